"""Untied students (MATH.md section 6): derivation against an independent Monte Carlo, the
finite-d correction against real one-step SGD, ODE against the simulator, the pathological
targets and the gain.

The Monte Carlo side samples the projections straight from section 6 (token l: z*_l ~ N(0, 1),
z_l = m_l z*_l + sqrt(q_l - m_l^2) w_l, independent across tokens), evaluates the links with plain
SymPy lambdify, and forms the increments of the flattened spherical update by hand:

    d dm_l = -eta dl_l z*_l,   d dq_l = -2 eta dl_l z_l + eta^2 dl_l^2,   d dQ = sum_l d dq_l / L,
    G_m_l = d dm_l - (m_l / 2) d dQ,   G_q_l = d dq_l - q_l d dQ.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import sympy as sp

from ssi_symbolic.backends.registry import ensure_module
from ssi_symbolic.numeric.ode import OverlapODE, initial_state, solve
from ssi_symbolic.analysis.gain import escape_prediction, predict_gain
from ssi_symbolic.numeric.simulate import simulate
from ssi_symbolic.model.spec import make_spec

K_SIGMA = 5.0


def _links(teacher: str, student: str, L: int):
    """Teacher, student and student gradient as NumPy functions, independently of the package."""
    zs = sp.symbols(f"z1:{L + 1}", real=True)
    loc = {f"z{l + 1}": zs[l] for l in range(L)}
    loc["He"] = lambda k, x: sp.hermite_prob(k, x)
    T = sp.sympify(teacher, locals=loc)
    S = sp.sympify(student, locals=loc)
    grad = [sp.diff(S, z) for z in zs]
    f = lambda e: sp.lambdify(zs, e, "numpy")
    return f(T), f(S), [f(g) for g in grad]


UNTIED_CASES = [
    # (teacher, student, L, state m_1..m_L, q_1..q_L, spherical)
    ("z1*z2 + He(2, z1)/2", "He(2, (z1 + z2)/sqrt(2))/sqrt(2)", 2, (0.3, -0.2), (1.1, 0.9), True),
    ("(z1 - z2)/sqrt(2)", "(z1 + z2)/sqrt(2)", 2, (0.25, 0.1), (1.0, 1.0), True),
    ("z1 + z2**2 - 1 + z3", "z1 + z2 + z3", 3, (0.2, 0.4, -0.1), (0.8, 1.2, 1.0), False),
]


@pytest.mark.parametrize("teacher, student, L, ms, qs, spherical", UNTIED_CASES)
def test_untied_drift_and_covariance_match_monte_carlo(teacher, student, L, ms, qs, spherical,
                                                       tmp_path):
    spec = make_spec(f"untied_mc_{L}_{int(spherical)}", L, teacher, student=student,
                     spherical=spherical, weights="untied")
    mod = ensure_module(spec, tmp_path)
    assert tuple(mod.OVERLAPS) == tuple(f"m{l + 1}" for l in range(L)) + \
        tuple(f"q{l + 1}" for l in range(L))
    eta, N = 0.1, 400_000
    rng = np.random.default_rng(11)
    m, q = np.array(ms)[:, None], np.array(qs)[:, None]
    zs = rng.standard_normal((L, N))
    z = m * zs + np.sqrt(q - m ** 2) * rng.standard_normal((L, N))
    T, S, grad = _links(teacher, student, L)
    res = T(*zs) - S(*z)
    dl = np.array([-res * np.broadcast_to(g(*z), (N,)) for g in grad])      # dl/dz_l
    dm = -eta * dl * zs
    dq = -2 * eta * dl * z + eta ** 2 * dl ** 2
    if spherical:
        dQ = dq.mean(axis=0)
        G = np.concatenate([dm - m / 2 * dQ, dq - q * dQ])
    else:
        G = np.concatenate([dm, dq])
    state = tuple(ms) + tuple(qs)
    drift = np.array(mod.drift(*state, eta=eta), dtype=float)
    se = G.std(axis=1) / math.sqrt(N)
    assert np.all(np.abs(G.mean(axis=1) - drift) <= K_SIGMA * se + 1e-9), (G.mean(axis=1), drift)
    cov = np.array(mod.covariance(*state, eta=eta), dtype=float)
    # batch estimate of the standard error of the sample covariance
    B = 40
    covs = np.array([np.cov(g) for g in np.split(G, B, axis=1)])
    cov_se = covs.std(axis=0) / math.sqrt(B)
    assert np.all(np.abs(np.cov(G) - cov) <= K_SIGMA * cov_se + 1e-9)
    # the loss: 1/2 E (y - y_hat)^2
    loss = float(mod.population_loss(*state))
    assert abs(loss - 0.5 * np.mean(res ** 2)) <= K_SIGMA * np.std(0.5 * res ** 2) / math.sqrt(N)


def test_untied_one_step_sgd_matches_drift_plus_finite_d(tmp_path):
    """Real d = 64 one-step SGD of an untied spherical student (160000 runs): the mean of
    d (X' - X) equals drift + finite_d_correction / d to 5 standard errors + 6/d^2 (the O(d^-2)
    rest, as for tied students in test_simulate)."""
    spec = make_spec("untied_step", 2, "z1*z2 + He(2, z1)/2",
                     student="He(2, (z1 + z2)/sqrt(2))/sqrt(2)", weights="untied")
    mod = ensure_module(spec, tmp_path)
    d, eta, m0 = 64, 0.1, 0.4
    runs = [simulate(spec, eta, d, 1, seeds=20000, seed=100 + b, m0=m0, out_dir=tmp_path,
                     progress=False) for b in range(8)]
    names = spec.overlap_names
    G = np.concatenate([[d * (r.overlaps[k][:, 1] - r.overlaps[k][:, 0]) for k in names]
                        for r in runs], axis=1)
    state = (m0, m0, 1.0, 1.0)
    expected = (np.array(mod.drift(*state, eta=eta), dtype=float)
                + np.array(mod.finite_d_correction(*state, eta=eta), dtype=float) / d)
    se = G.std(axis=1) / math.sqrt(G.shape[1])
    tol = K_SIGMA * se + 6.0 / d ** 2
    assert np.all(np.abs(G.mean(axis=1) - expected) <= tol), (G.mean(axis=1), expected, tol)
    # sharp: the O(eta) drift of m_1 is many tolerances away from zero
    assert abs(expected[0]) > 4 * tol[0]


def test_untied_ode_follows_simulation(tmp_path):
    """Mean of 8 seeds at d = 2000 follows the ODE from m_l = 0.3 within 4 sd/sqrt(8) + 5/d."""
    spec = make_spec("untied_he2", 2, "(He(2, z1) + He(2, z2))/2", weights="untied")
    mod = ensure_module(spec, tmp_path)
    ode = OverlapODE(mod, 0.1)
    tr = solve(ode, initial_state(ode, 2000, m0=0.3), t_max=10)
    sim = simulate(spec, 0.1, 2000, 20_000, seeds=8, m0=0.3, out_dir=tmp_path, progress=False,
                   record_every=2000)
    for name in ("m1", "m2"):
        ode_vals = np.interp(sim.t, tr.t, tr.x[spec.overlap_names.index(name)])
        sd = sim.overlaps[name].std(axis=0)
        assert np.all(np.abs(sim.mean()[name] - ode_vals) <= 4 * sd / math.sqrt(8) + 5 / 2000)
    assert ode_vals[-1] > 0.5  # it did learn: a real trajectory, not a flat line


def test_simulator_needs_only_the_drift_only_module(tmp_path):
    """The simulator evaluates only the links: without a current full module it writes the
    drift-only one (no Cov(G) derivation, which for L = 8 untied students takes tens of minutes
    and gigabytes); with a current full module it uses that one and writes nothing."""
    from ssi_symbolic.backends.files import module_path
    spec = make_spec("untied_links", 2, "(He(2, z1) + He(2, z2))/2", weights="untied")
    simulate(spec, 0.1, 50, 2, seeds=2, out_dir=tmp_path, progress=False)
    assert module_path(spec, tmp_path, False).exists()
    assert not module_path(spec, tmp_path, True).exists()
    other = tmp_path / "full"
    other.mkdir()
    ensure_module(spec, other)
    before = sorted(p.name for p in other.iterdir())
    a = simulate(spec, 0.1, 50, 3, seeds=2, seed=7, out_dir=other, progress=False)
    assert sorted(p.name for p in other.iterdir()) == before
    b = simulate(spec, 0.1, 50, 3, seeds=2, seed=7, out_dir=tmp_path, progress=False)
    assert np.array_equal(a.overlaps["m1"], b.overlaps["m1"])  # same links either way


@pytest.mark.parametrize("teacher", ["(z1 - z2)/sqrt(2)", "(z1**2 - z2**2)/sqrt(2)"])
def test_pathological_targets_tied_cannot_learn(teacher, tmp_path):
    """A student symmetric in the tokens, tied, on an antisymmetric target: zero leading drift,
    reported as not learnable; the untied student escapes."""
    spec = make_spec("patho", 2, teacher, student="He(2, tsum(z)/sqrt(L))/sqrt(2) + tsum(z)/sqrt(L)")
    tied = escape_prediction(spec, 0.05, 10_000, out_dir=tmp_path)
    assert tied["learnable"] is False and tied["escape_time"] is None
    assert "zero leading drift" in tied["reason"]
    untied = escape_prediction(spec.untied_student(), 0.05, 10_000, out_dir=tmp_path)
    assert untied["learnable"] is True and untied["escape_time"] > 0


def test_gain_of_sum_of_he2_grows_with_L(tmp_path):
    """tau_untied / tau_tied for the sum-of-He2 target: 1 at L = 1 (the two students coincide)
    and growing with L."""
    spec = make_spec("he2_family", 2, "tsum(He(2, z))/sqrt(2*L)",
                     student="He(2, tsum(z)/sqrt(L))/sqrt(2)")
    g = predict_gain(spec, [1, 2, 4], eta=0.05, d=10_000, out_dir=tmp_path)
    gains = [r["gain"] for r in g["rows"]]
    assert abs(gains[0] - 1) < 1e-6
    assert gains[1] > 1.2 and gains[2] > gains[1]
    assert g["fit"]["alpha"] > 0.3


def test_best_escape_eta_minimises_closed_form_escape_times(tmp_path):
    """lr_scaling "max" runs a student at the eta minimising its escape time. Closed forms:
    He2/sqrt 2 (SIE 2): dm/dt = eta (2 - 6 eta) m (1 - m^2), tau = F / (eta (2 - 6 eta)), so the
    best eta is 1/6 at every d; linear (SIE 1): dm/dt = eta (1 - m)(1 + b m), b = 1 - eta, tau
    = [ln((1 + b theta)/(1 - theta)) - ln((1 + b m0)/(1 - m0))] / ((1 + b) eta), minimised here
    by SciPy on the closed form."""
    from scipy.optimize import minimize_scalar
    d, theta = 10_000, 0.5
    he2 = escape_prediction(make_spec("he2_best", 1, "He(2, z1)/sqrt(2)"), 0.05, d,
                            out_dir=tmp_path, lr_scaling="max")
    assert he2["eta"] == pytest.approx(1 / 6, rel=1e-3)
    m0 = 1 / math.sqrt(d)

    def tau_linear(eta):
        b = 1 - eta
        G = lambda m: math.log((1 + b * m) / (1 - m)) / (1 + b)
        return (G(theta) - G(m0)) / eta

    ref = minimize_scalar(tau_linear, bounds=(0.01, 2.9), method="bounded",
                          options={"xatol": 1e-8})
    lin = escape_prediction(make_spec("linear_best", 1, "z1"), 0.05, d, out_dir=tmp_path,
                            lr_scaling="max")
    assert lin["eta"] == pytest.approx(ref.x, rel=1e-3)
    assert lin["escape_time"] == pytest.approx(ref.fun, rel=1e-6)
    assert ref.x > 0.2  # far from the common rate: the search did move


def test_gain_cli_json_and_errors(tmp_path, capsys):
    from ssi_symbolic.cli import main
    spec = str(tmp_path / "fam.toml")
    with open(spec, "w") as fh:
        fh.write('name = "fam"\nL = 2\n[teacher]\nlink = "tsum(He(2, z)) / sqrt(2 * L)"\n'
                 '[student]\nlink = "He(2, tsum(z) / sqrt(L)) / sqrt(2)"\n')
    assert main(["gain", spec, "--L", "1,2", "--json", "--out", str(tmp_path / "v")]) == 0
    import json
    out = json.loads(capsys.readouterr().out)
    assert {"rows", "fit", "eta", "d", "lr_scaling", "threshold"} <= set(out)
    assert [r["L"] for r in out["rows"]] == [1, 2]
    assert {"tied", "untied", "gain"} <= set(out["rows"][1])
    assert main(["gain", spec, "--L", "1,x", "--out", str(tmp_path / "v")]) == 2
    assert "--L" in capsys.readouterr().err
    # a link naming token 2 cannot be re-instantiated at L = 1
    bad = str(tmp_path / "bad.toml")
    with open(bad, "w") as fh:
        fh.write('name = "bad"\nL = 2\n[teacher]\nlink = "z1 * z2"\n')
    assert main(["gain", bad, "--L", "1", "--out", str(tmp_path / "v")]) == 2
    assert "token 2" in capsys.readouterr().err


def test_solve_says_why_a_pathological_target_does_not_escape(tmp_path):
    """`ssi solve` on the shipped pathological spec: no escape time, and the reason."""
    from ssi_symbolic.analysis.predict import predict_solve
    from tests.conftest import DERIVATIONS
    out = predict_solve(DERIVATIONS / "pathological_linear.toml", 0.05, 10_000, out_dir=tmp_path)
    assert out["escape_time"] is None
    assert "zero leading drift" in out["no_escape_reason"]
    assert len(out["loss"]) == len(out["t"])  # a constant loss is still a trajectory
