"""Validation of what a user passes with a spec: the spec itself (a path or a ModelSpec), a
state (inside the unit ball: m^2 + |e|^2 <= 1 spherical, <= q plain), eta > 0, d >= 1 and the
parameter values (names checked against the spec). Each raises one SSIError line naming the
value at fault."""
from __future__ import annotations

import math

from ..errors import SpecError, StateError
from .spec import ModelSpec, load_spec, overlap_index


def as_spec(spec_or_path) -> ModelSpec:
    """The ModelSpec itself, or the spec loaded from a TOML path."""
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
        if spec.multi:
            kind, a, b = overlap_index(k)
            diag = kind == "q" and a == b
        else:
            diag = k == "q"
        v = at.get(k, 1.0 if diag else 0.0)
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise StateError(f"overlap {k}: expected a number, got {v!r}") from None
        if not math.isfinite(v):
            raise StateError(f"overlap {k}: expected a finite number, got {v!r}")
        state[k] = v
    if spec.multi:
        _check_multi_state(spec, state)
        return state
    radius2 = sum(v * v for k, v in state.items() if k != "q")
    q = state.get("q", 1.0)
    if not spec.spherical and q <= 0:
        raise StateError(f"overlap q = {q} must be > 0 (q is the squared norm |w|^2/d)")
    if radius2 > q * (1 + 1e-12):
        where = "the unit ball" if spec.spherical else "the ball m^2 + |e|^2 <= q"
        raise StateError(f"state {state} lies outside {where}: m^2 + |e|^2 = {radius2:.6g}")
    return state


def _check_multi_state(spec: ModelSpec, state: dict) -> None:
    """StateError unless the overlaps M, E, Q of several directions are realisable by vectors:
    the covariance [[P, M^T, 0], [M, Q, E], [0, E^T, I]] of a token's fields (MATH.md section
    8) must be positive semi-definite."""
    import numpy as np
    Ks, K, r = spec.teacher_directions, spec.student_directions, spec.r
    n = Ks + K + r
    G = np.zeros((n, n))
    G[:Ks, :Ks] = np.array(spec.teacher_overlaps, dtype=float)
    G[Ks + K:, Ks + K:] = np.eye(r)
    for k in range(K):
        G[Ks + k, Ks + k] = 1.0
    for name, v in state.items():
        kind, a, b = overlap_index(name)
        i, j = {"m": (Ks + a, b), "e": (Ks + a, Ks + K + b), "q": (Ks + a, Ks + b)}[kind]
        G[i, j] = G[j, i] = v
    for k in range(K):
        if G[Ks + k, Ks + k] <= 0:
            raise StateError(f"overlap q{k + 1}_{k + 1} = {G[Ks + k, Ks + k]} must be > 0 "
                             f"(the squared norm |w_{k + 1}|^2/d)")
    low = float(np.min(np.linalg.eigvalsh(G)))
    if low < -1e-12:
        raise StateError(f"state {state} is not realisable by vectors: the covariance of the "
                         f"fields [[P, M^T, 0], [M, Q, E], [0, E^T, I]] has the eigenvalue "
                         f"{low:.6g} < 0")


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


def refuse_schedule(spec: ModelSpec, what: str) -> None:
    """SpecError naming training.schedule when `what` (a computation defined for a constant
    learning rate) is asked of a spec with a learning-rate schedule."""
    if spec.schedule is not None:
        raise SpecError(f"{spec.where('training.schedule')}: {what} is defined for a constant "
                        f"learning rate; remove the schedule (it is used by solve, sde and "
                        f"simulate)")


def refuse_multi(spec: ModelSpec, what: str) -> None:
    """SpecError naming the directions key when `what` (defined for one teacher and one
    student direction so far) is asked of a spec with several (MATH.md section 8)."""
    if spec.multi:
        key = "teacher.directions" if spec.teacher_directions > 1 else "student.directions"
        raise SpecError(f"{spec.where(key)}: {what} is not implemented for several directions "
                        f"yet (K* = {spec.teacher_directions}, K = {spec.student_directions}); "
                        f"solve, sde, simulate, evaluate, fixed-points, latex and sie are")


__all__ = ["as_spec", "check_state", "check_eta_d", "check_params", "refuse_schedule",
           "refuse_multi"]
