"""Sweep grids: parsing `name=start:stop:count` / `name=a,b,c`, the variables a sweep may vary,
the points in grid order and the deterministic seed of each point.

A grid variable is a spec parameter, the learning rate `eta`, the dimension `d`, the sequence
length `L` (the spec re-instantiated at that L, `ModelSpec.with_length`), the mini-batch size
`batch` (the spec re-instantiated with [training] batch = b, MATH.md section 9) or the escape
`threshold`.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math

import numpy as np

from ...errors import SpecError

#: grid variables every spec has (besides its own parameters)
BUILTIN = ("eta", "d", "L", "batch", "threshold")


def _number(text: str, where: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise SpecError(f"{where}: '{text.strip()}' is not a number") from None
    if not math.isfinite(v):
        raise SpecError(f"{where}: '{text.strip()}' is not a finite number")
    return v


def parse_grid(text: str) -> tuple[str, list[float]]:
    """(name, values) of one grid: `name=start:stop:count` (count values, both ends included,
    evenly spaced; `name=start:stop:count:log` spaces them geometrically) or `name=v1,v2,...`
    (the values as given, in that order). SpecError with a one-line message otherwise."""
    where = f"--grid {text}"
    if not isinstance(text, str) or "=" not in text:
        raise SpecError(f"{where}: expected name=start:stop:count or name=v1,v2,...")
    name, spec = (s.strip() for s in text.split("=", 1))
    if not name.isidentifier():
        raise SpecError(f"{where}: '{name}' is not a variable name")
    if not spec:
        raise SpecError(f"{where}: no values after '='")
    if ":" in spec:
        parts = [p.strip() for p in spec.split(":")]
        log = len(parts) == 4 and parts[3] == "log"
        if len(parts) not in (3, 4) or (len(parts) == 4 and not log):
            raise SpecError(f"{where}: expected start:stop:count or start:stop:count:log")
        start, stop = _number(parts[0], where), _number(parts[1], where)
        try:
            count = int(parts[2])
        except ValueError:
            raise SpecError(f"{where}: the count '{parts[2]}' is not an integer") from None
        if count < 1 or (count == 1 and start != stop):
            raise SpecError(f"{where}: the count must be >= 2 (1 only when start = stop), "
                            f"got {count}")
        if log:
            if start <= 0 or stop <= 0:
                raise SpecError(f"{where}: a log grid needs start and stop > 0")
            values = np.geomspace(start, stop, count)
            values[0], values[-1] = start, stop
        else:
            values = np.linspace(start, stop, count)
        values = [float(v) for v in values]
    else:
        values = [_number(v, where) for v in spec.split(",") if v.strip()]
        if not values:
            raise SpecError(f"{where}: no values after '='")
    if len(set(values)) != len(values):
        raise SpecError(f"{where}: a value appears twice")
    return name, values


def as_grids(grid) -> list[tuple[str, list[float]]]:
    """The grids of a sweep, in the order given, from strings ("eta=0.02:0.3:15"), (name,
    values) pairs or a dict {name: values}. SpecError for a name given twice or no grid."""
    if isinstance(grid, (str, tuple)):
        grid = [grid]
    items = list(grid.items()) if isinstance(grid, dict) else list(grid or [])
    out = []
    for g in items:
        if isinstance(g, str):
            name, values = parse_grid(g)
        else:
            name, vals = g
            vals = [vals] if np.isscalar(vals) else list(vals)
            values = [_number(str(v), f"grid {name}") for v in vals]
            if not values:
                raise SpecError(f"grid {name}: no values")
            if len(set(values)) != len(values):
                raise SpecError(f"grid {name}: a value appears twice")
        out.append((str(name), values))
    if not out:
        raise SpecError("sweep: give at least one grid (--grid name=start:stop:count)")
    names = [n for n, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SpecError(f"--grid {dup[0]}: given twice")
    return out


def check_grid_variables(grids, spec, fixed_params=()) -> None:
    """Refuse what cannot be swept on this spec: unknown names, a spec parameter named like a
    built-in variable, a name also fixed with
    --param, and values out of range (eta <= 0, d < 1, threshold <= 0, L not in 1..64, batch
    not a positive integer)."""
    params = tuple(spec.parameters)
    for name, values in grids:
        if name in params and name in BUILTIN:
            raise SpecError(f"--grid {name}: ambiguous, the spec has a parameter named "
                            f"'{name}' besides the built-in variable; rename the parameter")
        if name not in BUILTIN and name not in params:
            raise SpecError(f"--grid {name}: unknown variable '{name}' (this spec's parameters: "
                            f"{', '.join(params) or 'none'}; also {', '.join(BUILTIN)})")
        if name in fixed_params:
            raise SpecError(f"--grid {name}: also given with --param; give it once")
        bad = None
        if name == "eta":
            bad = next((v for v in values if not v > 0), None)
            why = "the learning rate must be > 0"
        elif name == "d":
            bad = next((v for v in values if not v >= 1), None)
            why = "the dimension must be >= 1"
        elif name == "threshold":
            bad = next((v for v in values if not v > 0), None)
            why = "the escape threshold must be > 0"
        elif name == "L":
            bad = next((v for v in values if not (float(v).is_integer() and 1 <= v <= 64)),
                       None)
            why = "sequence lengths are integers 1..64"
        elif name == "batch":
            bad = next((v for v in values if not (float(v).is_integer() and 1 <= v <= 10 ** 6)),
                       None)
            why = "batch sizes are integers >= 1"
        if bad is not None:
            raise SpecError(f"--grid {name}: {bad:g}: {why}")


def points(grids) -> list[dict]:
    """Every point of the grid as {name: value}, in grid order: the first variable varies
    slowest (itertools.product over the grids in the order given)."""
    names = [n for n, _ in grids]
    return [dict(zip(names, combo)) for combo in itertools.product(*[v for _, v in grids])]


def point_seed(seed: int, coords: dict) -> int:
    """The seed of one grid point: a numpy SeedSequence over the sweep seed and a sha256 of the
    point's coordinates (sorted by name, each value as float.hex), reduced to a 63-bit integer.
    It depends on nothing else (not on the grid's order, the executor or the other points), so a
    point gets the same random numbers locally and on a cluster."""
    if isinstance(seed, bool) or int(seed) != seed or seed < 0:
        raise SpecError(f"--seed: expected an integer >= 0, got {seed!r}")
    key = json.dumps(sorted((k, float(v).hex()) for k, v in coords.items()))
    digest = hashlib.sha256(key.encode()).digest()
    words = [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4)]
    state = np.random.SeedSequence([int(seed)] + words).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


__all__ = ["BUILTIN", "parse_grid", "as_grids", "check_grid_variables",
           "points", "point_seed"]
