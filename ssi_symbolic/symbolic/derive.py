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

from .directions import DirectionPermutations
from .expectation import Expectation
from .gaussian import (NotPolynomial, TokenGaussian, dag_any, dag_diff, dag_free_symbols,
                       has_quadrature, permutation_generators)
from .token_sums import sum_expectations
from ..model.spec import ModelSpec, link_entries, token_symbols

ETA = sp.Symbol("eta", positive=True)
D_SYM = sp.Symbol("d", positive=True)


class Deferred:
    """A value computed on first use: Derivation(covariance=Deferred(f)) calls f() when the
    covariance is first read (converting a large Cov(G) from the exact engine's ring to SymPy
    costs more than printing it from the ring, which the exact backend does)."""

    def __init__(self, compute):
        self.compute = compute


class _DeferredField:
    """Descriptor of a dataclass field that may be given as a Deferred."""

    def __set_name__(self, owner, name):
        self.slot = "_" + name

    def __get__(self, obj, objtype=None):
        if obj is None:
            raise AttributeError("no default")  # dataclasses: the field has no default
        value = obj.__dict__[self.slot]
        if isinstance(value, Deferred):
            value = obj.__dict__[self.slot] = value.compute()
        return value

    def __set__(self, obj, value):
        obj.__dict__[self.slot] = value


@dataclass
class RingForms:
    """The outputs of an exact derivation as ring elements of its exact engine `engine`
    (before any conversion to SymPy): loss, drift_eta1[i], drift_eta2[i], covariance[(i, j)]
    for i <= j, ito_correction[i], finite_d_correction[i] (the last three empty without
    diffusion)."""

    engine: object
    population_loss: object
    drift_eta1: tuple
    drift_eta2: tuple
    covariance: dict
    ito_correction: tuple
    finite_d_correction: tuple


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
    ring: for an exact derivation, the same outputs as ring elements (RingForms), which the
        exact backend prints directly when they are large; None otherwise.
    For an exact derivation, covariance, ito_correction and finite_d_correction are converted
    from the ring to SymPy when first read (Deferred).
    """

    spec: ModelSpec
    state: tuple
    parameters: tuple
    population_loss: sp.Expr
    drift_eta1: tuple
    drift_eta2: tuple
    covariance: sp.Matrix = _DeferredField()
    ito_correction: tuple = _DeferredField()
    finite_d_correction: tuple = _DeferredField()
    finite_d_note: str
    method: str
    seconds: float = 0.0
    methods: dict | None = None
    ring: RingForms | None = None

    def output_methods(self) -> dict:
        """{output: "exact" | "closed form" | "quadrature"}: "quadrature" when the formula
        holds a Gauss-Hermite node, "closed form" when it holds a transcendental function of
        the state (arcsin, erfc, Phi_2, sqrt, exp ...), "exact" when it is a polynomial in
        the state (Gaussian moments)."""
        outs = {"population_loss": [self.population_loss],
                "drift_eta1": list(self.drift_eta1), "drift_eta2": list(self.drift_eta2),
                "covariance": list(self.covariance),
                "ito_correction": list(self.ito_correction),
                "finite_d_correction": list(self.finite_d_correction)}
        return {k: method_of(v, self.state) for k, v in outs.items()}

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
        """d drift_i / d state_j, symbolically (for fixed-point stability): eta times the
        derivative of drift_eta1 plus eta^2 times that of drift_eta2, each differentiated as a
        polynomial in the state when it is one (much faster than SymPy's generic diff)."""
        free = {}  # one dag_free_symbols memo for every derivative
        xs = set(self.state)

        def not_polynomial(x):
            # a sub-expression that reads the state other than as a sum, product or
            # non-negative integer power (each distinct one visited once: sp.Poly's own test
            # walked the free symbols of large closed forms for seconds before refusing)
            if x.is_Symbol or x.is_Add or x.is_Mul or not (dag_free_symbols(x, free) & xs):
                return False
            return not (x.is_Pow and x.exp.is_Integer and x.exp >= 0)

        def grad(f):
            if has_quadrature(f) or dag_any(f, not_polynomial):
                return [dag_diff(f, x, free=free) for x in self.state]
            try:
                P = sp.Poly(f, *self.state)
            except sp.PolynomialError:
                return [dag_diff(f, x, free=free) for x in self.state]
            if any(c.free_symbols & set(self.state) for c in P.coeffs()):
                # e.g. sqrt(1 - m^2) coefficients
                return [dag_diff(f, x, free=free) for x in self.state]
            return [P.diff(x).as_expr() for x in self.state]
        g1 = [grad(f) for f in self.drift_eta1]
        g2 = [grad(f) for f in self.drift_eta2]
        return sp.Matrix([[ETA * a + ETA ** 2 * b for a, b in zip(r1, r2)]
                          for r1, r2 in zip(g1, g2)])


@dataclass
class Statistics:
    """Per-sample statistics in the Gaussian variables (MATH.md section 4).

    base: the base statistics (A_m, A_1..A_r, A_q, B for a tied student; per token
    A_m_l = dl_l z*_l, A_q_l = dl_l z_l, B_l = dl_l^2 for an untied one).
    plain[i]: d times the plain-SGD increment of tracked variable i, as coefficients over base.
    gq: None for plain SGD; for spherical SGD one row per rescaled weight vector g (the tied
        w, each direction's w_k, the flattened untied W): d times the increment of its
        normalised squared norm Q_g = |w_g|^2 / (d n_w) over base (n_w = 1, or L untied).
    power[i]: {g: p}: the rescaling maps X_i to X_i / prod_g Q_g^p (p = 1/2 for an overlap
        with w_g, 1/2 + 1/2 for Q[k,h] of two directions, 1 for an untied squared norm).
    coef[i]: d times the whole first-order increment G_i = plain_i - sum_g p_ig X_i gq_g.
    norm_terms[i]: the statistic whose expectation is d times the O(1/d) drift of variable i
        caused by the fluctuation of the token norms in the gradients' inner products (see
        `statistics`): sum_k norm_coef[i][k] K[k] / b for a batch of b sequences (K: one term
        tied, one per token untied, one per pair k <= h of directions). With b > 1 the
        products of different sequences' gradients add sum_k norm_coef[i][k] (b - 1)/b X_k
        (`batch_cross_terms`).
    dl: dl/dz_l per token (one direction), or dl[k][l] (several directions)."""

    loss: sp.Expr
    base: list
    plain: list
    gq: list | None
    power: list
    coef: list
    norm_terms: list
    K: list = None
    norm_coef: list = None
    dl: list = None


def _stein_norm_term(dl, l, l2, zs, zz, m, q, cache=None):
    """sum_ij Gamma_ij E[d^2 (dl_l dl_l') / ds_li ds_l'j] integrand over the projections
    s = (z*, z) of covariance Gamma = [[1, m], [m, q]] (Stein's lemma, see `statistics`),
    by the product rule of _stein_gram_term (each derivative of a factor taken once)."""
    return _stein_gram_term(dl[l], dl[l2], (zs[l], zz[l]), (zs[l2], zz[l2]),
                            [[1, m], [m, q]], {} if cache is None else cache)


def _stein_gram_term(a, b, s_l, s_l2, Gamma, cache):
    """sum_ij Gamma_ij d^2 (a b) / ds_li ds_l'j for the field vectors s_l, s_l' of two tokens
    and their covariance Gamma (several directions: s = (z*_1..z*_K*, z_1..z_K)), by the product
    rule d^2(ab)/dx dy = a_xy b + a_x b_y + a_y b_x + a b_xy with the derivatives of the factors
    taken once each (`cache`; differentiating the product itself took most of the statistics
    of the K = 4 committee)."""
    def d(f, *xs):  # mixed partials in one order (they commute), each from the one before
        if not xs:
            return f
        xs = tuple(sorted(xs, key=str))
        key = (f, xs)
        if key not in cache:
            cache[key] = sp.diff(d(f, *xs[:-1]), xs[-1])
        return cache[key]
    n = len(s_l)
    out = []
    for i in range(n):
        x = s_l[i]
        for j in range(n):
            if Gamma[i][j] == 0:
                continue
            y = s_l2[j]
            second = (d(a, x, y) * b + d(a, x) * d(b, y) + d(a, y) * d(b, x) + a * d(b, x, y))
            out.append(Gamma[i][j] * second)
    return sp.Add(*out)


def statistics(spec: ModelSpec, gauss: TokenGaussian, norm: bool = True) -> Statistics:
    """The per-sample loss and the increments G of MATH.md section 4 (section 6 for an untied
    student, section 8 for several directions) as combinations of base statistics (teacher at
    z*, student at z). norm=False leaves out the token-norm terms K (second derivatives of the
    link, only needed for the O(1/d) drift): K and norm_terms are then zero."""
    L = spec.L
    Ks, Kd = gauss.teacher_directions, gauss.student_directions
    tf = [gauss.teacher_fields(l) for l in range(L)]   # tf[l][j]
    sf = [gauss.student_fields(l) for l in range(L)]   # sf[l][k]
    teacher_vars = spec.variables("teacher")
    to_teacher = {v: tf[l][j] for v, (j, l) in zip(
        teacher_vars, [(j, l) for j in range(Ks) for l in range(L)])}
    T = [sp.sympify(t).xreplace(to_teacher) for t in link_entries(spec.teacher)]
    S = [sp.sympify(s) for s in link_entries(spec.student)]
    if spec.noise:
        T = [t + sp.sqrt(spec.noise) * x for t, x in zip(T, gauss.xi)]
    res = [t - s for t, s in zip(T, S)]
    loss = sp.Rational(1, 2) * sp.Add(*[r ** 2 for r in res])
    # dl[k][l] = dl / dz_{k,l}
    dlk = [[-sp.Add(*[r * sp.diff(s, sf[l][k]) for r, s in zip(res, S)]) for l in range(L)]
           for k in range(Kd)]
    dl = dlk[0]
    zero = sp.Integer(0)
    b = sp.Integer(spec.batch)
    # A batch of b sequences (MATH.md 9): the step averages b gradients, so the eta^2 |grad|^2
    # part of d dq is eta^2 / b times the per-sequence B (plus O(1/d) cross terms).
    E2 = ETA ** 2 / b
    # Finite d: eta^2 grad_k . grad_h / d = (eta^2/d) sum_ll' dl_kl dl_hl' g_ll' with the token
    # Gram matrix g_ll' = (x_l + p_l/sqrt d).(x_l' + p_l'/sqrt d) = delta_ll' + H_ll'/d + (noise
    # independent of the projections). Projecting x_l on span(w*_j, u_a, w_k) (dimension
    # k = K* + r + K, zero-mean coordinates s_l = (z*_l, zeta_l, z_l - mu_l) of covariance
    # Gamma): H_ll' = s_l^T Gamma^-1 s_l' - k delta_ll' + C_l'.zeta_l + C_l.zeta_l' + C_l.C_l'.
    # Stein's lemma removes Gamma^-1: E[f (s_l^T Gamma^-1 s_l' - k delta_ll')] =
    # sum_ij Gamma_ij E[d^2 f / ds_li ds_l'j], with f = dl_kl dl_hl' a function of (z*, z) only.
    # K_kh = sum_ll' (that integrand), so E[K_kh] is the O(1/d) excess of E[d dQ_kh] over its
    # d -> infinity value divided by eta^2. An untied student has grad_{w_l} = dl_l x_l: only
    # l = l' enters, token by token (K_l), with that token's own overlaps.
    if spec.untied:
        zs, zz = gauss.zstar, gauss.z
        base = ([dl[l] * zs[l] for l in range(L)] + [dl[l] * zz[l] for l in range(L)]
                + [dl[l] ** 2 for l in range(L)])
        nb = 3 * L
        plain = []
        for l in range(L):  # m_l: -eta A_m_l
            row = [zero] * nb
            row[l] = -ETA
            plain.append(row)
        for l in range(L):  # q_l: -2 eta A_q_l + eta^2 B_l
            row = [zero] * nb
            row[L + l], row[2 * L + l] = -2 * ETA, E2
            plain.append(row)
        gq = None
        if spec.spherical:  # Q = sum_l q_l / L
            gq = [[zero] * L + [-2 * ETA / L] * L + [E2 / L] * L]
        power = [{0: sp.Rational(1, 2)}] * L + [{0: sp.Integer(1)}] * L
        cache = {}
        K = [_stein_norm_term(dl, l, l, zs, zz, gauss.ms[l], gauss.qs[l], cache) if norm
             else zero for l in range(L)]
        X = gauss.state
        sph = 1 if spec.spherical else 0
        norm_coef = ([[-sph * ETA ** 2 * X[l] / (2 * L)] * L for l in range(L)]
                     + [[ETA ** 2 * ((1 if k == l else 0) - sph * X[L + l] / L)
                         for k in range(L)] for l in range(L)])
    else:
        # base: A_M[k,j] = sum_l dl_kl z*_jl, A_E[k,a] = sum_l dl_kl (zeta_la + C[l,a]),
        # A_Q[k,h] = sum_l (dl_kl z_hl + dl_hl z_kl) for k < h and sum_l dl_kl z_kl for k = h,
        # B[k,h] = sum_l dl_kl dl_hl (k <= h); one direction: A_m, A_1..A_r, A_q, B
        pairs = [(k, h) for k in range(Kd) for h in range(k, Kd)]
        A_M = [sp.Add(*[dlk[k][l] * tf[l][j] for l in range(L)])
               for k in range(Kd) for j in range(Ks)]
        A_E = [sp.Add(*[dlk[k][l] * (gauss.zeta[l][a] + spec.C[l][a]) for l in range(L)])
               for k in range(Kd) for a in range(spec.r)]
        A_Q = [sp.Add(*[dlk[k][l] * sf[l][k] for l in range(L)]) if k == h else
               sp.Add(*[dlk[k][l] * sf[l][h] + dlk[h][l] * sf[l][k] for l in range(L)])
               for k, h in pairs]
        B = [sp.Add(*[dlk[k][l] * dlk[h][l] for l in range(L)]) for k, h in pairs]
        base = A_M + A_E + A_Q + B
        nb = len(base)
        iQ = {p: len(A_M) + len(A_E) + i for i, p in enumerate(pairs)}
        iB = {p: len(A_M) + len(A_E) + len(pairs) + i for i, p in enumerate(pairs)}
        # token-norm terms K_kh (one direction: K), see above
        P, Mo, Eo, Qo = gauss.overlap_matrices()
        Gamma = ([[P[i][j] for j in range(Ks)] + [Mo[h][i] for h in range(Kd)]
                  for i in range(Ks)]
                 + [[Mo[k][j] for j in range(Ks)] + [Qo[k][h] for h in range(Kd)]
                    for k in range(Kd)])
        Kn, diff_cache = {}, {}
        for k, h in pairs:
            Kkh = zero
            for l in range(L if norm else 0):
                for l2 in range(L):
                    if not gauss.multi:
                        Kkh += _stein_norm_term(dl, l, l2, gauss.zstar, gauss.z, gauss.m,
                                                gauss.q, diff_cache)
                    else:
                        Kkh += _stein_gram_term(dlk[k][l], dlk[h][l2], tf[l] + sf[l],
                                                tf[l2] + sf[l2], Gamma, diff_cache)
                    if spec.r:
                        pos = sp.Add(*[spec.C[l2][a] * gauss.zeta[l][a]
                                       + spec.C[l][a] * gauss.zeta[l2][a]
                                       + spec.C[l][a] * spec.C[l2][a] for a in range(spec.r)])
                        Kkh += dlk[k][l] * dlk[h][l2] * pos
            Kn[(k, h)] = Kkh
        plain, power, tracked = [], [], []
        for k in range(Kd):  # M[k,j] and E[k,a]: -eta A_X
            for i in list(range(k * Ks, (k + 1) * Ks)):
                row = [zero] * nb
                row[i] = -ETA
                plain.append(row)
                power.append({k: sp.Rational(1, 2)})
                tracked.append(None)
        for k in range(Kd):
            for a in range(spec.r):
                row = [zero] * nb
                row[len(A_M) + k * spec.r + a] = -ETA
                plain.append(row)
                power.append({k: sp.Rational(1, 2)})
                tracked.append(None)

        def q_row(k, h):  # dQ_kh = -eta A_Q[k,h] (-2 eta for k = h) + eta^2 B[k,h]
            row = [zero] * nb
            row[iQ[(k, h)]], row[iB[(k, h)]] = (-2 * ETA if k == h else -ETA), E2
            return row
        gq = [q_row(k, k) for k in range(Kd)] if spec.spherical else None
        for k, h in pairs:
            if spec.spherical and k == h:
                continue
            plain.append(q_row(k, h))
            power.append({k: sp.Rational(1, 2), h: sp.Rational(1, 2)} if spec.spherical
                         else {})
            tracked.append((k, h))
        # norm_coef[i][p]: the coefficient of K_p in the O(1/d) drift of output i
        X = gauss.state
        norm_coef = []
        for i, pw in enumerate(power):
            row = [zero] * len(pairs)
            if tracked[i] is not None:
                row[pairs.index(tracked[i])] += ETA ** 2
            if spec.spherical:
                for g, p in pw.items():
                    row[pairs.index((g, g))] += -p * ETA ** 2 * X[i]
            norm_coef.append(row)
        K = [Kn[p] for p in pairs]
    norm_terms = [sp.Add(*[c * k for c, k in zip(row, K)]) / b for row in norm_coef]
    X = gauss.state
    coef = [list(row) if gq is None else
            [c - sp.Add(*[p * X[i] * gq[g][n] for g, p in power[i].items()])
             for n, c in enumerate(row)] for i, row in enumerate(plain)]
    return Statistics(loss, base, plain, gq, power, coef, norm_terms, K, norm_coef,
                      dlk if gauss.multi else dl)


def batch_cross_terms(spec: ModelSpec, st: Statistics, mean, state) -> list:
    """d times the O(1/d) drift from the products of different sequences' gradients in a
    batch of b (MATH.md 9): |sum_i grad_i|^2 / b^2 holds b (b - 1) cross products of mean
    E[grad_i . grad_j] = X / d, where for a tied student, in the orthonormal frame (w*, u_a, v)
    of span(w*, u, w) with w = sqrt(d) (m w* + e.u + rho v), rho^2 = q - m^2 - |e|^2,

        X = E[A_m]^2 + sum_a E[A_a]^2 + (E[A_q] - m E[A_m] - sum_a e_a E[A_a])^2 / rho^2

    (the components of sqrt(d) E[grad] along w*, u_a and v; the parts of the tokens outside
    the span are independent across sequences and average out), and for an untied student one
    X_l per token with rho_l^2 = q_l - m_l^2. Returns, per output i,
    sum_k norm_coef[i][k] (b - 1)/b X_k (SymPy); all zero for b = 1."""
    b = spec.batch
    n = len(st.norm_coef)
    if b == 1:
        return [sp.Integer(0)] * n
    mean = [sp.sympify(x) for x in mean]
    if spec.untied:
        L = spec.L
        X = []
        for l in range(L):
            m_l, q_l = state[l], state[L + l]
            am, aq = mean[l], mean[L + l]
            X.append(am ** 2 + (aq - m_l * am) ** 2 / (q_l - m_l ** 2))
    else:
        r = spec.r
        m, e = state[0], state[1:1 + r]
        q = sp.Integer(1) if spec.spherical else state[1 + r]
        am, aa, aq = mean[0], mean[1:1 + r], mean[1 + r]
        rho2 = q - m ** 2 - sp.Add(*[x ** 2 for x in e])
        X = [am ** 2 + sp.Add(*[x ** 2 for x in aa])
             + (aq - m * am - sp.Add(*[x * y for x, y in zip(e, aa)])) ** 2 / rho2]
    f = sp.Rational(b - 1, b)
    return [f * sp.Add(*[c * x for c, x in zip(row, X)]) for row in st.norm_coef]


def method_of(exprs, state) -> str:
    """"quadrature", "closed form" or "exact" for a list of formulas (see
    Derivation.output_methods)."""
    from .gaussian import dag_any, has_quadrature
    state = {s for s in state if isinstance(s, sp.Symbol)}
    kind = "exact"
    for x in exprs:
        x = sp.sympify(x)
        if has_quadrature(x):
            return "quadrature"
        if kind == "exact" and x.free_symbols & state:
            if dag_any(x, lambda f: (isinstance(f, sp.Function) or (
                    f.is_Pow and not (f.exp.is_Integer and f.exp >= 0)))
                    and bool(f.free_symbols & state)):
                kind = "closed form"
    return kind


def _check_existence(spec, E, gauss):
    """Refuse a spec whose closed-form expectations do not exist: every completed square
    det(I + A Sigma) must be positive at the starting state (m = e = 0, q = 1) with the
    parameter defaults."""
    from ..errors import SpecError
    at = {s: 0 for s in gauss.state}
    at.update({s: 1 for s in gauss.qs if isinstance(s, sp.Symbol)})
    if gauss.multi:  # Q = I
        Q = gauss.overlap_matrices()[3]
        at.update({Q[k][k]: 1 for k in range(len(Q)) if isinstance(Q[k][k], sp.Symbol)})
    at.update({sp.Symbol(k, real=True): v for k, v in spec.parameters.items()})
    seen = set()  # a completed square recurs in many terms: each determinant checked once
    for cond, factor in E.conditions:
        if cond in seen:
            continue
        seen.add(cond)
        try:
            val = complex(sp.sympify(cond).subs(at).evalf())
        except (TypeError, ValueError):
            continue
        if val.real <= 0:
            raise SpecError(f"{spec.where('teacher.link')}: E[{factor}] does not exist (the "
                            f"Gaussian integral diverges: det(I + A Sigma) = {val.real:g} <= 0 "
                            f"at the starting state)")


def _combine(zero, parts):
    """sum_k t_k p_k for pairs (t_k, p_k): ring elements by _ring_sum, SymPy expressions as
    they are."""
    if hasattr(zero, "ring"):
        return _ring_sum(zero.ring, parts)
    return sp.Add(*[t * p for t, p in parts])


def _quadratic(c1, M, c2, zero):
    """c1^T M c2 (SymPy expressions or ring elements)."""
    return _combine(zero, [(c1[a] * c2[b], M[a][b]) for a in range(len(c1)) if c1[a] != 0
                           for b in range(len(c2)) if c2[b] != 0])


def _exact_drift(st: Statistics, ex, X, mean, zero) -> list:
    """E G_i = coef_i . E[base] in the exact engine's ring, computed as
    plain_i . E[base] - sum_g p_ig X_i (gq_g . E[base]) (coef = plain - sum_g p X gq, see
    `statistics`): the rows plain_i are sparse and gq_g . E[base] is taken once per rescaled
    vector g, instead of a dense coefficient row per output (the same ring element)."""
    const = ex._const
    dot = lambda row: sum((const(c) * m for c, m in zip(row, mean) if c != 0), zero)
    if st.gq is None:
        return [dot(row) for row in st.plain]
    gq_mean = [dot(row) for row in st.gq]
    return [dot(row) - sum((const(p * X[i]) * gq_mean[g] for g, p in st.power[i].items()),
                           zero)
            for i, row in enumerate(st.plain)]


def _ring_sum(R, scaled):
    """sum_k t_k p_k for pairs (t_k, p_k) of ring elements. The terms of the p_k are
    accumulated in one dict per monomial of the t_k (the increments' coefficients are a few
    powers of eta times numbers), and each accumulated monomial is multiplied by the t
    monomial once at the end: no general product, no new polynomial per addition."""
    groups = {}
    for t, p in scaled:
        if not p:
            continue
        for tm, tc in t.items():
            acc = groups.setdefault(tm, {})
            get = acc.get
            if tc == 1:
                for m, c in p.items():
                    acc[m] = get(m, 0) + c
            elif tc == -1:
                for m, c in p.items():
                    acc[m] = get(m, 0) - c
            else:
                for m, c in p.items():
                    acc[m] = get(m, 0) + tc * c
    out = {}
    mul = R.monomial_mul
    for tm, acc in groups.items():
        shifted = any(tm)
        for m, c in acc.items():
            if c:
                if shifted:
                    m = mul(m, tm)
                out[m] = out.get(m, 0) + c
    return R.from_dict({m: c for m, c in out.items() if c}) if out else R.zero


def _second_moments(st: Statistics, M, X, const, zero):
    """second(i, j, minus) = E[G_i G_j] - minus = c_i^T M c_j - minus (M = E[base base^T])
    for the increments c_i = plain_i - sum_g p_ig X_i gq_g, using the sparsity of the rows
    plain_i: c_i^T M c_j = plain_i^T M plain_j - sum_h p_jh X_j plain_i . v_h - sum_g p_ig X_i
    plain_j . v_g + sum_gh p_ig p_jh X_i X_j w_gh with v_g = M gq_g and w_gh = gq_g^T v_h
    (the same ring element as the dense c_i^T M c_j, with a few products per entry instead of
    one per pair of base statistics)."""
    nb = len(M)
    R = zero.ring
    plain = [{a: const(c) for a, c in enumerate(row) if c != 0} for row in st.plain]
    gq = [{a: const(c) for a, c in enumerate(row) if c != 0} for row in (st.gq or [])]
    v = [[_ring_sum(R, ((c, M[a][b]) for b, c in g.items())) for a in range(nb)] for g in gq]
    w = [[_ring_sum(R, ((c, v[h][a]) for a, c in g.items())) for h in range(len(gq))]
         for g in gq]
    pw = [{g: const(-p * X[i]) for g, p in st.power[i].items()} if gq else {}
          for i in range(len(plain))]
    minus_one = const(sp.Integer(-1))

    def second(i, j, minus=zero):
        pi, pj = plain[i], plain[j]
        parts = [(minus_one, minus)]
        parts += [(ca * cb, M[a][b]) for a, ca in pi.items() for b, cb in pj.items()]
        for h, ph in pw[j].items():
            parts += [(ph * ca, v[h][a]) for a, ca in pi.items()]
        for g, pg in pw[i].items():
            parts += [(pg * cb, v[g][b]) for b, cb in pj.items()]
            parts += [(pg * ph, w[g][h]) for h, ph in pw[j].items()]
        return _ring_sum(R, parts)
    return second


def _ring_eta_part(ex, p, k):
    """The coefficient of eta^k of a polynomial p of the exact engine's ring (eta one of its
    generators), as a ring element."""
    i = list(ex.R.gens).index(ex.gen[ETA])
    terms = {mon[:i] + (0,) + mon[i + 1:]: c for mon, c in p.terms() if mon[i] == k}
    return ex.R.from_dict(terms) if terms else ex.R.zero


def token_symmetric(spec: ModelSpec) -> bool:
    """Whether the teacher and student links are invariant under every permutation of the
    tokens (checked on the transposition z1 <-> z2 and the cycle z1 -> z2 -> ... -> zL -> z1,
    which generate the symmetric group)."""
    L = spec.L
    if L < 2:
        return False
    zs = token_symbols(L)
    for link in (spec.teacher, spec.student):
        for entry in link_entries(link):
            entry = sp.sympify(entry)
            for sw in permutation_generators(zs):
                if sp.expand(entry.xreplace(sw) - entry) != 0:
                    return False
    return True


class _TokenPermutation:
    """Renaming of the per-token overlaps (m_l, q_l) of an untied student inside ring elements
    of the exact engine: apply(p, sigma) is p with the overlaps of token k replaced by those of
    token sigma[k]. For token-symmetric links the token Gaussians are exchangeable up to these
    overlaps, so E[f(token sigma(1), token sigma(2), ...)] = apply(E[f(1, 2, ...)], sigma): the
    expectations of one token's statistics give every token's."""

    def __init__(self, ex, gauss):
        gens = list(ex.R.gens)
        self.ex = ex
        self.slots = [(gens.index(ex.gen[m]), gens.index(ex.gen[q]))
                      for m, q in zip(gauss.ms, gauss.qs)]

    def apply(self, p, sigma):
        if all(k == s for k, s in enumerate(sigma)):
            return p
        where = {}
        for k, s in enumerate(sigma):
            for a, b in zip(self.slots[k], self.slots[s]):
                where[a] = b
        return self.ex.rename(p, where)

    @staticmethod
    def sending(L, first, second=None):
        """A permutation sigma of range(L) with sigma[0] = first (and sigma[1] = second)."""
        head = [first] if second is None else [first, second]
        return head + [k for k in range(L) if k not in head]


def _direction_orbits(spec: ModelSpec, gauss, ex, diffusion: bool):
    """The exchangeable directions of a tied multi-index spec derived with Cov(G)
    (directions.DirectionPermutations), or None when the group is trivial or unused."""
    if not (spec.multi and not spec.untied and diffusion):
        return None
    dirs = DirectionPermutations(spec, gauss, ex, gauss.state)
    return None if dirs.trivial else dirs


def derive(spec: ModelSpec, diffusion: bool = True) -> Derivation:
    """Derive the population loss, the drift (O(eta) and O(eta^2) parts), Cov(G) and the
    spherical Ito correction. With G = sum_k c_k base_k: E G = c . E[base] and
    Cov(G_i, G_j) = c_i^T (E[base base^T] - E[base] E[base]^T) c_j.

    When every statistic is polynomial the combination is done in the polynomial ring of the
    exact engine (fast); otherwise in SymPy, with the Gauss-Hermite nodes as opaque factors.
    A spec with [derivation] diffusion = false gets the loss and the drift only."""
    if spec.untied:  # links polynomial in token sums: summed cumulants, any L
        D = derive_token_sums(spec, diffusion)
        if D is not None:
            return D
    t0 = time.perf_counter()
    diffusion = diffusion and spec.diffusion
    gauss = TokenGaussian.of(spec)
    L = spec.L
    # an untied student with token-symmetric links: the statistics of token l are those of
    # token 1 with the tokens permuted, so only token 1's (and for pairs, tokens 1 and 2's)
    # expectations are computed (base = [A_m_l]_l + [A_q_l]_l + [B_l]_l)
    symmetric = spec.untied and token_symmetric(spec)
    # a tied student without positional encoding and token-symmetric links: the tokens are
    # exchangeable, so with base_k = sum_l f_k(l), f = (dl z*, dl z, dl^2),
    # E[base_k] = L E[f_k(1)] and E[base_a base_b] = L E[f_a(1) f_b(1)] + L(L-1) E[f_a(1) f_b(2)]
    # (likewise the token-norm term K = sum_ll' K_ll', see _exchangeable_norm_term)
    exchangeable = (not spec.untied and not spec.multi and not spec.C and L > 1
                    and token_symmetric(spec))
    st = statistics(spec, gauss, norm=diffusion and not exchangeable)
    # the token-norm terms hold second derivatives of the links: their constants (1/pi^4 from
    # a 1/pi in a link) are registered with the others
    E = Expectation(gauss, [st.loss] + st.base + [t for t in st.norm_terms if t != 0]
                    + [k for k in (st.K or []) if k != 0], extra_symbols=(ETA,))
    ex = E.exact
    dirs = None
    try:
        R = ex.expect_ring(st.loss)
        raw_product = ex.expect_ring
        if symmetric:
            perm = _TokenPermutation(ex, gauss)
            first = {k: ex.expect_ring(st.base[k * L]) for k in range(3)}
            mean = [perm.apply(first[a // L], perm.sending(L, a % L))
                    for a in range(len(st.base))]
            pairs = {}

            def product(a, b):
                (ka, la), (kb, lb) = divmod(a, L), divmod(b, L)
                if la == lb:
                    key, sigma = (ka, kb, 0), perm.sending(L, la)
                else:
                    key, sigma = (ka, kb, 1), perm.sending(L, la, lb)
                if key not in pairs:
                    pairs[key] = raw_product(st.base[ka * L], st.base[kb * L + key[2]])
                return perm.apply(pairs[key], sigma)
        elif exchangeable:
            dl, zs, zz = st.dl, gauss.zstar, gauss.z
            rep = lambda l: [dl[l] * zs[l], dl[l] * zz[l], dl[l] ** 2]  # A_m, A_q, B terms
            one, two = rep(0), rep(1)
            cL, cLL = ex._const(sp.Integer(L)), ex._const(sp.Integer(L * (L - 1)))
            mean = [cL * ex.expect_ring(f) for f in one]

            def product(a, b):
                return (cL * raw_product(one[a], one[b])
                        + cLL * raw_product(one[a], two[b]))
        else:
            mean = [ex.expect_ring(b) for b in st.base]
            product = lambda a, b: raw_product(st.base[a], st.base[b])
            dirs = _direction_orbits(spec, gauss, ex, diffusion)
            if dirs is not None:  # one product per orbit of pairs
                product = dirs.orbit_function(product, 1)
        coef = [[ex._const(c) for c in row] for row in st.coef]
        zero, back = ex.R.zero, ex.to_sympy
        method = "exact"
    except NotPolynomial:
        if exchangeable and diffusion:  # the general path needs the token-norm terms
            st = statistics(spec, gauss, norm=True)
        symmetric = exchangeable = False
        # every expectation the derivation needs, at once: two processes share them
        # (Expectation.expect_many); one closed form per orbit of pairs of directions
        nb = len(st.base)
        perms = _direction_orbits(spec, gauss, ex, diffusion)
        pairs = [(a, b) for a in range(nb) for b in range(a, nb)] if diffusion else []
        if perms is not None:
            pairs = perms.representatives(pairs, 1)
        norm_items = ([t for t in st.norm_terms if t != 0]
                      if diffusion and not _kinked_norm(st) else [])
        values = E.expect_many([st.loss] + list(st.base)
                               + [st.base[a] * st.base[b] for a, b in pairs] + norm_items)
        R, mean = values[0], values[1:1 + nb]
        products = dict(zip(pairs, values[1 + nb:1 + nb + len(pairs)]))
        norm_values = dict(zip(norm_items, values[1 + nb + len(pairs):]))
        coef = st.coef
        product = lambda a, b: products[(a, b)]
        if perms is not None:  # the other pairs of an orbit by renaming
            product = perms.orbit_function(product, 1, sympy_values=True)
        zero, back = sp.Integer(0), sp.sympify
        method = None
    if method == "exact":  # the eta^1 and eta^2 parts taken in the polynomial ring
        drift = _exact_drift(st, ex, gauss.state, mean, zero)
        d1_ring = tuple(_ring_eta_part(ex, x, 1) for x in drift)
        d2_ring = tuple(_ring_eta_part(ex, x, 2) for x in drift)
        d1, d2 = tuple(back(x) for x in d1_ring), tuple(back(x) for x in d2_ring)
    else:  # coefficient by coefficient: the means (closed forms, nodes) are not multiplied out
        # (a zero coefficient is skipped: SymPy's 0 * x asks whether the large x is finite)
        def eta_part(row, k):
            cs = [(sp.expand(c).coeff(ETA, k), x) for c, x in zip(row, mean)]
            return sp.Add(*[c * x for c, x in cs if c != 0 and x != 0])
        d1 = tuple(eta_part(row, 1) for row in coef)
        d2 = tuple(eta_part(row, 2) for row in coef)
    n, nb = len(coef), len(st.base)
    cov = sp.zeros(n, n)
    # a batch of b: the increment is the mean of b independent G (eta^2 -> eta^2 / b above),
    # so its covariance is Cov(G) / b (MATH.md 9)
    ito = tuple(sp.Integer(0) for _ in range(n))
    corr, note = ito, "not derived (diffusion=False)"
    if diffusion:
        M = [[None] * nb for _ in range(nb)]
        for a in range(nb):
            for b in range(a, nb):
                M[a][b] = M[b][a] = product(a, b)  # E[base_a base_b]
        const = ex._const if method == "exact" else sp.sympify
        if method == "exact":  # Cov(G_i, G_j) = c_i^T M c_j - E[G_i] E[G_j], in the ring
            second = _second_moments(st, M, gauss.state, const, zero)
            def cov_entry(i, j):
                c = second(i, j, drift[i] * drift[j])
                if spec.batch != 1:
                    c = c.mul_ground(sp.QQ(1, spec.batch))
                return ex._reduce(c)
            if dirs is not None:  # one entry per orbit of pairs of overlaps
                cov_entry = dirs.orbit_function(cov_entry, 2)
            cov_ring = {(i, j): cov_entry(i, j) for i in range(n) for j in range(i, n)}
            cov = deferred_covariance(n, cov_ring, back)
        else:
            C = [[M[a][b] - mean[a] * mean[b] for b in range(nb)] for a in range(nb)]
            for i in range(n):
                for j in range(i, n):
                    cov[i, j] = cov[j, i] = (back(_quadratic(coef[i], C, coef[j], zero))
                                             / spec.batch)
        Mb = M
        if spec.batch != 1:  # second moments of the batch-averaged increment
            C = [[M[a][b] - mean[a] * mean[b] for b in range(nb)] for a in range(nb)]
            ib = const(sp.Rational(1, spec.batch))
            Mb = [[mean[a] * mean[c] + ib * C[a][c] for c in range(nb)] for a in range(nb)]
        ito_raw = (_ito_correction(st, gauss.state, Mb, zero, const) if st.gq is not None
                   else [zero] * n)
        if _kinked_norm(st):
            EK, note = None, ("rescaling term only: the token-norm term needs second "
                              "derivatives of the link, which has a kink here")
        elif exchangeable:
            EK, note = _exchangeable_norm_term(spec, st, gauss, ex)
        elif symmetric:  # E[K_l] from E[K_1]; norm_terms_i = sum_k norm_coef[i][k] K_k / b
            K1 = ex.expect_ring(st.K[0])
            EKl = [perm.apply(K1, perm.sending(L, l)) for l in range(L)]
            EK = [sum((ex.expect_ring(c / spec.batch) * k
                       for c, k in zip(row, EKl) if c != 0), zero) for row in st.norm_coef]
            note = "complete"
        else:
            EK = [(ex.expect_ring(t) if method == "exact" else norm_values[t])
                  if t != 0 else zero for t in st.norm_terms]
            note = "complete"
        corr_ring = ito_raw if EK is None else [x + k for x, k in zip(ito_raw, EK)]
        if method == "exact" and not (spec.batch != 1 and EK is not None):
            # converted to SymPy when read (the generated module prints the ring elements)
            ito = Deferred(lambda back=back, x=tuple(ito_raw): tuple(back(p) for p in x))
            corr = Deferred(lambda back=back, x=tuple(corr_ring): tuple(back(p) for p in x))
        else:
            ito = tuple(back(x) for x in ito_raw)
            corr = tuple(back(x) for x in corr_ring)
        if spec.batch != 1 and EK is not None:
            cross = batch_cross_terms(spec, st, [back(x) for x in mean], gauss.state)
            corr = tuple(sp.sympify(c) + x for c, x in zip(corr, cross))
    if method is None:
        _check_existence(spec, E, gauss)
    params = tuple(sp.Symbol(p, real=True) for p in spec.parameters)
    D = Derivation(spec=spec, state=gauss.state, parameters=params,
                   population_loss=back(R), drift_eta1=d1, drift_eta2=d2, covariance=cov,
                   ito_correction=ito, finite_d_correction=corr, finite_d_note=note,
                   method=method or "exact", seconds=time.perf_counter() - t0)
    if method == "exact" and not (diffusion and spec.batch != 1):  # (batch: SymPy terms)
        D.ring = RingForms(
            engine=ex, population_loss=R, drift_eta1=d1_ring, drift_eta2=d2_ring,
            covariance=cov_ring if diffusion else {},
            ito_correction=tuple(ito_raw) if diffusion else (),
            finite_d_correction=tuple(corr_ring) if diffusion else ())
    if method == "exact":
        # ring elements are polynomials in the state (their generators are the state, the
        # parameters and constants): exact without walking the formulas; only the batch
        # cross terms (divided by rho^2) were built in SymPy
        D.methods = {k: "exact" for k in ("population_loss", "drift_eta1", "drift_eta2",
                                          "covariance", "ito_correction")}
        D.methods["finite_d_correction"] = (
            method_of(corr, gauss.state) if diffusion and spec.batch != 1 else "exact")
    else:
        D.methods = D.output_methods()
    if not diffusion:
        for k in ("covariance", "ito_correction", "finite_d_correction"):
            D.methods.pop(k)
    order = ("exact", "closed form", "quadrature")
    D.method = max(D.methods.values(), key=order.index)
    return D


def _kinked_norm(st: Statistics) -> bool:
    """Whether the token-norm terms hold a Dirac delta (second derivatives of a kinked link):
    then only the rescaling part of the finite-d correction is derived."""
    return any(sp.sympify(t).has(sp.DiracDelta) for t in st.norm_terms)


def deferred_covariance(n, cov_ring, back):
    """Cov(G) as a Deferred n x n SymPy matrix: the ring elements cov_ring[(i, j)] (i <= j)
    converted by `back` when the covariance is first read."""
    def cov_sympy():
        out = sp.zeros(n, n)
        for (i, j), p in cov_ring.items():
            out[i, j] = out[j, i] = back(p)
        return out
    return Deferred(cov_sympy)


def derive_token_sums(spec: ModelSpec, diffusion: bool = True):
    """The Derivation of an untied student whose links are polynomials in token sums, from the
    expectations of token 1 and of the pair (1, 2) in summed cumulants
    (token_sums.sum_expectations, outputs in the all-token moments M), the other tokens by
    renaming the overlaps; None when the spec is not of that kind."""
    t0 = time.perf_counter()
    diffusion = diffusion and spec.diffusion
    got = sum_expectations(spec, diffusion, ETA)
    if got is None:
        return None
    form, B, out = got
    L, gauss, kinds = spec.L, form.g, ("m", "q")
    ex = B.ex
    perm = _TokenPermutation(ex, gauss)
    send = _TokenPermutation.sending
    state = gauss.state
    n = len(state)
    where = [("m", l) for l in range(L)] + [("q", l) for l in range(L)]
    drift = [perm.apply(out[kind], send(L, l)) for kind, l in where]
    d1 = tuple(_ring_eta_part(ex, x, 1) for x in drift)
    d2 = tuple(_ring_eta_part(ex, x, 2) for x in drift)
    back = ex.to_sympy
    R = out["loss"]
    zero = ex.R.zero
    cov_ring, ito_raw, corr_ring = {}, (), ()
    cov = sp.zeros(n, n)
    ito = corr = tuple(sp.Integer(0) for _ in range(n))
    note = "not derived (diffusion=False)"
    if diffusion:
        sph = spec.spherical
        mean0 = {"m": out["m"], "q": out["q"]}
        same = {}
        for a in kinds:
            for b in kinds:
                key = (a, b, 0) if (a, b) != ("q", "m") else ("m", "q", 0)
                same[(a, b)] = ex._reduce(out[key] - mean0[a] * mean0[b])
        ones = send(L, 1, 0)
        pair = {}
        for a in kinds:
            for b in kinds:
                pair[(a, b)] = ex._reduce(out[(a, b, 1)] - mean0[a] * perm.apply(mean0[b], ones))
        for i in range(n):
            ki, li = where[i]
            for j in range(i, n):
                kj, lj = where[j]
                if li == lj:
                    cov_ring[(i, j)] = perm.apply(same[(ki, kj)], send(L, li))
                else:
                    cov_ring[(i, j)] = perm.apply(pair[(ki, kj)], send(L, li, lj))
        cov = deferred_covariance(n, cov_ring, back)
        c = ex._const
        if sph:
            ito0 = {}
            for a in kinds:
                p = B.ex._const(form.power[a])
                X = ex.gen[(form.m if a == "m" else form.q)[0]]
                ito0[a] = ex._reduce(-p * out[("gqx", a)]
                                     + p * (p + 1) * c(sp.Rational(1, 2)) * X * out["gq2"])
        else:
            ito0 = {a: zero for a in kinds}
        # token-norm terms: m_l: -sph eta^2 m_l / (2L) E[sum K]; q_l: eta^2 E[K_l] -
        # sph eta^2 q_l / L E[sum K] (derive.statistics, norm_coef)
        s = 1 if sph else 0
        EK0 = {"m": ex._reduce(c(-s * ETA ** 2 * form.m[0] / (2 * L)) * out["Ksum"]),
               "q": ex._reduce(c(ETA ** 2) * out["K0"]
                               - c(s * ETA ** 2 * form.q[0] / L) * out["Ksum"])}
        ito_raw = tuple(perm.apply(ito0[k], send(L, l)) for k, l in where)
        corr_ring = tuple(perm.apply(ex._reduce(ito0[k] + EK0[k]), send(L, l))
                          for k, l in where)
        ito = Deferred(lambda x=ito_raw: tuple(back(p) for p in x))
        corr = Deferred(lambda x=corr_ring: tuple(back(p) for p in x))
        note = "complete"
    params = tuple(sp.Symbol(p, real=True) for p in spec.parameters)
    D = Derivation(spec=spec, state=state, parameters=params, population_loss=back(R),
                   drift_eta1=tuple(back(x) for x in d1), drift_eta2=tuple(back(x) for x in d2),
                   covariance=cov, ito_correction=ito, finite_d_correction=corr,
                   finite_d_note=note, method="exact", seconds=0.0)
    D.ring = RingForms(engine=ex, population_loss=R, drift_eta1=d1, drift_eta2=d2,
                       covariance=cov_ring, ito_correction=ito_raw,
                       finite_d_correction=corr_ring)
    D.ring.token_sums = B
    D.methods = {k: "exact" for k in ("population_loss", "drift_eta1", "drift_eta2")}
    if diffusion:
        D.methods.update({k: "exact" for k in ("covariance", "ito_correction",
                                               "finite_d_correction")})
    D.method = "exact"
    D.seconds = time.perf_counter() - t0
    return D


def _exchangeable_norm_term(spec, st, gauss, ex):
    """(EK, note) for exchangeable tokens (tied student, no encoding, token-symmetric links):
    K = sum_ll' K_ll' has E[K] = L E[K_11] + L (L - 1) E[K_12], and the norm term of output i
    is norm_coef[i][0] E[K] / b. EK is None (with the note) when the link has a kink."""
    L, dl, zs, zz = spec.L, st.dl, gauss.zstar, gauss.z
    cache = {}
    K11 = _stein_norm_term(dl, 0, 0, zs, zz, gauss.m, gauss.q, cache)
    K12 = _stein_norm_term(dl, 0, 1, zs, zz, gauss.m, gauss.q, cache)
    if K11.has(sp.DiracDelta) or K12.has(sp.DiracDelta):
        return None, ("rescaling term only: the token-norm term needs second derivatives of "
                      "the link, which has a kink here")
    EK = (ex._const(sp.Integer(L)) * ex.expect_ring(K11)
          + ex._const(sp.Integer(L * (L - 1))) * ex.expect_ring(K12))
    return [ex.expect_ring(row[0] / spec.batch) * EK for row in st.norm_coef], \
        "complete"


def _ito_correction(st: Statistics, X, M, zero, const):
    """Spherical SGD: one step maps X to (X + dX) / prod_g (1 + dQ_g)^p_g (p = 1/2 per weight
    vector an overlap involves, 1 for an untied squared norm) with d*dX = plain_X . base and
    d*dQ_g = gq_g . base. To second order, prod_g (1 + dQ_g)^-p_g = 1 - sum_g p_g dQ_g +
    sum_g p_g (p_g + 1)/2 dQ_g^2 + sum_{g < g'} p_g p_g' dQ_g dQ_g', so per unit time (d steps)
    the rescaling adds (1/d) E[-sum_g p_g (d dX)(d dQ_g) + X (sum_g p_g (p_g + 1)/2 (d dQ_g)^2
    + sum_{g < g'} p_g p_g' (d dQ_g)(d dQ_g'))]. (Tied: -(1/2) dX dQ + (3/8) X dQ^2.)"""
    gq = [[const(c) for c in row] for row in st.gq]
    gram = {}

    def second(g, h):  # E[(d dQ_g)(d dQ_h)]
        key = (min(g, h), max(g, h))
        if key not in gram:
            gram[key] = _quadratic(gq[g], M, gq[h], zero)
        return gram[key]
    out = []
    for i, row in enumerate(st.plain):
        groups = sorted(st.power[i].items())
        parts = []
        for g, p in groups:
            parts += [(const(-p * c) * gq[g][b], M[a][b]) for a, c in enumerate(row) if c != 0
                      for b in range(len(gq[g])) if gq[g][b] != 0]
        for n, (g, p) in enumerate(groups):
            parts.append((const(p * (p + 1) / 2 * X[i]), second(g, g)))
            for h, p2 in groups[n + 1:]:
                parts.append((const(p * p2 * X[i]), second(g, h)))
        out.append(_combine(zero, parts))
    return out


__all__ = ["Derivation", "Deferred", "RingForms", "Statistics", "derive", "statistics", "ETA", "D_SYM"]
