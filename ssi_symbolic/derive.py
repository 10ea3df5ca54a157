"""Derivation: population loss, drift and diffusion of the overlap dynamics (MATH.md 3-4).

For a spec, with residual r_k = y_k - y_hat_k (y_k = g*_k(z*) + sqrt(Delta) xi_k), per-sample
loss l = 1/2 sum_k r_k^2 and dl_l = dl/dz_l = -sum_k r_k dg_k/dz_l, define

    A_m = sum_l dl_l z*_l,  A_a = sum_l dl_l (zeta_la + C[l,a]),  A_q = sum_l dl_l z_l,
    B = sum_l dl_l^2,

and G, d times the one-step increment of the tracked overlaps:

    plain:      G = ( -eta A_m, -eta A_a, -2 eta A_q + eta^2 B )                for (m, e_a, q)
    spherical:  G = ( -eta (A_m - m A_q) - (eta^2 m/2) B,
                      -eta (A_a - e_a A_q) - (eta^2 e_a/2) B )                   for (m, e_a)

Writing G = eta G1 + eta^2 G2, the drift is E G = eta E[G1] + eta^2 E[G2] (the two parts are kept
separately) and the diffusion is D = Cov(G) / d. Everything stays symbolic in the parameters.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import sympy as sp

from .gaussian import Expectation, NotPolynomial, TokenGaussian, has_quadrature
from .spec import ModelSpec, link_entries

ETA = sp.Symbol("eta", positive=True)
D_SYM = sp.Symbol("d", positive=True)


@dataclass
class Derivation:
    """The derived formulas of a spec, as SymPy expressions in the overlaps and parameters.

    population_loss: R(state; parameters).
    drift_eta1[i], drift_eta2[i]: E[G1_i], E[G2_i], so that drift_i = eta drift_eta1[i] +
        eta^2 drift_eta2[i].
    covariance: Cov(G)_ij, a polynomial in eta; diffusion D = covariance / d.
    method: "exact" when every expectation is in closed form, else "quadrature".
    """

    spec: ModelSpec
    state: tuple
    parameters: tuple
    population_loss: sp.Expr
    drift_eta1: tuple
    drift_eta2: tuple
    covariance: sp.Matrix
    method: str
    seconds: float = 0.0
    notes: list = field(default_factory=list)

    @property
    def overlap_names(self) -> tuple[str, ...]:
        return self.spec.overlap_names

    @property
    def drift(self) -> tuple:
        """Full drift eta E[G1] + eta^2 E[G2]."""
        return tuple(ETA * a + ETA ** 2 * b for a, b in zip(self.drift_eta1, self.drift_eta2))

    @property
    def diffusion(self) -> sp.Matrix:
        """D = Cov(G) / d (MATH.md section 4)."""
        return self.covariance / D_SYM


def statistics(spec: ModelSpec, gauss: TokenGaussian):
    """The per-sample loss l and the increments (G1, G2) of MATH.md section 4, in the
    Gaussian variables of `gauss` (teacher evaluated at z*, student at z)."""
    to_teacher = dict(zip(gauss.z, gauss.zstar))
    T = [sp.sympify(t).xreplace(to_teacher) for t in link_entries(spec.teacher)]
    S = [sp.sympify(s) for s in link_entries(spec.student)]
    if spec.noise:
        T = [t + sp.sqrt(spec.noise) * x for t, x in zip(T, gauss.xi)]
    res = [t - s for t, s in zip(T, S)]
    loss = sp.Rational(1, 2) * sp.Add(*[r ** 2 for r in res])
    dl = [-sp.Add(*[r * sp.diff(s, zl) for r, s in zip(res, S)]) for zl in gauss.z]
    A_m = sp.Add(*[d * zs for d, zs in zip(dl, gauss.zstar)])
    A_e = [sp.Add(*[dl[l] * (gauss.zeta[l][a] + spec.C[l][a]) for l in range(spec.L)])
           for a in range(spec.r)]
    A_q = sp.Add(*[d * zl for d, zl in zip(dl, gauss.z)])
    B = sp.Add(*[d ** 2 for d in dl])
    if spec.spherical:
        G1 = [-(A_m - gauss.m * A_q)] + [-(A - ea * A_q) for A, ea in zip(A_e, gauss.e)]
        G2 = [-gauss.m / 2 * B] + [-ea / 2 * B for ea in gauss.e]
    else:
        G1 = [-A_m] + [-A for A in A_e] + [-2 * A_q]
        G2 = [sp.Integer(0)] * (1 + spec.r) + [B]
    return loss, G1, G2


def derive(spec: ModelSpec, diffusion: bool = True) -> Derivation:
    """Derive the population loss, the drift (O(eta) and O(eta^2) parts) and Cov(G)."""
    t0 = time.perf_counter()
    gauss = TokenGaussian.of(spec)
    loss, G1, G2 = statistics(spec, gauss)
    E = Expectation(gauss, [loss] + G1 + G2)
    R = sp.expand(E.expect(loss))
    d1 = tuple(sp.expand(E.expect(x)) for x in G1)
    d2 = tuple(sp.expand(E.expect(x)) for x in G2)
    n = len(G1)
    cov = sp.zeros(n, n)
    if diffusion:
        for i in range(n):
            for j in range(i, n):
                second = _second_moment(E, G1, G2, i, j)
                mean_sq = (ETA * d1[i] + ETA ** 2 * d2[i]) * (ETA * d1[j] + ETA ** 2 * d2[j])
                cov[i, j] = cov[j, i] = sp.expand(second - mean_sq)
    method = "quadrature" if E.used_quadrature else "exact"
    params = tuple(sp.Symbol(p, real=True) for p in spec.parameters)
    return Derivation(spec=spec, state=gauss.state, parameters=params, population_loss=R,
                      drift_eta1=d1, drift_eta2=d2, covariance=cov, method=method,
                      seconds=time.perf_counter() - t0)


def _second_moment(E: Expectation, G1, G2, i, j):
    """E[G_i G_j] = eta^2 E[G1_i G1_j] + eta^3 E[G1_i G2_j + G2_i G1_j] + eta^4 E[G2_i G2_j],
    products taken in factored form when the statistics are polynomial."""
    if i == j:
        pairs = [(2, 1, G1[i], G1[i]), (3, 2, G1[i], G2[i]), (4, 1, G2[i], G2[i])]
    else:
        pairs = [(2, 1, G1[i], G1[j]), (3, 1, G1[i], G2[j]), (3, 1, G2[i], G1[j]),
                 (4, 1, G2[i], G2[j])]
    out = sp.Integer(0)
    ex = E.exact
    for k, mult, a, b in pairs:
        if a == 0 or b == 0:
            continue
        try:
            val = ex.to_sympy(ex.expect_spt(ex.mul(ex.to_spt(a), ex.to_spt(b), merge=False)))
        except NotPolynomial:
            val = E.expect(a * b)
        out += mult * ETA ** k * val
    return out


__all__ = ["Derivation", "derive", "statistics", "ETA", "D_SYM", "has_quadrature"]
