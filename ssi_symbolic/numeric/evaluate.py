"""Numerical evaluation of a spec's generated module at one state (no SymPy at run time).

Checks every number (model.checks) before anything is generated or written.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..model.checks import as_spec, check_eta_d, check_params, check_state

DEFAULT_ETA = 0.05
DEFAULT_D = 1000


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
    from ..backends.contract import why_not
    no_diffusion = why_not(mod, "diffusion")   # a drift-only module says why
    D = None if no_diffusion else mod.diffusion(*args, eta=eta, d=d, **pvals)
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
        "diffusion": None if D is None else [[_f(D[i][j]) for j in range(len(names))]
                                             for i in range(len(names))],
        "diffusion_unavailable": no_diffusion,
        "method": mod.METHOD,
        "methods": dict(mod.OUTPUT_METHODS),
        "loss_kind": spec.loss,
    }
    if mod.METHOD == "quadrature":
        _, err = mod.quadrature_error(mod.population_loss, *args, **pvals)
        _, derr = mod.quadrature_error(lambda *a, **k: np.array(mod.drift(*a, **k)),
                                       *args, eta=eta, **pvals)
        out["quadrature"] = {
            "nodes_per_dimension": mod.QUADRATURE_NODES,
            # the k-dimensional rules' counts where they differ from nodes_per_dimension
            "nodes_per_dimension_by_rule_dimension": {
                str(k): mod._nodes(k)
                for k in sorted(getattr(mod, "QUADRATURE_NODE_FACTORS", {}))},
            # rule dimension -> its nodes per dimension, for the rules whose count no probe
            # showed to meet QUADRATURE_TOLERANCE when the module was written
            "unverified_rule_dimensions": {
                str(k): n for k, n in sorted(getattr(mod, "QUADRATURE_UNVERIFIED", {}).items())},
            "loss_error_estimate": _f(err),
            "drift_error_estimate": {k: _f(e) for k, e in zip(names, np.ravel(derr))},
            "how": (f"{float(getattr(mod, 'QUADRATURE_ERROR_FACTOR', 1.0)):g} |value(n) - "
                    "value(2n)| of the tensor trapezoidal rule (n nodes per dimension on "
                    "[-10, 10]; the 2n rule on [-14, 14], and where the two differ by 0.1 % "
                    "or more also 3n nodes on [-20, 20], the larger difference) plus a "
                    "round-off floor"),
        }
    return out
