"""Expectation engine edge cases, checked against independent Gauss-Hermite sums."""
from pathlib import Path

import numpy as np
import pytest
import sympy as sp

from ssi_symbolic.backends.registry import generate
from ssi_symbolic.backends.files import load_module
from ssi_symbolic.model.spec import make_spec


def test_nonpolynomial_constants_made_by_expansion(tmp_path):
    """A parameter inside exp: expanding the loss creates constants such as
    1/(exp(2a) + 2 exp(a) + 1) that were not in the links; the loss must still come out right.
    Reference: R = 1/2 E[(z* + c - tanh(z))^2], c = 1/(1 + e^a), by a 2-d Gauss-Hermite sum."""
    spec = make_spec("const_atoms", 1, "z1 + 1/(1 + exp(a))", "tanh(z1)", parameters={"a": 0.3})
    mod = load_module(generate(spec, tmp_path)[0])
    x, w = np.polynomial.hermite_e.hermegauss(80)
    w = w / np.sqrt(2 * np.pi)
    for m, a in [(0.2, 0.3), (-0.7, 1.5)]:
        c = 1 / (1 + np.exp(a))
        zs = x[:, None]
        z = m * x[:, None] + np.sqrt(1 - m * m) * x[None, :]
        ref = 0.5 * np.einsum("i,j,ij->", w, w, (zs + c - np.tanh(z)) ** 2)
        fine, err = mod.quadrature_error(mod.population_loss, m, a=a)
        assert abs(float(mod.population_loss(m, a=a)) - ref) <= 3 * float(err) + 1e-12
        assert abs(float(fine) - ref) < 1e-9


def test_delta_integration_closed_form():
    """E[d/dm relu(m u1 + s u2)] with s = sqrt(1 - m^2): the derivative of the kink is
    integrated exactly (no quadrature node left for the delta term)."""
    from ssi_symbolic.symbolic.gaussian import GaussHermite
    m, u1, u2 = sp.symbols("m u1 u2", real=True)
    node = GaussHermite(sp.Max(0, m * u1 + sp.sqrt(1 - m ** 2) * u2) * u1, sp.Tuple(u1, u2))
    d = sp.diff(node, m)
    # E[u1 relu(w)] = m E[w relu(w)] = m/2 for w ~ N(0, 1): derivative 1/2
    assert not d.has(sp.DiracDelta)
    x, w = np.polynomial.hermite_e.hermegauss(60)
    w = w / np.sqrt(2 * np.pi)
    # the remaining smooth node is E[u1^2 H(...)] integrated by tensor Gauss-Hermite
    integrand = d.args if isinstance(d, sp.Add) else (d,)
    total = 0.0
    for part in integrand:
        if isinstance(part, GaussHermite):
            g = sp.lambdify([m] + list(part.variables), part.integrand, "numpy")
            grids = np.meshgrid(*([x] * len(part.variables)), indexing="ij")
            wts = np.ones(())
            for _ in part.variables:
                wts = np.multiply.outer(wts, w)
            total += float(np.sum(wts * g(0.3, *grids)))
        else:
            total += float(sp.lambdify([m], part, "numpy")(0.3))
    assert abs(total - 0.5) < 2e-2  # kinked smooth part: Gauss-Hermite converges slowly


def test_ring_to_sympy_is_the_canonical_expression(monkeypatch):
    """ExactEngine.to_sympy assembles SymPy's canonical form directly (ranked factors and
    terms, no re-flattening): every conversion made while deriving models with radicals,
    pi, parameters, several directions and positional encodings must equal, argument order
    included, what SymPy's own p.as_expr builds."""
    import sympy as sp

    from ssi_symbolic.model.spec import make_spec
    from ssi_symbolic.symbolic import exact_engine
    from ssi_symbolic.symbolic.derive import derive

    fast = exact_engine.ExactEngine.to_sympy
    seen = []

    def checked(self, p):
        a = fast(self, p)
        b = p.as_expr(*self._back_symbols)
        seen.append(sp.srepr(a) == sp.srepr(b) and a == b)
        return a

    monkeypatch.setattr(exact_engine.ExactEngine, "to_sympy", checked)
    specs = [
        make_spec("c1", 2, "He(2, z1)/sqrt(2) + He(3, z2)/sqrt(6)",
                  student="sqrt(3)*z1*z2/pi + beta*z1", positional=[[1.0], [-0.5]],
                  parameters={"beta": 0.5}, spherical=False),
        make_spec("c2", 1, "He(2, z1_1)/sqrt(2) + He(2, z2_1)/sqrt(2)", teacher_directions=2,
                  student_directions=2, spherical=False),
        make_spec("c3", 2, "exp(1)*z1**2 + sqrt(2)*sqrt(3)*z2**3 - 3*z1*z2/7", student="z1*z2",
                  noise=0.1),
        # a parameter and its radicals (beta, sqrt(beta), beta**(1/3)): powers of one base
        make_spec("c4", 1, "z1**2 + z1", student="beta**(1/3)*z1**2 + sqrt(beta)*z1 + beta*z1**3",
                  parameters={"beta": 0.5}),
    ]
    for spec in specs:
        D = derive(spec)
        # the diffusion outputs are converted when read
        D.covariance, D.ito_correction, D.finite_d_correction
    assert len(seen) > 50 and all(seen), (len(seen), seen.count(False))


def test_ring_to_sympy_takes_the_fast_path_for_powers_in_different_terms(monkeypatch):
    """m1 in one term and m1**2 in another is the usual polynomial, not a shared base within a
    term: the canonical form is built directly, without SymPy's as_expr (which cost 20 s of the
    untied L = 16 drift when every such polynomial fell back to it), and equals as_expr."""
    import sympy as sp
    from sympy.polys.rings import PolyElement

    from ssi_symbolic.model.spec import load_spec
    from ssi_symbolic.symbolic import exact_engine
    from ssi_symbolic.symbolic.derive import derive

    fast = exact_engine.ExactEngine.to_sympy
    calls, same = [0], []
    orig = PolyElement.as_expr

    def counting(self, *syms):
        calls[0] += 1
        return orig(self, *syms)

    def checked(self, p):
        calls[0] = 0
        a = fast(self, p)
        used = calls[0]
        same.append((used, sp.srepr(a) == sp.srepr(orig(p, *self._back_symbols))))
        return a

    monkeypatch.setattr(PolyElement, "as_expr", counting)
    monkeypatch.setattr(exact_engine.ExactEngine, "to_sympy", checked)
    spec = load_spec(Path(__file__).parent.parent / "derivations" / "tied_network_he2_L2.toml")
    derive(spec.with_length(4).untied_student(), diffusion=False)
    assert same and all(eq for _, eq in same)
    assert sum(used for used, _ in same) == 0, same


def test_parity_pruned_products_keep_the_expectation():
    """ExactEngine.mul(..., expect_only=True) leaves out the term products with an odd factor
    in a zero-mean group (their expectation vanishes): the factored product is smaller and its
    expectation equals that of the whole product. Tokens with a positional mean (token 1 here)
    are never pruned. Untied, tied and tied-with-encoding engines; random polynomials."""
    import random

    from ssi_symbolic.symbolic.exact_engine import ExactEngine
    from ssi_symbolic.symbolic.gaussian import TokenGaussian

    rnd = random.Random(3)
    specs = [make_spec("p", 3, "z1*z2*z3"), make_spec("p", 3, "z1*z2*z3", weights="untied"),
             make_spec("p", 3, "z1*z2*z3", positional=[[1], [0], [0]])]
    for spec in specs:
        g = TokenGaussian.of(spec)
        ex = ExactEngine(g, [])
        rv = [v for l in range(3) for v in g.token_variables(l)]

        def poly():
            return sp.Add(*[rnd.choice([-2, -1, 1, 3]) * sp.Mul(*rnd.sample(rv, rnd.randint(1, 3)))
                            for _ in range(6)])
        pruned_somewhere = False
        for _ in range(5):
            a, b = ex.to_spt(poly()), ex.to_spt(poly() * poly())
            whole = ex.mul(a, b, merge=False)
            pruned = ex.mul(a, b, expect_only=True)
            pruned_somewhere |= len(pruned) < len(whole)
            assert ex.expect_spt(pruned) == ex.expect_spt(whole)
        assert pruned_somewhere


def test_closed_form_refusals_say_whether_the_integrand_is_too_complex():
    """TooComplex (in the families, too many thresholds) against plain NoClosedForm (a
    function outside them): the dispatcher integrates only the first kind whole."""
    from ssi_symbolic.symbolic.closed_forms import GaussianClosedForm, NoClosedForm, TooComplex
    x, y, m = sp.symbols("x y m", real=True)
    cf = GaussianClosedForm((x, y), (0, 0), [[1, m], [m, 1]])
    with pytest.raises(TooComplex):
        cf.expect(sp.erf(x) ** 2 * sp.erf(y) ** 2)   # a four-dimensional orthant
    with pytest.raises(TooComplex):
        cf.expect(sp.erf(x + 1) * sp.erf(y) * sp.erf(x - y))  # three thresholds, shifted
    try:
        cf.expect(sp.tanh(x) * y)
    except NoClosedForm as err:
        assert not isinstance(err, TooComplex)
    else:
        raise AssertionError("tanh has no closed form here")
    assert cf.expect(sp.erf(x) * sp.erf(y)) != 0  # two thresholds close


def test_trigonometric_closed_form_with_symbolic_state_is_real_and_right():
    """y sin(4y/5 + 1/10) cos(x) under the token Gaussian of a positional spec (mean 3e/5,
    Cov [[1, m], [m, 1 - e^2]], m and e symbols): cos and sin enter as complex exponentials,
    and SymPy leaves imaginary terms I * b whose b cancel without its seeing it. The closed
    form keeps the real part (this term was refused before), free of I, and equals a 40 x 40
    Gauss-Hermite rule (exact to rounding for this entire integrand) at m = 0.3, e = 0.4."""
    from ssi_symbolic.symbolic.closed_forms import GaussianClosedForm
    x, y, m, e = sp.symbols("x y m e", real=True)
    cf = GaussianClosedForm((x, y), (0, 3 * e / 5), [[1, m], [m, 1 - e ** 2]])
    f = y * sp.sin(4 * y / 5 + sp.Rational(1, 10)) * sp.cos(x)
    value = cf.expect(f)
    assert not value.has(sp.I)
    mv, ev = 0.3, 0.4
    t, w = np.polynomial.hermite_e.hermegauss(40)
    w = w / w.sum()
    chol = np.linalg.cholesky(np.array([[1, mv], [mv, 1 - ev ** 2]]))
    g1, g2 = np.meshgrid(t, t, indexing="ij")
    xs = chol[0, 0] * g1
    ys = 3 * ev / 5 + chol[1, 0] * g1 + chol[1, 1] * g2
    ref = float(np.einsum("i,j,ij->", w, w, ys * np.sin(0.8 * ys + 0.1) * np.cos(xs)))
    assert abs(float(value.subs({m: mv, e: ev})) - ref) < 1e-12


def test_closed_form_budget_does_not_depend_on_what_was_computed_before():
    """Whether a term closes depends on the term alone: the budget counts every sub-problem
    its reduction reaches, memoised or not. With k the least degree for which fresh engines
    refuse x^k erf(x + 1) erf(y - 1) (more than MAX_REDUCTIONS sub-problems), an engine that
    has just reduced x^(k-1) erf(x + 1) erf(y - 1) (whose sub-problems are most of the x^k
    term's: counting new sub-problems only, it would close there) refuses it too; a term
    that closes has the same value either way."""
    from ssi_symbolic.symbolic.closed_forms import GaussianClosedForm, TooComplex
    x, y, m = sp.symbols("x y m", real=True)

    def engine():
        return GaussianClosedForm((x, y), (sp.Rational(1, 3), 0), [[1, m], [m, 1]])

    def refused(k):
        try:
            engine().expect(x ** k * f)
        except TooComplex:
            return True
        return False
    f = sp.erf(x + 1) * sp.erf(y - 1)
    k = next(k for k in range(1, 40) if refused(k))
    assert k >= 4, k  # the degrees below close
    warm = engine()
    lower = warm.expect(x ** (k - 1) * f)
    with pytest.raises(TooComplex):
        warm.expect(x ** k * f)
    warm2 = engine()
    warm2.expect(x ** (k - 2) * f)
    assert warm2.expect(x ** (k - 1) * f) == lower
    assert sp.srepr(engine().expect(x ** (k - 1) * f)) == sp.srepr(lower)


def test_smooth_too_complex_statistic_is_one_node_with_the_right_value():
    """A one-token statistic of gelu links with four Phi factors (no closed form) is one
    quadrature node over (zs1, z1), its polynomial part exact, and its value is the
    two-dimensional Gaussian integral computed here independently (tensor Gauss-Hermite of
    the statistic itself, zs1 = u1, z1 = m u1 + sqrt(1 - m^2) u2, 120 x 120 points)."""
    from ssi_symbolic.model.spec import make_spec
    from ssi_symbolic.symbolic.expectation import Expectation
    from ssi_symbolic.symbolic.gaussian import GaussHermite, TokenGaussian
    spec = make_spec(name="gelu_node", L=1, teacher="gelu(z1)")
    g = TokenGaussian.of(spec)
    zs, z = g.token_variables(0)
    (m,) = g.state
    Phi = lambda t: (1 + sp.erf(t / sp.sqrt(2))) / 2
    gelu, dgelu = z * Phi(z), Phi(z) + z * sp.exp(-z ** 2 / 2) / sp.sqrt(2 * sp.pi)
    stat = (dgelu * (zs * Phi(zs) - gelu)) ** 2 * z * zs
    E = Expectation(g, [stat])
    out = E.expect(stat)
    nodes = out.atoms(GaussHermite)
    assert len(nodes) == 1 and "quadrature" in E.kinds
    (node,) = nodes
    # zs1 and z1 both read by the functions determine the Gaussian (R = 0): the integrand is
    # the statistic at x = mu + W u in its product form, not expanded into monomials (80 x)
    assert sp.count_ops(node.integrand) <= 6 * sp.count_ops(stat)
    # whole: no closed-form terms beside it (term by term: thousands of operations of
    # arcsines and completed squares, and the same node for the terms with four Phi)
    assert not sp.sympify(out.xreplace({node: 0})).has(sp.asin, sp.erf, sp.erfc)
    assert len(node.variables) == 2
    x, w = np.polynomial.hermite_e.hermegauss(120)
    w = w / np.sqrt(2 * np.pi)
    U1, U2 = np.meshgrid(x, x, indexing="ij")
    W = np.multiply.outer(w, w)
    for mv in (0.0, 0.45, -0.8):
        f = sp.lambdify([zs, z], stat.subs(m, mv), "scipy")
        want = float(np.sum(W * f(U1, mv * U1 + np.sqrt(1 - mv ** 2) * U2)))
        h = sp.lambdify([*node.variables], node.integrand.subs(m, mv), "scipy")
        got = float(np.sum(W * h(U1, U2))) + float((out - node).subs(m, mv))
        assert abs(got - want) <= 1e-10 * max(1.0, abs(want)), (mv, got, want)


def test_too_many_erf_thresholds_refused_before_the_reduction(monkeypatch):
    """A statistic with a term of more erf thresholds than any closed form has (gelu((z1 +
    z2)/sqrt 2)'s squared error times its squared derivative: up to six Phi factors) is refused
    as TooComplex before its reduction to the forms its functions read (the conditional
    moments of the whole statistic, seconds of SymPy) is built, and then goes to one smooth
    quadrature node; a statistic that closes is still reduced (to one form) and closes, with
    the value of a Gauss-Hermite sum of the integrand itself (1e-12)."""
    from ssi_symbolic.model.spec import make_spec
    from ssi_symbolic.symbolic.expectation import Expectation
    from scipy.special import erf
    from ssi_symbolic.symbolic.gaussian import GaussHermite, TokenGaussian
    spec = make_spec(name="gelu_coupled", L=2, teacher="z1", student="gelu((z1 + z2)/sqrt(2))")
    g = TokenGaussian.of(spec)
    (zs1, z1), (_, z2) = g.token_variables(0), g.token_variables(1)
    (m,) = g.state
    Phi = lambda t: (1 + sp.erf(t / sp.sqrt(2))) / 2
    s = (z1 + z2) / sp.sqrt(2)
    gelu, dgelu = s * Phi(s), Phi(s) + s * sp.exp(-s ** 2 / 2) / sp.sqrt(2 * sp.pi)
    too_many = (dgelu * (zs1 - gelu)) ** 2 * zs1 * z2
    closes = Phi(s) ** 2 * zs1
    reduced = []
    original = Expectation._reduced

    def spy(self, factor, variables):
        reduced.append(factor)
        return original(self, factor, variables)
    monkeypatch.setattr(Expectation, "_reduced", spy)
    E = Expectation(g, [too_many, closes])
    assert E._closed_form(too_many) is None and E._too_complex[too_many] is True
    assert reduced == []
    out = E.expect(too_many)
    assert len(out.atoms(GaussHermite)) == 1 and reduced == []
    value = E._closed_form(closes)
    assert value is not None and reduced == [closes] and not value.has(GaussHermite)
    # E[Phi(s)^2 zs1], s = (z1 + z2)/sqrt 2: zs1 = a s + sqrt(1 - a^2) v with a = m / sqrt 2
    x, w = np.polynomial.hermite_e.hermegauss(100)
    w = w / np.sqrt(2 * np.pi)
    U, V = np.meshgrid(x, x, indexing="ij")
    W = np.multiply.outer(w, w)
    for mv in (0.0, 0.5, -0.9):
        a = mv / np.sqrt(2)
        phi2 = ((1 + erf(U / np.sqrt(2))) / 2) ** 2
        want = float(np.sum(W * phi2 * (a * U + np.sqrt(1 - a * a) * V)))
        assert abs(float(value.subs(m, mv)) - want) <= 1e-12, (mv, value)


def _closed_form_outcome(expr, xs, mean, cov, precheck):
    """E[expr] by the closed-form engine, with or without its threshold precheck
    (_erf_terms_refused): None when refused as too complex, "none" when refused otherwise."""
    from ssi_symbolic.symbolic import closed_forms as cf
    engine = cf.GaussianClosedForm(xs, mean, cov)
    if not precheck:
        engine._erf_terms_refused = lambda *a: False
    try:
        return engine.expect(expr)
    except cf.TooComplex:
        return None
    except cf.NoClosedForm:
        return "none"


def test_erf_threshold_precheck_refuses_exactly_what_the_expansion_would():
    """closed_forms refuses a statistic whose expansion has a term with four erf thresholds,
    or three with a shifted mean, before expanding it (_erf_terms_refused). The outcome must
    be the one the term-by-term planning reaches without the precheck: the same refusals,
    and the statistics that close do close, with the right value (a 2-d Gauss-Hermite sum of
    the integrand itself, 1e-12)."""
    from ssi_symbolic.symbolic import closed_forms as cf
    x, y = sp.symbols("x y", real=True)
    cov = [[1, sp.Rational(1, 2)], [sp.Rational(1, 2), 1]]
    three = (sp.erf(x) + x) * (sp.erf(y) + 1) * (sp.erf(x + y) - 2)
    four = (sp.erf(x) + 1) ** 2 * (sp.erf(y) + x) ** 2
    two = (sp.erf(x) + 1) * (sp.erf(y) + x) * sp.exp(-x ** 2 / 3)
    cases = [(three, (0, 0), True), (three, (sp.Rational(1, 3), 0), False),
             (four, (0, 0), False), (two, (sp.Rational(1, 3), 0), True)]

    def outcome(expr, mean, precheck):
        return _closed_form_outcome(expr, (x, y), mean, cov, precheck)

    g, w = np.polynomial.hermite_e.hermegauss(60)
    w = w / np.sqrt(2 * np.pi)
    u1, u2 = np.meshgrid(g, g, indexing="ij")
    W = np.outer(w, w)
    for expr, mean, closes in cases:
        got, plain = outcome(expr, mean, True), outcome(expr, mean, False)
        assert (got is not None) == (plain is not None) == closes, (expr, mean)
        if closes:
            assert sp.simplify(got - plain) == 0
            xs = float(mean[0]) + u1
            ys = float(mean[1]) + 0.5 * u1 + np.sqrt(0.75) * u2
            f = sp.lambdify((x, y), expr, modules=["scipy", "numpy"])
            ref = float(np.sum(W * f(xs, ys)))
            value = float(got.replace(cf.NormalCDF2, _phi2_by_quad))
            assert abs(value - ref) <= 1e-12 * max(1.0, abs(ref)), (expr, value, ref)


def _phi2_by_quad(h, k, rho):
    """Phi_2(h, k; rho) = int_{-inf}^h phi(t) Phi((k - rho t) / sqrt(1 - rho^2)) dt."""
    from scipy.integrate import quad
    from scipy.special import ndtr
    h, k, rho = float(h), float(k), float(rho)
    s = np.sqrt(1 - rho ** 2)
    val, _ = quad(lambda t: np.exp(-t * t / 2) / np.sqrt(2 * np.pi) * ndtr((k - rho * t) / s),
                  -np.inf, h, epsabs=1e-15, epsrel=1e-13)
    return sp.Float(val, 17)


def test_shared_projection_is_the_per_term_projection():
    """_restricted_projection reads a term's projection (mu, W, R, k) off the projection of
    all the random variables on the same forms; it must equal the projection computed on the
    term's own variables, entry by entry, for subsets of several tokens with encoding. And
    _forms_fix_everything (decided in the field of rational functions) must agree with a
    cancel of every entry of R."""
    from ssi_symbolic.symbolic.expectation import Expectation
    from ssi_symbolic.symbolic.gaussian import TokenGaussian
    spec = make_spec("proj", 3, "erf((z1 + z2 + z3)/sqrt(3))",
                     "(tanh(z1) + tanh(z2) + tanh(z3))/sqrt(3)",
                     positional=[[0.5, -0.3], [0.2, 0.8], [-0.6, 0.1]])
    g = TokenGaussian.of(spec)
    E = Expectation(g, [])
    t = [g.token_variables(l) for l in range(3)]  # (zs, z, zeta_1, zeta_2) per token
    s3 = 1 / sp.sqrt(3)
    cases = [  # (variables, forms as rows over them)
        ((t[0][1], t[1][1]), [(1, 0), (0, 1)]),                      # z1, z2: fixed
        ((t[0][0], t[0][1], t[0][2]), [(0, 1, 0)]),                  # z1 with zs1, zeta
        ((t[0][0], t[1][0], t[2][0], t[1][1], t[1][3]),
         [(s3, s3, s3, 0, 0), (0, 0, 0, 1, 0)]),                    # s, z2 with zeta2_2
        ((t[0][0], t[0][1], t[2][1], t[2][2]), [(0, 0, 1, 0), (1, 0, 0, 0)]),
    ]
    for variables, forms in cases:
        shared = E._restricted_projection(variables, forms)
        own = E._projection(variables, forms)
        assert shared[3] == own[3]
        for a, b in [(shared[0], own[0]), (shared[1], own[1])]:
            assert len(a) == len(b) and all(sp.expand(x - y) == 0 for x, y in zip(a, b))
        n = len(variables)
        R = own[2]
        assert all(sp.cancel(shared[2][i, j] - R[i, j]) == 0  # rational functions
                   for i in range(n) for j in range(n)), variables
        fixed = all(x == 0 or sp.cancel(x) == 0 for x in R)
        assert E._forms_fix_everything(variables, forms, shared[2]) == fixed, variables
    # the first case is fixed (two forms, two variables), the second is not
    assert E._forms_fix_everything(*cases[0], None)
    assert not E._forms_fix_everything(cases[1][0], cases[1][1], None)


def test_vanishing_diagonal_shortcuts_agree_with_the_field_computation(monkeypatch):
    """_vanishing_diagonal (the variables a set of forms fixes, R_ii = 0 identically) decides
    most entries without the computation in the field of rational functions: an entry that
    is not zero at one point of the generators is not zero, and a variable in the constant
    row span of the forms is fixed. Over every form set of one or two unit or summed rows of
    an L = 2 encoding's eight variables it agrees with the field computation alone
    (_at_point disabled), and with the row span; with a repeated variable (a singular
    covariance: fixed, but not in the span) the field computation still decides."""
    import itertools

    from ssi_symbolic.symbolic import expectation as ex
    from ssi_symbolic.symbolic.gaussian import TokenGaussian
    spec = make_spec("fixed", 2, "erf((z1 + z2)/sqrt(2))", "(tanh(z1) + tanh(z2))/sqrt(2)",
                     positional=[[0.5, -0.3], [0.2, 0.8]])
    g = TokenGaussian.of(spec)
    E = ex.Expectation(g, [])
    allv = tuple(v for l in range(2) for v in g.token_variables(l))
    n = len(allv)
    unit = [tuple(int(k == i) for k in range(n)) for i in range(n)]
    sets = []
    for i, j in itertools.combinations(range(n), 2):
        summed = tuple(sp.sqrt(2) * (a + b) / 2 for a, b in zip(unit[i], unit[j]))
        sets += [[unit[i]], [summed], [unit[i], unit[j]], [summed, unit[j]]]
    fast = [E._vanishing_diagonal(allv, rows) for rows in sets]
    monkeypatch.setattr(ex, "_at_point", lambda dom, elems: None)
    exact = [E._vanishing_diagonal(allv, rows) for rows in sets]
    assert fast == exact
    for rows, got in zip(sets, fast):
        A = ex._independent_rows(rows)
        assert got == {i for i in range(n) if ex._in_row_span(A, i)}
    assert any(got for got in fast) and any(len(got) < n for got in fast)
    # (z1 + z2)/sqrt 2 with z1 - z2 spans z1; a row that stays irrational is not decided
    z = sp.Matrix([[1, 1, 0], [1, -1, 0]]) / sp.sqrt(2)
    assert ex._in_row_span(z, 0) and not ex._in_row_span(z, 2)
    assert not ex._in_row_span(sp.Matrix([[1, sp.sqrt(2), 0]]), 0)
    monkeypatch.undo()
    z1 = g.token_variables(0)[1]
    assert E._vanishing_diagonal((z1, z1), [(1, 0)]) == {0, 1}
    assert E._vanishing_diagonal((z1, z1), [(1, 0)], whole=True) is True


def test_expanded_terms_with_unreduced_fractions_are_the_field_terms(monkeypatch):
    """The closed-form engine's expansion multiplies its coefficients (rational functions of
    the state, radicals as generators) as unreduced fractions and reduces each term's once
    (closed_forms._Fraction). The terms are those of the field arithmetic that reduces at
    every operation, and they sum to sp.expand of the integrand."""
    from ssi_symbolic.symbolic import closed_forms as cf
    x, y, q, m = sp.symbols("x y q m")
    expr = ((x / (2 * q - m ** 2) + y * m / (4 * q - 2 * m ** 2) + sp.sqrt(2) * q / 5) ** 3
            * (sp.erf(x) + y / (q + 1) + m ** 2 / (2 * q - m ** 2)) ** 2)
    fast = cf._expanded_terms(expr, {x, y})
    monkeypatch.setattr(cf._Fraction, "applies", staticmethod(lambda dom: False))
    field = cf._expanded_terms(expr, {x, y})
    assert fast == field and len(fast) > 20
    total = sp.Add(*[c * rest for c, rest in fast])
    for point in ({x: sp.Rational(1, 3), y: -2, q: sp.Rational(7, 5), m: sp.Rational(1, 2)},
                  {x: -1, y: sp.Rational(3, 4), q: 3, m: sp.Rational(-5, 4)}):
        assert abs(sp.N((total - expr).xreplace(point), 50)) < 1e-40


def test_product_terms_in_ground_rationals_are_the_sympy_terms():
    """product_terms multiplies rational coefficients as ground-type rationals and returns
    SymPy numbers: the same keys and the same coefficients (value and type) as the SymPy
    arithmetic path; exponents that cancel drop their base; a Float coefficient sends the
    whole expression down the SymPy path."""
    from ssi_symbolic.symbolic.gaussian import _product_terms, product_terms
    x, y, m = sp.symbols("x y m", real=True)
    exprs = [
        (x + sp.Rational(3, 7) * y - 2) ** 3 * (sp.erf(x) / 5 + x ** -2 * sp.sqrt(y)) * x ** 2,
        (sp.Rational(1, 3) * x - sp.sqrt(2) * m) ** 2 * (x - sp.Rational(1, 3)) - x ** 3 / 9,
        (x + y) * (x - y) - x ** 2 + y ** 2,
        (sp.Float(0.25) * x + 1) ** 2 * (y - 1),
    ]
    for expr in exprs:
        got, ref = product_terms(expr), _product_terms(expr, False)
        assert got.keys() == ref.keys()
        for k in ref:
            assert got[k] == ref[k] and type(got[k]) is type(ref[k]), (k, got[k], ref[k])
    assert all(c == 0 for c in product_terms(exprs[2]).values())
    assert product_terms((x ** 2 + y) * x ** -2) == {frozenset(): 1,
                                                     frozenset({(y, 1), (x, -2)}): 1}


def test_node_derivative_is_sp_diff_of_the_node():
    """dag_diff takes a quadrature node's derivative through its own _eval_derivative (kinks'
    deltas integrated out): the same expression as sp.diff's, smooth and kinked."""
    from ssi_symbolic.symbolic.gaussian import GaussHermite, dag_diff
    m, q, u1, u2 = sp.symbols("m q u1 u2", real=True)
    nodes = [GaussHermite(sp.tanh(m * u1 + q * u2) * u1 ** 2, sp.Tuple(u1, u2)),
             GaussHermite(sp.Max(0, m * u1 + 1) * sp.tanh(q * u1), sp.Tuple(u1,)),
             GaussHermite(sp.Heaviside(u1 - m) * sp.exp(q * u1), sp.Tuple(u1,))]
    for node in nodes:
        for s in (m, q):
            assert sp.srepr(dag_diff(3 * m * node, s)) == sp.srepr(sp.diff(3 * m * node, s))


def test_rewrite_refuses_the_same_links_with_or_without_its_first_walk(monkeypatch):
    """rewrite refuses a function outside its families found by a first walk over the
    distinct sub-expressions; with that walk off (every function taken as known) the full
    rewrite gives the same refusals and the same results."""
    from ssi_symbolic.symbolic import closed_forms
    from ssi_symbolic.symbolic.closed_forms import NoClosedForm, rewrite
    z1, z2, m = sp.symbols("z1 z2 m", real=True)
    random = {z1, z2}
    exprs = [sp.tanh(z1) * sp.erf(z2) + z1, sp.erf(z1 + z2) ** 2 * sp.exp(-z1 ** 2 / 2),
             sp.Max(z1, z2) * sp.Abs(z1 - 1) + sp.sign(z2), sp.cos(z1) * sp.tanh(m) * z2,
             sp.exp(sp.tanh(z1)), sp.sqrt(1 + z1 ** 2), sp.Heaviside(z1) * sp.log(1 + z2 ** 2),
             sp.DiracDelta(z1, 1), sp.Max(sp.tanh(z1), z2), sp.erf(z1) * sp.sin(z2 / 3)]

    def outcome(e):
        try:
            return rewrite(e, random)
        except NoClosedForm:
            return "refused"
    fast = [outcome(e) for e in exprs]
    monkeypatch.setattr(closed_forms, "_FAMILIES", (sp.Function,))
    slow = [outcome(e) for e in exprs]
    assert fast == slow
    assert fast.count("refused") == 6, fast


def test_reduction_over_all_variables_restricts_to_the_textbook_conditioning():
    """projection._Reduction, made once over all token variables for a set of forms and read
    off for a subset of them holding the variables the forms read, is the conditional law of
    that subset computed on its own:
    E[x | Y] = mu + S A^T K^-1 (Y - A mu), Cov(x | Y) = S - S A^T K^-1 A S, K = A S A^T
    (Matrix.inv, simplified differences), and x = A^T (A A^T)^-1 Y inside functions."""
    from ssi_symbolic.symbolic import expectation as ex
    from ssi_symbolic.symbolic.gaussian import TokenGaussian
    from ssi_symbolic.symbolic.projection import _Reduction
    spec = make_spec("reduction", 2, "relu(z1 - z2) + z1/2", "exp(z1/2)*Phi(z2)",
                     positional=[[0.9], [0.3]], spherical=False)
    g = TokenGaussian.of(spec)
    E = ex.Expectation(g, [])
    allv = tuple(v for l in range(2) for v in g.token_variables(l))
    n = len(allv)
    zs1, z1, zs2, z2 = (allv.index(v) for v in (g.zstar[0], g.z[0], g.zstar[1], g.z[1]))
    rows = [[0] * n for _ in range(2)]
    rows[0][z1], rows[0][z2] = 1, -1            # z1 - z2
    rows[1][zs1], rows[1][zs2] = sp.Rational(1, 2), 1
    base = _Reduction(allv, [tuple(r) for r in rows], E._gaussian_of(allv))
    # the variables of a factor hold every variable its forms read (the rows are zero
    # elsewhere), in any order, with or without others
    for at in ([z1, z2, zs1, zs2], [zs2, allv.index(g.zeta[0][0]), z2, zs1, z1],
               list(range(n))):
        variables = tuple(allv[i] for i in at)
        ys, ymean, K, cond, R, inner, _ = base.restricted(at, variables)
        mean, S = E._gaussian_of(variables)
        A = sp.Matrix([[r[i] for i in at] for r in rows])
        mu, yv = sp.Matrix(mean), sp.Matrix(ys)
        G = S * A.T * (A * S * A.T).inv()
        want_cond = mu + G * (yv - A * mu)
        want_R = S - G * A * S
        right = A.T * (A * A.T).inv()
        for a, v in enumerate(variables):
            assert sp.simplify(cond[a] - want_cond[a]) == 0
            assert sp.simplify(inner[v] - (right[a, :] * yv)[0]) == 0
            for b in range(len(variables)):
                assert sp.simplify(R[a, b] - want_R[a, b]) == 0
        assert all(sp.simplify(x - y) == 0 for x, y in zip(ymean, A * mu))


def test_pivots_are_the_rref_pivots_of_repeated_and_scaled_forms():
    """projection._pivots (the independent forms the projections are keyed by): the pivots
    of SymPy's rref of the forms' transpose, on lists with repeated rows, multiples
    (sqrt(3)/3 (1, 1, 1) and -2/3 (1, 1, 1)), and rows with radicals left to rref."""
    import random

    from ssi_symbolic.symbolic.projection import _pivots
    rng = random.Random(5)
    base = [(1, 0, 0, 0), (0, 1, 1, 0), (1, 1, 1, 0), (0, 0, 0, 1), (1, 0, 0, 1)]
    scales = [1, -1, sp.Rational(-2, 3), sp.sqrt(3) / 3, sp.Rational(5, 2)]
    for _ in range(40):
        forms = [tuple(rng.choice(scales) * x for x in rng.choice(base))
                 for _ in range(rng.randint(1, 7))]
        if rng.random() < 0.2:
            forms.append((1, sp.sqrt(2), 0, 0))
        assert _pivots(forms) == list(sp.Matrix(forms).T.rref()[1]), forms


@pytest.mark.parametrize("seed", range(3))
def test_step_threshold_precheck_refuses_only_what_the_expansion_would(seed):
    """thresholds.terms_refused with steps (Heaviside, relu = Max(y, 0), Max and Min of
    several forms, parallel steps with offsets, H(y) H(-y), deltas) beside erf factors, with
    and without a mean shift: on random products, a statistic the precheck refuses is one the
    expansion and term-by-term planning refuse too (TooComplex, or NoClosedForm for a
    squared delta), and one it lets through gets the planning's own outcome and value."""
    import random

    from ssi_symbolic.symbolic import closed_forms as cf
    x, y = sp.symbols("x y", real=True)
    cov = [[1, sp.Rational(1, 2)], [sp.Rational(1, 2), 1]]
    pool = [sp.erf(x), sp.erf(y) + 1, sp.erf(x + y) - x, sp.Heaviside(x),
            sp.Heaviside(-x) + y, sp.Heaviside(x - 1), sp.Heaviside(2 * x + 2),
            sp.Max(x - y, 0), sp.Max(x, y) + 1, sp.Min(x, 2 * y), sp.Max(x, y, 0),
            sp.exp(-x ** 2 / 3) + 1, x + y, sp.DiracDelta(x - y) + 1, sp.Heaviside(1 - x),
            sp.erf(x - 1) + y]

    def outcome(expr, mean, precheck):
        return _closed_form_outcome(expr, (x, y), mean, cov, precheck)

    rng = random.Random(seed)
    refused = 0
    for _ in range(40):
        expr = sp.Mul(*[rng.choice(pool) for _ in range(rng.randint(2, 5))])
        mean = rng.choice([(0, 0), (sp.Rational(1, 3), 0)])
        engine = cf.GaussianClosedForm((x, y), mean, cov)
        plain = outcome(expr, mean, False)
        if engine._erf_terms_refused(expr, {x, y}):
            refused += 1
            assert plain is None or plain == "none", (expr, mean)
            continue
        got = outcome(expr, mean, True)
        assert (got is None) == (plain is None), (expr, mean)
        if got is not None and got != "none":
            assert sp.simplify(got - plain) == 0, (expr, mean)
    assert refused >= 5


@pytest.mark.parametrize("seed", range(4))
def test_field_of_skips_only_the_attempts_construct_domain_refuses(seed, monkeypatch):
    """closed_forms._field_of goes straight to renamed constants when an irrational algebraic
    number is a polynomial factor (_algebraic_factor): construct_domain then gives EX (checked
    here), and the field, elements and expressions are those of the path that tries it
    first. Random rational functions of the state with sqrt(2), 3**(1/3), pi, exp(2),
    sqrt(1 - m^2) and radicals inside functions."""
    import random

    from sympy.polys.constructor import construct_domain

    from ssi_symbolic.symbolic import closed_forms as cf
    m, e = sp.symbols("m e", real=True)
    rng = random.Random(seed)
    atoms = [m, e, m, e, sp.sqrt(2), sp.Integer(3) ** sp.Rational(1, 3), sp.pi, sp.exp(2),
             1 + sp.sqrt(2), sp.Rational(3, 7)]
    rare = [sp.exp(sp.sqrt(2) * e), sp.sqrt(1 - m ** 2)]  # no field with m beside the second
    # transcendental constants and radicals inside functions are generators of a field
    for exprs in ([sp.pi * m / (e + 1)], [sp.exp(2) * m + e, m / 3],
                  [sp.exp(sp.sqrt(2) * e) * m / (m + 2)]):
        assert not cf._algebraic_factor(exprs)
        assert cf._field_of(exprs) is not None
    assert cf._algebraic_factor([m / (e + sp.sqrt(2))])
    assert cf._algebraic_factor([(1 + sp.Integer(3) ** sp.Rational(1, 3)) ** 2 * m])
    skipped = 0
    for _ in range(12):
        exprs = []
        for _ in range(rng.randint(1, 3)):
            num = sp.Add(*[sp.Mul(*rng.sample(atoms, 2)) for _ in range(3)])
            if rng.random() < 0.2:
                num += rng.choice(rare)
            den = sp.Add(*[rng.choice(atoms) for _ in range(2)]) + 5
            exprs.append(num / den)
        fast = cf._field_of(exprs)
        if cf._algebraic_factor(exprs):
            skipped += fast is not None
            dom, _ = construct_domain(exprs, field=True)
            assert dom.is_EX or dom.is_EXRAW, exprs
        with monkeypatch.context() as mp:
            mp.setattr(cf, "_algebraic_factor", lambda exprs: False)
            plain = cf._field_of(exprs)
        assert (fast is None) == (plain is None), exprs
        if fast is not None:
            back = [fast[2](cf._fraction_expr(fast[0], x)) for x in fast[1]]
            want = [plain[2](cf._fraction_expr(plain[0], x)) for x in plain[1]]
            assert back == want, exprs
    assert skipped >= 2


def test_step_with_a_parameter_in_its_direction(tmp_path):
    """relu(beta z1) with a parameter beta of either sign: the closed forms cannot merge its
    step with others by orientation (beta's sign is unknown) and keep it as it is (it was an
    internal error). Against z1, the loss is 1/2 (beta^2/2 - m beta + 1) (E[relu(beta z*)^2] =
    beta^2/2 and E[relu(beta z*) z] = m beta/2 for either sign); against erf(z1), the module
    at beta = -0.7 and 0.7 gives the numbers of the modules of relu(-0.7 z1) and relu(0.7 z1)."""
    lin = load_module(generate(make_spec("relu_beta", 1, "relu(beta*z1)", "z1",
                                         parameters={"beta": 0.7}), tmp_path / "a")[0])
    for beta in (0.7, -0.7, 1.3, -1.3):
        for m in (0.0, 0.4, -0.8):
            want = 0.5 * (beta ** 2 / 2 - m * beta + 1)
            assert abs(float(lin.population_loss(m, beta=beta)) - want) <= 1e-12
    par = load_module(generate(make_spec("relu_beta_erf", 1, "relu(beta*z1)", "erf(z1)",
                                         parameters={"beta": 0.7}), tmp_path / "b")[0])
    for beta in (0.7, -0.7):
        lit = load_module(generate(make_spec(f"relu_lit{int(beta > 0)}", 1,
                                             f"relu({beta}*z1)", "erf(z1)"),
                                   tmp_path / f"c{int(beta > 0)}")[0])
        for m in (0.0, 0.3, -0.6, 0.9):
            assert abs(float(par.population_loss(m, beta=beta))
                       - float(lit.population_loss(m))) <= 1e-12
            assert np.allclose(np.asarray(par.drift(m, 0.5, beta=beta), float),
                               np.asarray(lit.drift(m, 0.5), float), rtol=0, atol=1e-12)
