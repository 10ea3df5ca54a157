"""Orthant probabilities beyond the closed forms: Plackett's one-dimensional integral
(closed_forms.NormalOrthant, evaluated by runtime._orthant in generated modules; used with
several directions), and the expectation it serves, the committee's fourth power of the error
(E over four erf factors).

Oracles, none taken from the code under test:
- dimension 3 at zero mean: 1/8 + (arcsin r12 + arcsin r13 + arcsin r23) / 4 pi (Sheppard);
- dimension 4 with a block-diagonal correlation: the product of two bivariate orthant
  probabilities 1/4 + arcsin(r) / 2 pi;
- general dimension 3 and 4, with mean shifts: SciPy's multivariate normal CDF (Genz), within
  its tolerance;
- E[B_11^2] for the K = K* = 2 erf committee (B_kh = dl_k dl_h, dl_k = (y - y_hat) g'(z_k):
  four erf factors) against a Monte Carlo over the four fields, 5 standard errors.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import sympy as sp
from scipy.special import erf
from scipy.stats import multivariate_normal

import ssi_symbolic.backends.runtime as runtime
from ssi_symbolic.backends.runtime import _bvn, _orthant

ROOT = Path(__file__).resolve().parent.parent


def orthant(h, R, nodes=16):
    """runtime._orthant with `nodes` Gauss-Legendre points, and its n versus 2n estimate."""
    n = len(h)
    args = list(h) + [R[i][j] for i in range(n) for j in range(i + 1, n)]
    old = runtime.QUADRATURE_NODES
    try:
        runtime.QUADRATURE_NODES = nodes
        coarse = float(_orthant(*args))
        runtime.QUADRATURE_NODES = 2 * nodes
        fine = float(_orthant(*args))
    finally:
        runtime.QUADRATURE_NODES = old
    return coarse, abs(fine - coarse) + 1e-13


def random_correlation(rng, n):
    A = rng.normal(size=(n, n))
    T = A @ A.T + np.eye(n)
    d = np.sqrt(np.diag(T))
    return T / np.outer(d, d)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dimension_three_at_zero_mean_is_sheppard(seed):
    R = random_correlation(np.random.default_rng(seed), 3)
    exact = 1 / 8 + (math.asin(R[0, 1]) + math.asin(R[0, 2]) + math.asin(R[1, 2])) / (4 * math.pi)
    out, err = orthant(np.zeros(3), R)
    assert abs(out - exact) < 1e-10, (out, exact)
    assert abs(out - exact) <= err  # the n versus 2n estimate bounds the actual error


def test_dimension_four_block_diagonal_is_a_product():
    r1, r2 = 0.6, -0.35
    R = np.eye(4)
    R[0, 1] = R[1, 0] = r1
    R[2, 3] = R[3, 2] = r2
    exact = (0.25 + math.asin(r1) / (2 * math.pi)) * (0.25 + math.asin(r2) / (2 * math.pi))
    out, err = orthant(np.zeros(4), R)
    assert abs(out - exact) < 1e-10, (out, exact)
    assert abs(out - exact) <= err


@pytest.mark.parametrize("n,seed,shift", [(3, 3, True), (4, 4, False), (4, 5, True),
                                          (4, 6, True)])
def test_against_scipy_multivariate_normal_cdf(n, seed, shift):
    rng = np.random.default_rng(seed)
    R = random_correlation(rng, n)
    h = rng.normal(size=n) if shift else np.zeros(n)
    ref = multivariate_normal(np.zeros(n), R, maxpts=10 ** 7, abseps=1e-10,
                              releps=1e-10).cdf(h)
    out, err = orthant(h, R)
    assert abs(out - ref) < 1e-7, (out, ref)
    assert err < 1e-9


def test_vectorised_over_states():
    rng = np.random.default_rng(8)
    Rs = [random_correlation(rng, 4) for _ in range(3)]
    hs = rng.normal(size=(3, 4))
    args = [hs[:, i] for i in range(4)] + [np.array([R[i, j] for R in Rs])
                                           for i in range(4) for j in range(i + 1, 4)]
    old = runtime.QUADRATURE_NODES
    try:
        runtime.QUADRATURE_NODES = 16   # the points of orthant() below
        together = _orthant(*args)
    finally:
        runtime.QUADRATURE_NODES = old
    one_by_one = [orthant(hs[s], Rs[s])[0] for s in range(3)]
    assert np.allclose(together, one_by_one, rtol=0, atol=1e-12)


def test_committee_fourth_power_of_the_error_against_monte_carlo():
    from ssi_symbolic.model.spec import load_spec
    from ssi_symbolic.symbolic.closed_forms import NormalOrthant
    from ssi_symbolic.symbolic.derive import ETA, method_of, statistics
    from ssi_symbolic.symbolic.expectation import Expectation
    from ssi_symbolic.symbolic.gaussian import TokenGaussian
    spec = load_spec(ROOT / "derivations" / "committee_erf_K2.toml")
    gauss = TokenGaussian.of(spec)
    st = statistics(spec, gauss, norm=False)
    E = Expectation(gauss, [st.loss] + st.base, extra_symbols=(ETA,))
    # base = A_M (4), A_Q (3), B_11, B_12, B_22: E[B_11^2] = E[r^4 g'(z_1)^4]
    value = E.expect(st.base[7] ** 2)
    assert value.has(NormalOrthant)  # four erf factors: not a closed form
    assert method_of([value], gauss.state) == "quadrature"
    Mv = np.array([[0.3, 0.1], [0.05, 0.4]])
    Qv = np.array([[1.0, 0.2], [0.2, 0.8]])
    at = {"m1_1": Mv[0, 0], "m1_2": Mv[0, 1], "m2_1": Mv[1, 0], "m2_2": Mv[1, 1],
          "q1_1": Qv[0, 0], "q1_2": Qv[0, 1], "q2_2": Qv[1, 1]}
    syms = sorted(value.free_symbols, key=str)
    f = sp.lambdify(syms, value, modules=[{"NormalOrthant": _orthant, "NormalCDF2": _bvn},
                                          "scipy", "numpy"])
    got = float(f(*[at[str(s)] for s in syms]))
    # Monte Carlo: fields (z*_1, z*_2, z_1, z_2) with covariance [[I, M^T], [M, Q]]
    cov = np.block([[np.eye(2), Mv.T], [Mv, Qv]])
    rng = np.random.default_rng(7)
    n = 2_000_000
    Z = rng.multivariate_normal(np.zeros(4), cov, size=n, method="cholesky")
    g = lambda x: erf(x / math.sqrt(2))
    dg = lambda x: math.sqrt(2 / math.pi) * np.exp(-x ** 2 / 2)
    r = g(Z[:, 0]) + g(Z[:, 1]) - g(Z[:, 2]) - g(Z[:, 3])
    sample = (r * dg(Z[:, 2])) ** 4
    mean, se = sample.mean(), sample.std() / math.sqrt(n)
    assert abs(got - mean) < 5 * se, (got, mean, se)


def test_batched_orthants_equal_one_call_each():
    """runtime._orthants (the generated modules evaluate all orthant probabilities of a kind in
    one call) gives each call's _orthant value, with scalars and arrays mixed, centred and
    shifted, in one block of calls and (2^16 states) in blocks of one call each."""
    from ssi_symbolic.backends.runtime import _orthants
    rng = np.random.default_rng(11)
    Rs = [random_correlation(rng, 4) for _ in range(7)]
    hs = [np.zeros(4) if c % 2 else rng.normal(size=4) for c in range(7)]
    old = runtime.QUADRATURE_NODES
    try:
        runtime.QUADRATURE_NODES = 16
        for states in (np.linspace(0.2, 1.0, 5), np.linspace(0.2, 1.0, 2 ** 16)):
            calls = []
            for h, R in zip(hs, Rs):
                args = list(h) + [R[i, j] for i in range(4) for j in range(i + 1, 4)]
                args[4] = args[4] * states          # one argument varies over the states
                calls.append(tuple(args))
            batched = _orthants(*calls)
            assert len(batched) == len(calls)
            for got, args in zip(batched, calls):
                assert got.shape == states.shape
                np.testing.assert_allclose(got, _orthant(*args), rtol=0, atol=1e-15)
        three = [tuple(rng.normal(size=3))
                 + tuple(random_correlation(rng, 3)[np.triu_indices(3, 1)]) for _ in range(3)]
        for got, args in zip(_orthants(*three), three):
            assert abs(float(got) - float(_orthant(*args))) < 1e-15
    finally:
        runtime.QUADRATURE_NODES = old
