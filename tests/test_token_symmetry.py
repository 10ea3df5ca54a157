"""Token symmetry (issue 13, long sequences). For an untied student whose links are invariant
under permutations of the tokens, the derivation computes token 1's expectations (and tokens
1 and 2's for pairs) and renames the overlaps for the others; for a tied student without
positional encoding the tokens are exchangeable and a sum over tokens has L times the
expectation of one term (pairs: L E[f(1) g(1)] + L(L-1) E[f(1) g(2)]). The results must equal,
term by term, the derivation that computes every token's expectations (itself checked against
Monte Carlo in test_untied / test_montecarlo / test_finite_d)."""
import dataclasses

import pytest
import sympy as sp

import ssi_symbolic.symbolic.derive as derive_mod
from ssi_symbolic.symbolic import token_sums
from ssi_symbolic.model.spec import make_spec
from ssi_symbolic.symbolic.exact_engine import ExactEngine
from ssi_symbolic.symbolic.gaussian import TokenGaussian


def _outputs(D):
    return (D.population_loss,) + D.drift_eta1 + D.drift_eta2 + D.ito_correction \
        + D.finite_d_correction + tuple(D.covariance)


CASES = [
    pytest.param(lambda: make_spec("sym3", 3, "z1*z2 + z2*z3 + z1*z3", "(z1 + z2 + z3)**2 / 3",
                                   weights="untied", noise=0.1), 1, id="L3_spherical_noise"),
    pytest.param(lambda: make_spec("sym2", 2, "z1*z2", "He(3, (z1 + z2)/sqrt(2))",
                                   weights="untied", spherical=False), 3, id="L2_plain_batch3"),
    pytest.param(lambda: make_spec("tied3", 3, "z1*z2 + z2*z3 + z1*z3",
                                   "He(2, (z1 + z2 + z3)/sqrt(3))", noise=0.2), 1,
                 id="tied_L3_spherical_noise"),
    pytest.param(lambda: make_spec("tied2", 2, "He(2, z1) + He(2, z2)", "z1*z2 + z1 + z2",
                                   spherical=False), 2, id="tied_L2_plain_batch2"),
]


@pytest.mark.parametrize("make, batch", CASES)
def test_symmetric_shortcut_equals_the_full_computation(make, batch, monkeypatch):
    spec = dataclasses.replace(make(), batch=batch)
    assert derive_mod.token_symmetric(spec)
    fast = derive_mod.derive(spec)
    monkeypatch.setattr(derive_mod, "token_symmetric", lambda s: False)
    monkeypatch.setattr(ExactEngine, "_reducible", lambda self, others: [])  # no orbits
    full = derive_mod.derive(spec)
    for a, b in zip(_outputs(fast), _outputs(full)):
        assert sp.expand(a - b) == 0


def test_symmetry_detection():
    sym = derive_mod.token_symmetric
    assert sym(make_spec("a", 3, "z1*z2*z3", weights="untied"))
    assert not sym(make_spec("b", 3, "z1*z2 + z3", weights="untied"))
    assert not sym(make_spec("c", 2, "z1 + z2", "z1 + 2*z2", weights="untied"))
    assert not sym(make_spec("d", 1, "z1", weights="untied"))


# --- exchangeable tokens inside the exact engine (orbit reduction) -----------------------------

def _engine(L, positional=None):
    spec = make_spec("ex", L, " + ".join(f"z{l}" for l in range(1, L + 1)),
                     positional=positional)
    g = TokenGaussian.of(spec)
    return ExactEngine(g, []), g


def _count_reductions(monkeypatch) -> list:
    """[n]: n counts the calls of ExactEngine._orbit_reduce from now on."""
    calls = [0]
    orig = ExactEngine._orbit_reduce

    def counting(self, spt, classes):
        calls[0] += 1
        return orig(self, spt, classes)
    monkeypatch.setattr(ExactEngine, "_orbit_reduce", counting)
    return calls


def _moment_X2_Y4(mu, sx2, sy2, c):
    """E[X^2 Y^4] for jointly Gaussian X (mean 0, variance sx2) and Y (mean mu, variance sy2)
    with covariance c, by Wick's theorem on Y = mu + Y0: E[X^2 Y0^0] = sx2,
    E[X^2 Y0^2] = sx2 sy2 + 2 c^2, E[X^2 Y0^4] = 3 sx2 sy2^2 + 12 c^2 sy2."""
    return (mu ** 4 * sx2 + 6 * mu ** 2 * (sx2 * sy2 + 2 * c ** 2)
            + 3 * sx2 * sy2 ** 2 + 12 * c ** 2 * sy2)


@pytest.mark.parametrize("expanded", [True, False], ids=["expanded", "power"])
@pytest.mark.parametrize("positional", [None, [[1], [1], [1], [1], [-1], [-1]]],
                         ids=["no_encoding", "two_classes"])
def test_orbit_reduction_against_wick(expanded, positional, monkeypatch):
    """E[(sum_l z_l)^4 X^2] at L = 6 for X = z*_1 (breaks the symmetry: only tokens 2..6 are
    permuted), X = sum_l z*_l (symmetric) and X = z*_1 + z*_5 (two classes with an encoding),
    against Wick's formula. With the encoding the tokens 1-4 and 5-6 form two classes (different
    means mu_l = C_l e). The reduction must have been used (counted) for the expanded form."""
    ex, g = _engine(6, positional)
    calls = _count_reductions(monkeypatch)
    L, zs, z = 6, g.zstar, g.z
    m, q = g.m, g.q
    C = [row[0] for row in positional] if positional else [0] * L
    mu = sum(C) * (g.e[0] if positional else 0)
    S = sp.Add(*z)
    S4 = sp.expand(S ** 4) if expanded else S ** 4
    cases = [(zs[0], 1, m), (sp.Add(*zs), L, L * m), (zs[0] + zs[4], 2, 2 * m)]
    for X, sx2, c in cases:
        got = ex.to_sympy(ex.expect_ring(S4, X ** 2))
        want = _moment_X2_Y4(mu, sx2, L * q, c)
        assert sp.expand(got - want) == 0, (X, got, want)
    if expanded:
        assert calls[0] == len(cases)


def test_orbit_reduction_refused_for_an_untied_student():
    """Untied tokens have their own overlaps: no two tokens have one law, nothing is reduced."""
    spec = make_spec("u", 4, "z1 + z2 + z3 + z4", weights="untied")
    ex = ExactEngine(TokenGaussian.of(spec), [])
    assert ex.classes == []


@pytest.mark.parametrize("L", [12])
def test_tied_network_with_and_without_orbits(L, monkeypatch):
    """The drift and loss of the tied He2 network at L = 12 (where the factored y - y_hat has
    more than 64 terms and is reduced) equal those computed without orbit reduction."""
    spec = make_spec("tn", L, " + ".join(f"He(2, z{l}) / sqrt(2 * {L})" for l in range(1, L + 1)),
                     "He(2, (" + " + ".join(f"z{l}" for l in range(1, L + 1)) + f") / sqrt({L}))"
                     " / sqrt(2)")
    calls = _count_reductions(monkeypatch)
    fast = derive_mod.derive(spec, diffusion=False)
    assert calls[0] > 0
    monkeypatch.setattr(ExactEngine, "_reducible", lambda self, others: [])
    slow = derive_mod.derive(spec, diffusion=False)
    for a, b in zip((fast.population_loss,) + fast.drift_eta1 + fast.drift_eta2,
                    (slow.population_loss,) + slow.drift_eta1 + slow.drift_eta2):
        assert sp.expand(a - b) == 0


@pytest.mark.parametrize("weights, spherical", [("tied", True), ("untied", True),
                                                ("untied", False)])
def test_sparse_second_moments_equal_the_dense_form(weights, spherical, monkeypatch):
    """Cov(G_i, G_j) from the sparse rows (derive._second_moments: c_i^T M c_j - E G_i E G_j)
    equals the dense c_i^T (M - E[base] E[base]^T) c_j (the token-by-token path: untied
    students with token-sum links otherwise go through symbolic/token_sums.py)."""
    monkeypatch.setattr(token_sums, "MIN_L", 10 ** 6)
    spec = make_spec("sm", 3, "z1*z2 + z2*z3 + z1*z3", "(z1 + z2 + z3)**2 / 3",
                     weights=weights, spherical=spherical,
                     positional=[[1], [0], [-1]] if weights == "tied" else None)
    fast = derive_mod.derive(spec)
    seen = {}

    def dense(st, M, X, const, zero):
        coef = [[const(c) for c in row] for row in st.coef]
        seen["used"] = True
        mean = seen["mean"]
        C = [[M[a][b] - mean[a] * mean[b] for b in range(len(M))] for a in range(len(M))]
        # second(i, j, minus) = E[G_i G_j] - minus
        return lambda i, j, minus=zero: derive_mod._quadratic(coef[i], C, coef[j], zero) + \
            seen["drift"][i] * seen["drift"][j] - minus

    orig_drift = derive_mod._exact_drift

    def keep(st, ex, X, mean, zero):
        seen["mean"] = mean
        seen["drift"] = orig_drift(st, ex, X, mean, zero)
        return seen["drift"]
    monkeypatch.setattr(derive_mod, "_exact_drift", keep)
    monkeypatch.setattr(derive_mod, "_second_moments", dense)
    slow = derive_mod.derive(spec)
    assert seen.get("used")
    assert sp.expand(fast.covariance - slow.covariance) == sp.zeros(*fast.covariance.shape)
