"""Independent Monte Carlo check of the generated modules (loss, drift, Cov(G), diffusion).

Everything on the Monte Carlo side is computed straight from the model definitions (MATH.md
sections 1, 3, 4); nothing from ``ssi_symbolic.gaussian`` or ``ssi_symbolic.derive`` is used. The
only project API used is ``make_spec`` / ``generate`` / ``load_module`` and the public functions
of the generated module, whose values are the thing under test.

Sampling (per token l, independent across tokens; s^2 = q - m^2 - |e|^2 > 0):

    zs_l ~ N(0, 1),  u_la ~ N(0, 1),  w_l ~ N(0, 1)  (all independent)
    zeta_la = u_la,  z_l = m zs_l + sum_a e_a u_la + s w_l + mu_l,  mu_l = sum_a C[l, a] e_a,

which has exactly the moments of the spec: E z_l = mu_l, Var z_l = q, Cov(zs_l, z_l) = m,
Cov(zeta_la, z_l) = e_a, Cov(zeta_la, zeta_lb) = delta_ab, zeta independent of zs.
Labels y_k = g*_k(zs) + sqrt(Delta) xi_k with one xi per output entry.

Links are evaluated INDEPENDENTLY of the package: the link strings are parsed with plain SymPy
(``sympy.sympify`` with He -> ``sympy.hermite_prob``), differentiated with ``sympy.diff`` and
turned into NumPy functions with ``sympy.lambdify``. (One test cross-checks these against the
module's own ``teacher_link`` / ``student_link`` / ``student_link_gradient`` so that a Monte
Carlo disagreement can be attributed to the expectations rather than to the links.)

Tolerances come only from the Monte Carlo standard error: |generated - mc| <= K_SIGMA * stderr
(+ 1e-9 (1 + |mc|) for round-off, + the module's own quadrature error estimate when
METHOD == 'quadrature'). Means use std / sqrt(N); the covariance Cov(G) uses the spread of
N_BATCHES batch covariances. Everything is seeded, so the outcome is deterministic.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import pytest
import sympy as sp

from ssi_symbolic.backends.registry import generate
from ssi_symbolic.backends.files import load_module
from ssi_symbolic.model.spec import make_spec

K_SIGMA = 5.0       # tolerance in Monte Carlo standard errors
N_BATCHES = 50      # batches for the standard error of the sample covariance
ETA = 0.1           # learning rate at which drift / covariance are compared
D_DIM = 250.0       # input dimension d for diffusion = Cov(G) / d


# ----------------------------------------------------------------------------------------------
# random polynomial links
# ----------------------------------------------------------------------------------------------

def random_poly(rng, L, n_terms, max_deg):
    """A random polynomial link string in z1..zL: `n_terms` distinct monomials, each a product of
    He(k_l, z_l) over the tokens with total degree 1..max_deg (so cross-token products occur), with
    coefficients +-[0.3, 1.0] rounded to one decimal (exact rationals in the spec). The first
    term has degree exactly max_deg."""
    terms, seen = [], set()
    while len(terms) < n_terms:
        deg = max_deg if not terms else int(rng.integers(1, max_deg + 1))
        ks = np.zeros(L, dtype=int)
        for _ in range(deg):
            ks[rng.integers(L)] += 1
        if tuple(ks) in seen:
            continue
        seen.add(tuple(ks))
        c = round(float(rng.uniform(0.3, 1.0)), 1)
        sign = "-" if rng.random() < 0.5 else "+"
        factors = [f"z{l + 1}" if k == 1 else f"He({k}, z{l + 1})" for l, k in enumerate(ks) if k]
        terms.append(f"{sign} {c}*" + "*".join(factors))
    text = " ".join(terms)
    return text[2:] if text.startswith("+ ") else text


def random_positional(rng, L, r):
    """An L x r positional matrix C with entries in [-1, 1] rounded to one decimal."""
    return np.round(rng.uniform(-1.0, 1.0, (L, r)), 1).tolist()


@dataclass
class Case:
    """One model of the Monte Carlo comparison.

    params: parameter defaults given to the spec; values: the parameter values at which the module
    is evaluated (deliberately different from the defaults). n: Monte Carlo sample size.
    """

    name: str
    L: int
    teacher: str
    student: str | None = None
    C: list | None = None
    params: dict = field(default_factory=dict)
    values: dict = field(default_factory=dict)
    noise: float = 0.0
    spherical: bool = True
    method: str = "exact"
    n: int = 600_000
    seed: int = 0

    @property
    def r(self):
        return len(self.C[0]) if self.C else 0

    @property
    def student_text(self):
        return self.student if self.student is not None else self.teacher


def _cases():
    """The cases: L = 1..4, r = 0, 1, 2, spherical and plain, label noise, a parameter, a
    vector-valued link and non-polynomial (quadrature) students. The random links come from
    fixed seeds (one generator per case), so the list is the same on every run.

    Degrees are kept small on purpose: with a teacher of degree dT and a student of degree dS,
    dl has degree max(dT, dS) + dS - 1 and Cov(G) involves E[dl^4]-type moments, whose Monte
    Carlo estimate (and its batch standard error) becomes unreliable for heavy-tailed high
    degrees. So either dT <= 3 with a linear student or dT, dS <= 2 (dl of degree <= 3).
    (With a cubic student, e.g. L = 1, the batch standard error of Cov(G) is far too small: the
    sample misses the tail and underestimates Cov(G) by ~2x at 6 "standard errors".)

    mc_tanh_student_pe exercises the quadrature path with a positional direction, where zeta
    must be regressed on both z*_l and z_l (zeta_la is independent of z*_l but correlated with
    z_l, and z_l with z*_l)."""
    out = []
    g = np.random.default_rng(101)
    out.append(Case("mc_L1_sph", 1, random_poly(g, 1, 2, 3), random_poly(g, 1, 1, 1),
                    seed=11))
    g = np.random.default_rng(102)
    out.append(Case("mc_L2_plain_pe1_noise", 2, random_poly(g, 2, 3, 2),
                    random_poly(g, 2, 2, 2), C=random_positional(g, 2, 1), noise=0.1,
                    spherical=False, n=1_200_000, seed=12))
    g = np.random.default_rng(103)
    out.append(Case("mc_L3_sph_pe2", 3, random_poly(g, 3, 3, 2), random_poly(g, 3, 3, 2),
                    C=random_positional(g, 3, 2), seed=13))
    g = np.random.default_rng(104)
    out.append(Case("mc_L4_plain_pe1_param", 4, random_poly(g, 4, 2, 2) + " + beta*z1*z4",
                    random_poly(g, 4, 2, 2) + " + beta*z4", C=random_positional(g, 4, 1),
                    params={"beta": 0.7}, values={"beta": -0.6}, spherical=False, seed=14))
    g = np.random.default_rng(105)
    out.append(Case("mc_L4_sph_cubic_teacher", 4, random_poly(g, 4, 3, 3),
                    random_poly(g, 4, 3, 1), seed=15))
    g = np.random.default_rng(106)
    out.append(Case("mc_L2_plain_pe2", 2, random_poly(g, 2, 3, 2), random_poly(g, 2, 3, 2),
                    C=random_positional(g, 2, 2), spherical=False, seed=16))
    out.append(Case("mc_vector_noise", 2, "Matrix([z1*z2, He(2, z1)])", C=[[1.0], [-1.0]],
                    noise=0.1, n=1_000_000, seed=17))
    out.append(Case("mc_tanh_student_plain", 1, "He(2, z1) + 0.5*z1", "1.5*tanh(z1)",
                    spherical=False, method="quadrature", seed=18))
    out.append(Case("mc_tanh_student_pe", 1, "He(2, z1) + 0.5*z1", "1.5*tanh(z1)", C=[[0.6]],
                    method="quadrature", seed=19))
    return out


CASES = _cases()
CASE_IDS = [c.name for c in CASES]


# ----------------------------------------------------------------------------------------------
# independent link evaluation (plain SymPy -> NumPy)
# ----------------------------------------------------------------------------------------------

def _he(k, x):
    return sp.hermite_prob(int(k), x)


class Link:
    """A link string evaluated with plain SymPy: entries g_k and the gradient dg_k/dz_l, as NumPy
    functions of an (N, L) array (parameters substituted by their values)."""

    def __init__(self, text, L, values):
        zs = sp.symbols(f"z1:{L + 1}", real=True)
        local = {f"z{l + 1}": zs[l] for l in range(L)}
        local.update(He=_he, tanh=sp.tanh, Matrix=sp.Matrix, sqrt=sp.sqrt, exp=sp.exp)
        local.update({p: sp.Symbol(p, real=True) for p in values})
        expr = sp.sympify(text, locals=local)
        entries = list(expr) if isinstance(expr, sp.MatrixBase) else [expr]
        subs = {sp.Symbol(p, real=True): sp.nsimplify(v) for p, v in values.items()}
        entries = [sp.sympify(e).subs(subs) for e in entries]
        self.L = L
        self.K = len(entries)
        self._g = [sp.lambdify(zs, e, "numpy") for e in entries]
        self._dg = [[sp.lambdify(zs, sp.diff(e, z), "numpy") for z in zs] for e in entries]

    def _call(self, f, Z):
        cols = [Z[:, l] for l in range(self.L)]
        return np.broadcast_to(np.asarray(f(*cols), dtype=float), (Z.shape[0],))

    def values(self, Z):
        """(N, K) link entries."""
        return np.stack([self._call(f, Z) for f in self._g], axis=1)

    def gradient(self, Z):
        """(N, K, L) derivatives dg_k/dz_l."""
        return np.stack([np.stack([self._call(f, Z) for f in row], axis=1) for row in self._dg],
                        axis=1)


# ----------------------------------------------------------------------------------------------
# the Monte Carlo estimate
# ----------------------------------------------------------------------------------------------

def random_state(case):
    """A random interior state: (m, e_1..e_r) of norm in [0.3, 0.85] sqrt(q); q ~ U[0.5, 1.5]
    for plain SGD (q = 1 for spherical). Returns (m, e vector, q, state tuple in OVERLAPS
    order)."""
    rng = np.random.default_rng(1000 + case.seed)
    q = 1.0 if case.spherical else float(rng.uniform(0.5, 1.5))
    v = rng.standard_normal(1 + case.r)
    v *= np.sqrt(q) * rng.uniform(0.3, 0.85) / np.linalg.norm(v)
    m, e = float(v[0]), v[1:].astype(float)
    state = (m, *map(float, e)) + (() if case.spherical else (q,))
    return m, e, q, state


def per_sample(case, m, e, q, n, seed, teacher=None):
    """Per-sample loss l (N,), G1 (N, n_state) and G2 (N, n_state) straight from MATH.md.
    `teacher` optionally overrides the teacher link string (for the sanity test)."""
    rng = np.random.default_rng(seed)
    L, r = case.L, case.r
    zs = rng.standard_normal((n, L))
    u = rng.standard_normal((n, L, r))                  # zeta_la
    w = rng.standard_normal((n, L))
    # the label noise is drawn last, one per output entry, as before this split
    xi = (rng.standard_normal((n, Link(teacher or case.teacher, L, case.values).K))
          if case.noise else None)
    return increments(case, m, e, q, zs, u, w, xi, teacher=teacher)


def increments(case, m, e, q, zs, u, w, xi=None, teacher=None):
    """Loss, G1 and G2 (MATH.md sections 3-4) of the samples given by their standard normal
    coordinates: zs (N, L), zeta = u (N, L, r), w (N, L) and, with label noise, xi (N, K);
    z = m zs + u e + s w + mu (see the module docstring)."""
    n, L, r = zs.shape[0], case.L, case.r
    C = np.asarray(case.C, dtype=float) if r else np.zeros((L, 0))
    s2 = q - m ** 2 - float(e @ e)
    assert s2 > 0, "state outside the interior"
    mu = C @ e                                          # (L,)
    z = m * zs + u @ e + np.sqrt(s2) * w + mu           # (N, L)
    T = Link(teacher or case.teacher, L, case.values)
    S = Link(case.student_text, L, case.values)
    y = T.values(zs)
    if case.noise:
        y = y + np.sqrt(case.noise) * xi
    res = y - S.values(z)                               # (N, K)
    loss = 0.5 * np.sum(res ** 2, axis=1)
    dl = -np.einsum("nk,nkl->nl", res, S.gradient(z))    # dl/dz_l
    A_m = np.sum(dl * zs, axis=1)
    A_e = np.einsum("nl,nla->na", dl, u + C[None, :, :])
    A_q = np.sum(dl * z, axis=1)
    B = np.sum(dl ** 2, axis=1)
    if case.spherical:
        G1 = np.column_stack([-(A_m - m * A_q)] + [-(A_e[:, a] - e[a] * A_q) for a in range(r)])
        G2 = np.column_stack([-0.5 * m * B] + [-0.5 * e[a] * B for a in range(r)])
    else:
        G1 = np.column_stack([-A_m] + [-A_e[:, a] for a in range(r)] + [-2.0 * A_q])
        G2 = np.column_stack([np.zeros(n)] * (1 + r) + [B])
    return loss, G1, G2


@dataclass
class MC:
    """Monte Carlo estimates (value, standard error) of the generated quantities."""

    loss: tuple
    drift_eta1: tuple
    drift_eta2: tuple
    drift: tuple
    covariance: tuple


def _mean_se(x):
    return x.mean(axis=0), x.std(axis=0, ddof=1) / np.sqrt(x.shape[0])


def estimate(case, m, e, q, eta=ETA, seed=None, teacher=None):
    """Monte Carlo estimates of loss, E G1, E G2, E G and Cov(G) (batch-mean covariance with
    the batch spread as its standard error)."""
    loss, G1, G2 = per_sample(case, m, e, q, case.n, seed if seed is not None else case.seed,
                              teacher=teacher)
    G = eta * G1 + eta ** 2 * G2
    batches = np.array_split(G, N_BATCHES)
    covs = np.array([np.cov(b, rowvar=False, ddof=1).reshape(G.shape[1], G.shape[1])
                     for b in batches])
    cov = (covs.mean(axis=0), covs.std(axis=0, ddof=1) / np.sqrt(N_BATCHES))
    return MC(_mean_se(loss), _mean_se(G1), _mean_se(G2), _mean_se(G), cov)


# ----------------------------------------------------------------------------------------------
# fixtures / caches
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def out_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("mc_generated")


_MODULES = {}


def module_for(case, out_dir):
    """Generate (once per test session) and import the module of a case."""
    if case.name not in _MODULES:
        spec = make_spec(case.name, case.L, case.teacher, student=case.student,
                         positional=case.C, parameters=case.params, noise=case.noise,
                         spherical=case.spherical)
        path, _ = generate(spec, out_dir=out_dir)
        _MODULES[case.name] = load_module(path)
    return _MODULES[case.name]


@functools.lru_cache(maxsize=None)
def mc_for(name):
    case = CASES[CASE_IDS.index(name)]
    m, e, q, _ = random_state(case)
    return estimate(case, m, e, q)


def _vec(x):
    return np.atleast_1d(np.asarray(x, dtype=float))


def check(label, gen, mc, extra=0.0):
    """Assert |gen - mc| <= K_SIGMA * se + extra + 1e-9 (1 + |mc|) entrywise, with a message
    listing every entry (generated, Monte Carlo, standard error, z-score)."""
    gen = np.asarray(gen, dtype=float)
    val, se = (np.asarray(a, dtype=float) for a in mc)
    gen = gen.reshape(val.shape)
    extra = np.broadcast_to(np.asarray(extra, dtype=float), val.shape)
    tol = K_SIGMA * se + extra + 1e-9 * (1.0 + np.abs(val))
    bad = np.abs(gen - val) > tol
    if bad.any():
        lines = [f"{label}: generated code disagrees with Monte Carlo"]
        for idx in np.ndindex(val.shape):
            z = (gen[idx] - val[idx]) / se[idx] if se[idx] > 0 else np.inf
            flag = "  <-- OUTSIDE" if bad[idx] else ""
            lines.append(f"  [{idx}] generated={gen[idx]:.6g} mc={val[idx]:.6g} "
                         f"se={se[idx]:.3g} z={z:.2f} quad_err={extra[idx]:.2g}{flag}")
        pytest.fail("\n".join(lines))


def quad_err(mod, function, state, **kw):
    """The module's own quadrature error estimate (0 for exact modules)."""
    if mod.METHOD != "quadrature":
        return 0.0
    _, err = mod.quadrature_error(function, *state, **kw)
    return np.asarray(err, dtype=float)


# ----------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_module_metadata(case, out_dir):
    """The generated module has the expected state variables (m, e / e1..er, q for plain SGD)
    and METHOD ('exact' for polynomial links, 'quadrature' for the tanh student)."""
    mod = module_for(case, out_dir)
    es = ("e",) if case.r == 1 else tuple(f"e{a + 1}" for a in range(case.r))
    assert tuple(mod.OVERLAPS) == ("m",) + es + (() if case.spherical else ("q",))
    assert mod.METHOD == case.method


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_links_match_independent_evaluation(case, out_dir):
    """The module's teacher_link, student_link and student_link_gradient equal the links
    evaluated independently (plain SymPy parse + sympy.diff + lambdify) at random points, so that
    the Monte Carlo below simulates the same model as the generated code."""
    mod = module_for(case, out_dir)
    Z = np.random.default_rng(7).standard_normal((64, case.L)) * 1.3
    cols = [Z[:, l] for l in range(case.L)]
    T = Link(case.teacher, case.L, case.values)
    S = Link(case.student_text, case.L, case.values)
    tv = np.asarray(mod.teacher_link(*cols, **case.values), dtype=float).reshape(T.K, -1).T
    sv = np.asarray(mod.student_link(*cols, **case.values), dtype=float).reshape(S.K, -1).T
    rows = mod.student_link_gradient(*cols, **case.values)
    grad = np.array([[np.broadcast_to(np.asarray(x, dtype=float), (Z.shape[0],)) for x in row]
                     for row in rows])                  # (K, L, N)
    np.testing.assert_allclose(tv, T.values(Z), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sv, S.values(Z), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.moveaxis(grad, 2, 0), S.gradient(Z), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_population_loss_matches_mc(case, out_dir):
    """population_loss(state) = E[1/2 ||y - y_hat||^2] within K_SIGMA Monte Carlo standard
    errors (+ the quadrature error estimate for quadrature modules)."""
    mod = module_for(case, out_dir)
    *_, state = random_state(case)
    mc = mc_for(case.name)
    gen = mod.population_loss(*state, **case.values)
    check(f"{case.name} population_loss at {state}", gen, mc.loss,
          quad_err(mod, mod.population_loss, state, **case.values))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_drift_matches_mc(case, out_dir):
    """drift_eta1 = E[G1], drift_eta2 = E[G2] and drift(eta) = E[G] (every overlap) within
    K_SIGMA Monte Carlo standard errors (+ quadrature error estimate)."""
    mod = module_for(case, out_dir)
    *_, state = random_state(case)
    mc = mc_for(case.name)
    v = case.values
    check(f"{case.name} drift_eta1 at {state}", _vec(mod.drift_eta1(*state, **v)),
          mc.drift_eta1, quad_err(mod, mod.drift_eta1, state, **v))
    check(f"{case.name} drift_eta2 at {state}", _vec(mod.drift_eta2(*state, **v)),
          mc.drift_eta2, quad_err(mod, mod.drift_eta2, state, **v))
    check(f"{case.name} drift(eta={ETA}) at {state}", _vec(mod.drift(*state, eta=ETA, **v)),
          mc.drift, quad_err(mod, mod.drift, state, eta=ETA, **v))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_covariance_and_diffusion_match_mc(case, out_dir):
    """covariance(state, eta) = Cov(G) entrywise (n x n over the state) within K_SIGMA
    batch-based standard errors, and diffusion(state, eta, d) = Cov(G) / d."""
    mod = module_for(case, out_dir)
    *_, state = random_state(case)
    mc = mc_for(case.name)
    v = case.values
    n = len(mod.OVERLAPS)
    cov = np.asarray(mod.covariance(*state, eta=ETA, **v), dtype=float).reshape(n, n)
    qe = quad_err(mod, mod.covariance, state, eta=ETA, **v)
    check(f"{case.name} covariance(eta={ETA}) at {state}", cov, mc.covariance, qe)
    np.testing.assert_allclose(cov, cov.T, rtol=1e-12, atol=1e-15)
    diff = np.asarray(mod.diffusion(*state, eta=ETA, d=D_DIM, **v), dtype=float)
    assert diff.shape == (n, n)
    check(f"{case.name} diffusion(eta={ETA}, d={D_DIM}) at {state}", diff,
          (mc.covariance[0] / D_DIM, mc.covariance[1] / D_DIM), np.asarray(qe) / D_DIM)


def _failing_entries(gen, mc):
    """Number of entries with |gen - mc| > K_SIGMA * se + 1e-9 (1 + |mc|)."""
    val, se = mc
    gen = np.asarray(gen, dtype=float).reshape(np.shape(val))
    return int(np.sum(np.abs(gen - val) > K_SIGMA * se + 1e-9 * (1.0 + np.abs(val))))


@pytest.mark.parametrize("shift", [0.05, -0.05])
@pytest.mark.parametrize("name", ["mc_L2_plain_pe1_noise", "mc_L3_sph_pe2", "mc_vector_noise",
                                  "mc_tanh_student_plain"])
def test_mc_check_detects_perturbed_state(name, shift, out_dir):
    """Sanity check of the tolerance: the generated drift (E[G1] and E[G2]) evaluated at a state
    whose m is off by +-0.05 must FAIL the Monte Carlo comparison in at least one entry, while
    the unperturbed state passes (so the tolerance is not vacuous)."""
    case = CASES[CASE_IDS.index(name)]
    mod = module_for(case, out_dir)
    *_, state = random_state(case)
    mc = mc_for(case.name)
    v = case.values

    def failures(st):
        return (_failing_entries(_vec(mod.drift_eta1(*st, **v)), mc.drift_eta1)
                + _failing_entries(_vec(mod.drift_eta2(*st, **v)), mc.drift_eta2))

    assert failures(state) == 0
    assert failures((state[0] + shift,) + tuple(state[1:])) >= 1


def _flip_first_term(text):
    """The link string with the sign of its first term flipped."""
    return text[2:] if text.startswith("- ") else "- " + text


@pytest.mark.parametrize("name", ["mc_L2_plain_pe1_noise", "mc_L3_sph_pe2"])
def test_mc_check_detects_flipped_sign(name, out_dir):
    """Sanity check of the tolerance: a Monte Carlo of the same model with the sign of the
    teacher's first term flipped must disagree with the generated drift (E[G1], E[G2]) in at
    least one entry."""
    case = CASES[CASE_IDS.index(name)]
    mod = module_for(case, out_dir)
    m, e, q, state = random_state(case)
    flipped = _flip_first_term(case.teacher)
    mc = estimate(case, m, e, q, seed=case.seed + 1, teacher=flipped)
    v = case.values
    failures = (_failing_entries(_vec(mod.drift_eta1(*state, **v)), mc.drift_eta1)
                + _failing_entries(_vec(mod.drift_eta2(*state, **v)), mc.drift_eta2))
    assert failures >= 1, f"flipping the first term of {case.teacher!r} went undetected"
