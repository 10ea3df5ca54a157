"""Error estimates and evaluation times of generated modules side by side: for each module,
quadrature_error (value, bound) of the loss, the drift and Cov(G) at two states, the time of
one such call, and the largest difference between the first and the last module's values.

    python3 bench/module_accuracy.py OLD.py NEW.py [--eta 0.5] [--states "0.3,0.2,-0.1;..."]

The default states: m = 0.3 with the other overlaps 0.15 and q = 1.1, and m = -0.6 with -0.1
and q = 0.8 (in the order of the first module's OVERLAPS)."""
from __future__ import annotations

import argparse
import importlib.util
import time

import numpy as np


def load(path):
    spec = importlib.util.spec_from_file_location(f"mod{abs(hash(path))}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def default_states(names):
    return [tuple({"m": 0.3, "q": 1.1}.get(n[0], 0.15) for n in names),
            tuple({"m": -0.6, "q": 0.8}.get(n[0], -0.1) for n in names)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("modules", nargs="+")
    p.add_argument("--eta", type=float, default=0.5)
    p.add_argument("--states", help="states as 'a,b,c;d,e,f' in the order of OVERLAPS")
    args = p.parse_args(argv)
    mods = [load(m) for m in args.modules]
    states = ([tuple(float(x) for x in s.split(",")) for s in args.states.split(";")]
              if args.states else default_states(mods[0].OVERLAPS))
    for st in states:
        for name in ("population_loss", "drift", "covariance"):
            row = []
            for mod in mods:
                kw = {} if name == "population_loss" else {"eta": args.eta}
                t0 = time.perf_counter()
                value, bound = mod.quadrature_error(getattr(mod, name), *st, **kw)
                row.append((np.asarray(value, float), float(np.max(np.abs(bound))),
                            time.perf_counter() - t0))
            diff = float(np.max(np.abs(row[0][0] - row[-1][0])))
            print(f"{name:16s} {st}  " + " | ".join(f"bound {b:.2e}  {t:.2f} s" for _, b, t in row)
                  + f" | largest difference {diff:.2e}")


if __name__ == "__main__":
    main()
