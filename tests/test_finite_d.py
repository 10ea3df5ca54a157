"""The generated O(1/d) drift (finite_d_correction) against an independent Monte Carlo of the
one-step expansion, whose form the simulator's one-step test checks against real SGD."""
import numpy as np
import pytest

from ssi_symbolic.backends.registry import ensure_module
from ssi_symbolic.model.spec import make_spec

from .test_simulate import one_step_correction, plain_pe_spec, shipped

CASES = [
    pytest.param(lambda: shipped("tied_he2_pe"), 0.4, 0.3, 0.1, id="tied_he2_pe"),
    pytest.param(lambda: shipped("tied_he2_pe"), 0.1, -0.5, 0.2, id="tied_he2_pe_b"),
    pytest.param(lambda: shipped("linear_plain"), 0.3, None, 0.5, id="linear_plain"),
    pytest.param(plain_pe_spec, 0.3, 0.2, 0.3, id="plain_pe_noisy"),
    pytest.param(lambda: make_spec("cross_r2", 2, "z1*z2 + He(2, z1)/2", "z1*z2",
                                   positional=[[1.0, 0.5], [-0.5, 1.0]]),
                 0.3, [0.2, -0.1], 0.15, id="cross_r2"),
    # constants in the links (1/pi, sqrt 3): the token-norm term has 1/pi^2 .. 1/pi^4, which
    # the exact engine must know as constants (it ended in NotPolynomial: pi**(-4))
    pytest.param(lambda: make_spec("pi_constants", 2, "He(2, z1)/sqrt(2) + z2",
                                   "sqrt(3)*z1*z2/pi + z1**2/(2*pi)",
                                   positional=[[1.0], [-0.5]]),
                 0.3, 0.2, 0.2, id="pi_constants"),
]


@pytest.mark.parametrize("make, m, e, eta", CASES)
def test_finite_d_correction_matches_monte_carlo(make, m, e, eta, tmp_path):
    spec = make()
    mod = ensure_module(spec, tmp_path)
    e_list = [] if e is None else list(np.atleast_1d(e))
    mc = one_step_correction(mod, spec, m, e_list, eta, 1_000_000, np.random.default_rng(11))
    state = [m] + e_list + ([] if spec.spherical else [1.0])
    got = mod.finite_d_correction(*state, eta=eta)
    for name, g in zip(spec.overlap_names, got):
        c, se = mc[name]
        assert abs(float(g) - c) <= 5 * se + 1e-12, (name, float(g), c, se)
    # the token-norm term matters: the rescaling term alone is many standard errors off
    if spec.spherical:
        ito = mod.ito_correction(*state, eta=eta)
        assert any(abs(float(i) - mc[k][0]) > 8 * mc[k][1]
                   for k, i in zip(spec.overlap_names, ito))
