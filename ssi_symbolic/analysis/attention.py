"""Finite-d questions about softmax attention specs (MATH.md section 7): the noise at the
origin, the escape direction of real d-dimensional SGD from m = e = 0, and the flatness index
from the exact Hessian at the origin of the attention backend's module."""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import sympy as sp

from ..backends.attention import _check, _numeric, gh_rule, stable
from ..backends.registry import ensure_module
from ..model.spec import ModelSpec, link_entries, token_symbols


# ----------------------------------------------------------------------------- finite d
def link_functions(spec: ModelSpec):
    """NumPy functions of the links: T(z*1..z*L, **params) and S(z), dS(z) (entries flattened;
    dS[l * K + k] = dS_k / dz_l), for the simulator and the noise at the origin."""
    zs = token_symbols(spec.L)
    psyms = [sp.Symbol(p, real=True) for p in spec.parameters]
    T = sp.lambdify(list(zs) + psyms, [stable(x) for x in link_entries(spec.teacher)],
                    modules="numpy", cse=True)
    S = _numeric(link_entries(spec.student), spec.L)
    dS = _numeric([sp.diff(stable(sk), zs[l]) for l in range(spec.L)
                   for sk in link_entries(spec.student)], spec.L)

    def teacher(*z, **params):
        with np.errstate(over="ignore"):
            out = T(*z, *[params[p] for p in spec.parameters])
        shape = np.broadcast(*z).shape
        return [np.broadcast_to(np.asarray(o, dtype=float), shape) for o in out]
    return teacher, S, dS


def origin_noise(spec: ModelSpec, params: dict, n: int = 40) -> np.ndarray:
    """Cov(A_m, A_e) at the origin m = e = 0 (MATH.md 4: A_m = sum_l dl_l z*_l, A_e = sum_l
    dl_l (zeta_l + C_l)), square loss; there z*, z, zeta are independent N(0, 1), so
    Var A_m = E (sum dl_l z*_l)^2, Var A_e = E sum dl_l^2 + E (sum C_l dl_l)^2 - (E sum C_l dl_l)^2,
    Cov = E[sum dl z* sum C dl]. The spherical increments are G = -eta A at the origin, so the
    diffusion there is D = eta^2 Cov(A) / d. 2L-dim tensor Gauss-Hermite with n nodes."""
    _check(spec)
    T, S, dS = link_functions(spec)
    L, K = spec.L, len(link_entries(spec.student))
    C = np.array([float(r[0]) for r in spec.C])
    u, w = gh_rule(2 * L, n)
    zs, z = u[:L], u[L:]
    Tv, Sv, dSv = T(*zs, **params), S(*z), dS(*z)
    dl = [-sum((Tv[k] - Sv[k]) * dSv[l * K + k] for k in range(K)) for l in range(L)]
    Am = sum(dl[l] * zs[l] for l in range(L))
    Cd = sum(C[l] * dl[l] for l in range(L))
    B = sum(x * x for x in dl)
    vm = w @ (Am * Am) - (w @ Am) ** 2
    ve = w @ B + w @ (Cd * Cd) - (w @ Cd) ** 2
    cme = w @ (Am * Cd) - (w @ Am) * (w @ Cd)
    return np.array([[vm, cme], [cme, ve]])


def simulate_escape(spec: ModelSpec, params: dict, eta: float, d: int, runs: int,
                    max_steps: int, theta: float = 0.5, seed: int = 0, loss: str | None = None,
                    chunk: int = 64):
    """Finite-d spherical online SGD of an attention spec from m = e = 0 (MATH.md 1-4):
    w* = sqrt(d) b1, u = b2 (orthonormal), w uniform on the sphere |w|^2 = d orthogonal to both;
    each step draws fresh tokens x_l ~ N(0, I/d), z*_l = x_l . w*, z_l = (x_l + C_l u/sqrt(d)).w,
    w <- w - eta sum_l dl_l (x_l + C_l u / sqrt(d)), then w <- sqrt(d) w / |w|. The loss is
    1/2 ||y - y_hat||_F^2 ("square") or ||y - y_hat||_F ("norm"; default: the spec's).

    Returns (kind, t): per run 'semantic' (|m| >= theta first), 'positional' (|e| >= theta
    first) or None, and the escape time t = steps / d (None when not escaped)."""
    _check(spec)
    loss = loss or spec.loss
    T, S, dS = link_functions(spec)
    L, K = spec.L, len(link_entries(spec.student))
    C = np.array([float(r[0]) for r in spec.C])
    rng = np.random.default_rng(seed)
    kinds, times = [None] * runs, [None] * runs
    for s0 in range(0, runs, chunk):
        R = min(chunk, runs - s0)
        w = rng.normal(size=(R, d))
        w[:, :2] = 0.0
        w *= math.sqrt(d) / np.linalg.norm(w, axis=1, keepdims=True)
        alive = np.ones(R, dtype=bool)
        for step in range(1, max_steps + 1):
            idx = np.nonzero(alive)[0]
            if not len(idx):
                break
            W = w[idx]
            x = rng.normal(scale=1 / math.sqrt(d), size=(len(idx), L, d))
            zst = x[:, :, 0] * math.sqrt(d)                       # x_l . w*, w* = sqrt(d) b1
            xp = x.copy()
            xp[:, :, 1] += C[None, :] / math.sqrt(d)              # + C_l u / sqrt(d), u = b2
            z = np.einsum("rld,rd->rl", xp, W)
            Tv = T(*[zst[:, l] for l in range(L)], **params)
            Sv = S(*[z[:, l] for l in range(L)])
            dSv = dS(*[z[:, l] for l in range(L)])
            r = [Tv[k] - Sv[k] for k in range(K)]
            scale = 1.0
            if loss == "norm":
                scale = 1.0 / np.maximum(np.sqrt(sum(x_ * x_ for x_ in r)), 1e-300)
            dl = np.stack([-scale * sum(r[k] * dSv[l * K + k] for k in range(K))
                           for l in range(L)], axis=1)           # (n, L)
            W = W - eta * np.einsum("rl,rld->rd", dl, xp)
            W *= math.sqrt(d) / np.linalg.norm(W, axis=1, keepdims=True)
            w[idx] = W
            m_, e_ = W[:, 0] / math.sqrt(d), W[:, 1] / math.sqrt(d)
            sem, pos = np.abs(m_) >= theta, np.abs(e_) >= theta
            for j in np.nonzero(sem | pos)[0]:
                g = s0 + idx[j]
                kinds[g] = "semantic" if (sem[j] and (not pos[j] or abs(m_[j]) >= abs(e_[j]))) \
                    else "positional"
                times[g] = step / d
                alive[idx[j]] = False
    return kinds, times


# ----------------------------------------------------------------------------- flatness
def flatness(spec: ModelSpec, out_dir="generated", tol: float = 1e-8, **_ignored) -> dict:
    """Flatness index of an attention spec at its default parameters (MATH.md 5): 1 when the
    gradient of R at the origin is non-zero, 2 when the Hessian is (both exact from Hermite
    moments, `gradient_origin` / `hessian_origin` of the generated module), None when both
    vanish (higher orders are not computed by this backend). Same keys as hermite.flatness."""
    t0 = time.perf_counter()
    mod = ensure_module(spec, Path(out_dir))
    pv = {k: float(v) for k, v in spec.parameters.items()}
    if not hasattr(mod, "hessian_origin"):
        return {"flatness": None, "method": "numerical", "leading_terms": "",
                "note": "norm loss: no Hessian at the origin from this backend",
                "seconds": time.perf_counter() - t0}
    g = [float(np.ravel(x)[0]) for x in mod.gradient_origin(**pv)]
    H = [[float(np.ravel(x)[0]) for x in row] for row in mod.hessian_origin(**pv)]
    scale = max(1.0, abs(float(mod.population_loss(0.0, 0.0, **pv))))
    if max(abs(x) for x in g) > tol * scale:
        k, lead = 1, f"{g[0]:.10g}*m + {g[1]:.10g}*e"
    elif max(abs(x) for row in H for x in row) > tol * scale:
        k, lead = 2, (f"{H[0][0] / 2:.10g}*m**2 + {H[0][1]:.10g}*m*e + "
                      f"{H[1][1] / 2:.10g}*e**2")
    else:
        k, lead = None, ""
    return {"flatness": k, "method": "numerical", "leading_terms": lead,
            "variables": ["m", "e"], "gradient": g, "hessian": H, "tolerance": tol,
            "how": "attention backend: exact Hermite moments at the origin (order <= 2)",
            "seconds": time.perf_counter() - t0}
