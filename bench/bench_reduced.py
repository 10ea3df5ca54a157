"""Benchmark of the exact reduced simulator (MATH.md section 10, issue 13).

1. Per-seed cost of one SGD step at d = 10^4, full (d-dimensional, 8 seeds) against reduced
   (the overlap chain, 1000 seeds; NumPy engine, and the compiled numba engine when Numba is
   installed), for he2_L1 and tied_network_he2_L2: the CPU time of n extra steps,
   (T(2n) - T(n)) / (n S), best of three, so the setup (frames, initial weights, module import,
   compilation) is not counted. Target ratio >= 1000.
2. Wall time of 1000 seeds to escape (||(m, e)|| >= 0.5 from m0 = 1/sqrt(d)) at d = 10^5 for
   he2_L1, eta = 0.1, with the reduced simulator: --engine numba (the default when Numba is
   installed; seeds on one thread per core, each seed stopped at its own escape) or numpy (the
   seeds split over --jobs processes); the median escape time next to the ODE's. Target
   < 3 minutes on 2 cores.

Modules are copied into a temporary directory (never written into generated/).

Run: python bench/bench_reduced.py [--d-step 10000] [--d 100000] [--seeds 1000] [--jobs 2]
     [--eta 0.1] [--engine numba|numpy] [--skip-escape]
"""
from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _timed(spec, gen, method, d, steps, seeds, eta, engine="numpy"):
    """CPU seconds of one simulate call (process time, all threads: less sensitive than the
    wall clock to other jobs on a shared machine)."""
    from ssi_symbolic.numeric.simulate import simulate
    t0 = time.process_time()
    simulate(spec, eta, d, steps, seeds=seeds, seed=1, out_dir=gen, progress=False,
             method=method, record_every=10 ** 9, engine=engine)
    return time.process_time() - t0


def step_cost(spec, gen, method, d, steps, seeds, eta, repeat=3, engine="numpy"):
    """CPU seconds per step and seed: (T(2 steps) - T(steps)) / (steps seeds), with the best of
    `repeat` timings of each."""
    _timed(spec, gen, method, d, 2, seeds, eta, engine)              # warm-up (compilation)
    t2 = min(_timed(spec, gen, method, d, 2 * steps, seeds, eta, engine) for _ in range(repeat))
    t1 = min(_timed(spec, gen, method, d, steps, seeds, eta, engine) for _ in range(repeat))
    return (t2 - t1) / (steps * seeds)


def _escape_job(args):
    path, gen, eta, d, steps, seeds, seed, engine = args
    from ssi_symbolic.model.spec import load_spec
    from ssi_symbolic.numeric.simulate import simulate
    res = simulate(load_spec(path), eta, d, steps, seeds=seeds, seed=seed, out_dir=gen,
                   progress=False, method="reduced", stop_when_escaped=True,
                   record_every=10 ** 9, engine=engine, records_after_escape=False)
    return res.escape_times["escape"], res.steps_run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-step", type=int, default=10_000, help="d of the per-step costs")
    ap.add_argument("--d", type=int, default=100_000, help="d of the escape run")
    ap.add_argument("--seeds", type=int, default=1000)
    ap.add_argument("--jobs", type=int, default=2, help="processes for the escape run")
    ap.add_argument("--eta", type=float, default=0.1)
    ap.add_argument("--engine", choices=("numba", "numpy"), default=None,
                    help="engine of the escape run (default: numba when installed)")
    ap.add_argument("--skip-escape", action="store_true")
    args = ap.parse_args()
    from ssi_symbolic.analysis.predict import predict_solve
    from ssi_symbolic.model.spec import load_spec
    from ssi_symbolic.numeric.compiled import numba_available
    fast = numba_available()
    engine = args.engine or ("numba" if fast else "numpy")

    gen = Path(tempfile.mkdtemp(prefix="ssi-bench-reduced-"))       # never into generated/
    for f in (ROOT / "generated").glob("*.py"):
        shutil.copy(f, gen / f.name)

    print(f"1. per-seed CPU cost of one step at d = {args.d_step} (eta = {args.eta})")
    print(f"{'spec':22} {'full [us]':>10} {'reduced [us]':>13} {'ratio':>8}"
          + (f" {'numba [us]':>11} {'ratio':>8}" if fast else "  (numba not installed)"),
          flush=True)
    for name in ("he2_L1", "tied_network_he2_L2"):
        spec = load_spec(ROOT / "derivations" / f"{name}.toml")
        full = step_cost(spec, gen, "full", args.d_step, 100, 8, args.eta)
        red = step_cost(spec, gen, "reduced", args.d_step, 2000, 1000, args.eta)
        line = f"{name:22} {1e6 * full:10.2f} {1e6 * red:13.4f} {full / red:8.0f}"
        if fast:
            nb = step_cost(spec, gen, "reduced", args.d_step, 20_000, 1000, args.eta,
                           engine="numba")
            line += f" {1e6 * nb:11.4f} {full / nb:8.0f}"
        print(line, flush=True)

    if args.skip_escape:
        return 0
    path = ROOT / "derivations" / "he2_L1.toml"
    ode = predict_solve(path, args.eta, args.d, out_dir=gen)["escape_time"]
    steps = int(math.ceil(4 * ode * args.d))
    jobs = 1 if engine == "numba" else max(1, min(args.jobs, args.seeds))
    split = np.array_split(np.arange(args.seeds), jobs)
    print(f"\n2. {args.seeds} seeds of he2_L1 to escape at d = {args.d}, eta = {args.eta}, "
          f"reduced, {engine} engine, "
          + ("one thread per core" if engine == "numba" else f"{jobs} processes")
          + f" (at most {steps} steps)", flush=True)
    t0 = time.perf_counter()
    work = [(str(path), str(gen), args.eta, args.d, steps, len(s), 1000 + j, engine)
            for j, s in enumerate(split)]
    if jobs == 1:
        out = [_escape_job(work[0])]
    else:
        with mp.get_context("fork").Pool(jobs) as pool:
            out = pool.map(_escape_job, work)
    wall = time.perf_counter() - t0
    tau = np.concatenate([o[0] for o in out])
    steps_run = max(o[1] for o in out)
    done = np.isfinite(tau)
    print(f"wall time {wall:.0f} s ({wall / 60:.1f} min); escaped {done.sum()}/{tau.size}; "
          f"steps run {steps_run} (t = {steps_run / args.d:.1f}); "
          f"{1e6 * wall / steps_run:.1f} us per step of the longest seed"
          + ("" if engine == "numba" else " (all processes in parallel)"))
    q = np.nanpercentile(tau, [5, 25, 50, 75, 95])
    print(f"escape time: median {q[2]:.3f}, quartiles [{q[1]:.3f}, {q[3]:.3f}], "
          f"5-95 % [{q[0]:.3f}, {q[4]:.3f}], max {np.nanmax(tau):.3f}; ODE {ode:.3f}")
    shutil.rmtree(gen, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
