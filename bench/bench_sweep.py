"""Benchmark of `ssi sweep` (issue 14): a 20 x 20 ODE escape-time sweep of he2_L1 over (eta, d)
on the local process pool, with its CSV and figure, against the same sweep in one process
(workers = 1) and a serial loop of Model.solve over the same 400 points (and a check that all
three give the same numbers). The sweep stops each ODE run at the escape when only the escape
time is asked for; Model.solve runs to convergence (alignment, fixed point), so the speed-up
over the loop counts both that and the pool. The modules are copied to a
temporary folder (never into generated/); the CSV and the figure go there too unless --plot.

Run: python bench/bench_sweep.py [--n 20] [--workers N] [--plot FILE.png]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "derivations" / "he2_L1.toml"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20, help="points per axis (20: 400 points)")
    ap.add_argument("--workers", type=int, default=None, help="local processes (all cores)")
    ap.add_argument("--plot", default=None, help="figure path (default: the temporary folder)")
    args = ap.parse_args()
    import ssi_symbolic as ssi
    tmp = Path(tempfile.mkdtemp(prefix="ssi-bench-sweep-"))
    gen = tmp / "generated"
    gen.mkdir()
    shutil.copy(ROOT / "generated" / "he2_L1.py", gen / "he2_L1.py")
    model = ssi.Model(SPEC, gen)
    model.module                      # derive here if the copy is out of date (not timed)
    grid = [f"eta=0.02:0.3:{args.n}", f"d=1e3:1e5:{args.n}:log"]
    plot = args.plot or str(tmp / "sweep.png")
    print(f"he2_L1: ODE escape time on a {args.n} x {args.n} grid over (eta, d), "
          f"{os.cpu_count()} cores", flush=True)

    t0 = time.perf_counter()
    res = model.sweep(grid, "escape_time", out=tmp / "sweep.csv", plot=plot,
                      workers=args.workers)
    t_sweep = time.perf_counter() - t0
    print(f"sweep ({res['executor']}, CSV and figure): {t_sweep:6.2f} s for {res['points']} "
          f"points ({1e3 * t_sweep / res['points']:.1f} ms/point)", flush=True)

    t0 = time.perf_counter()
    one = model.sweep(grid, "escape_time", out=tmp / "serial.csv", plot=tmp / "serial.png",
                      workers=1)
    t_one = time.perf_counter() - t0
    print(f"the same sweep in one process:     {t_one:6.2f} s", flush=True)

    t0 = time.perf_counter()
    serial = {}
    for e in res["grid"]["eta"]:
        for d in res["grid"]["d"]:
            serial[(e, d)] = model.solve(eta=e, d=d)["escape_time"]
    t_serial = time.perf_counter() - t0
    print(f"serial loop of Model.solve:        {t_serial:6.2f} s", flush=True)
    same = all(r["value"] == serial[(r["eta"], r["d"])] for r in res["rows"]) and \
        [r["value"] for r in one["rows"]] == [r["value"] for r in res["rows"]]
    print(f"speed-up over the serial loop {t_serial / t_sweep:.2f}x (over the one-process "
          f"sweep {t_one / t_sweep:.2f}x: the pool alone); identical escape times: {same}; "
          f"target < 30 s: {'met' if t_sweep < 30 else 'missed'}")
    print(f"figure {plot} ({os.path.getsize(plot)} bytes); table {tmp / 'sweep.csv'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
