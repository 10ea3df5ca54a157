"""Untied students with links polynomial in token sums (symbolic/token_sums.py): the power-sum
form of symmetric links, the derivation through summed cumulants against the token-by-token
exact engine (an independent computation: it expands every statistic over the L tokens), the
generated module and its Jacobian, the Monte Carlo of MATH.md section 6 at L = 16, and the
fallback when the form would be too large."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import sympy as sp

from ssi_symbolic.backends.exact import module_source
from ssi_symbolic.backends.files import load_module
from ssi_symbolic.model.spec import make_spec
from ssi_symbolic.symbolic import token_sums as TS
from ssi_symbolic.symbolic.derive import ETA, derive, derive_token_sums


def _spec(teacher, student, L, spherical=True, name="ts"):
    return make_spec(f"{name}_{L}_{int(spherical)}", L, teacher, student=student,
                     spherical=spherical, weights="untied")


def _token_by_token(spec, monkeypatch, diffusion=True):
    with monkeypatch.context() as mp:
        mp.setattr(TS, "MIN_L", 10 ** 6)
        D = derive(spec, diffusion=diffusion)
    assert getattr(D.ring, "token_sums", None) is None
    return D


def test_power_sum_form_rebuilds_symmetric_polynomials():
    """A random polynomial in power sums, expanded over the tokens, converts back to a
    polynomial in power sums that expands to it again (L = 3, degree up to 5, also when L is
    below the degree); a polynomial that is not symmetric gives None."""
    rng = random.Random(3)
    for L in (2, 3):
        zs = sp.symbols(f"w1:{L + 1}")
        Y = {k: sp.Symbol(f"P{k}") for k in range(1, 6)}
        for _ in range(4):
            f = sp.Integer(rng.randint(-3, 3))
            for _ in range(4):
                parts = [rng.randint(1, 3) for _ in range(rng.randint(1, 2))]
                f += sp.Rational(rng.randint(-5, 5), rng.randint(1, 4)) * sp.sqrt(2) ** rng.randint(0, 1) \
                    * sp.Mul(*[sp.Add(*[z ** k for z in zs]) for k in parts])
            f = sp.expand(f)
            g = TS._power_sum_form(f, zs, lambda k: Y[k])
            assert g is not None
            back = sp.expand(g.xreplace({Y[k]: sp.Add(*[z ** k for z in zs]) for k in Y}))
            assert sp.expand(back - f) == 0
    w1, w2 = sp.symbols("w1 w2")
    assert TS._power_sum_form(w1 ** 2 + w2, (w1, w2), lambda k: sp.Symbol(f"P{k}")) is None


CASES = [
    # (teacher, student, spherical): the tied network's He2 pair, its untied students' own
    # variants, SIE-1 mixtures, odd and shifted links, plain SGD
    ("tsum(He(2, z)) / sqrt(2 * L)", "He(2, tsum(z) / sqrt(L)) / sqrt(2)", True),
    ("tsum(He(2, z)) / sqrt(2 * L)", "tsum(He(2, z)) / sqrt(2 * L)", True),
    ("tsum(z + He(2, z) / sqrt(2)) / sqrt(2 * L)",
     "(tsum(z) / sqrt(L) + He(2, tsum(z) / sqrt(L)) / sqrt(2)) / sqrt(2)", True),
    ("tsum(He(3, z)) / sqrt(6 * L) + 1/3", "tsum(z) ** 2 / L", False),
    ("tsum(He(2, z)) / sqrt(2 * L)", "He(2, tsum(z) / sqrt(L)) / sqrt(2)", False),
]


@pytest.mark.parametrize("teacher, student, spherical", CASES)
def test_token_sums_equal_the_token_by_token_derivation(teacher, student, spherical,
                                                        monkeypatch):
    """Every output (loss, both drift parts, Cov(G), the Ito and the whole O(1/d) drift) of the
    summed-cumulant derivation equals the token-by-token one at a rational state, to 30
    digits (L = 3: both are exact, so they agree identically)."""
    L = 3
    spec = _spec(teacher, student, L, spherical)
    D = derive(spec)
    assert getattr(D.ring, "token_sums", None) is not None
    D0 = _token_by_token(spec, monkeypatch)
    rng = random.Random(7)
    at = {s: sp.Rational(rng.randint(-8, 8), 10) for s in D0.state[:L]}
    at.update({s: sp.Rational(rng.randint(6, 14), 10) for s in D0.state[L:]})
    at[ETA] = sp.Rational(3, 10)

    def same(a, b):
        x = (sp.sympify(a) - sp.sympify(b)).xreplace(at)
        return abs(sp.N(x, 40)) < sp.Float("1e-30")
    n = len(D0.state)
    assert same(D.population_loss, D0.population_loss)
    for i in range(n):
        assert same(D.drift_eta1[i], D0.drift_eta1[i]), i
        assert same(D.drift_eta2[i], D0.drift_eta2[i]), i
        assert same(D.ito_correction[i], D0.ito_correction[i]), i
        assert same(D.finite_d_correction[i], D0.finite_d_correction[i]), i
        for j in range(i, n):
            assert same(D.covariance[i, j], D0.covariance[i, j]), (i, j)
    assert D.finite_d_note == D0.finite_d_note == "complete"


def _load(src, tmp_path, name):
    path = tmp_path / f"{name}.py"
    path.write_text(src)
    return load_module(path)


def test_generated_module_and_its_jacobian(tmp_path, monkeypatch):
    """The module printed from the summed-cumulant form (K and M computed from the state in
    the module) against the token-by-token module on random states, and its drift_jacobian
    (chain rule through the summed cumulants) against central differences of its drift."""
    L = 5
    spec = _spec(*CASES[2][:2], L)
    D = derive(spec)
    text = module_source(D)
    assert "q1 + q2 + q3 + q4 + q5" in text  # a summed cumulant, computed in the module
    mod = _load(text, tmp_path, "sums")
    ref = _load(module_source(_token_by_token(spec, monkeypatch)), tmp_path, "tokens")
    rng = np.random.default_rng(0)
    x = [rng.uniform(-0.8, 0.8, 6) for _ in range(L)] + [rng.uniform(0.6, 1.4, 6)
                                                        for _ in range(L)]
    for name in ("population_loss", "drift", "drift_jacobian", "covariance", "ito_correction",
                 "finite_d_correction"):
        kw = {} if name == "population_loss" else {"eta": 0.3}
        a = np.asarray(getattr(mod, name)(*x, **kw), dtype=float)
        b = np.asarray(getattr(ref, name)(*x, **kw), dtype=float)
        assert np.allclose(a, b, rtol=1e-12, atol=1e-12 * np.abs(b).max()), name
    J = np.asarray(mod.drift_jacobian(*x, eta=0.3), dtype=float)
    h = 1e-5
    for j in range(2 * L):
        xp, xm = list(x), list(x)
        xp[j], xm[j] = x[j] + h, x[j] - h
        fd = (np.asarray(mod.drift(*xp, eta=0.3)) - np.asarray(mod.drift(*xm, eta=0.3))) / (2 * h)
        assert np.allclose(J[:, j], fd, atol=1e-7), j
    assert mod.JACOBIAN == "symbolic" and "summed cumulants" in mod.drift_jacobian.__doc__


def test_untied_L16_drift_and_covariance_match_monte_carlo(tmp_path):
    """L = 16, the tied network's untied student on the sphere: the generated drift and
    Cov(G) against a Monte Carlo of MATH.md section 6 (projections sampled per token, the
    increments of the flattened spherical update formed by hand; 5 standard errors)."""
    L, eta, N = 16, 0.1, 200_000
    spec = _spec("tsum(He(2, z)) / sqrt(2 * L)", "He(2, tsum(z) / sqrt(L)) / sqrt(2)", L,
                 name="mc")
    D = derive(spec)
    assert getattr(D.ring, "token_sums", None) is not None
    mod = _load(module_source(D), tmp_path, "mc16")
    rng = np.random.default_rng(5)
    ms = rng.uniform(-0.5, 0.5, L)
    qs = rng.uniform(0.7, 1.3, L)
    m, q = ms[:, None], qs[:, None]
    zs = rng.standard_normal((L, N))
    z = m * zs + np.sqrt(q - m ** 2) * rng.standard_normal((L, N))
    y = (zs ** 2 - 1).sum(axis=0) / math.sqrt(2 * L)
    s = z.sum(axis=0) / math.sqrt(L)
    res = y - (s ** 2 - 1) / math.sqrt(2)
    dl = np.broadcast_to(-res * math.sqrt(2) * s / math.sqrt(L), (L, N))   # dl/dz_l
    dm = -eta * dl * zs
    dq = -2 * eta * dl * z + eta ** 2 * dl ** 2
    dQ = dq.mean(axis=0)
    G = np.concatenate([dm - m / 2 * dQ, dq - q * dQ])
    state = tuple(ms) + tuple(qs)
    drift = np.asarray(mod.drift(*state, eta=eta), dtype=float)
    se = G.std(axis=1) / math.sqrt(N)
    assert np.all(np.abs(G.mean(axis=1) - drift) <= 5 * se + 1e-12)
    cov = np.asarray(mod.covariance(*state, eta=eta), dtype=float)
    B = 40
    covs = np.array([np.cov(g) for g in np.split(G, B, axis=1)])
    cov_se = covs.std(axis=0) / math.sqrt(B)
    assert np.all(np.abs(covs.mean(axis=0) - cov) <= 5 * cov_se + 1e-9)


def test_too_large_forms_fall_back_to_the_token_path(monkeypatch):
    """Past the work budget the token-by-token derivation is used (same outputs)."""
    spec = _spec(*CASES[0][:2], 3)
    monkeypatch.setattr(TS, "BUDGET", 10)
    assert derive_token_sums(spec) is None
    D = derive(spec)
    assert getattr(D.ring, "token_sums", None) is None
    monkeypatch.setattr(TS, "BUDGET", 2_000_000)
    D2 = derive(spec)
    assert getattr(D2.ring, "token_sums", None) is not None
    x = {s: sp.Rational(k + 2, 10 + k) for k, s in enumerate(D.state)}
    x[ETA] = sp.Rational(1, 5)
    assert abs(sp.N((D.drift_eta1[0] - D2.drift_eta1[0]).xreplace(x), 40)) < 1e-30
