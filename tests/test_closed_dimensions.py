"""Quadrature dimensions that only closed-form functions read are integrated in closed form
(symbolic/conditioning.py): the nodes lose those dimensions, and the expectations keep their
values, checked against tensor Gauss-Hermite sums of the statistic itself over the token
Gaussians (written here from the covariances, not from the engine's projection) and against
the engine with the step switched off.

Also the work the derivation no longer repeats: expect_many takes E[c x] and E[c' x] (c, c'
free of the random variables) as one E[x]; a product with a factor like tanh(z1) goes to the
quadrature path without the exact engine's attempt; the closed dimensions read the integrand
as a polynomial in v and the closed functions themselves (no symbols substituted for them),
checked against a Gauss-Hermite sum, the engine's own refusal and sp.Poly."""
import numpy as np
import pytest
import sympy as sp

from ssi_symbolic.model.spec import make_spec
from ssi_symbolic.symbolic import conditioning
from ssi_symbolic.symbolic import expectation as expectation_module
from ssi_symbolic.symbolic.expectation import Expectation, _not_polynomial
from ssi_symbolic.symbolic.gaussian import GaussHermite, NotPolynomial, TokenGaussian


def _gh(k, n):
    """Tensor Gauss-Hermite nodes (k, n^k) and weights for E over k independent N(0, 1)."""
    x, w = np.polynomial.hermite_e.hermegauss(n)
    w = w / np.sqrt(2 * np.pi)
    grids = np.meshgrid(*([x] * k), indexing="ij")
    W = np.ones_like(grids[0])
    for i in range(k):
        W = W * w.reshape([-1 if j == i else 1 for j in range(k)])
    return [g.ravel() for g in grids], W.ravel()


def _phi2(h, k, rho):
    """Phi_2(h, k; rho) = Phi(h) Phi(k) + int_0^rho phi_2(h, k; r) dr (Plackett's identity;
    the derivative of Phi_2 in rho is the bivariate density), by 60-point Gauss-Legendre in r:
    written here independently of the engine's Owen's T route."""
    from scipy.special import ndtr
    h, k, rho = np.broadcast_arrays(*[np.asarray(x, dtype=float) for x in (h, k, rho)])
    t, w = np.polynomial.legendre.leggauss(60)
    r = rho[..., None] * (t + 1) / 2
    s2 = 1 - r * r
    dens = np.exp(-(h[..., None] ** 2 - 2 * r * h[..., None] * k[..., None] + k[..., None] ** 2)
                  / (2 * s2)) / (2 * np.pi * np.sqrt(s2))
    return ndtr(h) * ndtr(k) + rho / 2 * np.sum(w * dens, axis=-1)


def _value(out, state, n=(96, 64, 40)):
    """A derived expectation at a numeric state: each GaussHermite node replaced by its tensor
    Gauss-Hermite sum (n[k - 1] points per dimension; a node may be multiplied by
    coefficients), the rest evaluated as it is."""
    out = sp.sympify(out).subs(state)
    for node in out.atoms(GaussHermite):
        k = len(node.variables)
        pts, W = _gh(k, n[k - 1])
        f = sp.lambdify(list(node.variables), node.integrand,
                        [{"NormalCDF2": _phi2}, "scipy", "numpy"])
        out = out.xreplace({node: sp.Float(float(np.sum(W * np.broadcast_to(f(*pts),
                                                                            W.shape))))})
    return float(sp.lambdify([], out, [{"NormalCDF2": _phi2}, "scipy", "numpy"])())


def _dims(out):
    return sorted(len(n.variables) for n in sp.sympify(out).atoms(GaussHermite))


def _law(g, state, tokens):
    """Token by token, (variables, mean, covariance) at a numeric state."""
    out = []
    for l in tokens:
        vs = list(g.token_variables(l))
        mean = np.array([float(sp.sympify(x).subs(state)) for x in g.token_mean(l)])
        cov = np.array(g.token_covariance(l).subs(state), dtype=float)
        out.append((vs, mean, cov))
    return out


def _reference(stat, g, state, tokens, read, n):
    """E[stat] by tensor Gauss-Hermite over the variables `read` of the tokens (one
    Cholesky factor per token's block of them; the statistic reads no other variable)."""
    blocks = []
    for vs, mean, cov in _law(g, state, tokens):
        idx = [i for i, v in enumerate(vs) if v in read]
        blocks.append(([vs[i] for i in idx], mean[idx], np.linalg.cholesky(cov[np.ix_(idx, idx)])))
    k = sum(len(b[0]) for b in blocks)
    pts, W = _gh(k, n)
    values, at = {}, 0
    for vs, mean, Lc in blocks:
        z = np.array(pts[at:at + len(vs)])
        x = mean[:, None] + Lc @ z
        values.update({v: x[i] for i, v in enumerate(vs)})
        at += len(vs)
    names = list(values)
    f = sp.lambdify(names, stat.subs(state), ["scipy", "numpy"])
    return float(np.sum(W * np.broadcast_to(f(*[values[v] for v in names]), W.shape)))


def _expect(stat, g, closed=True, monkeypatch=None):
    if not closed:
        monkeypatch.setattr(expectation_module, "closed_dimensions", lambda *a, **k: None)
    E = Expectation(g, [stat])
    out = E.expect(stat)
    if not closed:
        monkeypatch.undo()
    return out, E


def test_one_token_erf_beside_a_smooth_function(monkeypatch):
    """E[erf(zs + 0.3) exp(sin(0.7 z)) zs^2] at L = 1 with a positional mean shift: one
    dimension (z's), not two; the value of a 96 x 96 Gauss-Hermite sum of the statistic over
    (zs, z) to 1e-11, and of the engine without the step."""
    spec = make_spec("closed_dims_l1", 1, "erf(z1)", "tanh(z1)", positional=[[0.4]])
    g = TokenGaussian.of(spec)
    zs, z = g.token_variables(0)[:2]
    stat = sp.erf(zs + sp.Rational(3, 10)) * sp.exp(sp.sin(sp.Rational(7, 10) * z)) * zs ** 2
    out, _ = _expect(stat, g)
    old, _ = _expect(stat, g, closed=False, monkeypatch=monkeypatch)
    assert _dims(out) == [1] and _dims(old) == [2]
    for values in ((0.3, 0.2), (-0.7, 0.5)):
        state = dict(zip(g.state, values))
        want = _reference(stat, g, state, [0], {zs, z}, 96)
        for got in (_value(out, state), _value(old, state)):
            assert abs(got - want) <= 1e-11 * max(1.0, abs(want)), (values, got, want)


def test_three_thresholds_keep_their_dimension(monkeypatch):
    """erf(zs)^3 beside exp(sin z) (three shifted thresholds: no closed form) keeps zs's
    dimension in a node of its own; erf(zs)^2 beside it closes (Owen's T); the sum has the
    value of the Gauss-Hermite sum of the statistic."""
    spec = make_spec("closed_dims_cube", 1, "erf(z1)", "tanh(z1)", positional=[[0.4]])
    g = TokenGaussian.of(spec)
    zs, z = g.token_variables(0)[:2]
    smooth = sp.exp(sp.sin(sp.Rational(7, 10) * z))
    stat = (sp.erf(zs) ** 3 + sp.erf(zs / 2) ** 2 * zs) * smooth
    out, _ = _expect(stat, g)
    assert _dims(out) == [1, 2]
    state = dict(zip(g.state, (0.55, -0.3)))
    want = _reference(stat, g, state, [0], {zs, z}, 96)
    got = _value(out, state)
    assert abs(got - want) <= 1e-11 * max(1.0, abs(want)), (got, want)


def test_a_gaussian_bump_is_closed_with_its_condition():
    """exp(-zs^2/3) zs beside exp(sin z): the completed square closes (its existence
    condition recorded), one dimension left, the value of the Gauss-Hermite sum."""
    spec = make_spec("closed_dims_bump", 1, "erf(z1)", "tanh(z1)")
    g = TokenGaussian.of(spec)
    zs, z = g.token_variables(0)[:2]
    stat = sp.exp(-zs ** 2 / 3) * zs * sp.exp(sp.sin(z))
    out, E = _expect(stat, g)
    assert _dims(out) == [1]
    assert E.conditions  # det(I + A Sigma) > 0 of the completed square
    state = dict(zip(g.state, (0.8,)))
    assert all(float(sp.sympify(c).subs(state)) > 0 for c, _ in E.conditions)
    want = _reference(stat, g, state, [0], {zs, z}, 96)
    assert abs(_value(out, state) - want) <= 1e-11 * max(1.0, abs(want))


@pytest.mark.parametrize("seed", range(6))
def test_random_products_across_two_tokens(seed, monkeypatch):
    """erf, erfc and exponentials of random forms of two tokens' teacher fields times random
    polynomials beside smooth functions of the student fields (exp(sin)): the nodes lose
    the closed functions' dimensions, and the values agree with the engine without the step
    (1e-9) and with a Gauss-Hermite sum of the statistic over the four fields (5e-6)."""
    rng = np.random.default_rng(seed)
    spec = make_spec("closed_dims_l2", 2, "erf(z1)", "tanh(z1)",
                     positional=[[0.5], [-0.3]] if seed % 2 else None)
    g = TokenGaussian.of(spec)
    (zs1, z1), (zs2, z2) = g.token_variables(0)[:2], g.token_variables(1)[:2]
    r = lambda: sp.Rational(int(rng.integers(-9, 10)), 10)
    form = (1 + r() ** 2) * zs1 + r() * zs2 + r() * z1
    closed = [sp.erf(form), sp.erfc(form / 2 + r()), sp.exp(r() * form),
              sp.exp(-form ** 2 / 4)][seed % 4]
    poly = [1, zs1, zs2 * z2, zs1 ** 2 - z1][int(rng.integers(0, 4))]
    smooth = sp.exp(sp.sin(sp.Rational(1, 2) * z1 + r() * z2))
    stat = closed * poly * smooth + (sp.erf(zs2) * z1 if seed % 3 == 0 else 0)
    out, _ = _expect(stat, g)
    old, _ = _expect(stat, g, closed=False, monkeypatch=monkeypatch)
    assert max(_dims(out)) < max(_dims(old)), (_dims(out), _dims(old))
    state = dict(zip(g.state, [0.35, -0.2][:len(g.state)]))
    # the four-dimensional sum converges slowly where erf is steep (1e-6 at 28 points)
    want = _reference(stat, g, state, [0, 1], {zs1, z1, zs2, z2}, 32)
    got, before = _value(out, state, n=(96, 64, 24)), _value(old, state, n=(96, 64, 24))
    assert abs(got - before) <= 1e-9 * max(1.0, abs(before)), (got, before)
    assert abs(got - want) <= 5e-6 * max(1.0, abs(want)), (got, want)


def test_which_nodes_are_left_as_they_are():
    """closed_dimensions leaves a node alone when nothing but steps, kinks or deltas read
    its other dimensions (such a node exists because the closed form of its statistic was
    refused, and its terms mostly would be again), or when closed functions alone read its
    dimensions (gelu's Cov(G)); beside a smooth function it integrates the dimension the
    erf alone reads: E over u2 of erf(u1/2 + u2) u2 = (2 / sqrt(3 pi)) exp(-u1^2/12)."""
    from ssi_symbolic.symbolic.conditioning import closed_dimensions
    spec = make_spec("closed_dims_left", 1, "erf(z1)", "tanh(z1)")
    E = Expectation(TokenGaussian.of(spec), [sp.Integer(0)])
    u1, u2 = sp.symbols("u1 u2", real=True)
    f = sp.erf(u1 / 2 + u2) * u2
    for other in (sp.Heaviside(u1 - 1), sp.Abs(u1), sp.Max(u1, 0), sp.Integer(1)):
        assert closed_dimensions(E, f * other, (u1, u2)) is None, other
    done, left = closed_dimensions(E, f * sp.tanh(u1), (u1, u2))
    assert left == 0
    want = 2 / sp.sqrt(3 * sp.pi) * sp.exp(-u1 ** 2 / 12) * sp.tanh(u1)
    for x in (-1.3, 0.0, 0.7):
        assert abs(float((done - want).subs(u1, x))) < 1e-14



def test_expect_many_takes_a_shared_random_part_once(monkeypatch):
    """[m x, -e1 x / 2, y, x] with x = tanh(z1) erf((zs1 + zs2)/2) zs2: the engine is asked
    for x once (not for m x and -e1 x / 2 apart), and each value matches a 48^4 Gauss-Hermite
    sum of its own statistic (coefficient included) over the token Gaussians to 1e-7."""
    spec = make_spec("shared_parts", 2, "erf((z1 + z2)/2)", "tanh(z1) + tanh(z2)",
                     positional=[[0.4], [-0.3]])
    g = TokenGaussian.of(spec)
    zs1, z1 = g.token_variables(0)[:2]
    zs2, z2 = g.token_variables(1)[:2]
    m, e1 = g.state[0], g.state[1]
    x = sp.tanh(z1) * sp.erf((zs1 + zs2) / 2) * zs2
    y = sp.tanh(z2) ** 2 * zs1
    items = [m * x, -e1 * x / 2, y, x]
    asked = []
    expect = Expectation.expect

    def counting(self, expr):
        asked.append(sp.sympify(expr))
        return expect(self, expr)
    monkeypatch.setattr(Expectation, "expect", counting)
    monkeypatch.setenv("SSI_SERIAL", "1")  # the counting wrapper sees every call
    out = Expectation(g, items).expect_many(items)
    assert sorted(map(str, asked)) == sorted(map(str, [x, y]))
    state = dict(zip(g.state, (0.35, 0.2)))
    for stat, got in zip(items, out):
        want = _reference(stat, g, state, [0, 1], {zs1, z1, zs2, z2}, 48)
        assert abs(_value(got, state) - want) <= 1e-7 * max(1.0, abs(want)), (stat, want)


def test_not_polynomial_only_where_the_engine_refuses():
    """_not_polynomial is True exactly for the terms the exact engine refuses (NotPolynomial),
    a function inside a sum factor included, and False for polynomial ones (constants such as
    exp(1/3) and sqrt(2) among them)."""
    spec = make_spec("not_poly", 2, "z1 + z2", "tanh(z1) + tanh(z2)")
    g = TokenGaussian.of(spec)
    zs1, z1 = g.token_variables(0)[:2]
    zs2, z2 = g.token_variables(1)[:2]
    a = g.state[0]
    random = set(g.random_variables)
    refused = [sp.tanh(z1) * zs1, z1 ** 2 * sp.exp(-zs2 ** 2), sp.sqrt(z1) * z2, 3 * sp.erf(zs1),
               sp.tanh(z1 + z2) ** 2 * a, (1 - sp.tanh(z1) ** 2) * z1, (z2 + 1 / zs1) ** 2]
    polynomial = [z1 ** 2 * (1 + z2), sp.exp(sp.Rational(1, 3)) * zs1 * z2 ** 3,
                  sp.sqrt(2) * z1, a * zs2]
    E = Expectation(g, refused + polynomial)  # its ring holds the constants of the terms
    for term in refused:
        assert _not_polynomial(term, random), term
        with pytest.raises(NotPolynomial):
            E.exact.to_spt(term)
    for term in polynomial:
        assert not _not_polynomial(term, random), term
        E.exact.to_spt(term)


def test_poly_in_reads_closed_functions_as_generators():
    """conditioning._poly_in(expr, (v, w, F, G), (v, w)) with F = erf(a + b v) and
    G = exp(c w - w^2): the coefficients of expr as a polynomial in v, w, F and G, as sp.Poly
    finds them with F and G replaced by symbols; None where v sits inside another function
    or under a negative power."""
    v, w, a, b, c, t1, t2 = sp.symbols("v w a b c t1 t2", real=True)
    F, G = sp.erf(a + b * v), sp.exp(c * w - w ** 2)
    expr = ((F - t1 - t2) ** 2 * v + 3 * v ** 2 * F * (t1 + c) - G * w * (a - F) + t2 ** 3
            + (v + w) ** 2 * G * F * sp.tanh(t1))
    got = conditioning._poly_in(expr, (v, w, F, G), (v, w))
    f, h = sp.Dummy("f"), sp.Dummy("h")
    want = sp.Poly(sp.expand(expr.xreplace({F: f, G: h})), v, w, f, h).as_dict()
    assert set(got) == {k for k, x in want.items() if x != 0}
    for k, x in want.items():
        assert sp.expand(got[k] - x) == 0, k
    assert conditioning._poly_in(v * sp.tanh(v) + F, (v, F), (v,)) is None
    assert conditioning._poly_in(F / v, (v, F), (v,)) is None
    assert conditioning._poly_in(sp.erf(F) * v, (v, F), (v,)) is None


def test_projection_factors_k_without_nested_radicals():
    """Expectation._projection over three forms of two tokens' variables (plain SGD: q free)
    factors K = A Sigma A^T as U diag(d) U^T, U unit lower triangular and U, d rational
    functions of the state (no radicals: the only ones in W are the 1/sqrt(d_j)); at random
    states W W^T equals Sigma A^T K^-1 A Sigma and R equals Sigma - W W^T (numpy, from the
    covariances)."""
    from ssi_symbolic.symbolic.projection import _ldl
    spec = make_spec("ldl_forms", 2, "relu(z1 - z2)", "tanh(z1)*erf(z2)",
                     positional=[[0.4], [-0.3]], spherical=False)
    g = TokenGaussian.of(spec)
    zs1, z1, zeta1 = g.token_variables(0)
    zs2, z2, zeta2 = g.token_variables(1)
    variables = (zs1, z1, zeta1, zs2, z2, zeta2)
    forms = [(1, 0, 0, -1, 0, 0), (0, 1, 0, 0, 0, 0), (sp.Rational(1, 2), 0, 0, 0, 1, 0)]
    E = Expectation(g, [])
    mu, W, R, k = E._projection(variables, forms)
    mean, S = E._gaussian_of(variables)
    A = sp.Matrix(forms)
    K = (A * S * A.T).applyfunc(sp.expand)
    U, d = _ldl(K)
    assert all(U[i, i] == 1 and all(U[i, j] == 0 for j in range(i + 1, k)) for i in range(k))
    assert all(all(p.exp.is_Integer for p in x.atoms(sp.Pow)) for x in list(U) + d)
    assert (U * sp.diag(*d) * U.T - K).applyfunc(sp.cancel) == sp.zeros(k, k)
    rng = np.random.default_rng(7)
    for _ in range(5):
        state = dict(zip(g.state, [rng.uniform(-0.5, 0.5), rng.uniform(-0.4, 0.4),
                                   rng.uniform(1.0, 1.6)]))
        Sn = np.array(S.subs(state), dtype=float)
        An = np.array(A, dtype=float)
        Wn = np.array(W.subs(state), dtype=float)
        want = Sn @ An.T @ np.linalg.solve(An @ Sn @ An.T, An @ Sn)
        np.testing.assert_allclose(Wn @ Wn.T, want, atol=1e-12)
        np.testing.assert_allclose(np.array(R.subs(state), dtype=float), Sn - want, atol=1e-12)
