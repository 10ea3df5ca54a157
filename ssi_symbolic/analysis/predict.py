"""One call per prediction, from a spec (path or ModelSpec) to the JSON object the CLI prints.

    predict_solve(spec, eta, d, ...)    ODE trajectory, escape/alignment times, phases, fixed point
    predict_sde(spec, eta, d, runs)     escape-time distribution of the finite-d SDE
    predict_max_lr(spec)                maximal learning rate and why
    predict_fixed_points(spec, eta)     fixed points of the drift with their stability
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import StateError
from ..numeric.ode import DEFAULT_THETA, OverlapODE, fixed_points, initial_state, max_learning_rate, solve
from ..model.checks import as_spec, check_eta_d, check_params, refuse_multi, refuse_schedule
from ..numeric.sde import simulate_sde


def _ode(spec_or_path, eta, d, params, out_dir, scheduled=True):
    """The spec and its OverlapODE at eta; with `scheduled`, the spec's learning-rate schedule
    ([training] schedule) multiplies eta at every time."""
    from ..backends.registry import ensure_module
    spec = as_spec(spec_or_path)
    check_eta_d(eta, d)
    pvals = check_params(spec, params)
    mod = ensure_module(spec, Path(out_dir))
    schedule = spec.schedule_factor(pvals) if scheduled else None
    return spec, OverlapODE(mod, eta, pvals, schedule=schedule)


def _training(spec) -> dict:
    """The JSON keys that say how the spec trains: batch and schedule (null without one)."""
    return {"batch": spec.batch,
            "schedule": None if spec.schedule is None else str(spec.schedule)}


def _start(ode, d, m0, e0, init, start_seed) -> tuple:
    """The initial state and, for several directions, the JSON key that records it."""
    x0 = initial_state(ode, d, m0, e0, init=init, seed=start_seed)
    extra = ({"initial_state": {k: float(v) for k, v in zip(ode.names, x0)},
              "start_seed": start_seed} if ode.multi else {})
    return x0, extra


def predict_solve(spec_or_path, eta, d=1000, m0=None, e0=None, t_max=None,
                  threshold=DEFAULT_THETA, params=None, out_dir="generated", init=None,
                  start_seed=0) -> dict:
    """The ODE from (m0 = 1/sqrt(d), e0 = 0): the JSON of `ssi solve --json`. With several
    directions from the random-like start of `numeric.ode.random_start` (drawn with
    start_seed, entries overridden by init = {overlap name: value})."""
    spec, ode = _ode(spec_or_path, eta, d, params, out_dir)
    x0, extra = _start(ode, d, m0, e0, init, start_seed)
    tr = solve(ode, x0, t_max=t_max, theta=threshold)
    out = tr.to_json() | extra
    out.update({"spec": spec.name, "d": d, "parameters": ode.params, "loss_kind": spec.loss,
                "method": ode.mod.METHOD, "no_escape_reason": None} | _training(spec))
    if out["escape_time"] is None:  # say why instead of leaving a bare null
        from .gain import learnability
        ok, why = learnability(ode.mod, ode.params)
        fp = {k: round(v, 6) for k, v in (out["fixed_point"] or {}).items()}
        end = {k: round(v[-1], 6) for k, v in out["overlaps"].items()}
        if not ok:
            out["no_escape_reason"] = why
        elif t_max is not None and out["t"][-1] >= t_max * (1 - 1e-9):
            # stopped by the horizon, not by convergence (a plateau looks converged)
            out["no_escape_reason"] = (
                f"the threshold {threshold} is not reached by t_max = {t_max:g} (the state "
                f"there: {end}); a longer --t-max may reach the escape")
        else:
            out["no_escape_reason"] = (
                f"the dynamics converge to {fp} before |(m, e)| reaches {threshold} (eta too "
                f"large, see `ssi max-lr`, or an uninformative fixed point)")
    return out


def predict_sde(spec_or_path, eta, d, runs=1000, seed=0, t_max=None, m0=None, e0=None,
                threshold=DEFAULT_THETA, params=None, dt=None, out_dir="generated",
                progress=False, init=None, start_seed=0, random_starts=False) -> dict:
    """Escape-time distribution over SDE paths: the JSON of `ssi sde --json` (the start as in
    `predict_solve`; `seed` draws the noise). random_starts (several directions): path i
    starts from its own random-like start, drawn with start_seed + i (init overriding the
    same entries of every start), as the seeds of the simulator do; the JSON's
    initial_state is then null and random_starts true."""
    spec, ode = _ode(spec_or_path, eta, d, params, out_dir)
    if random_starts:
        if not ode.multi:
            raise StateError("random_starts (--random-starts): only for models with several "
                             "directions (a single-direction model starts at m0 = 1/sqrt(d))")
        if runs < 1:
            raise StateError(f"runs = {runs}: need at least one path")
        x0 = np.stack([initial_state(ode, d, init=init, seed=start_seed + i)
                       for i in range(runs)], axis=1)
        extra = {"initial_state": None, "start_seed": start_seed, "random_starts": True}
    else:
        x0, extra = _start(ode, d, m0, e0, init, start_seed)
    res = simulate_sde(ode, d, x0, runs=runs, t_max=t_max, dt=dt,
                       theta=threshold, seed=seed, progress=progress)
    out = res.summary() | extra
    out.update({"spec": spec.name, "parameters": ode.params, "seed": seed} | _training(spec))
    return out


def predict_max_lr(spec_or_path, params=None, d=10_000, out_dir="generated") -> dict:
    """Maximal learning rate: the JSON of `ssi max-lr --json`."""
    from ..backends.registry import ensure_module
    spec = as_spec(spec_or_path)
    refuse_schedule(spec, "the maximal learning rate")
    refuse_multi(spec, "the maximal learning rate")
    pvals = check_params(spec, params)
    mod = ensure_module(spec, Path(out_dir))
    out = max_learning_rate(mod, pvals, d=d)
    out.update({"spec": spec.name, "parameters": pvals})
    return out


def predict_fixed_points(spec_or_path, eta, params=None, out_dir="generated") -> dict:
    """Fixed points of the drift at eta: the JSON of `ssi fixed-points --json`."""
    spec, ode = _ode(spec_or_path, eta, None, params, out_dir, scheduled=False)
    return {"spec": spec.name, "eta": eta, "parameters": ode.params,
            "overlaps": list(ode.names), "fixed_points": fixed_points(ode)}
