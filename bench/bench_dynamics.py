"""Benchmark of the predictions (issue 3). For each spec: wall time of one ODE escape-time
prediction, of the SDE ensemble (1000 paths) and of the simulator (8 seeds to escape), and the
relative error of the ODE escape time and of the SDE median against the simulated median.
Target: the ODE at least 1000 times faster than the simulation, and within 10 percent of it.

Run: python bench/bench_dynamics.py [--d 10000] [--eta 0.12] [--seeds 8] [--seed 0]
     [--specs he2_L1,tied_network_he2_L2]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d", type=int, default=10_000)
    ap.add_argument("--eta", type=float, default=0.12)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0, help="base seed of the simulator")
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--specs", default="he2_L1,tied_network_he2_L2,tied_network_he2_L4")
    args = ap.parse_args()
    from ssi_symbolic.analysis.predict import predict_sde, predict_solve
    from ssi_symbolic.numeric.simulate import simulate
    from ssi_symbolic.model.spec import load_spec

    import shutil
    import tempfile
    print(f"d = {args.d}, eta = {args.eta}, {args.seeds} seeds, {args.runs} SDE paths")
    print(f"{'spec':22} {'ODE tau':>8} {'SDE med':>8} {'SDE IQR':>17} {'sim med':>8} "
          f"{'ODE err':>8} {'SDE err':>8} {'ODE [s]':>8} {'SDE [s]':>8} {'sim [s]':>8} "
          f"{'sim/ODE':>8}", flush=True)
    gen = Path(tempfile.mkdtemp(prefix="ssi-bench-"))  # never write into generated/
    for f in (ROOT / "generated").glob("*.py"):
        shutil.copy(f, gen / f.name)
    for name in args.specs.split(","):
        path = ROOT / "derivations" / f"{name}.toml"
        predict_solve(path, args.eta, args.d, out_dir=gen)  # warm-up (module import)
        t0 = time.perf_counter()
        ode = predict_solve(path, args.eta, args.d, out_dir=gen)
        t_ode = time.perf_counter() - t0
        t0 = time.perf_counter()
        sde = predict_sde(path, args.eta, args.d, runs=args.runs, out_dir=gen)
        t_sde = time.perf_counter() - t0
        steps = int(3 * ode["escape_time"] * args.d)
        t0 = time.perf_counter()
        sim = simulate(load_spec(path), args.eta, args.d, steps, seeds=args.seeds, seed=args.seed,
                       out_dir=gen, stop_when_escaped=True, record_every=args.d,
                       progress=sys.stderr.isatty())
        t_sim = time.perf_counter() - t0
        med = float(np.nanmedian(sim.escape_times["escape"]))
        tau, sm, q = ode["escape_time"], sde["median"], sde["quartiles"]
        print(f"{name:22} {tau:8.3f} {sm:8.3f} [{q[0]:7.3f},{q[1]:7.3f}] {med:8.3f} "
              f"{abs(tau - med) / med:8.1%} {abs(sm - med) / med:8.1%} {t_ode:8.3f} "
              f"{t_sde:8.3f} {t_sim:8.1f} {t_sim / t_ode:8.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
