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
separately) and the diffusion is D = Cov(G) / d. For spherical SGD the rescaling adds an O(1/d)
Ito drift (second-order expansion of X / sqrt(q)), kept separately for the SDE. Everything stays
symbolic in the parameters.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import sympy as sp

from .gaussian import Expectation, NotPolynomial, TokenGaussian
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
    ito_correction[i]: for spherical SGD, d times the O(1/d) drift added by the rescaling
        w <- sqrt(d) w / |w| (second-order expansion of X / sqrt(q); zero for plain SGD).
    finite_d_correction[i]: d times the whole O(1/d) drift, the SDE drift being
        drift + finite_d_correction / d: the rescaling term plus the term from the fluctuation
        of the token norms in |grad|^2 (E|x_l|^2 = 1 only on average), see `statistics`.
    finite_d_note: "complete", or why the norm term is missing.
    method: "exact" when every expectation is in closed form, else "quadrature".
    """

    spec: ModelSpec
    state: tuple
    parameters: tuple
    population_loss: sp.Expr
    drift_eta1: tuple
    drift_eta2: tuple
    covariance: sp.Matrix
    ito_correction: tuple
    finite_d_correction: tuple
    finite_d_note: str
    method: str
    seconds: float = 0.0

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

    def drift_jacobian(self) -> sp.Matrix:
        """d drift_i / d state_j, symbolically (for fixed-point stability)."""
        return sp.Matrix([[sp.diff(f, x) for x in self.state] for f in self.drift])


@dataclass
class Statistics:
    """Per-sample statistics in the Gaussian variables (MATH.md section 4).

    base = (A_m, A_1..A_r, A_q, B); G_i = sum_k coef[i][k] base_k with coefficients
    polynomial in eta and the state. K: the norm-fluctuation statistic (see `statistics`)."""

    loss: sp.Expr
    base: list
    coef: list
    K: sp.Expr


def statistics(spec: ModelSpec, gauss: TokenGaussian) -> Statistics:
    """The per-sample loss and the increments G of MATH.md section 4 as combinations of the
    base statistics A_m, A_a, A_q, B (teacher at z*, student at z)."""
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
    base = [A_m] + A_e + [A_q, B]
    # Finite d: eta^2 |grad|^2 / d = (eta^2/d) sum_ll' dl_l dl_l' g_ll' with the token Gram
    # matrix g_ll' = (x_l + p_l/sqrt d).(x_l' + p_l'/sqrt d) = delta_ll' + H_ll'/d + (noise
    # independent of the projections). Projecting x_l on span(w*, u_a, w) (dimension k = 2 + r,
    # zero-mean coordinates s_l = (z*_l, zeta_l, z_l - mu_l) of covariance Gamma):
    # H_ll' = s_l^T Gamma^-1 s_l' - k delta_ll' + C_l'.zeta_l + C_l.zeta_l' + C_l.C_l'.
    # Stein's lemma removes Gamma^-1: E[f (s_l^T Gamma^-1 s_l' - k delta_ll')] =
    # sum_ij Gamma_ij E[d^2 f / ds_li ds_l'j], with f = dl_l dl_l' a function of (z*, z) only.
    # K = sum_ll' (that integrand), so E[K] is the O(1/d) excess of E[d dq] over -2 eta A_q +
    # eta^2 B divided by eta^2.
    zs, zz, m, q = gauss.zstar, gauss.z, gauss.m, gauss.q
    K = sp.Integer(0)
    for l in range(spec.L):
        for l2 in range(spec.L):
            f = dl[l] * dl[l2]
            K += (sp.diff(f, zs[l], zs[l2]) + m * (sp.diff(f, zs[l], zz[l2])
                                                   + sp.diff(f, zz[l], zs[l2]))
                  + q * sp.diff(f, zz[l], zz[l2]))
            if spec.r:
                pos = sp.Add(*[spec.C[l2][a] * gauss.zeta[l][a] + spec.C[l][a] * gauss.zeta[l2][a]
                               + spec.C[l][a] * spec.C[l2][a] for a in range(spec.r)])
                K += f * pos
    nb = len(base)
    iq, iB = nb - 2, nb - 1
    coef = []
    for i, x in enumerate((gauss.m,) + gauss.e):  # m and e_a
        row = [sp.Integer(0)] * nb
        row[i] = -ETA
        if spec.spherical:
            row[iq] = ETA * x
            row[iB] = -ETA ** 2 * x / 2
        coef.append(row)
    if not spec.spherical:  # q
        row = [sp.Integer(0)] * nb
        row[iq], row[iB] = -2 * ETA, ETA ** 2
        coef.append(row)
    return Statistics(loss, base, coef, K)


def _quadratic(c1, M, c2, zero):
    """c1^T M c2 (SymPy expressions or ring elements)."""
    out = zero
    for a in range(len(c1)):
        if c1[a] == 0:
            continue
        for b in range(len(c2)):
            if c2[b] != 0:
                out = out + c1[a] * M[a][b] * c2[b]
    return out


def _eta_part(expr, k):
    return sp.expand(expr).coeff(ETA, k)


def derive(spec: ModelSpec, diffusion: bool = True) -> Derivation:
    """Derive the population loss, the drift (O(eta) and O(eta^2) parts), Cov(G) and the
    spherical Ito correction. With G = sum_k c_k base_k: E G = c . E[base] and
    Cov(G_i, G_j) = c_i^T (E[base base^T] - E[base] E[base]^T) c_j.

    When every statistic is polynomial the combination is done in the polynomial ring of the
    exact engine (fast); otherwise in SymPy, with the Gauss-Hermite nodes as opaque factors."""
    t0 = time.perf_counter()
    gauss = TokenGaussian.of(spec)
    st = statistics(spec, gauss)
    E = Expectation(gauss, [st.loss] + st.base, extra_symbols=(ETA,))
    ex = E.exact
    try:
        R = ex.expect_spt(ex.to_spt(st.loss))
        mean = [ex.expect_spt(ex.to_spt(b)) for b in st.base]
        coef = [[ex._const(c) for c in row] for row in st.coef]
        product = lambda a, b: ex.expect_spt(ex.mul(ex.to_spt(a), ex.to_spt(b), merge=False))
        zero, back = ex.R.zero, ex.to_sympy
        method = "exact"
    except NotPolynomial:
        R = E.expect(st.loss)
        mean = [E.expect(b) for b in st.base]
        coef = st.coef
        product = lambda a, b: E.expect(a * b)
        zero, back = sp.Integer(0), sp.expand
        method = "quadrature"
    drift = [back(_quadratic(c, [[x] for x in mean], [1], zero)) for c in coef]
    d1 = tuple(_eta_part(x, 1) for x in drift)
    d2 = tuple(_eta_part(x, 2) for x in drift)
    n, nb = len(coef), len(st.base)
    cov = sp.zeros(n, n)
    ito = tuple(sp.Integer(0) for _ in range(n))
    corr, note = ito, "not derived (diffusion=False)"
    if diffusion:
        M = [[None] * nb for _ in range(nb)]
        for a in range(nb):
            for b in range(a, nb):
                M[a][b] = M[b][a] = product(st.base[a], st.base[b])
        C = [[M[a][b] - mean[a] * mean[b] for b in range(nb)] for a in range(nb)]
        for i in range(n):
            for j in range(i, n):
                cov[i, j] = cov[j, i] = back(_quadratic(coef[i], C, coef[j], zero))
        const = ex._const if method == "exact" else sp.sympify
        ito_raw = (_ito_correction(gauss, M, nb, coef, zero, const) if spec.spherical
                   else [zero] * n)
        ito = tuple(back(x) for x in ito_raw)
        if st.K.has(sp.DiracDelta):
            EK, note = None, ("rescaling term only: the token-norm term needs second "
                              "derivatives of the link, which has a kink here")
        else:
            EK = (ex.expect_spt(ex.to_spt(st.K)) if method == "exact" else E.expect(st.K))
            note = "complete"
        if EK is None:
            corr = ito
        elif spec.spherical:
            corr = tuple(back(x - const(ETA ** 2 * X / 2) * EK)
                         for x, X in zip(ito_raw, (gauss.m,) + gauss.e))
        else:
            corr = tuple([sp.Integer(0)] * (n - 1) + [back(const(ETA ** 2) * EK)])
    params = tuple(sp.Symbol(p, real=True) for p in spec.parameters)
    return Derivation(spec=spec, state=gauss.state, parameters=params,
                      population_loss=back(R), drift_eta1=d1, drift_eta2=d2, covariance=cov,
                      ito_correction=ito, finite_d_correction=corr, finite_d_note=note,
                      method=method, seconds=time.perf_counter() - t0)


def _ito_correction(gauss: TokenGaussian, M, nb, coef, zero, const):
    """Spherical SGD: with the plain increments d*dX = -eta A_X and d*dq = Gq = -2 eta A_q +
    eta^2 B, one step maps X to (X + dX) / sqrt(1 + dq) = X + dX - X dq/2 - dX dq/2
    + (3/8) X dq^2 + ...; the second-order terms add, per unit time (d steps),
    (1/d) E[(eta A_X) Gq / 2 + (3/8) X Gq^2]."""
    iq, iB = nb - 2, nb - 1
    gq = [zero] * nb
    gq[iq], gq[iB] = const(-2 * ETA), const(ETA ** 2)
    gq2 = _quadratic(gq, M, gq, zero)
    out = []
    for i, x in enumerate((gauss.m,) + gauss.e):
        a = [zero] * nb
        a[i] = const(ETA / 2)
        out.append(_quadratic(a, M, gq, zero) + const(sp.Rational(3, 8) * x) * gq2)
    return out


__all__ = ["Derivation", "Statistics", "derive", "statistics", "ETA", "D_SYM"]
