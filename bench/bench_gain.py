"""Benchmark of the tied/untied gain (issue 5): for each L, the ODE prediction of
tau_untied / tau_tied against real SGD of both students (median escape times over the seeds,
the simulated gain's range from the quartiles), with wall times. Rows print as they complete.

Run: python bench/bench_gain.py [--L 2,4,8] [--d 500] [--eta 0.05] [--seeds 8] [--seed 0]
     [--spec derivations/tied_network_he2_L2.toml]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(ROOT / "derivations" / "tied_network_he2_L2.toml"))
    ap.add_argument("--L", default="2,4,8")
    ap.add_argument("--d", type=int, default=500)
    ap.add_argument("--eta", type=float, default=0.05)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    from ssi_symbolic.analysis.gain import simulated_gain
    out = Path(tempfile.mkdtemp(prefix="ssi-bench-gain-"))  # never write into generated/
    print(f"{Path(args.spec).stem}: d = {args.d}, eta = {args.eta}, {args.seeds} seeds")
    print(f"{'L':>3} {'ODE tied':>9} {'sim tied':>9} {'ODE untied':>10} {'sim untied':>10} "
          f"{'ODE gain':>8} {'sim gain':>8} {'range':>17} {'inside':>6} {'wall [s]':>8}",
          flush=True)
    for L in (int(x) for x in args.L.split(",")):
        t0 = time.perf_counter()
        r = simulated_gain(args.spec, L, args.eta, args.d, args.seeds, args.seed, out_dir=out)
        lo, hi = r["sim_gain_range"]
        print(f"{L:>3} {r['tied']['ode']:9.2f} {r['tied']['sim_median']:9.2f} "
              f"{r['untied']['ode']:10.2f} {r['untied']['sim_median']:10.2f} "
              f"{r['ode_gain']:8.3f} {r['sim_gain']:8.3f} [{lo:7.3f},{hi:7.3f}] "
              f"{'yes' if r['inside'] else 'no':>6} {time.perf_counter() - t0:8.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
