"""Fits and robust statistics of escape times: t = a + k d^-1/2, t = a + b ln d, and the median
with the runs that did not escape counted as infinite."""
from __future__ import annotations

import math

import numpy as np


def median_inf(values) -> float:
    """Median with NaN (not escaped) counted as +infinity; NaN when the median is not reached."""
    v = np.where(np.isfinite(values), values, np.inf)
    med = float(np.median(v)) if v.size else math.nan
    return med if math.isfinite(med) else math.nan


def fit_sqrt(ds, ts) -> dict:
    """Least-squares fit t = a + k d^-1/2 over the finite points."""
    ds, ts = np.asarray(ds, float), np.asarray(ts, float)
    ok = np.isfinite(ts)
    if ok.sum() < 2:
        return {"a": None, "k": None, "points": int(ok.sum())}
    k, a = np.polyfit(1.0 / np.sqrt(ds[ok]), ts[ok], 1)
    return {"a": float(a), "k": float(k), "points": int(ok.sum())}


def fit_log(ds, ts) -> dict:
    """Least-squares fit t = a + b ln d over the finite points."""
    ds, ts = np.asarray(ds, float), np.asarray(ts, float)
    ok = np.isfinite(ts)
    if ok.sum() < 2:
        return {"a": None, "b": None, "points": int(ok.sum())}
    b, a = np.polyfit(np.log(ds[ok]), ts[ok], 1)
    return {"a": float(a), "b": float(b), "points": int(ok.sum())}


__all__ = ["median_inf", "fit_sqrt", "fit_log"]
