"""Derivations against exact solutions worked out by hand (MATH.md conventions)."""
import numpy as np
import sympy as sp

from ssi_symbolic.backends.exact import module_source
from ssi_symbolic.symbolic.derive import ETA, derive
from ssi_symbolic.model.spec import load_spec, make_spec

from .conftest import DERIVATIONS

m = sp.Symbol("m", real=True)
e = sp.Symbol("e", real=True)
q = sp.Symbol("q", positive=True)


def test_phase_retrieval_drift():
    """y = z^2 with student z^2 (L = 1), spherical: dm/dt = eta (4 - 24 eta) m (1 - m^2)."""
    D = derive(load_spec(DERIVATIONS / "phase_retrieval.toml"))
    assert sp.expand(D.drift[0] - ETA * (4 - 24 * ETA) * m * (1 - m ** 2)) == 0
    # loss: 1/2 E (z*^2 - z^2)^2 = 1/2 (3 - 2(1 + 2 m^2) + 3) = 2 - 2 m^2
    assert sp.expand(D.population_loss - (2 - 2 * m ** 2)) == 0


def test_linear_drift():
    """Linear link, spherical: dm/dt = eta (1 - m)(1 + (1 - eta) m)."""
    D = derive(load_spec(DERIVATIONS / "linear.toml"))
    assert sp.expand(D.drift[0] - ETA * (1 - m) * (1 + (1 - ETA) * m)) == 0
    assert sp.expand(D.population_loss - (1 - m)) == 0


def test_linear_plain_drift_and_diffusion():
    """Plain SGD on y = z: dl = z - z*, so dm/dt = eta (1 - m) and
    dq/dt = -2 eta (q - m) + eta^2 E[(z - z*)^2] = -2 eta (q - m) + eta^2 (1 - 2m + q).
    Var(G_m) = eta^2 Var((z - z*) z*) = eta^2 ((1 - m)^2 + (q - 2m + 1))."""
    D = derive(make_spec("lp", 1, "z1", spherical=False))
    assert [str(s) for s in D.state] == ["m", "q"]
    assert sp.expand(D.drift[0] - ETA * (1 - m)) == 0
    assert sp.expand(D.drift[1] - (-2 * ETA * (q - m) + ETA ** 2 * (1 - 2 * m + q))) == 0
    # E[(z - z*)^2 z*^2] = E z^2 z*^2 - 2 E z z*^3 + E z*^4 = (q + 2 m^2) - 6 m + 3
    var_gm = ETA ** 2 * ((q + 2 * m ** 2) - 6 * m + 3 - (m - 1) ** 2)
    assert sp.expand(D.covariance[0, 0] - var_gm) == 0


def test_positional_linear_drift():
    """y = z1 + z2, student the same, C = [[1], [-1]]: mu_1 = e, mu_2 = -e, so the student's
    mean output cancels and R = 1/2 E (z*1 + z*2 - z1 - z2)^2 = 2 - 2m (e drops out)."""
    D = derive(make_spec("lpe", 2, "z1 + z2", positional=[[1.0], [-1.0]]))
    assert sp.expand(D.population_loss - (2 - 2 * m)) == 0
    # plain de/dt: -eta sum_l (e E[d2l_ll] + C_l E[dl_l]) = -eta (2e + 0);
    # spherical correction -e/2 phi with phi = -2 eta E[sum dl_l z_l] + eta^2 E[sum dl_l^2].
    # dl_l = -(r), r = z*1 + z*2 - z1 - z2 (mean 0, variance 4 - 4m);
    # E[sum_l dl_l z_l] = -E[r (z1 + z2)] = -(2m - 2), E[sum dl_l^2] = 2 E r^2 = 8 - 8m.
    phi = -2 * ETA * (2 - 2 * m) + ETA ** 2 * (8 - 8 * m)
    assert sp.expand(D.drift[1] - (-ETA * 2 * e - e / 2 * phi)) == 0


def test_noise_enters_loss_and_eta2_only():
    """Label noise Delta adds Delta/2 to R and eta^2 Delta terms, never to the O(eta) drift."""
    D0 = derive(make_spec("a", 1, "z1"))
    D1 = derive(make_spec("b", 1, "z1", noise=0.25))
    assert sp.expand(D1.population_loss - D0.population_loss - sp.Rational(1, 8)) == 0
    assert sp.expand(D1.drift_eta1[0] - D0.drift_eta1[0]) == 0
    # spherical: G2_m = -(m/2) B, B = dl^2, and E dl^2 gains Delta
    assert sp.expand(D1.drift_eta2[0] - D0.drift_eta2[0] + m / 2 * sp.Rational(1, 4)) == 0


def test_generated_oracle_numbers(tmp_path):
    """The generated module reproduces the phase-retrieval oracle at random states."""
    from ssi_symbolic.backends.files import load_module
    spec = load_spec(DERIVATIONS / "phase_retrieval.toml")
    path = tmp_path / "pr.py"
    path.write_text(module_source(derive(spec)))
    mod = load_module(path)
    rng = np.random.default_rng(0)
    mm = rng.uniform(-1, 1, 1000)
    eta = rng.uniform(0.01, 0.3, 1000)
    (got,) = mod.drift(mm, eta=eta)
    np.testing.assert_allclose(got, eta * (4 - 24 * eta) * mm * (1 - mm ** 2), rtol=1e-12,
                               atol=1e-14)
