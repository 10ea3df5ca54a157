"""Quadrature backend for softmax attention models (issue 4, MATH.md section 7).

The generic symbolic path cannot integrate softmax links (it hangs); specs whose student link
contains ``exp`` (softmax_rows, trace of a softmax, ...) or whose loss is the non-squared norm
are routed here by :func:`ssi_symbolic.backends.registry.backend_for`.

Method (spherical SGD, q = 1, one positional direction e with coefficients C_l). Given the state,
the token pairs are independent and z_l = m z*_l + sqrt(1 - m^2) g_l + C_l e with z*, g i.i.d.
N(0, 1). The teacher is split by SymPy into T = sum_p c_p(theta) f_p(z*) + b(theta) (c_p, b
depend on the parameters only, each f_p lives in one output entry i(p) and has no parameter);
the student S(z) may not depend on parameters. With the squared loss

    R(m, e) = 1/2 E|T|^2 - E[T . S] + 1/2 E|S|^2 + K Delta / 2
            = 1/2 [sum_pq c_p c_q G_pq + 2 sum_p c_p b_i(p) M_p + |b|^2]       (teacher only)
              - sum_p c_p X_p(m, e) - sum_i b_i Sbar_i(e) + 1/2 P(e) + K Delta / 2

with G_pq = E[f_p f_q] (same entry), M_p = E f_p (L-dim integrals), Sbar_i(e) = E S_i(g + C e),
P(e) = E|S(g + C e)|^2 (L-dim, functions of e only) and the cross terms X_p(m, e) =
E[f_p(z*) S_i(p)(z)] (2L-dim). A polynomial f_p is expanded in Hermite polynomials, and by
Mehler's formula X_p = sum_k fhat_pk m^|k| sigma_ik(e) with sigma_ik(e) = E[S_i(g + C e) He_k(g)]
(L-dim). A non-polynomial f_p (the softmax teacher, L = 2) needs the 4-dim integral: it is
tabulated once at Chebyshev-Lobatto nodes in (m, e) (in y = 2 x^2 - 1 when X_p is numerically even
in x, which halves the degree) by pruned tensor Gauss-Hermite quadrature, and interpolated.
Every parameter value then costs only a few array operations: a whole phase diagram reuses the
same tables.

The Hessian at the origin comes from Hermite moments at e = 0 (Stein's lemma, no finite
differences): d/de E F(g + C e) = sum_l C_l E[F He_{e_l}(g)] and d/de sigma_ik = sum_l C_l
sigma_{i, k + e_l}, so

    R_mm = -sum_p c_p 2 sum_{|k|=2} fhat_pk sigma_ik(0)
    R_me = -sum_p c_p sum_{|k|=1} fhat_pk sum_l C_l sigma_{i,k+e_l}(0)
    R_ee = 1/2 sum_ll' C_l C_l' Pi_{e_l+e_l'} - sum_i (b_i + sum_{p in i} c_p M_p)
           sum_ll' C_l C_l' sigma_{i, e_l+e_l'}(0),            Pi_k = E[|S(g)|^2 He_k(g)]

with fhat_pk = E[f_p He_k] / k!, all L-dim integrals evaluated to ~1e-10.

The norm loss R = E ||T - S||_F does not split: its generated module integrates the 2L-dim
expectation directly at each state (pruned tensor Gauss-Hermite, slower).

Diffusion and O(1/d) drift (MATH.md 4; both losses): the per-state statistics of one spherical
SGD step, runtime._step_coefficients, give E G1, E G2, the eta^2..eta^4 parts of Cov(G), of the
rescaling (Ito) drift E[-(1/2)(d dX)(d dQ) + (3/8) X (d dQ)^2] and of the token-norm drift
-(eta^2 X / 2) E[token Gram excess] (the finite-d term of symbolic.derive.statistics, written in
whitened coordinates so that no derivative of the link is needed), by 2L-dim tensor Gauss-Hermite
over (z*, g). A square-loss module tabulates them per parameter set on first use as a Chebyshev
series in (theta, e'), m = cos theta, e = e' sin theta (analytic on the closed disk), with an error
estimate checked against direct quadrature (runtime._polar_table), so that the SDE evaluates
covariance and finite_d_correction at every step and path cheaply; a norm-loss module integrates
them at each state.
"""
from __future__ import annotations

from ...model.spec import ModelSpec
from ..files import module_path, read_hash, write_atomic
from .integrals import PRUNE, Integrals
from .pinned import pinned_environment, pinned_module_source
from .routing import _check, handles, split_teacher, stable
from .source import backend_salt, module_source


# ----------------------------------------------------------------------------- generate
def salt(diffusion: bool = True) -> str:
    """The salt of this backend's spec hash (its modules always carry the covariance)."""
    return backend_salt()


def generate(spec: ModelSpec, out_dir="generated", force: bool = False, diffusion: bool = True):
    """Write <out_dir>/<name>.py for an attention spec unless its hash is current. Its
    covariance is a direct quadrature at each state (no derivation cost), so a drift-only
    request (diffusion=False) gets the full module. The source is computed in a child
    interpreter with NumPy's and OpenBLAS's kernels pinned to AVX2 (`pinned`), so that the
    module's numbers are the same bytes on every x86-64 machine.

    Returns (path, written), like the exact backend's generate."""
    _check(spec)
    path = module_path(spec, out_dir)
    if not force and read_hash(path) == spec.hash(backend_salt()):
        return path, False
    write_atomic(path, pinned_module_source(spec))
    return path, True


__all__ = ["handles", "generate", "salt", "backend_salt", "module_source", "Integrals",
           "pinned_environment", "pinned_module_source",
           "split_teacher", "stable", "PRUNE"]
