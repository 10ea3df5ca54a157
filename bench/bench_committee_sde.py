"""The K = K* = 2 erf committee (Saad and Solla) at d = 1000: ODE, SDE and simulator escape times
from random starts (issue 12's acceptance), and the cost of its Cov(G).

1. Cov(G) evaluation: one call on 1, 200 and 1000 states (the eta^4 part holds 175 orthant
   probabilities, Plackett integrals evaluated in one batched call per module call).
2. Escape from the symmetric plateau (theta = 0.7, above its overlaps of about 0.45),
   eta = 0.5, d = 1000, every run from its own random-like start (MATH.md 8):
   - the ODE from each of --starts random-like starts (start seeds 0, 1, ...);
   - the exact reduced simulator, --seeds seeds (random unit students);
   - `ssi sde --random-starts` with --runs paths at each --dt.
   Prints the quartiles and medians of each and the wall times.

The shipped module is copied into a temporary folder (never written into generated/).

Run: python3 bench/bench_committee_sde.py [--starts 64] [--seeds 64] [--runs 200]
     [--dt 0.1,0.05]
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "derivations" / "committee_erf_K2.toml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--starts", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=64)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--dt", default="0.1,0.05")
    args = ap.parse_args()
    from ssi_symbolic import Model
    from ssi_symbolic.backends.registry import ensure_module
    from ssi_symbolic.model.spec import load_spec
    eta, d, theta = 0.5, 1000, 0.7
    q = lambda x: "[" + ", ".join(f"{v:.1f}" for v in np.percentile(x, [25, 50, 75])) + "]"
    with tempfile.TemporaryDirectory() as tmp:
        for f in (ROOT / "generated").glob("committee_erf_K2*.py"):
            shutil.copy(f, tmp)
        mod = ensure_module(load_spec(SPEC), Path(tmp))
        rng = np.random.default_rng(0)
        for n in (1, 200, 1000):
            X = [0.3 + 0.1 * rng.standard_normal(n) for _ in range(4)] + [
                1 + 0.1 * rng.standard_normal(n), 0.1 * rng.standard_normal(n),
                1 + 0.1 * rng.standard_normal(n)]
            mod.covariance(*X, eta=eta)
            t0 = time.perf_counter()
            for _ in range(5):
                mod.covariance(*X, eta=eta)
            dt = (time.perf_counter() - t0) / 5
            print(f"Cov(G) on {n:5d} states: {dt * 1e3:8.1f} ms ({dt / n * 1e3:.3f} ms per state)",
                  flush=True)
        model = Model(SPEC, tmp)
        t0 = time.perf_counter()
        ode = np.array([model.solve(eta, d, threshold=theta, start_seed=s)["escape_time"]
                        for s in range(args.starts)], dtype=float)
        print(f"ODE, {args.starts} random starts: quartiles {q(ode)}  "
              f"({time.perf_counter() - t0:.1f} s)", flush=True)
        t0 = time.perf_counter()
        res = model.simulate(eta, d, 400_000, seeds=args.seeds, seed=1, method="reduced",
                             stop_when_escaped=True, threshold=theta)
        sim = np.asarray(res.escape_times["escape"], dtype=float)
        print(f"reduced simulator, {args.seeds} seeds: quartiles {q(sim)}, escaped "
              f"{np.isfinite(sim).mean():.2f}  ({time.perf_counter() - t0:.1f} s)", flush=True)
        for step in (float(x) for x in args.dt.split(",")):
            t0 = time.perf_counter()
            r = model.sde(eta, d, runs=args.runs, seed=2, threshold=theta, dt=step,
                          random_starts=True)
            print(f"SDE, {args.runs} paths, dt = {step:g}: median {r['median']:.1f}, quartiles "
                  f"[{r['quartiles'][0]:.1f}, {r['quartiles'][1]:.1f}], escaped "
                  f"{r['escaped_fraction']:.2f}  ({time.perf_counter() - t0:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
