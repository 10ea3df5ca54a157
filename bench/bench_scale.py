"""Escape time against d at scale (issue 13's acceptance): the exact reduced simulator with
hundreds of seeds per d (the compiled numba engine), beside the ODE and the SDE median, and the
slope of the simulated medians in ln d against 1/(2c) from the leading drift.

For each spec (he2_L1 and tied_network_he2_L2 by default, eta = 0.1, from m0 = 1/sqrt(d), escape
at ||(m, e)|| >= 0.5): at every d of --ds, the ODE escape time, the SDE median over --runs paths,
and the median of --seeds reduced seeds (each stopped at its own escape, records_after_escape
False), with the relative difference of the simulated median from the SDE median and its
standard error (from the seeds' interquartile range: 1.253 sigma / sqrt(n) with sigma = IQR /
1.349). Then the least-squares fit t = a + b ln d of the simulated medians, against
b_expected = 1 / (2 c), c = eta a1 + eta^2 a2 the coefficient of the leading drift dm/dt ~ c m
(SIE 2; numeric.ode.leading_drift).

Modules are copied into a temporary directory (never written into generated/). Needs Numba
(the extra [fast]); --engine numpy runs the same with the NumPy engine (hours at d = 10^5).

Run: python bench/bench_scale.py [--specs he2_L1,tied_network_he2_L2] [--ds 1000,10000,100000]
     [--seeds 500] [--runs 2000] [--eta 0.1] [--engine numba]
"""
from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--specs", default="he2_L1,tied_network_he2_L2")
    ap.add_argument("--ds", default="1000,10000,100000")
    ap.add_argument("--seeds", type=int, default=500)
    ap.add_argument("--runs", type=int, default=2000, help="SDE paths per d")
    ap.add_argument("--eta", type=float, default=0.1)
    ap.add_argument("--engine", choices=("numba", "numpy"), default="numba")
    args = ap.parse_args()
    from ssi_symbolic.analysis.predict import predict_sde, predict_solve
    from ssi_symbolic.backends.registry import ensure_module
    from ssi_symbolic.model.spec import load_spec
    from ssi_symbolic.numeric.ode import leading_drift
    from ssi_symbolic.numeric.simulate import simulate
    from ssi_symbolic.report.fits import fit_log

    gen = Path(tempfile.mkdtemp(prefix="ssi-bench-scale-"))          # never into generated/
    for f in (ROOT / "generated").glob("*.py"):
        shutil.copy(f, gen / f.name)
    ds = [int(float(x)) for x in args.ds.split(",")]
    eta = args.eta
    for name in args.specs.split(","):
        path = ROOT / "derivations" / f"{name}.toml"
        spec = load_spec(path)
        mod = ensure_module(spec, gen)
        pvals = {k: float(v) for k, v in spec.parameters.items()}
        p1, a1, p2, a2 = leading_drift(mod, pvals)
        c = eta * a1 + (eta * eta * a2 if p2 == p1 else 0.0)
        print(f"\n{name}: eta = {eta}, leading drift dm/dt ~ c m^{p1}, c = {c:.6g}, "
              f"expected slope 1/(2c) = {1 / (2 * c):.5g}", flush=True)
        print(f"{'d':>8} {'ODE':>8} {'SDE median':>11} {'sim median':>11} {'IQR':>17} "
              f"{'sim-SDE':>8} {'+-se':>6} {'escaped':>9} {'wall s':>7}", flush=True)
        meds = []
        for i, d in enumerate(ds):
            ode = predict_solve(path, eta, d, out_dir=gen)["escape_time"]
            sde = predict_sde(path, eta, d, runs=args.runs, seed=1 + i, out_dir=gen)["median"]
            t0 = time.perf_counter()
            steps = int(math.ceil(6 * ode * d))
            res = simulate(spec, eta, d, steps, seeds=args.seeds, seed=100 + i, out_dir=gen,
                           progress=False, method="reduced", engine=args.engine,
                           stop_when_escaped=True, records_after_escape=False,
                           record_every=10 ** 12)
            wall = time.perf_counter() - t0
            tau = res.escape_times["escape"]
            q1, med, q3 = np.nanpercentile(tau, [25, 50, 75])
            se = 1.2533 * (q3 - q1) / 1.349 / math.sqrt(np.isfinite(tau).sum())
            meds.append(med if np.isfinite(tau).all() else np.nan)
            print(f"{d:8d} {ode:8.3f} {sde:11.3f} {med:11.3f} [{q1:7.3f}, {q3:7.3f}] "
                  f"{100 * (med / sde - 1):+7.2f}% {100 * se / sde:5.2f}% "
                  f"{int(np.isfinite(tau).sum()):4d}/{tau.size:<4d} {wall:7.1f}", flush=True)
        fit = fit_log(ds, meds)
        if fit["b"] is not None:
            b = fit["b"]
            print(f"fit of the simulated medians: t = {fit['a']:.4g} + {b:.5g} ln d; "
                  f"1/(2c) = {1 / (2 * c):.5g}; {100 * (b * 2 * c - 1):+.2f} %", flush=True)
    shutil.rmtree(gen, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
