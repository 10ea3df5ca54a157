"""Several directions (MATH.md section 8): cold derivation times and drift throughput.

    python3 bench/bench_multi.py [--skip-k4]

Prints, each in a fresh process (cold caches):
- the soft committee with erf(x/sqrt 2), K = K* = 2, drift-only module (target < 10 s);
- a polynomial committee sum_k He2(z_k)/sqrt 2 with K = K* = 4 (plain SGD), the full module with
  Cov(G) (target < 60 s);
- the generated drift's throughput on 10^6 states (one vectorised call) for both.
Modules are written to a temporary folder, never to generated/.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "erf committee K = K* = 2 (drift only)": dict(
        L=1, teacher="erf(z1_1 / sqrt(2)) + erf(z2_1 / sqrt(2))", K=2, spherical=False,
        diffusion=False),
    "He2 committee K = K* = 4 (full, with Cov(G))": dict(
        L=1, teacher=" + ".join(f"He(2, z{k}_1) / sqrt(2)" for k in range(1, 5)), K=4,
        spherical=False, diffusion=True),
}

CHILD = textwrap.dedent("""
    import json, sys, time
    import numpy as np
    from ssi_symbolic.model.spec import make_spec
    from ssi_symbolic.backends.registry import ensure_module
    from ssi_symbolic.numeric.ode import OverlapODE, random_start
    case, out = json.loads(sys.argv[1]), sys.argv[2]
    spec = make_spec("bench_multi", case["L"], case["teacher"], teacher_directions=case["K"],
                     student_directions=case["K"], spherical=case["spherical"])
    t0 = time.perf_counter()
    mod = ensure_module(spec, out, diffusion=case["diffusion"])
    cold = time.perf_counter() - t0
    ode = OverlapODE(mod, 0.1, {})
    rng = np.random.default_rng(0)
    X = np.stack([random_start(ode, 1000, seed=s) for s in range(8)], axis=1)
    X = X[:, rng.integers(0, 8, 10 ** 6)]
    t0 = time.perf_counter()
    mod.drift(*X, eta=0.1)
    rate = 10 ** 6 / (time.perf_counter() - t0)
    print(json.dumps({"cold_s": cold, "states_per_s": rate, "method": mod.METHOD}))
""")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-k4", action="store_true", help="only the erf committee")
    args = ap.parse_args()
    import json
    print(f"{'model':48} {'cold derivation':>16} {'drift, 10^6 states':>20}  method")
    for name, case in CASES.items():
        if args.skip_k4 and case["K"] == 4:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            res = subprocess.run([sys.executable, "-c", CHILD, json.dumps(case), tmp],
                                 capture_output=True, text=True, cwd=ROOT)
        if res.returncode:
            last = (res.stderr.strip().splitlines() or [f"exit code {res.returncode}"])[-1]
            print(f"{name:48} failed: {last}", flush=True)
            continue
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"{name:48} {r['cold_s']:14.1f} s {1e6 / r['states_per_s']:17.2f} s  {r['method']}",
              flush=True)


if __name__ == "__main__":
    main()
