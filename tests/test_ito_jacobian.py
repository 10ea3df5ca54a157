"""Independent checks of the spherical Ito correction and of the drift Jacobian.

Nothing here imports ``ssi_symbolic.gaussian`` or ``ssi_symbolic.derive``: the link strings are
parsed with plain SymPy (He -> ``sympy.hermite_prob``), differentiated with ``sympy.diff`` and
turned into NumPy functions with ``sympy.lambdify``; Gaussian expectations are tensor
Gauss-Hermite sums written out below. The project API used is ``make_spec`` / ``generate`` /
``load_module`` and the public functions of the generated modules.

Conventions (MATH.md). Per token l, given the overlaps, (zs_l, z_l, zeta_l1..zeta_lr) is Gaussian,
independent across tokens, with mean (0, mu_l, 0..0), mu_l = sum_a C[l, a] e_a, and covariance

    Var zs = 1, Var z = q (= 1 for spherical SGD), Cov(zs, z) = m,
    Cov(zeta_a, z) = e_a, Cov(zeta_a, zeta_b) = delta_ab, Cov(zeta_a, zs) = 0.

y_k = g*_k(zs) + sqrt(Delta) xi_k, loss = 1/2 sum_k (y_k - g_k(z))^2, dl_l = d loss / d z_l and

    A_m = sum_l dl_l zs_l,  A_a = sum_l dl_l (zeta_la + C[l, a]),  A_q = sum_l dl_l z_l,
    B = sum_l dl_l^2,  Gq = -2 eta A_q + eta^2 B.

Spherical SGD: X' = (X - eta A_X / d) / sqrt(1 + Gq / d); the O(1/d^2) term of one step is
(eta A_X Gq / 2 + 3/8 X Gq^2) / d^2, so ``ito_correction`` = E[eta A_X Gq / 2 + 3/8 X Gq^2].
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import pytest
import sympy as sp
from numpy.polynomial.hermite_e import hermegauss

from ssi_symbolic.backends.registry import generate
from ssi_symbolic.backends.files import load_module
from ssi_symbolic.model.spec import make_spec

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "generated"


# ----------------------------------------------------------------------------------------------
# independent model description: links parsed with plain SymPy
# ----------------------------------------------------------------------------------------------

def _He(k, x):
    return sp.hermite_prob(int(k), x)


def parse_entries(text, L, params):
    """The link's entries (row by row) as SymPy expressions in z1..zL, parameters substituted."""
    zs = sp.symbols(f"z1:{L + 1}", real=True)
    local = {"He": _He, "Matrix": sp.Matrix, "sqrt": sp.sqrt}
    local.update({f"z{l + 1}": zs[l] for l in range(L)})
    local.update({k: sp.Symbol(k, real=True) for k in params})
    expr = sp.sympify(text, locals=local)
    items = list(expr) if isinstance(expr, sp.MatrixBase) else [expr]
    sub = {sp.Symbol(k, real=True): sp.nsimplify(v) for k, v in params.items()}
    return [sp.sympify(x).subs(sub) for x in items], zs


# Models for the Ito check: (name, L, teacher, student, positional, parameters, noise).
MODELS = {
    # L = 1, r = 0, cubic link with label noise (high polynomial degree: 20 in Gq^2)
    "cubic_noisy": dict(L=1, teacher="z1**3 - 3*z1 + 0.5*z1**2", student=None,
                        positional=None, parameters={}, noise=0.2),
    # L = 1, r = 0, misspecified (quadratic teacher, linear student), noisy; used by the
    # one-step simulation too
    "misspecified": dict(L=1, teacher="z1 + 0.5*z1**2", student="z1", positional=None,
                         parameters={}, noise=0.1),
    # L = 1, r = 1, student != teacher
    "quad_pe": dict(L=1, teacher="z1**2", student="z1**2 + 0.3*z1", positional=[[0.5]],
                    parameters={}, noise=0.0),
    # L = 2, r = 1, opposite-paired encoding
    "he2_pe": dict(L=2, teacher="(He(2, z1) + He(2, z2)) / sqrt(2)", student=None,
                   positional=[[1.0], [-1.0]], parameters={}, noise=0.0),
    # L = 2, r = 1, cross-token link with a symbolic parameter
    "cross_pe": dict(L=2, teacher="z1*z2", student="z1*z2 + beta*z1",
                     positional=[[1.0], [0.5]], parameters={"beta": 0.5}, noise=0.0),
    # L = 1, r = 2, vector output (sum over output entries)
    "vector_r2": dict(L=1, teacher="Matrix([z1, z1**2])", student=None,
                      positional=[[1.0, -0.5]], parameters={}, noise=0.0),
}


@pytest.fixture(scope="module")
def gen_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("ito_modules")


@functools.lru_cache(maxsize=None)
def _module_cached(name, out_dir):
    cfg = MODELS[name]
    spec = make_spec(f"ito_{name}", cfg["L"], cfg["teacher"], student=cfg["student"],
                     positional=cfg["positional"], parameters=cfg["parameters"],
                     noise=cfg["noise"], spherical=True)
    path, _ = generate(spec, out_dir=out_dir)
    return load_module(path)


def model_module(name, gen_dir):
    return _module_cached(name, str(gen_dir))


# ----------------------------------------------------------------------------------------------
# independent per-sample statistics and exact Gauss-Hermite expectations
# ----------------------------------------------------------------------------------------------

class Statistics:
    """Per-sample SymPy statistics of a model, in the variables zs_l, z_l, zeta_la, xi_k."""

    def __init__(self, cfg, eta, params):
        L = cfg["L"]
        C = np.array(cfg["positional"], dtype=float) if cfg["positional"] else np.zeros((L, 0))
        self.L, self.C, self.r = L, C, C.shape[1]
        teacher, ztok = parse_entries(cfg["teacher"], L, params)
        student, _ = parse_entries(cfg["student"] or cfg["teacher"], L, params)
        assert len(teacher) == len(student)
        K = len(teacher)
        self.zs = sp.symbols(f"zs1:{L + 1}", real=True)
        self.z = sp.symbols(f"zz1:{L + 1}", real=True)
        self.zeta = [[sp.Symbol(f"zeta{l + 1}_{a + 1}", real=True) for a in range(self.r)]
                     for l in range(L)]
        noise = sp.nsimplify(cfg["noise"])
        self.xi = list(sp.symbols(f"xi1:{K + 1}", real=True)) if noise != 0 else []
        to_t = dict(zip(ztok, self.zs))
        to_s = dict(zip(ztok, self.z))
        res = []
        for k in range(K):
            y = teacher[k].subs(to_t, simultaneous=True)
            if self.xi:
                y = y + sp.sqrt(noise) * self.xi[k]
            res.append(y - student[k].subs(to_s, simultaneous=True))
        loss = sum(x ** 2 for x in res) / 2
        dl = [sp.expand(sp.diff(loss, self.z[l])) for l in range(L)]
        self.eta = float(eta)
        eta = sp.Float(self.eta)  # only fixes Gq's degree structure; values are numeric below
        self.A = [sp.expand(sum(dl[l] * self.zs[l] for l in range(L)))]
        for a in range(self.r):
            self.A.append(sp.expand(sum(dl[l] * (self.zeta[l][a] + sp.nsimplify(C[l, a]))
                                        for l in range(L))))
        self.Aq = sp.expand(sum(dl[l] * self.z[l] for l in range(L)))
        self.B = sp.expand(sum(x ** 2 for x in dl))
        self.Gq = sp.expand(-2 * eta * self.Aq + eta ** 2 * self.B)

    def blocks(self):
        """Variables of each independent Gaussian block: one per token, then the noise."""
        out = [[self.zs[l], self.z[l]] + self.zeta[l] for l in range(self.L)]
        if self.xi:
            out.append(list(self.xi))
        return out

    def variables(self):
        return [v for b in self.blocks() for v in b]

    def degree(self, expr, block):
        """Total degree of a polynomial statistic in one block's variables."""
        if not expr.free_symbols & set(block):
            return 0
        return sp.Poly(expr, *block).total_degree()

    def nodes_needed(self):
        """Per block, a Gauss-Hermite order that is exact for A_X Gq and Gq^2 (whitening mixes
        the variables of a block linearly, so the total degree in the block is what counts)."""
        out = []
        for block in self.blocks():
            dg = self.degree(self.Gq, block)
            deg = max([2 * dg] + [self.degree(a, block) + dg for a in self.A])
            out.append(max(2, deg // 2 + 1))  # n nodes integrate degree <= 2n - 1 exactly
        return out


def token_gaussian(state, C, l):
    """Mean and covariance of (zs_l, z_l, zeta_l1..zeta_lr) for spherical training (q = 1)."""
    m, e = state[0], np.asarray(state[1:], dtype=float)
    r = len(e)
    mean = np.zeros(2 + r)
    mean[1] = float(C[l] @ e) if r else 0.0
    cov = np.eye(2 + r)
    cov[0, 1] = cov[1, 0] = m
    cov[1, 2:] = cov[2:, 1] = e
    return mean, cov


def gauss_grid(stats, state, n_nodes):
    """Tensor Gauss-Hermite nodes in the model's variables (whitened per block) and weights."""
    blocks = stats.blocks()
    axes, weights = [], []
    for block, n in zip(blocks, n_nodes):
        x, w = hermegauss(n)
        axes += [x] * len(block)
        weights += [w / math.sqrt(2.0 * math.pi)] * len(block)
    grids = np.meshgrid(*axes, indexing="ij")
    u = np.array([g.ravel() for g in grids])
    wt = functools.reduce(np.multiply.outer, weights).ravel()
    values, row = [], 0
    for i, block in enumerate(blocks):
        ub = u[row:row + len(block)]
        if i < stats.L:
            mean, cov = token_gaussian(state, stats.C, i)
            values.append(mean[:, None] + np.linalg.cholesky(cov) @ ub)
        else:  # label noise: independent standard normals
            values.append(ub)
        row += len(block)
    return np.concatenate(values), wt


def reference_ito_and_drift(cfg, state, eta, params):
    """Independent E[eta A_X Gq / 2 + 3/8 X Gq^2] and E[G] (spherical G) for X in (m, e_a)."""
    st = Statistics(cfg, eta, params)
    v, wt = gauss_grid(st, state, st.nodes_needed())
    f = sp.lambdify(st.variables(), st.A + [st.Aq, st.B], "numpy")
    vals = [np.broadcast_to(np.asarray(x, dtype=float), wt.shape) for x in f(*v)]
    A, Aq, B = vals[:-2], vals[-2], vals[-1]
    eta = st.eta
    Gq = -2 * eta * Aq + eta ** 2 * B
    X = np.asarray(state, dtype=float)
    ito = np.array([wt @ (eta * A[i] * Gq / 2 + 3.0 / 8.0 * X[i] * Gq ** 2)
                    for i in range(len(A))])
    drift = np.array([wt @ (-eta * (A[i] - X[i] * Aq) - eta ** 2 * X[i] * B / 2)
                      for i in range(len(A))])
    return ito, drift


def random_state(rng, r):
    """A random interior spherical state (m, e_1..e_r) with m^2 + |e|^2 < 1."""
    m = rng.uniform(-0.6, 0.6)
    e = rng.uniform(-0.45, 0.45, size=r)
    assert m * m + e @ e < 0.98
    return (m, *e)


# ----------------------------------------------------------------------------------------------
# 1. Ito correction (and drift) against exact independent quadrature
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(MODELS))
def test_ito_correction_matches_independent_quadrature(name, gen_dir):
    cfg = MODELS[name]
    mod = model_module(name, gen_dir)
    r = len(cfg["positional"][0]) if cfg["positional"] else 0
    assert len(mod.OVERLAPS) == 1 + r and mod.SPHERICAL
    rng = np.random.default_rng(1234 + list(MODELS).index(name))
    params = {k: v + 0.25 for k, v in cfg["parameters"].items()}  # off the defaults
    for _ in range(2):
        state = random_state(rng, r)
        eta = float(rng.uniform(0.05, 0.6))
        ref_ito, ref_drift = reference_ito_and_drift(cfg, state, eta, params)
        got_ito = np.array(mod.ito_correction(*state, eta=eta, **params), dtype=float)
        got_drift = np.array(mod.drift(*state, eta=eta, **params), dtype=float)
        scale = max(1.0, np.abs(ref_ito).max())
        np.testing.assert_allclose(got_ito, ref_ito, rtol=1e-9, atol=1e-11 * scale,
                                   err_msg=f"{name} ito_correction at {state}, eta={eta}")
        scale = max(1.0, np.abs(ref_drift).max())
        np.testing.assert_allclose(got_drift, ref_drift, rtol=1e-9, atol=1e-11 * scale,
                                   err_msg=f"{name} drift at {state}, eta={eta}")


def test_ito_correction_broadcasts(gen_dir):
    """Array states give the elementwise values."""
    mod = model_module("he2_pe", gen_dir)
    m = np.array([0.1, -0.3, 0.5])
    e = np.array([0.2, 0.4, -0.1])
    out = mod.ito_correction(m, e, eta=0.3)
    for i in range(3):
        single = mod.ito_correction(m[i], e[i], eta=0.3)
        for a in range(2):
            assert out[a].shape == (3,)
            assert out[a][i] == pytest.approx(float(single[a]), rel=1e-13, abs=1e-15)


# ----------------------------------------------------------------------------------------------
# 2. The expansion itself: one spherical SGD step simulated in finite d
# ----------------------------------------------------------------------------------------------

def test_series_coefficient_symbolic():
    """(m + a/d) / sqrt(1 + b/d) = m + (a - m b/2)/d + (-a b/2 + 3/8 m b^2)/d^2 + O(d^-3)."""
    m, a, b, eps = sp.symbols("m a b epsilon")
    ser = sp.series((m + a * eps) / sp.sqrt(1 + b * eps), eps, 0, 3).removeO()
    assert sp.expand(ser.coeff(eps, 1) - (a - m * b / 2)) == 0
    assert sp.expand(ser.coeff(eps, 2) - (-a * b / 2 + sp.Rational(3, 8) * m * b ** 2)) == 0


def test_one_step_simulation_matches_second_order_drift(gen_dir):
    """Simulate ONE spherical SGD step many times at finite d for the L = 1, r = 0 model
    'misspecified' (teacher z + z^2/2 with label noise 0.1, linear student).

    Finite-d model: |w| = |w*| = sqrt(d), m = w.w*/d, token x ~ N(0, I/d), z = w.x, zs = w*.x,
    y = g*(zs) + sqrt(Delta) xi, w <- w - eta dl x, w <- sqrt(d) w / |w|. Then

        d^2 E[m' - m] - d drift_m = ito_correction_m + x_corr + O(1/d)

    where x_corr = -(m eta^2 / 2) E[B (|u|^2 - 2)] comes from |x|^2 != 1: the exact q increment
    is Gq = -2 eta A_q + eta^2 B |x|^2 and d |x|^2 = |u|^2 + chi^2_{d-2}, u = the two whitened
    coordinates of x in span(w, w*). This term is NOT part of ito_correction (whose definition
    takes |x|^2 = 1); it is computed independently below by quadrature.

    Estimator (same mean as d^2 (m' - m) - d drift_m, much smaller variance): per sample
        Y = d^2 (m' - m) - d (a - m b0 / 2) + (m eta^2 / 2) dl^2 (chi_perp - (d - 2))
    with a = -eta dl zs, b0 = -2 eta dl z + eta^2 dl^2 (so E[a - m b0/2] = drift_m, checked
    against the module below) and chi_perp = d |x_perp|^2, independent of dl with mean d - 2.
    """
    cfg = MODELS["misspecified"]
    mod = model_module("misspecified", gen_dir)
    m, eta, noise = 0.4, 0.2, cfg["noise"]
    d, n_rep, chunk = 100, 240_000, 40_000
    z = sp.Symbol("z1", real=True)
    gs = sp.lambdify(z, sp.sympify(cfg["teacher"], locals={"z1": z}), "numpy")
    g_expr = sp.sympify(cfg["student"], locals={"z1": z})
    g = sp.lambdify(z, g_expr, "numpy")
    gp = sp.lambdify(z, sp.diff(g_expr, z), "numpy")

    def dl_of(zs_, z_, xi_):
        return -(gs(zs_) + math.sqrt(noise) * xi_ - g(z_)) * np.broadcast_to(gp(z_), z_.shape)

    # independent quadrature for E[a - m b0/2] (must equal drift_m) and x_corr
    x, w = hermegauss(24)
    w = w / math.sqrt(2 * math.pi)
    U1, U2, U3 = np.meshgrid(x, x, x, indexing="ij")
    W = np.einsum("i,j,k->ijk", w, w, w)
    s = math.sqrt(1 - m * m)
    zs_q, z_q = U1, m * U1 + s * U2
    dl_q = dl_of(zs_q, z_q, U3)
    G_q = -eta * dl_q * zs_q - m / 2 * (-2 * eta * dl_q * z_q + eta ** 2 * dl_q ** 2)
    drift_m = float(mod.drift(m, eta=eta)[0])
    assert np.sum(W * G_q) == pytest.approx(drift_m, rel=1e-10, abs=1e-12)
    x_corr = -(m * eta ** 2 / 2) * np.sum(W * dl_q ** 2 * (U1 ** 2 + U2 ** 2 - 2))
    ito_m = float(mod.ito_correction(m, eta=eta)[0])
    target = ito_m + x_corr

    rng = np.random.default_rng(20240611)
    w_star = np.zeros(d)
    w_star[0] = math.sqrt(d)
    w0 = np.zeros(d)
    w0[0], w0[1] = m * math.sqrt(d), s * math.sqrt(d)
    ys = []
    for _ in range(n_rep // chunk):
        X = rng.standard_normal((chunk, d)) / math.sqrt(d)
        zs_, z_ = X @ w_star, X @ w0
        dl = dl_of(zs_, z_, rng.standard_normal(chunk))
        w1 = w0[None, :] - eta * dl[:, None] * X
        m1 = math.sqrt(d) * (w1 @ w_star) / (d * np.linalg.norm(w1, axis=1))
        a = -eta * dl * zs_
        b0 = -2 * eta * dl * z_ + eta ** 2 * dl ** 2
        chi_perp = d * np.einsum("ij,ij->i", X[:, 2:], X[:, 2:])
        ys.append(d * d * (m1 - m) - d * (a - m * b0 / 2)
                  + (m * eta ** 2 / 2) * dl ** 2 * (chi_perp - (d - 2)))
    Y = np.concatenate(ys)
    mean, se = Y.mean(), Y.std(ddof=1) / math.sqrt(len(Y))
    # 4 standard errors, plus the O(1/d) remainder (measured ~5e-2 relative at d = 10)
    tol = 4 * se + 0.005 * abs(target)
    assert abs(mean - target) < tol, (mean, se, target, ito_m, x_corr)
    # the check has power: it tells ito_correction + x_corr from ito_correction alone
    assert abs(x_corr) > 5 * tol


# ----------------------------------------------------------------------------------------------
# 3. drift_jacobian against Richardson-extrapolated central differences
# ----------------------------------------------------------------------------------------------

def richardson_jacobian(f, state, h):
    """J_ij = d f_i / d x_j by central differences at h and h/2, Richardson-combined (O(h^4))."""
    state = [np.asarray(x, dtype=float) for x in state]
    n = len(state)
    cols = []
    for j in range(n):
        def D(step):
            xp = list(state); xp[j] = state[j] + step
            xm = list(state); xm[j] = state[j] - step
            return [(np.asarray(a) - np.asarray(b)) / (2 * step) for a, b in zip(f(*xp), f(*xm))]
        d1, d2 = D(h), D(h / 2)
        cols.append([(4 * b - a) / 3 for a, b in zip(d1, d2)])
    return np.array([[cols[j][i] for j in range(n)] for i in range(n)])


SHIPPED_SYMBOLIC = {
    "tied_he2_pe": {"omega": 0.7},
    "he4_example_pe": {},
    "linear_plain": {},
    "noisy_linear_pe": {"alpha": 0.8},
}


def shipped_states(mod, rng, k=4):
    """k random interior states as arrays (broadcast evaluation)."""
    names = mod.OVERLAPS
    r = len([n for n in names if n.startswith("e")])
    m = rng.uniform(-0.6, 0.6, size=k)
    e = [rng.uniform(-0.4, 0.4, size=k) for _ in range(r)]
    out = [m] + e
    if "q" in names:  # plain SGD: q > m^2 + |e|^2
        out.append(m * m + sum(x * x for x in e) + rng.uniform(0.2, 1.5, size=k))
    return out


@pytest.mark.parametrize("name", list(SHIPPED_SYMBOLIC))
def test_symbolic_jacobian_matches_finite_differences(name):
    mod = load_module(GENERATED / f"{name}.py")
    assert mod.JACOBIAN == "symbolic"
    params = SHIPPED_SYMBOLIC[name]
    rng = np.random.default_rng(7)
    states = shipped_states(mod, rng)
    n = len(mod.OVERLAPS)
    for eta in (0.05, 0.4):
        jac = mod.drift_jacobian(*states, eta=eta, **params)
        assert len(jac) == n and all(len(row) == n for row in jac)
        # entries broadcast against the states (a state-independent entry may come back 0-d)
        got = np.array([[np.broadcast_to(x, states[0].shape) for x in row] for row in jac])
        ref = richardson_jacobian(lambda *x: mod.drift(*x, eta=eta, **params), states, 1e-3)
        for k in range(len(states[0])):
            scale = np.abs(ref[..., k]).max()
            np.testing.assert_allclose(got[..., k], ref[..., k], rtol=1e-6, atol=1e-8 * scale,
                                       err_msg=f"{name} eta={eta} state {k}")


# Closed-form drifts (arcsine, arc-cosine, Owen's T, completed squares) are differentiated by
# the chain rule through the module's common subexpressions: the same Richardson check.
CLOSED_FORM_LINKS = {
    "cf_erf": dict(L=1, teacher="erf(z1/sqrt(2))", student="erf(z1/sqrt(2))"),
    "cf_relu_plain": dict(L=1, teacher="relu(z1)", student="relu(z1)", spherical=False),
    "cf_relu_pe": dict(L=1, teacher="relu(z1)", student="relu(z1)", positional=[[1.0]]),
    "cf_exp_erf_pe": dict(L=2, teacher="exp(z1/3) + erf(z2)", student="erf(z1) + z2/2",
                          positional=[[1.0], [-0.5]], spherical=False),
}


@pytest.mark.parametrize("name", list(CLOSED_FORM_LINKS))
def test_closed_form_jacobian_matches_finite_differences(name, gen_dir):
    opts = dict(CLOSED_FORM_LINKS[name])
    spec = make_spec(name, opts.pop("L"), opts.pop("teacher"), **opts)
    mod = load_module(generate(spec, out_dir=gen_dir, diffusion=False)[0])
    assert "closed form" in (mod.OUTPUT_METHODS["drift_eta1"], mod.OUTPUT_METHODS["drift_eta2"])
    assert mod.JACOBIAN == "symbolic"
    states = shipped_states(mod, np.random.default_rng(11))
    n = len(mod.OVERLAPS)
    for eta in (0.05, 0.4):
        jac = mod.drift_jacobian(*states, eta=eta)
        got = np.array([[np.broadcast_to(x, states[0].shape) for x in row] for row in jac])
        ref = richardson_jacobian(lambda *x: mod.drift(*x, eta=eta), states, 1e-3)
        assert got.shape == (n, n, len(states[0]))
        for k in range(len(states[0])):
            scale = np.abs(ref[..., k]).max()
            np.testing.assert_allclose(got[..., k], ref[..., k], rtol=1e-6, atol=1e-8 * scale,
                                       err_msg=f"{name} eta={eta} state {k}")


def test_forward_jacobian_of_a_polynomial_drift_with_many_overlaps(gen_dir, monkeypatch):
    """The untied L = 8 student (16 overlaps m_l, q_l): a polynomial drift of that many
    overlaps is differentiated through the CSE too; against Richardson differences (the
    token-by-token derivation; through token sums, tests/test_token_sums.py)."""
    from ssi_symbolic.symbolic import token_sums
    monkeypatch.setattr(token_sums, "MIN_L", 10 ** 6)
    spec = make_spec("untied_L8", 8, "tsum(He(2, z)) / sqrt(2 * L)",
                     "He(2, tsum(z) / sqrt(L)) / sqrt(2)", weights="untied")
    mod = load_module(generate(spec, out_dir=gen_dir, diffusion=False)[0])
    assert len(mod.OVERLAPS) == 16 and mod.JACOBIAN == "symbolic"
    assert "chain rule" in mod.drift_jacobian.__doc__
    rng = np.random.default_rng(3)
    states = ([rng.uniform(-0.3, 0.3, 3) for _ in range(8)]
              + [rng.uniform(0.8, 1.2, 3) for _ in range(8)])
    got = np.array([[np.broadcast_to(x, (3,)) for x in row]
                    for row in mod.drift_jacobian(*states, eta=0.05)])
    ref = richardson_jacobian(lambda *x: mod.drift(*x, eta=0.05), states, 1e-3)
    for k in range(3):
        scale = np.abs(ref[..., k]).max()
        np.testing.assert_allclose(got[..., k], ref[..., k], rtol=1e-6, atol=1e-8 * scale)


def test_committee_jacobian_matches_finite_differences():
    """The K = 2 erf committee (shipped, arcsine closed forms) at realisable states drawn from
    random vectors."""
    mod = load_module(GENERATED / "committee_erf_K2.py")
    assert mod.JACOBIAN == "symbolic"
    rng = np.random.default_rng(5)
    cols = []
    for _ in range(4):
        W = rng.standard_normal((2, 40)) / math.sqrt(40)
        M, Q = W[:, :2], W @ W.T
        cols.append([{"m": M, "q": Q}[nm[0]][int(nm[1]) - 1, int(nm[3]) - 1]
                     for nm in mod.OVERLAPS])
    states = [np.array(c) for c in zip(*cols)]
    for eta in (0.1, 0.8):
        got = np.array([[np.broadcast_to(x, states[0].shape) for x in row]
                        for row in mod.drift_jacobian(*states, eta=eta)])
        ref = richardson_jacobian(lambda *x: mod.drift(*x, eta=eta), states, 1e-3)
        for k in range(len(cols)):
            scale = np.abs(ref[..., k]).max()
            np.testing.assert_allclose(got[..., k], ref[..., k], rtol=1e-6, atol=1e-8 * scale,
                                       err_msg=f"eta={eta} state {k}")


def _relu_exact_drift():
    """Exact drift of relu_student_he2 (teacher He2(zs)/sqrt 2, student relu(z), spherical).

    With z = u, zs = m u + sqrt(1 - m^2) v (u, v independent standard normals), dl = 0 for u < 0
    and dl = -(y - u) for u > 0; E over v by Gaussian moments, then over u > 0 by half-line
    moments E[u^k 1{u>0}] = (k-1)!!/2 (k even), 2^((k-1)/2) ((k-1)/2)! / sqrt(2 pi) (k odd)."""
    u, v, m, eta = sp.symbols("u v m eta", real=True)
    zs = m * u + sp.sqrt(1 - m ** 2) * v
    y = (zs ** 2 - 1) / sp.sqrt(2)
    dl = -(y - u)
    G = sp.expand(-eta * (dl * zs - m * dl * u) - eta ** 2 * m * dl ** 2 / 2)
    Ev = sum(c * sp.factorial2(k - 1) for (k,), c in sp.Poly(G, v).terms() if k % 2 == 0)

    def half(k):
        if k % 2 == 0:
            return sp.factorial2(k - 1) / 2
        return 2 ** sp.Rational(k - 1, 2) * sp.factorial((k - 1) // 2) / sp.sqrt(2 * sp.pi)

    drift = sp.expand(sum(c * half(k) for (k,), c in sp.Poly(sp.expand(Ev), u).terms()))
    return (sp.lambdify((m, eta), drift, "numpy"),
            sp.lambdify((m, eta), sp.diff(drift, m), "numpy"))


RELU_STATES = (-0.5, 0.1, 0.37, 0.8)


def test_relu_drift_is_exact():
    """The ReLU model is now derived in closed form (Stein's lemma and half-line Gaussian
    integrals; against the polynomial teacher the result is a polynomial in m): its drift
    equals the drift written independently above (half-line moments) to 1e-12."""
    mod = load_module(GENERATED / "relu_student_he2.py")
    assert mod.JACOBIAN == "symbolic" and mod.METHOD == "exact"
    exact_drift, _ = _relu_exact_drift()
    for m in RELU_STATES:
        for eta in (0.1, 0.3):
            got = float(mod.drift(m, eta=eta)[0])
            assert abs(got - exact_drift(m, eta)) <= 1e-12 * (1 + abs(exact_drift(m, eta)))


def test_relu_jacobian_matches_exact_derivative():
    """The Jacobian of the closed-form ReLU drift is the exact d drift / dm (1e-12)."""
    mod = load_module(GENERATED / "relu_student_he2.py")
    _, exact_jac = _relu_exact_drift()
    for m in RELU_STATES:
        eta = 0.3
        got = float(mod.drift_jacobian(m, eta=eta)[0][0])
        assert abs(got - exact_jac(m, eta)) <= 1e-12 * (1 + abs(exact_jac(m, eta))), \
            (m, got, exact_jac(m, eta))


# ----------------------------------------------------------------------------------------------
# 4. plain SGD: no Ito correction
# ----------------------------------------------------------------------------------------------

def test_plain_sgd_ito_correction_is_zero(gen_dir):
    shipped = load_module(GENERATED / "linear_plain.py")
    spec = make_spec("ito_plain_pe", 2, "z1*z2 + z1**2", student="z1*z2 + beta*z1",
                     positional=[[1.0], [-1.0]], parameters={"beta": 0.5}, spherical=False)
    generated = load_module(generate(spec, out_dir=gen_dir)[0])
    rng = np.random.default_rng(3)
    for mod, params in ((shipped, {}), (generated, {"beta": 0.3})):
        assert not mod.SPHERICAL and mod.OVERLAPS[-1] == "q"
        states = shipped_states(mod, rng, k=3)
        out = mod.ito_correction(*states, eta=0.37, **params)
        assert len(out) == len(mod.OVERLAPS)
        for x in out:
            # broadcast-compatible with the states (currently a 0-d array: the zeros are
            # constants, which the module's _bc does not expand to the states' shape)
            assert np.broadcast_to(x, (3,)).shape == (3,)
            assert np.all(np.asarray(x) == 0.0)
        # and the drift there is genuinely non-zero (the zeros are not a degenerate state)
        assert np.any(np.abs(np.asarray(mod.drift(*states, eta=0.37, **params))) > 1e-6)
