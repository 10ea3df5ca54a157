"""Numerical evaluation of a spec's generated module at one state (no SymPy at run time).

Checks every number before anything is generated or written: the state must lie in the unit ball
(spherical: m^2 + |e|^2 <= 1; plain: m^2 + |e|^2 <= q), eta > 0 and d >= 1.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..errors import SpecError, StateError
from ..model.spec import ModelSpec, load_spec

DEFAULT_ETA = 0.05
DEFAULT_D = 1000


def as_spec(spec_or_path) -> ModelSpec:
    return spec_or_path if isinstance(spec_or_path, ModelSpec) else load_spec(spec_or_path)


def check_state(spec: ModelSpec, at: dict) -> dict:
    """The full state (m, e..., q) as floats, missing entries 0 (q: 1), validated."""
    names = spec.overlap_names
    unknown = [k for k in at if k not in names]
    if unknown:
        raise StateError(f"unknown overlap '{unknown[0]}' (this spec's overlaps: "
                         f"{', '.join(names)})")
    state = {}
    for k in names:
        v = at.get(k, 1.0 if k == "q" else 0.0)
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise StateError(f"overlap {k}: expected a number, got {v!r}") from None
        if not math.isfinite(v):
            raise StateError(f"overlap {k}: expected a finite number, got {v!r}")
        state[k] = v
    radius2 = sum(v * v for k, v in state.items() if k != "q")
    q = state.get("q", 1.0)
    if not spec.spherical and q <= 0:
        raise StateError(f"overlap q = {q} must be > 0 (q is the squared norm |w|^2/d)")
    if radius2 > q * (1 + 1e-12):
        where = "the unit ball" if spec.spherical else "the ball m^2 + |e|^2 <= q"
        raise StateError(f"state {state} lies outside {where}: m^2 + |e|^2 = {radius2:.6g}")
    return state


def check_eta_d(eta, d):
    if eta is not None and not (math.isfinite(eta) and eta > 0):
        raise StateError(f"eta = {eta}: the learning rate must be > 0")
    if d is not None and not (math.isfinite(d) and d >= 1):
        raise StateError(f"d = {d}: the dimension must be >= 1")


def check_params(spec: ModelSpec, params: dict | None) -> dict:
    """Parameter values: the spec's defaults overridden by `params` (names checked)."""
    out = {k: float(v) for k, v in spec.parameters.items()}
    for k, v in (params or {}).items():
        if k not in out:
            raise SpecError(f"unknown parameter '{k}' (this spec's parameters: "
                            f"{', '.join(out) or 'none'})")
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            raise SpecError(f"parameter {k}: expected a number, got {v!r}") from None
    return out


def _f(x) -> float | None:
    x = float(np.asarray(x))
    return x if math.isfinite(x) else None


def evaluate(spec_or_path, at: dict, eta: float = DEFAULT_ETA, d: float = DEFAULT_D,
             params: dict | None = None, out_dir="generated") -> dict:
    """Loss, drift (total, O(eta), O(eta^2) parts) and diffusion D = Cov(G)/d at one state.

    The O(eta) entry is eta E[G1] and the O(eta^2) entry eta^2 E[G2], so drift is their sum.
    Returns the JSON object of `ssi evaluate --json`.
    """
    from ..backends.registry import ensure_module

    spec = as_spec(spec_or_path)
    state = check_state(spec, at)
    check_eta_d(eta, d)
    pvals = check_params(spec, params)
    mod = ensure_module(spec, Path(out_dir))
    args = [state[k] for k in spec.overlap_names]
    names = list(spec.overlap_names)
    d1 = mod.drift_eta1(*args, **pvals)
    d2 = mod.drift_eta2(*args, **pvals)
    D = mod.diffusion(*args, eta=eta, d=d, **pvals)
    out = {
        "spec": spec.name,
        "overlaps": names,
        "state": state,
        "parameters": pvals,
        "eta": eta,
        "d": d,
        "loss": _f(mod.population_loss(*args, **pvals)),
        "drift": {k: _f(eta * a + eta ** 2 * b) for k, a, b in zip(names, d1, d2)},
        "drift_eta1": {k: _f(eta * a) for k, a in zip(names, d1)},
        "drift_eta2": {k: _f(eta ** 2 * b) for k, b in zip(names, d2)},
        "diffusion": [[_f(D[i][j]) for j in range(len(names))] for i in range(len(names))],
        "method": mod.METHOD,
        "loss_kind": spec.loss,
    }
    if mod.METHOD == "quadrature":
        _, err = mod.quadrature_error(mod.population_loss, *args, **pvals)
        _, derr = mod.quadrature_error(lambda *a, **k: np.array(mod.drift(*a, **k)),
                                       *args, eta=eta, **pvals)
        out["quadrature"] = {
            "nodes_per_dimension": mod.QUADRATURE_NODES,
            "loss_error_estimate": _f(err),
            "drift_error_estimate": {k: _f(e) for k, e in zip(names, np.ravel(derr))},
            "how": "difference between n and 2n Gauss-Hermite nodes per dimension",
        }
    return out
