"""Benchmark of the symbolic core (issue 2). Prints, for every spec in derivations/:

- cold: derivation + code generation in a fresh Python process (SymPy caches empty), target < 5 s;
- cached: `generate` when the module is up to date (hash check only) plus import;
- drift throughput of the generated module on 10^6 states, target >= 10^6 states/s for
  polynomial (exact) models.

Run: python bench/bench_derive.py [--states 1000000] [--only NAME]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

COLD = """
import json, sys, time
t0 = time.perf_counter()
from ssi_symbolic.model.spec import load_spec
from ssi_symbolic.backends.registry import generate
spec = load_spec(sys.argv[1])
t1 = time.perf_counter()
path, written = generate(spec, sys.argv[2], force=True)
t2 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "derive_codegen": t2 - t1, "path": str(path)}))
"""


def states(names, n, rng):
    k = len([x for x in names if x != "q"])
    v = rng.normal(size=(k, n))
    v *= rng.uniform(0, 1, n) ** (1 / k) / np.linalg.norm(v, axis=0)
    out = list(v)
    if "q" in names:
        out.append(np.ones(n))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--states", type=int, default=10 ** 6)
    ap.add_argument("--only", default=None)
    args = ap.parse_args()
    from ssi_symbolic.backends.registry import generate
    from ssi_symbolic.backends.files import load_module
    from ssi_symbolic.model.spec import load_spec

    rng = np.random.default_rng(0)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for f in sorted((ROOT / "derivations").glob("*.toml")):
            if args.only and args.only not in f.stem:
                continue
            res = subprocess.run([sys.executable, "-c", COLD, str(f), tmp], capture_output=True,
                                 text=True, check=True)
            cold = json.loads(res.stdout)
            spec = load_spec(f)
            t0 = time.perf_counter()
            path, written = generate(spec, tmp)
            mod = load_module(path)
            cached = time.perf_counter() - t0
            assert not written
            st = states(mod.OVERLAPS, args.states, rng)
            mod.drift(*[x[:10] for x in st], eta=0.05)  # warm-up
            t0 = time.perf_counter()
            mod.drift(*st, eta=0.05)
            dt = time.perf_counter() - t0
            rows.append((spec.name, mod.METHOD, cold["derive_codegen"], cached,
                         args.states / dt))
    print(f"{'spec':24} {'method':10} {'cold [s]':>9} {'cached [s]':>10} "
          f"{'drift states/s':>15}  targets: cold < 5 s, >= 1e6 states/s (exact)")
    ok = True
    for name, method, cold, cached, thr in rows:
        flag = ""
        if cold >= 5 or (method == "exact" and thr < 1e6):
            flag, ok = "  MISSED", False
        print(f"{name:24} {method:10} {cold:9.2f} {cached:10.4f} {thr:15.3g}{flag}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
