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
from ssi_symbolic.model.spec import make_spec


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
    full = derive_mod.derive(spec)
    for a, b in zip(_outputs(fast), _outputs(full)):
        assert sp.expand(a - b) == 0


def test_symmetry_detection():
    sym = derive_mod.token_symmetric
    assert sym(make_spec("a", 3, "z1*z2*z3", weights="untied"))
    assert not sym(make_spec("b", 3, "z1*z2 + z3", weights="untied"))
    assert not sym(make_spec("c", 2, "z1 + z2", "z1 + 2*z2", weights="untied"))
    assert not sym(make_spec("d", 1, "z1", weights="untied"))
