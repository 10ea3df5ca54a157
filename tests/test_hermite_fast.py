"""Numerical Hermite coefficients of non-polynomial links (analysis/hermite_numeric.py, MATH.md 5):
dimension reduction to the linear forms a term depends on, products over disjoint tokens,
kink-aware one-dimensional rules, error estimates that bound the actual errors, and speed.

Closed forms used below (phi the standard normal density, Phi its distribution function, He_k
the probabilists' Hermite polynomials, He_k phi = (-1)^k phi^(k)):

* relu(z - a), k >= 2: E[relu(z - a) He_k(z)] = int_a^inf (z - a) (-1)^k phi^(k)(z) dz; one
  integration by parts (the boundary term vanishes at z = a and at infinity) gives
  (-1)^(k+1) int_a^inf phi^(k-1) = (-1)^k phi^(k-2)(a) = He_{k-2}(a) phi(a). For k = 1 it is
  E[relu'(z - a)] = 1 - Phi(a) (Stein), for k = 0 phi(a) - a (1 - Phi(a)). At a = 0:
  E[relu He_k] = He_{k-2}(0) / sqrt(2 pi), He_{2j}(0) = (-1)^j (2j - 1)!!, He_{2j+1}(0) = 0.
* Heaviside(z - a), k >= 1: int_a^inf (-1)^k phi^(k) = (-1)^(k-1) phi^(k-1)(a) = He_{k-1}(a) phi(a).
* |z| = relu(z) + relu(-z): E[|z| He_k] = (1 + (-1)^k) E[relu He_k].
* f(v . z) with |v| = 1: E[f(v . z) He_alpha(z)] = E[f(u) He_|alpha|(u)] v^alpha (the projection
  identity with one linear form).
"""
import itertools
import math
import time

import mpmath
import numpy as np
import pytest
import sympy as sp

from ssi_symbolic.analysis.hermite import numerical_coefficients, sie
from ssi_symbolic.model.spec import token_symbols

Z = token_symbols(12)
PHI0 = 1 / math.sqrt(2 * math.pi)


def He(k, x):
    """He_k(x) (numpy)."""
    return np.polynomial.hermite_e.hermeval(x, [0] * k + [1])


def phi(x):
    return math.exp(-x * x / 2) / math.sqrt(2 * math.pi)


def sf(x):
    return 0.5 * math.erfc(x / math.sqrt(2))


def gh_tensor(f, L, n, alpha):
    """E[f(z) He_alpha(z)], z ~ N(0, I_L), by a tensor Gauss-Hermite rule written here."""
    x, w = np.polynomial.hermite_e.hermegauss(n)
    w = w / math.sqrt(2 * math.pi)
    X = np.meshgrid(*([x] * L), indexing="ij")
    W = np.ones(())
    for _ in range(L):
        W = np.multiply.outer(W, w)
    G = np.broadcast_to(f(*X), W.shape) * W
    for l, a in enumerate(alpha):
        G = G * He(a, X[l])
    return float(G.sum())


def mp_coefficient(f, k, dps=30):
    """E[f(u) He_k(u)], u ~ N(0, 1), by mpmath quadrature (f takes an mpf)."""
    with mpmath.workdps(dps):
        def g(u):
            return f(u) * mpmath.hermite(k, u / mpmath.sqrt(2)) * 2 ** (-mpmath.mpf(k) / 2) \
                * mpmath.exp(-u * u / 2) / mpmath.sqrt(2 * mpmath.pi)
        return float(mpmath.quad(g, [-mpmath.inf, -2, 0, 2, mpmath.inf]))


def multi_indices(L, k):
    return [a for a in itertools.product(range(k + 1), repeat=L) if sum(a) == k]


# ------------------------------------------------------------------ the projection identity

def test_mp_coefficient_helper_is_probabilists_hermite():
    # E[u^4 He_4(u)] = 4! and E[u^2 He_0] = 1
    assert mp_coefficient(lambda u: u ** 4, 4) == pytest.approx(24, rel=1e-12)
    assert mp_coefficient(lambda u: u ** 2, 0) == pytest.approx(1, rel=1e-12)


@pytest.mark.parametrize("expr, fnp", [
    (sp.erf((Z[0] + 2 * Z[1] - Z[2]) / sp.sqrt(6)),
     lambda a, b, c: __import__("scipy.special").special.erf((a + 2 * b - c) / math.sqrt(6))),
    (sp.exp(-(Z[0] - Z[1] + Z[2] / 2) ** 2 / 3),
     lambda a, b, c: np.exp(-(a - b + c / 2) ** 2 / 3)),
])
def test_projection_identity_one_form(expr, fnp):
    """A term of one linear form in three tokens: the coefficients from the one-dimensional rule
    projected onto the tokens match a direct three-dimensional Gauss-Hermite rule."""
    for k in range(0, 6):
        got = numerical_coefficients(expr, 3, k)
        assert set(got) == set(multi_indices(3, k))
        for alpha, (v, e) in got.items():
            direct = gh_tensor(fnp, 3, 48, alpha)
            assert abs(v - direct) < 1e-10, (k, alpha, v, direct)
            assert e < 1e-9
    r = sie(expr, 3)
    assert [rule["dimension"] for rule in r["rules"]] == [1]


def test_projection_identity_two_forms():
    """f(u1, u2) = tanh(u1) * exp(-u2^2 / 4) of two linear forms of three tokens: (a) the
    identity E[f(V z) He_alpha(z)] = alpha! [t^alpha] sum_{|beta| = |alpha|} c_beta (V t)^beta /
    beta! itself, evaluated here with SymPy from c_beta of a 2-d rule, against a direct 3-d rule
    (V's rows orthonormal); (b) the library's two-dimensional leaf against both."""
    V = np.array([[1.0, 1.0, 0.0], [1.0, -1.0, 2.0]])
    V = V / np.linalg.norm(V, axis=1, keepdims=True)
    assert abs(V[0] @ V[1]) < 1e-15

    def f2(u1, u2):
        return np.tanh(u1) * np.exp(-u2 ** 2 / 4)

    def f3(a, b, c):
        return f2(V[0, 0] * a + V[0, 1] * b + V[0, 2] * c, V[1, 0] * a + V[1, 1] * b + V[1, 2] * c)

    t = sp.symbols("t1:4")
    Vt = [sum(sp.Float(V[i, l]) * t[l] for l in range(3)) for i in range(2)]
    u1, u2 = sp.symbols("u1 u2", real=True)
    # the same function as a link: tanh of the first form times exp(-second^2 / 4), with the
    # forms written with exact coefficients (the library finds V from them)
    expr = sp.tanh((Z[0] + Z[1]) / sp.sqrt(2)) * sp.exp(-((Z[0] - Z[1] + 2 * Z[2]) / sp.sqrt(6))
                                                          ** 2 / 4)
    for k in range(0, 5):
        c = {beta: gh_tensor(f2, 2, 120, beta) for beta in multi_indices(2, k)}
        gen = sp.expand(sum(cb * Vt[0] ** beta[0] * Vt[1] ** beta[1]
                            / (math.factorial(beta[0]) * math.factorial(beta[1]))
                            for beta, cb in c.items()))
        poly = sp.Poly(gen, *t) if k else None
        lib = numerical_coefficients(expr, 3, k)
        for alpha in multi_indices(3, k):
            fact = math.prod(math.factorial(a) for a in alpha)
            ident = fact * float(poly.coeff_monomial(sp.Mul(*[ti ** a for ti, a in zip(t, alpha)]))
                                 if k else gen)
            direct = gh_tensor(f3, 3, 40, alpha)
            assert abs(ident - direct) < 1e-9, (alpha, ident, direct)
            v, e = lib[alpha]
            assert abs(v - direct) < 1e-9 and e < 1e-8, (alpha, v, direct, e)
    rules = sie(expr, 3)["rules"]
    assert [r["dimension"] for r in rules] == [2] and len(rules[0]["linear_forms"]) == 2


def test_products_over_disjoint_tokens_factor():
    """tanh(z1) * tanh(z2): E[. He_(a, b)] = c_a(tanh) c_b(tanh), from two 1-d rules."""
    c = [mp_coefficient(mpmath.tanh, k) for k in range(5)]
    for k in range(1, 5):
        got = numerical_coefficients(sp.tanh(Z[0]) * sp.tanh(Z[1]), 2, k)
        for (a, b), (v, e) in got.items():
            assert abs(v - c[a] * c[b]) < 1e-12 + e and e < 1e-9
    r = sie("tanh(z1) * tanh(z2)", 2)
    assert r["sie"] == 2 and {x["dimension"] for x in r["rules"]} == {1}
    assert r["coefficients"]["(1, 1)"] == pytest.approx(c[1] ** 2, rel=1e-12)


# ------------------------------------------------------------------ closed forms and mpmath

def he_at_zero(k):
    return 0 if k % 2 else (-1) ** (k // 2) * math.prod(range(k - 1, 0, -2))


def relu_coefficient(k, a=0.0):
    if k == 0:
        return phi(a) - a * sf(a)
    if k == 1:
        return sf(a)
    return float(He(k - 2, a)) * phi(a)


@pytest.mark.parametrize("a", [0.0, 0.5, -1.3])
def test_relu_closed_form(a):
    assert relu_coefficient(2) == pytest.approx(he_at_zero(0) * PHI0, rel=1e-15)
    assert relu_coefficient(6) == pytest.approx(he_at_zero(4) * PHI0, rel=1e-15)
    for k in range(0, 9):
        (v, e), = numerical_coefficients(sp.Max(Z[0] - sp.nsimplify(a), 0), 1, k).values()
        exact = relu_coefficient(k, a)
        err = abs(v - exact)
        assert err <= max(e, 1e-15 * math.factorial(k)), (k, v, exact, e)  # the estimate bounds
        assert e < 1e-9 * max(1.0, abs(exact))  # ... and is small
    # also through a link string (relu is Max(x, 0) in the vocabulary)
    r = sie("relu(z1) - 1/sqrt(2*pi)", 1)
    assert r["sie"] == 1 and r["coefficients"]["(1,)"] == pytest.approx(0.5, abs=1e-13)
    assert r["rules"][0]["kinks"] == [0.0] and r["rules"][0]["converged"]


def test_abs_and_heaviside_closed_forms():
    for k in range(0, 9):
        (v, e), = numerical_coefficients(sp.Abs(Z[0]), 1, k).values()
        exact = (1 + (-1) ** k) * relu_coefficient(k)
        assert abs(v - exact) <= max(e, 1e-14) and e < 1e-9
        (v, e), = numerical_coefficients("Abs(z1)", 1, k).values()  # Max(x, -x)
        assert abs(v - exact) <= max(e, 1e-14) and e < 1e-9
    a = 0.7
    for k in range(1, 8):
        (v, e), = numerical_coefficients(sp.Heaviside(Z[0] - sp.Rational(7, 10)), 1, k).values()
        exact = float(He(k - 1, a)) * phi(a)
        assert abs(v - exact) <= max(e, 1e-14) and e < 1e-9


@pytest.mark.parametrize("name, expr, mp", [
    ("tanh", sp.tanh(Z[0]), mpmath.tanh),
    ("sigmoid", 1 / (1 + sp.exp(-Z[0])), lambda u: 1 / (1 + mpmath.exp(-u))),
    ("softplus", sp.log(1 + sp.exp(Z[0])), lambda u: mpmath.log(1 + mpmath.exp(u))),
    ("erf", sp.erf(Z[0]), mpmath.erf),
    ("hardtanh", sp.Min(sp.Max(Z[0], -1), 1), lambda u: min(max(u, -1), 1)),
])
def test_smooth_and_kinked_links_against_mpmath(name, expr, mp):
    for k in range(0, 8):
        (v, e), = numerical_coefficients(expr, 1, k).values()
        exact = mp_coefficient(mp, k) if name != "hardtanh" else \
            float(mpmath.quad(lambda u: mp(u) * mpmath.hermite(k, u / mpmath.sqrt(2))
                              * 2 ** (-mpmath.mpf(k) / 2) * mpmath.npdf(u),
                              [-mpmath.inf, -1, 1, mpmath.inf]))
        assert abs(v - exact) <= max(e, 1e-14), (name, k, v, exact, e)
        assert e < 1e-9, (name, k, e)


def test_tanh_of_a_sum_of_tokens():
    """tanh(z1 + z2) = tanh(sqrt(2) u), u = (z1 + z2) / sqrt(2):
    c_alpha = c_|alpha| 2^(-|alpha|/2)."""
    for k in range(1, 6):
        ck = mp_coefficient(lambda u: mpmath.tanh(mpmath.sqrt(2) * u), k)
        for alpha, (v, e) in numerical_coefficients("tanh(z1 + z2)", 2, k).items():
            assert abs(v - ck * 2 ** (-k / 2)) <= max(e, 1e-14) and e < 1e-9


# ------------------------------------------------------------------ SIE decisions

SIE_CASES = [
    ("tanh(z1 + z2)", 2, 1),
    ("relu(z1) - 1/sqrt(2*pi)", 1, 1),
    ("Abs(z1) + z2", 2, 1),
    ("erf((z1+z2)/sqrt(2))", 2, 1),
    ("tanh(z1)*tanh(z2)", 2, 2),
    ("sigmoid(z1) + log(1 + exp(z2))", 2, 1),
    ("Abs(z1)", 1, 2),
    ("Abs(z1 + z2) - relu(z3)", 3, 1),
    ("Abs(z1 + z2 - z3)", 3, 2),
    ("erf((z1 + z2 + z3)/sqrt(3))", 3, 1),
    ("exp(-z1**2) + sigmoid(z2 * z3)", 3, 2),
    ("relu(z1 - 1/2) - (1 - erf(sqrt(2)/4))/2 * z1", 1, 2),
    ("tanh(tsum(z) / sqrt(L))", 12, 1),
]


@pytest.mark.parametrize("link, L, k", SIE_CASES)
def test_sie_of_links(link, L, k):
    r = sie(link, L)
    assert r["sie"] == k and r["method"] == "numerical", r
    for key, v in r["coefficients"].items():
        assert abs(v) > 10 * r["coefficient_errors"][key]


@pytest.mark.parametrize("expr, L, k", [
    (sp.Heaviside(Z[0]) - sp.Rational(1, 2), 1, 1),
    (sp.sign(Z[0]), 1, 1),
    # E[sign z] = sqrt(2/pi) cancels exactly, order 2 vanishes by symmetry: SIE 3
    (sp.sign(Z[0]) - sp.sqrt(2 / sp.pi) * Z[0], 1, 3),
    (sp.Max(Z[0], Z[0] / 10), 1, 1),                       # leaky relu
    (sp.Min(sp.Max(Z[0], -1), 1), 1, 1),                   # hardtanh
    (sp.cos(Z[0]) + sp.cos(Z[1]), 2, 2),
    (sp.sin(Z[0] - Z[1]), 2, 1),
    (sp.erfc(Z[0]), 1, 1),
    (Z[0] * (1 + sp.erf(Z[0] / sp.sqrt(2))) / 2, 1, 1),    # gelu
    (Z[0] / (1 + sp.exp(-Z[0])) - Z[0] / 2, 1, 2),         # silu minus its linear part
    (sp.Heaviside(Z[0]) * sp.Heaviside(Z[1]), 2, 1),
    (sp.Piecewise((Z[0] ** 2, Z[0] < 1), (2 * Z[0] - 1, True)), 1, 1),
])
def test_sie_of_sympy_expressions(expr, L, k):
    r = sie(expr, L)
    assert r["sie"] == k, r


def test_kinks_along_one_direction_in_two_dimensions():
    """Max(z1, z2) = (z1 + z2)/2 + |z1 - z2|/2 depends on two forms, with a kink along one
    direction: Gauss-Legendre across the kink times Gauss-Hermite along it, to the tolerance.
    E[Max He_alpha] = |alpha| = 1: 1/2; |alpha| = 2k >= 2: E[|u| He_2k(u)] / sqrt(2) v^alpha,
    v = (1, -1) / sqrt(2), from the projection identity with u = (z1 - z2) / sqrt(2)."""
    r = sie(sp.Max(Z[0], Z[1]), 2)
    assert r["sie"] == 1 and r["rules"][0]["rule"] == "gauss-legendre x gauss-hermite"
    assert r["rules"][0]["converged"] and "kink" in r["note"]
    for k in range(1, 7):
        for alpha, (v, e) in numerical_coefficients(sp.Max(Z[0], Z[1]), 2, k).items():
            if k == 1:
                exact = 0.5
            else:
                exact = 2 * relu_coefficient(k) / math.sqrt(2) * 2 ** (-k / 2) * (-1) ** alpha[1] \
                    if k % 2 == 0 else 0.0
            assert abs(v - exact) <= max(e, 1e-14) and e < 1e-9, (alpha, v, exact, e)
    # relu(z1 + z2 - 1) * tanh(z1 - 2 z2): two forms, the kink along the first
    r = sie(sp.Max(Z[0] + Z[1] - 1, 0) * sp.tanh(Z[0] - 2 * Z[1]), 2)
    assert r["rules"][0]["rule"] == "gauss-legendre x gauss-hermite" and r["sie"] == 1


def polar_reference(f, alpha, angles):
    """E[f(z) He_alpha(z)], z ~ N(0, I_2), in polar coordinates: Gauss-Legendre in the angle on
    panels cut at `angles` (f smooth between them) times Gauss-Legendre in r on [0, 20]."""
    cuts = np.unique(np.concatenate([[0.0, 2 * np.pi], np.mod(angles, 2 * np.pi)]))
    x, w = np.polynomial.legendre.leggauss(64)
    th = np.concatenate([(b - a) / 2 * x + (a + b) / 2 for a, b in zip(cuts[:-1], cuts[1:])])
    wt = np.concatenate([(b - a) / 2 * w for a, b in zip(cuts[:-1], cuts[1:])])
    r, wr = 10 * x + 10, 10 * w
    R, TH = np.meshgrid(r, th, indexing="ij")
    z1, z2 = R * np.cos(TH), R * np.sin(TH)
    g = f(z1, z2) * He(alpha[0], z1) * He(alpha[1], z2) * R * np.exp(-R * R / 2) / (2 * np.pi)
    return float(np.einsum("i,j,ij->", wr, wt, g))


def test_multidimensional_kink_falls_back_and_says_so():
    """Kinks along two directions (Max of three forms): tensor Gauss-Hermite, said in the note;
    its heuristic error estimate covers the error here (reference in polar coordinates)."""
    expr = sp.Max(Z[0], Z[1], -Z[0] - Z[1])
    r = sie(expr, 2)
    assert r["sie"] == 1
    assert r["rules"][0]["rule"] == "gauss-hermite" and r["rules"][0]["kinked"]
    assert "kinks in 2 joint dimensions" in r["note"]
    f = lambda a, b: np.maximum(np.maximum(a, b), -a - b)
    angles = [np.pi / 4, np.arctan2(-2, 1), np.arctan2(-1, 2)]
    angles = angles + [a + np.pi for a in angles]
    assert polar_reference(lambda a, b: a * a, (0, 0), angles) == pytest.approx(1, rel=1e-13)
    for k in (1, 2, 3):
        for alpha, (v, e) in numerical_coefficients(expr, 2, k).items():
            ref = polar_reference(f, alpha, angles)
            assert abs(v - ref) <= e, (alpha, v, ref, e)
            assert e < 1e-2


def test_tiny_coefficients_and_tolerance():
    """A coefficient of 1e-6 relative is found (tol 1e-8), one of 1e-12 is below tol."""
    assert sie(sp.Abs(Z[0]) + sp.Rational(1, 10 ** 6) * sp.tanh(Z[0]), 1)["sie"] == 1
    assert sie(sp.Abs(Z[0]) + sp.Rational(1, 10 ** 12) * sp.tanh(Z[0]), 1)["sie"] == 2


# ------------------------------------------------------------------ speed

@pytest.mark.parametrize("link, L, k", SIE_CASES[:6])
def test_sie_is_fast(link, L, k):
    sie("tanh(z1)", 1)  # imports (SciPy's special functions) outside the timing
    t0 = time.perf_counter()
    r = sie(link, L)
    assert time.perf_counter() - t0 < 2.0 and r["sie"] == k
