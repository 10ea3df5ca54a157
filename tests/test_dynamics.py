"""Dynamics (issue 3): ODE against exact solutions, maximal learning rate, and the ODE/SDE
predictions against the finite-d SGD simulator."""
import json
import math

import numpy as np
import pytest

from ssi_symbolic.cli import main
from ssi_symbolic.backends.files import load_module
from ssi_symbolic.numeric.ode import DynamicsError, OverlapODE, initial_state, solve
from ssi_symbolic.analysis.predict import predict_sde, predict_solve
from ssi_symbolic.numeric.simulate import simulate
from ssi_symbolic.model.spec import load_spec

from .conftest import DERIVATIONS, GENERATED


def cli_json(argv, capsys, out):
    assert main(argv + ["--json", "--out", str(out)]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("eta, d", [(0.05, 1000), (0.3, 400), (1.2, 10_000)])
def test_solve_linear_exact(eta, d, capsys, gen):
    """(1 + (1 - eta) m)/(1 - m) = C exp(eta (2 - eta) t): `ssi solve` agrees to 1e-6."""
    r = cli_json(["solve", str(DERIVATIONS / "linear.toml"), "--eta", str(eta), "--d", str(d)],
                 capsys, gen)
    t, m = np.array(r["t"]), np.array(r["overlaps"]["m"])
    m0 = 1 / math.sqrt(d)
    E = (1 + (1 - eta) * m0) / (1 - m0) * np.exp(eta * (2 - eta) * t)
    np.testing.assert_allclose(m, (E - 1) / (E + 1 - eta), atol=1e-6, rtol=0)
    # escape time from the same closed form: m = 1/2
    Ce = (1 + (1 - eta) / 2) / (1 / 2)
    t_esc = math.log(Ce * (1 - m0) / (1 + (1 - eta) * m0)) / (eta * (2 - eta))
    assert abs(r["escape_time"] - t_esc) < 1e-6
    assert r["stable"] and abs(r["fixed_point"]["m"] - 1) < 1e-6
    assert [p["name"] for p in r["phases"]] == ["plateau", "escape", "alignment", "converged"]


@pytest.mark.parametrize("eta", [0.02, 0.1, 0.15])
def test_solve_phase_retrieval_exact(eta, capsys, gen):
    """y = z^2: u = m^2 is logistic with rate 2 eta (4 - 24 eta)."""
    d = 1000
    r = cli_json(["solve", str(DERIVATIONS / "phase_retrieval.toml"), "--eta", str(eta),
                  "--d", str(d)], capsys, gen)
    t, m = np.array(r["t"]), np.array(r["overlaps"]["m"])
    rate = 2 * eta * (4 - 24 * eta)
    u0 = 1 / d
    u = u0 * np.exp(rate * t) / (1 - u0 + u0 * np.exp(rate * t))
    np.testing.assert_allclose(m ** 2, u, atol=1e-6, rtol=0)
    t_esc = math.log((0.25 / 0.75) * (1 - u0) / u0) / rate
    assert abs(r["escape_time"] - t_esc) < 1e-6


def test_max_lr_phase_retrieval(capsys, gen):
    """The maximal learning rate of y = z^2 is 1/6 (from dm/dt = eta (4 - 24 eta) m (1 - m^2))."""
    r = cli_json(["max-lr", str(DERIVATIONS / "phase_retrieval.toml")], capsys, gen)
    assert abs(r["max_lr"] - 1 / 6) < 1e-9
    assert "escape" in r["reason"]


def test_max_lr_linear_is_stability_limit(capsys, gen):
    """Linear link: dm/dt = eta (1 - m)(1 + (1 - eta) m); the fixed point m = 1 has eigenvalue
    -eta (2 - eta): stable for eta < 2."""
    r = cli_json(["max-lr", str(DERIVATIONS / "linear.toml")], capsys, gen)
    assert abs(r["max_lr"] - 2) < 1e-6 and "stability" in r["reason"]


def test_too_large_learning_rate_is_reported():
    """Plain SGD with eta beyond 2 makes q blow up: a clear DynamicsError, not garbage."""
    mod = load_module(GENERATED / "linear_plain.py")
    ode = OverlapODE(mod, 3.0)
    with pytest.raises(DynamicsError, match="learning rate is too large"):
        solve(ode, initial_state(ode, 1000))


# ----------------------------------------------------------------------------------------
# ODE / SDE against the finite-d simulator
# ----------------------------------------------------------------------------------------

SIM_CASES = [("he2_L1", 0.12), ("tied_network_he2_L2", 0.12), ("tied_network_he2_L4", 0.1)]


@pytest.mark.parametrize("name, eta", SIM_CASES)
def test_mean_overlap_follows_ode(name, eta, gen):
    """From the same macroscopic overlap m0 = 0.3, the mean over 8 seeds at d = 2000 follows the
    ODE. Tolerance: the finite-d fluctuations of m are O(1/sqrt(d)) per seed (measured by the
    spread across seeds, sd(t)); the mean of 8 seeds deviates by sd/sqrt(8), bounded here by
    4 sd/sqrt(8); the bias of the ODE is O(1/d), bounded by 5/d."""
    d, seeds, t_end = 2000, 8, 12.0
    spec = load_spec(DERIVATIONS / f"{name}.toml")
    sim = simulate(spec, eta, d, int(t_end * d), seeds=seeds, seed=1, m0=0.3,
                   record_every=d // 2, progress=False, out_dir=gen)
    mod = load_module(GENERATED / f"{name}.py")
    ode = OverlapODE(mod, eta)
    tr = solve(ode, initial_state(ode, d, m0=0.3), t_max=t_end)
    from scipy.integrate import solve_ivp
    ref = solve_ivp(lambda t, x: ode.drift(x), (0, t_end), [0.3], t_eval=sim.t, rtol=1e-10,
                    atol=1e-12).y[0]
    m = sim.overlaps["m"]
    mean, sd = m.mean(axis=0), m.std(axis=0, ddof=1)
    tol = 4 * sd / math.sqrt(seeds) + 5 / d
    assert np.all(np.abs(mean - ref) <= tol), np.max(np.abs(mean - ref) / tol)
    assert np.max(np.abs(ref - ref[0])) > 3 * np.max(tol)  # the overlap really moves
    assert tr.x.shape[0] == 1


# eta near the fastest escape in steps; the L = 4 model runs on the exact reduced simulator
# (same law as the d-dimensional one, tests/test_reduced.py; 8 minutes less on 2 cores)
ESCAPE_CASES = [("he2_L1", 0.12, "full"), ("tied_network_he2_L2", 0.12, "full"),
                ("tied_network_he2_L4", 0.08, "reduced")]


@pytest.mark.parametrize("name, eta, method", ESCAPE_CASES)
def test_simulated_escape_median_inside_sde_quartiles(name, eta, method, gen):
    """From m0 = 1/sqrt(d) the noise decides the escape (SIE 2): the median escape time of 8
    simulated seeds at d = 2000 lies inside the quartile range of 1000 SDE paths."""
    d = 2000
    path = DERIVATIONS / f"{name}.toml"
    sde = predict_sde(path, eta, d, runs=1000, seed=3, out_dir=gen)
    ode = predict_solve(path, eta, d, out_dir=gen)
    steps = int(3 * ode["escape_time"] * d)
    sim = simulate(load_spec(path), eta, d, steps, seeds=8, seed=5, progress=False,
                   out_dir=gen, stop_when_escaped=True, record_every=d, method=method)
    esc = sim.escape_times["escape"]
    assert np.all(np.isfinite(esc))
    q1, q3 = sde["quartiles"]
    assert q1 <= np.median(esc) <= q3, (np.median(esc), q1, q3, ode["escape_time"])


def test_solve_plot_and_table(tmp_path, capsys, gen):
    """`ssi solve --plot` draws a PNG; without --json a readable table is printed."""
    png = tmp_path / "traj.png"
    assert main(["solve", str(DERIVATIONS / "tied_he2_pe.toml"), "--eta", "0.05", "--d", "1000",
                 "--plot", str(png), "--out", str(gen)]) == 0
    out = capsys.readouterr().out
    assert "escape time" in out and "fixed point" in out
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"


def test_bad_plot_path_writes_nothing(tmp_path, capsys, gen):
    assert main(["solve", str(DERIVATIONS / "linear.toml"), "--eta", "0.05", "--d", "100",
                 "--plot", str(tmp_path / "x.jpg"), "--out", str(gen)]) == 2
    assert ".png" in capsys.readouterr().err and not list(tmp_path.iterdir())


def test_sde_and_sie_cli(capsys, gen):
    r = cli_json(["sde", str(DERIVATIONS / "phase_retrieval.toml"), "--eta", "0.1", "--d", "500",
                  "--runs", "200", "--seed", "1"], capsys, gen)
    assert set(r) >= {"median", "quartiles", "escaped_fraction"}
    assert r["escaped_fraction"] == 1.0 and r["quartiles"][0] <= r["median"] <= r["quartiles"][1]
    r = cli_json(["sie", str(DERIVATIONS / "he4_example_pe.toml")], capsys, gen)
    assert (r["sie"], r["flatness"], r["method"]) == (4, 2, "exact")
