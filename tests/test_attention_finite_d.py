"""The O(1/d) drift and Cov(G) of attention modules (runtime._step_coefficients, MATH.md 4).

1. The formulas against the exact backend: for a polynomial spec both backends can handle
   (tied_he2_pe: L = 2, r = 1, C = [[1], [-1]]), the attention runtime fed with the exact
   module's links gives that module's covariance, ito_correction and finite_d_correction (the
   exact backend derives the token-norm term with Stein's lemma and second derivatives, the
   runtime from the token Gram excess in whitened coordinates; Gauss-Hermite is exact here).
2. The softmax model against a Monte Carlo of one finite-d spherical SGD step in the exact
   reduced representation of MATH.md 10 (no expansion in 1/d): d^2 (X' - X) - d G has mean
   finite_d_correction + O(1/d) and O(1) variance (G, the first-order increment of the same
   sample, has mean drift exactly), so its mean is compared within 5 standard errors plus the
   quadrature error; the rescaling term alone is rejected by the same Monte Carlo.
3. The (theta, e') Chebyshev table and its error estimate, on the polynomial spec.
"""
import math

import numpy as np
import pytest

from ssi_symbolic.backends import runtime as rt
from ssi_symbolic.backends.files import load_module

from .conftest import copy_generated


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    return copy_generated(tmp_path_factory.mktemp("generated"))


def _links(mod):
    return (mod.teacher_link, mod.student_link, mod.student_link_gradient)


STATES = [(0.4, 0.3), (-0.2, 0.6), (0.0, 0.0), (0.9, -0.1)]


@pytest.mark.parametrize("m, e", STATES)
def test_step_coefficients_match_exact_backend(gen, m, e):
    mod = load_module(gen / "tied_he2_pe.py")
    assert mod.FINITE_D_CORRECTION == "complete"
    c = rt._step_coefficients(m, e, _links(mod), [1.0, -1.0], False, 10, {"omega": 0.5})
    for eta in (0.1, 0.7):
        cov, ito, fdc = rt._sc_pieces(c, eta)
        want_cov = np.array(mod.covariance(m, e, eta), dtype=float)
        want_ito = np.array(mod.ito_correction(m, e, eta), dtype=float)
        want_fdc = np.array(mod.finite_d_correction(m, e, eta), dtype=float)
        drift = eta * c[rt._SC_MEAN1] + eta ** 2 * c[rt._SC_MEAN2]
        for got, want in [(cov, want_cov), (ito, want_ito), (fdc, want_fdc),
                          (drift, np.array(mod.drift(m, e, eta), dtype=float))]:
            # rounding of the quadrature sums of degree-12 polynomials: 1e-8 relative
            np.testing.assert_allclose(np.array(got), want, rtol=1e-8,
                                       atol=1e-10 * max(1.0, np.abs(want).max()))


def one_step_monte_carlo(mod, params, C, m, e, eta, d, n, rng, chunk=500_000):
    """(mean, standard error) over n samples of Y = d^2 (X' - X) - d G for X = (m, e).

    One step of spherical SGD in the reduced representation (MATH.md 10): tokens have
    independent N(0, 1) projections z*_l, zeta_l, h_l on w*, u, v (w = sqrt(d)(m w*/sqrt(d) +
    e u + rho v), rho^2 = 1 - m^2 - e^2), z_l = m z*_l + e zeta_l + rho h_l + C_l e;
    m' = m - (eta/d) sum dl z*, e' = e - (eta/d) sum dl (zeta + C), rho'^2 = (rho - (eta/d)
    sum dl h)^2 + (eta/d)^2 |dl|^2 chi^2_(d-3), then (m', e') / sqrt(m'^2 + e'^2 + rho'^2).
    The chi-square is replaced by its mean d - 3 (its fluctuation changes E[d^2 (X' - X)] by
    O(1/d) only and would add O(d) variance). G = (-eta (A_m - m A_q) - eta^2 m B / 2,
    -eta (A_e - e A_q) - eta^2 e B / 2) from the same sample."""
    L = len(C)
    rho = math.sqrt(1 - m * m - e * e)
    tot, tot2, k = np.zeros(2), np.zeros(2), 0
    while k < n:
        b = min(chunk, n - k)
        zs, zeta, h = rng.standard_normal((3, L, b))
        z = [m * zs[l] + e * zeta[l] + rho * h[l] + C[l] * e for l in range(L)]
        T = mod.teacher_link(*zs, **params)
        S = mod.student_link(*z)
        dS = mod.student_link_gradient(*z)
        dl = [-sum((T[i] - S[i]) * dS[i][l] for i in range(len(T))) for l in range(L)]
        Am = sum(dl[l] * zs[l] for l in range(L))
        Ae = sum(dl[l] * (zeta[l] + C[l]) for l in range(L))
        Ah = sum(dl[l] * h[l] for l in range(L))
        Aq = sum(dl[l] * z[l] for l in range(L))
        B = sum(x * x for x in dl)
        m1, e1 = m - eta * Am / d, e - eta * Ae / d
        r2 = (rho - eta * Ah / d) ** 2 + (eta / d) ** 2 * B * (d - 3)
        q = m1 * m1 + e1 * e1 + r2
        Y = np.array([d * d * (m1 / np.sqrt(q) - m) - d * (-eta * (Am - m * Aq) - eta ** 2 * m * B / 2),
                      d * d * (e1 / np.sqrt(q) - e) - d * (-eta * (Ae - e * Aq) - eta ** 2 * e * B / 2)])
        tot += Y.sum(axis=1)
        tot2 += (Y * Y).sum(axis=1)
        k += b
    mean = tot / n
    return mean, np.sqrt((tot2 / n - mean * mean) / n)


@pytest.mark.parametrize("m, e, eta", [(0.3, 0.2, 1.0), (0.6, -0.5, 2.0)])
def test_softmax_finite_d_correction_against_one_step_monte_carlo(gen, m, e, eta):
    mod = load_module(gen / "positional_semantic.py")
    assert "finite_d_correction" not in mod.UNAVAILABLE
    params = dict(mod.DEFAULTS)
    c = mod.step_coefficients(m, e, **params)
    fine = mod.step_coefficients(m, e, (3 * mod.COVARIANCE_NODES) // 2, **params)
    _, ito, fdc = rt._sc_pieces(c, eta)
    _, _, fdc_fine = rt._sc_pieces(fine, eta)
    quad = 2 * np.abs(np.array(fdc) - np.array(fdc_fine))
    mc, se = one_step_monte_carlo(mod, params, mod.C, m, e, eta, 1e4, 1_000_000,
                                  np.random.default_rng(5))
    assert np.all(se < 0.05 * np.abs(mc).max())          # the Monte Carlo resolves the term
    assert np.all(np.abs(np.array(fdc) - mc) <= 5 * se + quad + 1e-3 * np.abs(mc) + 1e-9), (
        fdc, mc, se, quad)
    # the token-norm term matters: the rescaling term alone is many standard errors off
    assert np.any(np.abs(np.array(ito) - mc) > 8 * se + quad)


def test_polar_table_and_its_error_estimate(gen):
    """A (theta, e') table of the polynomial spec's step coefficients interpolates them over
    the disk within its own error estimate (and NaN outside the disk)."""
    mod = load_module(gen / "tied_he2_pe.py")
    f = lambda mm, ee: rt._step_coefficients(mm, ee, _links(mod), [1.0, -1.0], False, 8,  # noqa
                                             {"omega": 0.5})
    g = lambda mm, ee: rt._step_coefficients(mm, ee, _links(mod), [1.0, -1.0], False, 12,  # noqa
                                             {"omega": 0.5})
    table, err = rt._polar_table(f, (20, 12), [(0.3, 0.2), (-0.7, 0.5), (0.05, -0.9)], g)
    rng = np.random.default_rng(3)
    v = rng.normal(size=(2, 60))
    v *= rng.uniform(0, 1, 60) ** 0.5 / np.linalg.norm(v, axis=0)
    got = rt._polar_eval(table, v[0], v[1])
    want = np.array([f(a, b) for a, b in zip(*v)]).T
    scale = np.abs(want).max()
    assert np.all(np.abs(got - want) <= err[:, None] + 1e-12 * scale)
    assert np.all(np.isnan(rt._polar_eval(table, 0.9, 0.9)))
    # the module-level lookup: one table per distinct parameter set
    calls = []

    def table_of(**p):
        calls.append(p)
        return table, err
    val, est = rt._tabulated(table_of, v[0], v[1], {"omega": np.where(v[0] > 0, 0.5, 0.7)})
    assert len(calls) == 2 and val.shape == (rt._SC_SIZE, 60) and np.allclose(val, got)
    assert np.all(est == err[:, None])
    val, _ = rt._tabulated(table_of, v[0], v[1], {})      # a spec without parameters
    assert len(calls) == 3 and calls[-1] == {} and np.allclose(val, got)
