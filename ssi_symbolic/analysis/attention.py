"""Finite-d questions about softmax attention specs (MATH.md section 7): the noise at the
origin, the escape direction of real d-dimensional SGD from m = e = 0, and the flatness index
from the exact Hessian at the origin of the attention backend's module."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..backends.attention import PRUNE, _check
from ..backends.contract import provides, why_not
from ..backends.quadrature import gauss_hermite
from ..backends.registry import ensure_module
from ..model.spec import ModelSpec, link_entries


# ----------------------------------------------------------------------------- finite d
def link_functions(spec: ModelSpec, out_dir="generated"):
    """NumPy functions of the links of the spec's generated module (`registry.links_module`,
    generated into out_dir if needed): T(z*1..z*L, **params) -> list of the K teacher entries
    g*_k(z*), S(z1..zL) -> list of the K student entries g_k(z), dS(z1..zL) -> list of the L K
    derivatives with dS[l * K + k] = dg_k / dz_l (entries flattened row by row, each broadcast
    to the shape of the z's). The student of an attention spec has no parameters."""
    from ..backends.registry import links_module
    mod = links_module(spec, out_dir)
    L = spec.L

    def entries(values, z):
        shape = np.broadcast(*z).shape
        return [np.broadcast_to(np.asarray(v, dtype=float), shape) for v in values]

    def teacher(*z, **params):
        return entries(mod.teacher_link(*z, **params), z)

    def student(*z):
        return entries(mod.student_link(*z), z)

    def gradient(*z):
        rows = mod.student_link_gradient(*z)                          # K rows of L entries
        return entries([rows[k][l] for l in range(L) for k in range(len(rows))], z)
    return teacher, student, gradient


def origin_noise(spec: ModelSpec, params: dict, n: int = 40, out_dir="generated") -> np.ndarray:
    """Cov(A_m, A_e) at the origin m = e = 0 (MATH.md 4: A_m = sum_l dl_l z*_l, A_e = sum_l
    dl_l (zeta_l + C_l)), square loss; there z*, z, zeta are independent N(0, 1), so
    Var A_m = E (sum dl_l z*_l)^2, Var A_e = E sum dl_l^2 + E (sum C_l dl_l)^2 - (E sum C_l dl_l)^2,
    Cov = E[sum dl z* sum C dl]. The spherical increments are G = -eta A at the origin, so the
    diffusion there is D = eta^2 Cov(A) / d. 2L-dim tensor Gauss-Hermite with n nodes; the links
    are those of the spec's generated module in out_dir (`link_functions`)."""
    _check(spec)
    T, S, dS = link_functions(spec, out_dir)
    L, K = spec.L, len(link_entries(spec.student))
    C = np.array([float(r[0]) for r in spec.C])
    u, w = gauss_hermite(2 * L, n, PRUNE)
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
                    chunk: int = 64, out_dir="generated"):
    """Finite-d spherical online SGD of an attention spec from m = e = 0 until each run escapes
    along one direction: the package's one simulator (`numeric.simulate.simulate_first_escape`,
    real d-dimensional SGD with the step of `numeric.sgd_step`; MATH.md 1-4): a random frame
    (w*, u), w uniform on the sphere |w|^2 = d orthogonal to both, each step
    w <- w - eta sum_l dl_l (x_l + C_l u / sqrt(d)), then w <- sqrt(d) w / |w|, with dl from the
    loss 1/2 ||y - y_hat||_F^2 ("square") or ||y - y_hat||_F ("norm"). loss: the spec's when
    None; another kind runs a copy of the spec with that loss (`sgd_step.spec_with_loss`, named
    <name>_<loss>, its module in out_dir). Runs go in chunks of at most `chunk` seeds; chunk c
    uses the generator seed `seed + c * 2**32` (chunk 0: `seed`, as `simulate`). params: the
    parameter values; max_steps: steps per run at most.

    Returns (kinds, times): per run 'semantic' (|m| >= theta first), 'positional' (|e| >= theta
    first; at a step where both first hold, the larger one) or None, and the escape time
    t = steps / d (None when not escaped within max_steps)."""
    from ..numeric.sgd_step import spec_with_loss
    from ..numeric.simulate import simulate_first_escape
    _check(spec)
    if loss is not None:
        spec = spec_with_loss(spec, loss)
    kinds, times = [], []
    for c, s0 in enumerate(range(0, runs, chunk)):
        res = simulate_first_escape(spec, eta, d, max_steps, seeds=min(chunk, runs - s0),
                                    seed=seed + c * 2 ** 32, m0=0.0, e0=0.0, theta=theta,
                                    record_every=max_steps, params=params, progress=False,
                                    out_dir=out_dir)
        first = np.fmin(res.escape_times["semantic"], res.escape_times["positional"])
        kinds += list(res.escape_kinds)
        times += [float(t) if np.isfinite(t) else None for t in first]
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
    if not (provides(mod, "gradient_origin") and provides(mod, "hessian_origin")):
        return {"flatness": None, "method": "numerical", "leading_terms": "",
                "note": f"no derivatives at the origin: {why_not(mod, 'hessian_origin')}",
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
