"""The sequence-length gain of tying (MATH.md sections 5 and 6).

For a spec whose links are written for any L (with z, tsum and L, e.g. teacher
"tsum(He(2, z)) / sqrt(2 * L)"), `predict_gain` derives, for every requested L, the tied student
and the untied one (one weight vector per token, spherical constraint on the flattened vector)
and predicts each escape time from the ODE started at m0 = 1/sqrt(d) (for the untied student
m_l = v_l / sqrt(d) along its escape direction v, q_l = 1; see `escape_direction`):

    gain(L) = tau_untied(L) / tau_tied(L),

at a common learning rate (lr_scaling "same") or at each student's own best rate (lr_scaling
"max": the eta that minimises its ODE escape time, `best_escape_eta`), with the least-squares
power law gain ~ c L^alpha.

A student whose leading drift at the origin vanishes (for example a tied student whose link is
symmetric in the tokens on an antisymmetric target such as z1 - z2) cannot escape: it is
reported as not learnable, with that reason, instead of an escape time.

Only the drift is needed, so the variants are generated drift-only (``diffusion=False``) into a
cache folder (default generated/variants, not committed): long sequences derive much faster.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np

from ..numeric.ode import DynamicsError, OverlapODE, initial_state, leading_drift, max_learning_rate, solve
from ..errors import SpecError, StateError
from ..model.checks import as_spec, check_params, refuse_schedule

DEFAULT_VARIANTS = Path("generated") / "variants"
LR_SCALINGS = ("same", "max")


def escape_direction(mod, params=None) -> np.ndarray:
    """The pattern v of the semantic overlaps (mean v_l^2 = 1) along which the student leaves
    the origin: all ones for a tied student; for an untied one the drift at the origin when it
    is not zero (SIE 1), else the eigenvector of the largest
    eigenvalue of the O(eta) drift's Jacobian in (m_1..m_L) at the origin (q_l = 1) when that
    eigenvalue is positive (SIE 2: the growing mode a random start projects on), else all ones.
    A random start has every m_l ~ N(0, 1/d), so m_l = v_l / sqrt(d) is its typical size."""
    names = tuple(mod.OVERLAPS)
    sem = [i for i, k in enumerate(names) if k[0] == "m"]
    if len(sem) == 1 or "m" in names:
        return np.ones(1)
    params = params or {}
    x = [0.0 if k[0] == "m" else 1.0 for k in names]
    b = np.array([float(mod.drift_eta1(*x, **params)[i]) for i in sem])
    if np.max(np.abs(b)) > 1e-12:  # SIE 1: a constant drift at the origin points the way
        return b / np.sqrt(np.mean(b ** 2))
    J = np.array(mod.drift_jacobian(*x, eta=1e-6, **params), dtype=float) / 1e-6
    A = J[np.ix_(sem, sem)]
    w, V = np.linalg.eig(A)
    k = int(np.argmax(w.real))
    if not w[k].real > 1e-9 * max(1.0, np.abs(w).max()):
        return np.ones(len(sem))
    v = V[:, k].real
    v = v / np.sqrt(np.mean(v ** 2))
    return v if v.sum() >= -1e-12 else -v


def learnability(mod, params=None, direction=None) -> tuple[bool, str]:
    """(True, "") when the O(eta) drift of the semantic overlap(s) along the escape direction
    is positive near the origin, else (False, why): the escape from m0 = 1/sqrt(d) needs it."""
    p1, a1, _, _ = leading_drift(mod, params, direction=direction)
    if p1 is None:
        return False, ("zero leading drift: the O(eta) drift of m vanishes identically near the "
                       "origin, so the student never escapes (no escape time)")
    if a1 <= 0:
        return False, (f"the O(eta) drift of m near the origin is {a1:.3g} m^{p1} <= 0: the "
                       f"origin attracts, no escape")
    return True, ""


def _ode_escape(mod, pvals, eta, d, v, theta=0.5, t_max=None) -> tuple[float | None, str]:
    """ODE escape time from m_l = v_l / sqrt(d), q_l = 1 at learning rate eta: (tau, "") or
    (None, why); t_max: give up (None) at that time."""
    ode = OverlapODE(mod, eta, pvals)
    try:
        x0 = initial_state(ode, d)
        x0[ode.sem_idx] = v / math.sqrt(d)
        tr = solve(ode, x0, t_max=t_max, theta=theta, n_grid=50, stop_at_escape=True)
    except DynamicsError as exc:
        return None, str(exc)
    if tr.escape_time is None and t_max is not None and tr.t[-1] >= t_max * (1 - 1e-9):
        return None, f"no escape by t = {t_max:g} at eta = {eta:g}"
    if tr.escape_time is None:
        fp = {k: round(float(x), 6) for k, x in tr.fixed_point.items()}
        return None, (f"no escape at eta = {eta:g}: the dynamics converge to {fp} before "
                      f"|(m, e)| reaches {theta}")
    return tr.escape_time, ""


#: log-spaced learning rates per decade scanned by best_escape_eta below its upper bound
BEST_ETA_PER_DECADE = 8
#: the upper bound of the scan when the O(eta^2) drift does not limit the escape
BEST_ETA_CAP = 10.0


def best_escape_eta(mod, params, d, direction=None, theta=0.5,
                    rtol=1e-4) -> tuple[float | None, str]:
    """The learning rate that minimises the ODE escape time tau(eta) from m0 = 1/sqrt(d) along
    the escape direction: a scan of log-spaced rates (BEST_ETA_PER_DECADE per decade) upwards
    from 1e-3 eta_hi, stopped once tau has passed its minimum (tau is unimodal in eta: ~ c/eta
    at small eta, infinite beyond the escape limit), then a bounded golden-section/parabolic
    refinement around the best one (to rtol in eta). Runs slower than twice the best time so
    far are cut there (they cannot win).

    eta_hi is the escape limit: near the origin dm/dt ~ eta a1 m^p1 + eta^2 a2 m^p2, so escape
    from m0 needs eta < a1 m0^(p1 - p2) / (-a2) when a2 < 0 (for SIE k >= 2 with p1 = p2 the
    minimiser of the leading term alone is half of it); otherwise BEST_ETA_CAP. For SIE 1 the
    noise term is O(m0) smaller than the signal at the start, so the best rate is set by the
    whole trajectory, which is why tau itself is minimised. (None, why) when no rate escapes."""
    from scipy.optimize import minimize_scalar
    p1, a1, p2, a2 = leading_drift(mod, params, direction=direction)
    if p1 is None or a1 <= 0:
        return None, "the O(eta) drift does not escape the origin: no best learning rate"
    v = np.ones(1) if direction is None else np.asarray(direction, dtype=float)
    m0 = 1.0 / math.sqrt(d)
    eta_hi = BEST_ETA_CAP
    if p2 is not None and a2 < 0:
        eta_hi = min(eta_hi, a1 * m0 ** (p1 - p2) / -a2)
    best_tau = math.inf

    def tau(eta):
        nonlocal best_tau
        cap = 2 * best_tau if math.isfinite(best_tau) else None
        t, _ = _ode_escape(mod, params, float(eta), d, v, theta, t_max=cap)
        t = math.inf if t is None else t
        best_tau = min(best_tau, t)
        return t

    grid = eta_hi * np.logspace(-3, 0, 3 * BEST_ETA_PER_DECADE + 1)[:-1]  # eta_hi excluded
    taus = []
    for e in grid:
        taus.append(tau(e))
        i = int(np.argmin(taus))
        if math.isfinite(taus[i]) and len(taus) - 1 >= i + 2:   # two rates past the minimum
            break
    taus = np.array(taus)
    if not np.isfinite(taus).any():
        return None, (f"no learning rate in [{grid[0]:.3g}, {grid[-1]:.3g}] escapes "
                      f"(ODE from m0 = 1/sqrt(d))")
    i = int(np.argmin(taus))
    lo = grid[max(i - 1, 0)]
    hi = grid[i + 1] if i + 1 < len(grid) else eta_hi
    big = 2 * float(taus[i])  # a finite stand-in for "no escape" inside the bracket
    res = minimize_scalar(lambda e: min(tau(e), big), bounds=(lo, hi), method="bounded",
                          options={"xatol": rtol * grid[i]})
    return (float(res.x) if res.fun <= taus[i] else float(grid[i])), ""


def escape_prediction(spec, eta, d, params=None, out_dir=DEFAULT_VARIANTS,
                      lr_scaling="same", theta=0.5) -> dict:
    """ODE escape time of one student (tied or untied) from m0 = 1/sqrt(d).

    lr_scaling "max": eta is replaced by the student's best learning rate (`best_escape_eta`,
    the one that minimises its ODE escape time); "max_lr" is its maximal learning rate (escape
    and stability of the informative fixed point, `max_learning_rate`) for reference. Returns
    {"escape_time", "eta", "max_lr", "learnable", "reason", "overlaps", "m0"} with m0 the
    starting semantic overlaps (see `escape_direction`)."""
    from ..backends.registry import ensure_module
    mod = ensure_module(spec, out_dir, diffusion=False)
    pvals = check_params(spec, params)
    v = escape_direction(mod, pvals)
    ok, why = learnability(mod, pvals, v)
    out = {"spec": spec.name, "untied": spec.untied, "learnable": ok, "reason": why or None,
           "eta": eta, "max_lr": None, "escape_time": None, "overlaps": list(mod.OVERLAPS),
           "m0": [float(x) for x in v / math.sqrt(d)]}
    if not ok:
        return out
    if lr_scaling == "max":
        best, why_best = best_escape_eta(mod, pvals, d, v, theta=theta)
        lr = max_learning_rate(mod, pvals, d=d, direction=v)
        out["max_lr"], out["max_lr_reason"] = lr["max_lr"], lr["reason"]
        if best is None:
            out["reason"] = why_best
            return out
        out["eta"] = eta = best
    out["escape_time"], why = _ode_escape(mod, pvals, eta, d, v, theta)
    out["reason"] = why or None
    return out


def power_law(Ls, values) -> dict | None:
    """Least-squares fit log v = log c + alpha log L over the finite, positive values at L > 1
    (with L = 1, where tied and untied coincide, when present); None with fewer than 2 points."""
    pts = [(L, v) for L, v in zip(Ls, values) if v is not None and v > 0 and math.isfinite(v)]
    if len([L for L, _ in pts if L > 1]) < 2 and len(pts) < 2:
        return None
    x = np.log([L for L, _ in pts])
    y = np.log([v for _, v in pts])
    A = np.vstack([np.ones_like(x), x]).T
    (logc, alpha), *_ = np.linalg.lstsq(A, y, rcond=None)
    resid = y - A @ np.array([logc, alpha])
    return {"alpha": float(alpha), "c": float(math.exp(logc)),
            "rms_log_residual": float(np.sqrt(np.mean(resid ** 2)))}


def predict_gain(spec_or_path, Ls=(1, 2, 4, 8), eta=0.05, d=10_000, lr_scaling="same",
                 params=None, out_dir=DEFAULT_VARIANTS, theta=0.5, progress=False) -> dict:
    """tau_untied / tau_tied for every L in Ls (the JSON of `ssi gain --json`).

    Keys: "rows" (per L: "L", "tied" and "untied" escape predictions, "gain"), "fit" (power
    law of the gain in L, or None), "eta", "d", "lr_scaling", "threshold"."""
    spec = as_spec(spec_or_path)
    refuse_schedule(spec, "the tied/untied gain")
    if lr_scaling not in LR_SCALINGS:
        raise StateError(f"lr_scaling: expected one of {', '.join(LR_SCALINGS)}, "
                         f"got {lr_scaling!r}")
    Ls = [int(L) for L in Ls]
    if not Ls or any(L < 1 or L > 64 for L in Ls):
        raise StateError(f"L: expected sequence lengths 1..64, got {Ls}")
    if lr_scaling == "same" and not (eta is not None and eta > 0 and math.isfinite(eta)):
        raise StateError(f"eta = {eta}: a common learning rate > 0 is needed with "
                         f"lr_scaling 'same'")
    if spec.untied:
        raise SpecError(f"{spec.where('student.weights')}: give the tied spec; its untied "
                        f"twin is derived for the comparison")
    rows = []
    t0 = time.perf_counter()
    for L in Ls:
        tied = spec.with_length(L)
        untied = tied.untied_student()
        row = {"L": L}
        for key, sp_ in (("tied", tied), ("untied", untied)):
            if progress:
                sys.stderr.write(f"gain: L = {L} {key}: deriving and solving "
                                 f"({time.perf_counter() - t0:.0f} s)\n")
                sys.stderr.flush()
            row[key] = escape_prediction(sp_, eta, d, params, out_dir, lr_scaling, theta)
        a, b = row["untied"]["escape_time"], row["tied"]["escape_time"]
        row["gain"] = a / b if a is not None and b is not None and b > 0 else None
        rows.append(row)
    fit = power_law([r["L"] for r in rows], [r["gain"] for r in rows])
    return {"spec": spec.name, "rows": rows, "fit": fit, "eta": eta if lr_scaling == "same"
            else None, "d": d, "lr_scaling": lr_scaling, "threshold": theta,
            "parameters": check_params(spec, params)}


def simulated_gain(spec, L, eta, d, seeds=8, seed=0, out_dir=DEFAULT_VARIANTS, cap=3.0,
                   params=None, theta=0.5) -> dict:
    """The simulator's check of the gain at one L: real SGD of the tied student and of its
    untied twin (`seeds` runs each, at most cap times the ODE escape time), their median escape
    times and quartiles, the simulated gain (ratio of medians) with the range from the
    quartiles (untied q1 / tied q3 to untied q3 / tied q1), the ODE gain and whether it lies in
    that range. Non-escaped runs count as +infinity."""
    from ..numeric.simulate import simulate
    tied = as_spec(spec).with_length(L)
    row = {"L": L, "d": d, "eta": eta, "seeds": seeds}
    for key, sp_ in (("tied", tied), ("untied", tied.untied_student())):
        pred = escape_prediction(sp_, eta, d, params, out_dir, theta=theta)
        if pred["escape_time"] is None:
            raise StateError(f"{sp_.name}: no ODE escape at eta = {eta}: {pred['reason']}")
        steps = int(cap * pred["escape_time"] * d)
        res = simulate(sp_, eta, d, steps, seeds=seeds, seed=seed, params=params,
                       out_dir=out_dir, stop_when_escaped=True, record_every=d, progress=False,
                       theta=theta)
        esc = np.where(np.isnan(res.escape_times["escape"]), np.inf, res.escape_times["escape"])
        q1, med, q3 = (float(np.quantile(esc, q)) for q in (0.25, 0.5, 0.75))
        row[key] = {"ode": pred["escape_time"], "sim_median": med, "sim_quartiles": [q1, q3],
                    "escaped": int(np.sum(np.isfinite(esc))), "wall_time": res.wall_time}
    t, u = row["tied"], row["untied"]
    row["ode_gain"] = u["ode"] / t["ode"]
    row["sim_gain"] = u["sim_median"] / t["sim_median"]
    row["sim_gain_range"] = [u["sim_quartiles"][0] / t["sim_quartiles"][1],
                             u["sim_quartiles"][1] / t["sim_quartiles"][0]]
    lo, hi = row["sim_gain_range"]
    row["inside"] = bool(lo <= row["ode_gain"] <= hi)
    return row


__all__ = ["predict_gain", "escape_prediction", "learnability", "power_law", "simulated_gain",
           "best_escape_eta", "escape_direction"]
