"""Formatting for the report: numbers in markdown (fmt), numbers and objects as plain JSON (num,
jsonable), markdown tables (table) and exceptions as one line (one_line)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np


def one_line(exc: BaseException) -> str:
    """`Type: first line of the message` of an exception."""
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}".rstrip(": ")


def fmt(v, spec=".4g") -> str:
    """A number for markdown ("-" for None, NaN and infinities)."""
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec)


def num(v):
    """A float for JSON (None for NaN / infinities / None)."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def jsonable(obj):
    """Numbers, lists, dicts, numpy values and Paths as plain JSON (NaN -> None)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return num(obj)
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)


def table(header: list, rows: list) -> str:
    """A markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


__all__ = ["one_line", "fmt", "num", "jsonable", "table"]
