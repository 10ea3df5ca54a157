"""Finite-d overlap SDE: dX = (drift + c / d) dt + sqrt(D) dB, D = Cov(G) / d, c the
module's finite_d_correction (spherical rescaling and token-norm terms).

An ensemble of paths is integrated at once by the Euler-Maruyama scheme (all paths in one array,
no Python work per path). For spherical SGD the state is kept in the unit ball (a step that
would leave it is projected back onto the sphere, which the finite-d dynamics never leaves).
From m0 = 1/sqrt(d) the noise decides the escape when SIE >= 2; the distribution of escape times
over paths is what predicts the spread a user sees across seeds. Conventions: MATH.md section 4.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass

import numpy as np

from .ode import DEFAULT_THETA, OverlapODE, _check_eta
from ..backends.contract import require
from ..errors import StateError
from ..model.spec import overlap_index


def _sqrt_psd(D):
    """Symmetric square root of a stack of PSD matrices, shape (N, n, n)."""
    w, V = np.linalg.eigh(D)
    w = np.clip(w, 0.0, None)
    return np.einsum("...ij,...j,...kj->...ik", V, np.sqrt(w), V)


def _multi_project(ode: OverlapODE, x):
    """States of a model with several directions back in their domain (spherical SGD): for
    each student direction k, |w_k| = sqrt(d) bounds its overlaps, M[k] P^-1 M[k]^T +
    |E[k]|^2 <= 1 (a step beyond is scaled back onto that sphere), and |Q[k,h]| <= 1. Plain
    SGD states are left as they are."""
    if not ode.spherical:
        return x
    M, E, _ = ode.matrices(x)
    Pinv = np.linalg.inv(np.array(ode.mod.TEACHER_OVERLAPS, dtype=float))
    norm2 = np.einsum("kj...,ji,ki...->k...", M, Pinv, M) + np.sum(E ** 2, axis=1)
    scale = 1.0 / np.sqrt(np.maximum(norm2, 1.0))            # (K, N)
    x = np.array(x, dtype=float)
    for i, name in enumerate(ode.names):
        kind, k, _ = overlap_index(name)
        if kind in "me":
            x[i] = x[i] * scale[k]
        else:
            x[i] = np.clip(x[i], -1.0, 1.0)
    return x


@dataclass
class SDEResult:
    """Escape times of an ensemble of SDE paths (NaN: no escape before t_max)."""

    escape_times: np.ndarray
    t_max: float
    dt: float
    runs: int
    eta: float
    d: float
    theta: float
    t_record: np.ndarray | None = None   # (T,) record times, when paths were recorded
    paths: np.ndarray | None = None      # (n, runs, T) states at t_record

    def summary(self) -> dict:
        e = self.escape_times
        done = e[np.isfinite(e)]
        frac = float(done.size / e.size)
        if done.size == 0:
            med, q = None, [None, None]
        else:  # quartiles over all runs, non-escaped runs counting as +infinity
            full = np.where(np.isfinite(e), e, np.inf)
            qs = np.quantile(full, [0.25, 0.5, 0.75])
            conv = lambda v: float(v) if math.isfinite(v) else None
            med, q = conv(qs[1]), [conv(qs[0]), conv(qs[2])]
        return {"median": med, "quartiles": q, "escaped_fraction": frac,
                "mean": float(done.mean()) if done.size else None, "runs": self.runs,
                "dt": self.dt, "t_max": self.t_max, "eta": self.eta, "d": self.d,
                "threshold": self.theta}


def simulate_sde(ode: OverlapODE, d: float, x0, runs=1000, t_max=None, dt=None,
                 theta=DEFAULT_THETA, seed=0, progress=False, record_times=None) -> SDEResult:
    """Euler-Maruyama ensemble of `runs` paths from x0 (one state, or one per path: shape
    (n, runs)) until every path has escaped
    (|(m, e)| >= theta) or t_max. dt defaults to 0.005 / eta (200 steps per unit of
    eta * t, the time scale of the drift), never below 1/d.

    record_times: optional increasing times in [0, t_max]; then every path is integrated up to
    t_max (escaped or not) and its state at the first step with t >= each record time is kept in
    `paths` (n, runs, T), with `t_record` the times of those steps (the escape times keep
    their distribution, but escaped paths then draw noise too, so not the same values).
    Under a schedule (ode.schedule) each step from time t uses the learning rate eta f(t)."""
    _check_eta(ode.eta)
    require(ode.mod, "diffusion", "the SDE")
    require(ode.mod, "finite_d_correction", "the SDE")
    if not (d >= 1):
        raise StateError(f"d = {d}: the dimension must be >= 1")
    if runs < 1:
        raise StateError(f"runs = {runs}: need at least one path")
    if dt is not None and not (math.isfinite(dt) and dt > 0):
        raise StateError(f"dt = {dt}: the SDE step must be a positive number")
    mod, eta, params = ode.mod, ode.eta, ode.params
    dt = float(dt) if dt is not None else max(0.005 / eta, 1.0 / d)
    t_max = float(t_max) if t_max is not None else 1e5 / eta
    rng = np.random.default_rng(seed)
    n, nd = ode.n, ode.n_dir
    x0 = np.asarray(x0, dtype=float)
    if x0.ndim == 2:   # one start per path (random-like starts of several directions)
        if x0.shape != (n, runs):
            raise StateError(f"x0 of shape {x0.shape}: expected ({n},) or ({n}, {runs})")
        x = x0.copy()
    else:
        x = np.repeat(x0[:, None], runs, axis=1)
    esc = np.full(runs, np.nan)
    alive = np.ones(runs, dtype=bool)
    t = 0.0
    r_prev = ode.radius(x)
    last = time.monotonic()
    steps = int(math.ceil(t_max / dt))
    rec_t, paths, j = None, None, 0
    if record_times is not None:
        rec_t = np.asarray(record_times, dtype=float).reshape(-1)
        if rec_t.size == 0 or np.any(np.diff(rec_t) < 0) or rec_t[0] < 0 \
                or rec_t[-1] > t_max * (1 + 1e-12):
            raise StateError(f"record_times: expected increasing times in [0, t_max = "
                             f"{t_max:g}]")
        paths = np.full((n, runs, rec_t.size), np.nan)
        t_rec = np.full(rec_t.size, np.nan)
        everyone = np.arange(runs)
    for k in range(steps + 1):
        while rec_t is not None and j < rec_t.size and t >= rec_t[j] - 1e-12 * max(1.0, t):
            paths[:, :, j], t_rec[j] = x, t
            j += 1
        if k == steps:
            break
        idx = np.flatnonzero(alive) if rec_t is None else everyone
        if idx.size == 0:
            break
        xa = x[:, idx]
        eta_t = ode.eta_at(t)                                    # eta f(t) under a schedule
        drift = np.array(mod.drift(*xa, eta=eta_t, **params))
        drift = drift + np.array(mod.finite_d_correction(*xa, eta=eta_t, **params)) / d
        cov = np.array(mod.covariance(*xa, eta=eta_t, **params))  # (n, n, N)
        S = _sqrt_psd(np.moveaxis(cov, -1, 0) / d)              # (N, n, n)
        noise = np.einsum("kij,kj->ik", S, rng.standard_normal((idx.size, n)))
        xn = xa + drift * dt + noise * math.sqrt(dt)
        if ode.untied:  # the finite-d state keeps sum_l q_l = L (spherical) and m_l^2 <= q_l
            xn = ode.project(xn)
            qn = np.maximum(xn[ode.norm_idx], 1e-12)
            xn[ode.sem_idx] = np.clip(xn[ode.sem_idx], -np.sqrt(qn), np.sqrt(qn))
        elif ode.multi:  # every student direction stays in its ball, |Q[k,h]| <= 1
            xn = _multi_project(ode, xn)
        elif ode.spherical:  # the finite-d state never leaves the ball
            rad = np.sqrt(np.sum(xn[:nd] ** 2, axis=0))
            xn[:nd] /= np.maximum(rad, 1.0)
        rn = ode.radius(xn)
        crossed = rn >= theta
        if rec_t is not None:
            crossed &= alive
        if crossed.any():
            ra = r_prev[idx][crossed]
            frac = np.clip((theta - ra) / np.maximum(rn[crossed] - ra, 1e-300), 0.0, 1.0)
            esc[idx[crossed]] = t + frac * dt
            alive[idx[crossed]] = False
        x[:, idx] = xn
        r_prev[idx] = rn
        t += dt
        if progress and time.monotonic() - last > 0.2:
            last = time.monotonic()
            sys.stderr.write(f"\rsde: t = {t:9.3f}  escaped {np.sum(~alive)}/{runs}")
            sys.stderr.flush()
    if progress:
        sys.stderr.write(f"\rsde: t = {t:9.3f}  escaped {np.sum(~alive)}/{runs}\n")
    if rec_t is not None:
        paths, t_rec = paths[:, :, :j], t_rec[:j]
    return SDEResult(escape_times=esc, t_max=t_max, dt=dt, runs=runs, eta=eta, d=d, theta=theta,
                     t_record=t_rec if rec_t is not None else None, paths=paths)
