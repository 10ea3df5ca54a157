"""Static analysis (MATH.md section 5): sequence information exponent and flatness index."""
import itertools
import json
import math
import random

import numpy as np
import pytest
import sympy as sp

from ssi_symbolic.analysis.hermite import flatness, hermite_coefficients, monomial_to_hermite, sie, static_analysis
from ssi_symbolic.model.links import He
from ssi_symbolic.model.spec import load_spec, make_spec, token_symbols

from .conftest import DERIVATIONS

Z = token_symbols(6)


# ------------------------------------------------------------------ exact (polynomial links)

def test_monomial_inversion_formula():
    x = sp.Symbol("x", real=True)
    for n in range(10):
        back = sp.Add(*[c * He(j, x) for j, c in monomial_to_hermite(n)])
        assert sp.expand(back - x ** n) == 0


@pytest.mark.parametrize("L", [1, 2, 3, 5])
def test_sum_of_tokens_has_sie_1(L):
    r = sie(sp.Add(*Z[:L]), L)
    assert r["sie"] == 1 and r["method"] == "exact"
    assert len(r["coefficients"]) == L and set(r["coefficients"].values()) == {"1"}


def test_product_z1_z2_has_sie_2():
    r = sie(Z[0] * Z[1], 2)
    assert r["sie"] == 2
    assert r["coefficients"] == {"(1, 1)": "1"}
    assert hermite_coefficients("z1*z2", 2, 1) == {}


def test_mixed_hermite_products_sie_4():
    link = He(1, Z[0]) * He(4, Z[1]) + He(2, Z[2]) * He(2, Z[3])
    r = sie(link, 4)
    assert r["sie"] == 4
    # E[g He_alpha] = alpha! for a single product He_alpha
    assert r["coefficients"] == {"(0, 0, 2, 2)": "4"}
    assert hermite_coefficients(link, 4, 5) == {(1, 4, 0, 0): 24}
    assert all(hermite_coefficients(link, 4, k) == {} for k in (1, 2, 3, 6))


@pytest.mark.parametrize("L", [3, 4, 5])
def test_product_rule_random_degrees(L):
    rng = random.Random(100 + L)
    for _ in range(3):
        ks = [rng.randint(0, 4) for _ in range(L)]
        if sum(ks) == 0:
            ks[0] = 1
        link = sp.Mul(*[He(k, z) for k, z in zip(ks, Z[:L])])
        r = sie(link, L)
        assert r["sie"] == sum(ks), ks
        expected = math.prod(math.factorial(k) for k in ks)
        assert r["coefficients"] == {str(tuple(ks)): str(expected)}


def test_he4_target_sie_4_from_string():
    r = sie("4/3 + He(4, z1) + 2*He(4, z2)", 2)
    assert r["sie"] == 4 and r["method"] == "exact" and r["tolerance"] is None
    assert r["coefficients"] == {"(4, 0)": "24", "(0, 4)": "48"}


def test_constant_link_has_no_sie():
    for link in (sp.Rational(4, 3), Z[0] ** 2 - (Z[0] ** 2 - 7)):
        r = sie(link, 2)
        assert r["sie"] is None and "infinite" in r["note"]
        assert r["coefficients"] == {}


def test_symbolic_parameters_and_defaults():
    a = sp.Symbol("alpha", real=True)
    link = a * Z[0] + He(2, Z[1])
    r = sie(link, 2)
    assert r["sie"] == 1 and r["parameter_dependent"] and r["coefficients"] == {"(1, 0)": "alpha"}
    assert sie(link, 2, params={"alpha": 0})["sie"] == 2
    assert sie(link, 2, params={"alpha": 0.5})["coefficients"] == {"(1, 0)": "1/2"}
    # irrational coefficients cancel exactly
    assert sie(sp.sqrt(2) * Z[0] - sp.sqrt(8) * Z[0] / 2 + Z[0] * Z[1], 2)["sie"] == 2


def test_vector_link_takes_minimum_over_entries():
    link = sp.Matrix([He(2, Z[0]), Z[0] * Z[1] * Z[2], 5])
    r = sie(link, 3)
    assert r["sie"] == 2 and r["entries"] == [2, 3, None]
    assert r["coefficients"] == {"[0] (2, 0, 0)": "2"}
    hc = hermite_coefficients(link, 3, 3)
    assert list(hc) == [(1, 1, 1)] and list(hc[(1, 1, 1)]) == [0, 1, 0]


def test_exact_coefficients_match_gauss_hermite_quadrature():
    """A random polynomial link in 3 tokens: the exact coefficients E[g He_alpha] against an
    independent tensor Gauss-Hermite computation (exact for these degrees)."""
    rng = random.Random(7)
    L, deg = 3, 5
    terms = []
    for _ in range(10):
        n = [rng.randint(0, 3) for _ in range(L)]
        if sum(n) > deg:
            continue
        terms.append(sp.Rational(rng.randint(-9, 9), rng.randint(1, 5))
                     * sp.Mul(*[z ** k for z, k in zip(Z, n)]))
    link = sp.Add(*terms) + sp.Rational(1, 3)
    f = sp.lambdify(Z[:L], link, "numpy")
    x, w = np.polynomial.hermite_e.hermegauss(12)
    w = w / np.sqrt(2 * np.pi)
    X = np.meshgrid(x, x, x, indexing="ij")
    W = w[:, None, None] * w[None, :, None] * w[None, None, :]
    G = np.broadcast_to(f(*X), W.shape)
    compared = 0
    for order in range(0, deg + 2):
        exact = hermite_coefficients(link, L, order)
        for alpha in itertools.product(range(order + 1), repeat=L):
            if sum(alpha) != order:
                continue
            he = np.ones(W.shape)
            for l, a in enumerate(alpha):
                he = he * np.polynomial.hermite_e.hermeval(X[l], [0] * a + [1])
            quad = float(np.sum(W * G * he))
            ex = float(exact.get(alpha, 0))
            assert abs(quad - ex) < 1e-9 * (1 + abs(ex)), (alpha, quad, ex)
            compared += 1
    assert compared > 50


def test_hermite_coefficients_reject_non_polynomial():
    with pytest.raises(ValueError):
        hermite_coefficients(sp.tanh(Z[0]), 1, 1)


# ------------------------------------------------------------------ numerical links

def test_erf_link_numerical_sie_1():
    r = sie("erf(z1)", 1)
    assert r["sie"] == 1 and r["method"] == "numerical"
    assert r["tolerance"] == 1e-8 and r["absolute_tolerance"] > 0
    # E[erf(z) z] = E[erf'(z)] = 2 / sqrt(3 pi)
    assert r["coefficients"]["(1,)"] == pytest.approx(2 / math.sqrt(3 * math.pi), rel=1e-10)


def test_tanh_sum_numerical_sie_1():
    r = sie(sp.tanh(Z[0]) + sp.tanh(Z[1]) + sp.tanh(Z[2]), 3)
    assert r["sie"] == 1 and r["method"] == "numerical"
    assert set(r["coefficients"]) == {"(1, 0, 0)", "(0, 1, 0)", "(0, 0, 1)"}


def test_even_relu_pair_numerical_sie_2():
    """relu(z) + relu(-z) = |z|: odd coefficients vanish, E[|z| He_2] = sqrt(2 / pi)."""
    r = sie("relu(z1) + relu(-z1)", 1, tol=1e-8)
    assert r["sie"] == 2 and r["method"] == "numerical" and r["tolerance"] == 1e-8
    assert r["l2_norm"] == pytest.approx(1.0, rel=1e-8)
    assert r["coefficients"]["(2,)"] == pytest.approx(math.sqrt(2 / math.pi), rel=1e-2)
    assert r["quadrature_error"] < 1e-2


def test_numerical_zero_coefficient_not_protected_by_symmetry():
    """g = relu(z - 1/2) - P(z > 1/2) z has E[g He_1] = 0 exactly, but the kink makes the
    quadrature value ~1e-3: only the error estimate keeps it from counting as non-zero.
    E[g He_2] = phi(1/2)."""
    r = sie("relu(z1 - 1/2) - (1 - erf(sqrt(2)/4))/2 * z1", 1)
    assert r["sie"] == 2 and r["method"] == "numerical"
    phi = math.exp(-1 / 8) / math.sqrt(2 * math.pi)
    assert r["coefficients"]["(2,)"] == pytest.approx(phi, rel=1e-2)


def test_numerical_joint_links():
    assert sie("tanh(z1) * tanh(z2)", 2)["sie"] == 2
    assert sie("exp(-z1**2) + sigmoid(z2 * z3)", 3)["sie"] == 2
    r = sie("softmax_rows(Matrix([[z1, z2], [z2, z1]]))", 2)
    assert r["sie"] == 1 and r["entries"] == [1, 1, 1, 1]


def test_numerical_agrees_with_exact_on_polynomials():
    for link, L, k in [("4/3 + He(4, z1) + 2*He(4, z2)", 2, 4),
                       ("He(3, z1) * He(2, z2)", 2, 5), ("z1 * z2 * z3", 3, 3)]:
        r = sie(link, L, method="numerical")
        assert r["method"] == "numerical" and r["sie"] == k
    assert sie("2 + 0 * tanh(z1)", 1, method="numerical")["sie"] is None


def test_numerical_parameters_need_values():
    link = "alpha * tanh(z1) + He(2, z2)"
    with pytest.raises(ValueError, match="alpha"):
        sie(link, 2)
    assert sie(link, 2, params={"alpha": 0.5})["sie"] == 1
    assert sie(link, 2, params={"alpha": 0})["sie"] == 2


# ------------------------------------------------------------------ flatness

def test_he4_example_pe_sie_4_flatness_2(tmp_path):
    spec = load_spec(DERIVATIONS / "he4_example_pe.toml")
    f = flatness(spec, out_dir=tmp_path)
    assert f["flatness"] == 2 and f["method"] == "exact"
    assert f["leading_terms"] == "240*e**2"
    out = static_analysis(spec, out_dir=tmp_path)
    assert (out["sie"], out["flatness"], out["method"]) == (4, 2, "exact")
    json.dumps(out)
    # the numerical estimator on the same (polynomial) loss
    fn = flatness(spec, out_dir=tmp_path, method="numerical")
    assert fn["flatness"] == 2 and fn["method"] == "numerical"
    assert fn["leading_terms"] == "240*e**2" and fn["quadrature_nodes"] is None


def test_without_positional_encoding_flatness_equals_sie(tmp_path):
    spec = make_spec("he4_nope", 2, "4/3 + He(4, z1) + 2*He(4, z2)")
    out = static_analysis(spec, out_dir=tmp_path)
    assert (out["sie"], out["flatness"]) == (4, 4)


def test_plain_sgd_flatness_at_q_1(tmp_path):
    f = flatness(load_spec(DERIVATIONS / "linear_plain.toml"), out_dir=tmp_path)
    assert f["flatness"] == 1 and f["variables"] == ["m"] and f["leading_terms"] == "-m"


def test_parameter_defaults_reported(tmp_path):
    spec = make_spec("p", 2, "alpha * z1 + He(2, z2)", parameters={"alpha": 0.0})
    out = static_analysis(spec, out_dir=tmp_path)
    assert out["sie"] == 1 and out["sie_at_defaults"] == 2
    assert out["flatness"] == 1 and out["flatness_at_defaults"] == 2


def test_constant_teacher(tmp_path):
    out = static_analysis(make_spec("const", 1, "2", "z1"), out_dir=tmp_path)
    assert out["sie"] is None and out["flatness"] is None
    assert "infinite" in out["sie_note"]


def test_relu_student_flatness_2(tmp_path):
    """R(m) = 3/4 - m^2 / (2 sqrt(pi)) for He2(z)/sqrt(2) learnt by a ReLU: E[relu He_2] =
    phi(0) = 1/sqrt(2 pi) and E[T He_2] = sqrt(2), so the m^2 coefficient is
    -sqrt(2) / sqrt(2 pi) / 2!. The ReLU expectations are in closed form, so R is exact."""
    spec = load_spec(DERIVATIONS / "relu_student_he2.toml")
    f = flatness(spec, out_dir=tmp_path)
    assert f["flatness"] == 2 and f["method"] == "exact"
    assert f["leading_terms"] == "-m**2/(2*sqrt(pi))"
    out = static_analysis(spec, out_dir=tmp_path)
    assert (out["sie"], out["flatness"], out["method"]) == (2, 2, "exact")
    # the SIE of the ReLU itself still comes from numerical Hermite coefficients
    assert out["student_sie"] == 1 and out["student_sie_method"] == "numerical"
    # the numerical estimator on the same (closed-form) loss
    fn = flatness(spec, out_dir=tmp_path, method="numerical")
    assert fn["flatness"] == 2 and fn["method"] == "numerical" and fn["quadrature_nodes"] is None
    c = float(fn["leading_terms"].split("*")[0])
    assert c == pytest.approx(-1 / (2 * math.sqrt(math.pi)), rel=1e-4)


@pytest.mark.parametrize("target, k, c", [("He(2, z1) + He(3, z1)", 2, -1),
                                          ("He(3, z1)", 3, sp.Rational(-1, 2))])
def test_shifted_relu_student_flatness(tmp_path, target, k, c):
    """Student relu(z - 1/2), kink off the origin: the teacher has no He_1 part, so R has no
    linear term. R = const - sum_j c_j(T) c_j(S) m^j / j! with c_2(S) = phi(1/2),
    c_3(S) = phi(1/2) / 2 (E[relu(z - a) He_k] = He_{k-2}(a) phi(a)) and c_2(T) = 2, c_3(T) = 6:
    leading terms -phi(1/2) m^2 resp. -phi(1/2) m^3 / 2, exact (closed-form ReLU expectations)."""
    f = flatness(make_spec("shifted_relu", 1, target, "relu(z1 - 1/2)"), out_dir=tmp_path)
    assert f["flatness"] == k and f["method"] == "exact"
    m = sp.Symbol("m")
    phi = sp.exp(sp.Rational(-1, 8)) / sp.sqrt(2 * sp.pi)
    assert sp.simplify(sp.sympify(f["leading_terms"]) - c * phi * m ** k) == 0


@pytest.mark.parametrize("target, k, c", [("He(2, z1) + He(3, z1)", 2, -0.19715728743090312),
                                          ("He(3, z1)", 3, 0.0030132928233970711)])
def test_shifted_saturating_relu_student_numerical_flatness(tmp_path, target, k, c):
    """Student tanh(relu(z - 1/2)): the kink of the shifted ReLU (off the quadrature grid's
    symmetry), but no closed form, so R comes from quadrature split at the kink. The teacher has
    no He_1 part: R has no linear term, and the quadrature must not report one.
    R = const - sum_j c_j(T) c_j(S) m^j / j!, c_2(T) = 2, c_3(T) = 6, so the leading coefficient
    is -c_2(S) resp. -c_3(S), with c_j(S) = int_{1/2}^inf tanh(z - 1/2) He_j(z) phi(z) dz
    (mpmath.quad, 30 digits): c_2(S) = 0.197157287430903..., c_3(S) = -0.00301329282339707...
    (also c_1(S) = 0.212104994399531..., which the teacher does not see)."""
    f = flatness(make_spec("shifted_tanh_relu", 1, target, "tanh(relu(z1 - 1/2))"),
                 out_dir=tmp_path)
    assert f["flatness"] == k and f["method"] == "numerical" and not f["inconclusive"]
    lead = float(f["leading_terms"].split("*")[0])
    assert lead == pytest.approx(c, rel=1e-4)


@pytest.mark.parametrize("target, k", [("z1", 1), ("He(3, z1)", 3)])
def test_tanh_student_numerical_flatness(tmp_path, target, k):
    """R = const - sum_j c_j(target) c_j(tanh) m^j / j!: the first non-zero is at j = k."""
    f = flatness(make_spec("tanh_student", 1, target, "tanh(z1)"), out_dir=tmp_path)
    assert f["flatness"] == k and f["method"] == "numerical"


def test_static_analysis_of_every_example_is_json(tmp_path, spec_files):
    for path in spec_files:
        spec = load_spec(path)
        out = static_analysis(spec, out_dir=tmp_path)
        if spec.multi:  # several directions: information exponents and leaps (test_leap.py)
            res = json.loads(json.dumps(out))
            assert {"information_exponents", "leaps", "leap_complexity", "method"} <= set(res)
            assert len(res["information_exponents"]) == spec.teacher_directions
            continue
        text = json.dumps(out)
        assert {"sie", "flatness", "method"} <= set(json.loads(text))
        if path.stem.startswith("pathological"):
            # antisymmetric target, token-symmetric tied student: E[T S] = 0 for every m, so
            # R is constant and no derivative at the origin is non-zero
            assert out["sie"] is not None and out["flatness"] is None
            assert "constant" in out["flatness_details"]["note"]
            continue
        assert out["flatness"] is not None and out["sie"] is not None
        if out["method"] == "exact":
            assert out["flatness"] <= out["sie"]
