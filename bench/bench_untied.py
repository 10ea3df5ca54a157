"""Cold derivation times of untied students at long L (issue 13): for each L, a fresh process
derives the untied student of the tied-network family (tied_network_he2_L2.toml
`.with_length(L).untied_student()`) and writes its module, drift-only and full (Cov(G) and the
O(1/d) drift), into a temporary folder; then `ssi gain SPEC --L 1,2,4,8,16` from a cold output
folder. Targets (issue 13): untied L = 16 drift-only < 10 s, full < 60 s; the gain < 2 min.

Run: python bench/bench_untied.py [--L 8,16,32] [--spec FILE] [--skip-gain]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import sys, time
from ssi_symbolic.model.spec import load_spec
from ssi_symbolic.backends.exact import generate
spec = load_spec(sys.argv[1]).with_length(int(sys.argv[2])).untied_student()
t = time.perf_counter()
path, _ = generate(spec, sys.argv[3], force=True, diffusion=sys.argv[4] == "full")
print(time.perf_counter() - t, path.stat().st_size)
"""


def cold(spec: str, L: int, kind: str, out: Path) -> tuple[float, float, int]:
    """(wall of the fresh process, derivation + code generation inside it, module bytes)."""
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", CHILD, spec, str(L), str(out), kind],
                       capture_output=True, text=True, check=True, cwd=ROOT)
    wall = time.perf_counter() - t
    inner, size = r.stdout.split()
    return wall, float(inner), int(size)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(ROOT / "derivations" / "tied_network_he2_L2.toml"))
    ap.add_argument("--L", default="8,16,32")
    ap.add_argument("--skip-gain", action="store_true")
    args = ap.parse_args()
    out = Path(tempfile.mkdtemp(prefix="ssi-bench-untied-"))  # never write into generated/
    print(f"{Path(args.spec).stem}, untied student, cold (fresh process, module written)")
    print(f"{'L':>3} {'module':>10} {'wall [s]':>9} {'derive+print [s]':>17} {'size [kB]':>10}",
          flush=True)
    for L in (int(x) for x in args.L.split(",")):
        for kind in ("drift-only", "full"):
            wall, inner, size = cold(args.spec, L, kind, out)
            print(f"{L:>3} {kind:>10} {wall:9.1f} {inner:17.1f} {size / 1e3:10.0f}", flush=True)
    if not args.skip_gain:
        gain_out = Path(tempfile.mkdtemp(prefix="ssi-bench-gain-"))
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "ssi_symbolic", "gain", args.spec,
                            "--L", "1,2,4,8,16", "--out", str(gain_out)],
                           capture_output=True, text=True, cwd=ROOT)
        wall = time.perf_counter() - t
        print(f"ssi gain --L 1,2,4,8,16 (cold output folder): {wall:.1f} s, exit {r.returncode}")
        print(r.stdout.strip()[-2000:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
