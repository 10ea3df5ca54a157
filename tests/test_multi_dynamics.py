"""Several directions (MATH.md section 8): the random-like start, per-direction escape times,
the committee's plateau and specialisation, the staircase, the SDE and the CLI."""
import json
import math

import numpy as np
import pytest

from ssi_symbolic import Model
from ssi_symbolic.backends.registry import ensure_module
from ssi_symbolic.cli import main
from ssi_symbolic.errors import StateError
from ssi_symbolic.model.spec import load_spec
from ssi_symbolic.numeric.ode import OverlapODE, random_start

from .conftest import DERIVATIONS


def _ode(name, gen, eta):
    spec = load_spec(DERIVATIONS / f"{name}.toml")
    return OverlapODE(ensure_module(spec, gen), eta, {})


def test_random_start_has_the_law_of_random_unit_vectors(gen):
    """M[k,j] of independent uniform unit students against orthonormal teachers: to leading
    order N(0, 1/d) independent, E = 0 mean, Q[k,k] = 1. Checked over 400 seeds against the
    overlaps of actual random vectors in dimension d (sample means and variances within 5
    standard errors of each other)."""
    ode = _ode("staircase_K2", gen, 0.05)
    d, n = 400, 400
    X = np.array([random_start(ode, d, seed=s) for s in range(n)])
    rng = np.random.default_rng(7)
    W = rng.standard_normal((n, 2, d))
    W *= math.sqrt(d) / np.linalg.norm(W, axis=2, keepdims=True)
    T = np.eye(d)[:2] * math.sqrt(d)                      # two orthonormal teachers, |w*|^2 = d
    M = W @ T.T / d                                       # (n, K, K*)
    Q12 = np.sum(W[:, 0] * W[:, 1], axis=1) / d
    names = ode.names
    ours = {k: X[:, i] for i, k in enumerate(names)}
    ref = {"m1_1": M[:, 0, 0], "m1_2": M[:, 0, 1], "m2_1": M[:, 1, 0], "m2_2": M[:, 1, 1],
           "q1_2": Q12}
    for k, a in ref.items():
        b = ours[k]
        se_mean = math.sqrt(a.var() / n + b.var() / n)
        assert abs(a.mean() - b.mean()) < 5 * se_mean, k
        # variance of a sample variance of near-Gaussian data: 2 sigma^4 / n
        se_var = math.sqrt(2 * a.var() ** 2 / n + 2 * b.var() ** 2 / n)
        assert abs(a.var() - b.var()) < 5 * se_var, k


def test_start_overrides_and_refusals(gen):
    ode = _ode("staircase_K2", gen, 0.05)
    x = random_start(ode, 1000, init={"m2_2": 0.01}, seed=3)
    assert x[ode.names.index("m2_2")] == 0.01
    with pytest.raises(StateError, match="not realisable"):
        random_start(ode, 1000, init={"m1_1": 0.9, "m1_2": 0.9})   # |w_1 projection| > 1
    with pytest.raises(StateError, match="not an overlap"):
        random_start(ode, 1000, init={"m3_1": 0.1})
    with pytest.raises(StateError, match="--at NAME=VALUE"):
        Model(DERIVATIONS / "staircase_K2.toml", gen).solve(0.05, 1000, m0=0.1)


def test_staircase_directions_escape_one_after_the_other(gen):
    """y = z*_1 + z*_1 z*_2: direction 1 (information exponent 1) escapes first; direction 2
    can only be learnt once direction 1 is (its term is a product with z*_1). Both end at
    the teacher (M = I, Q[1,2] = 0), a stable fixed point with zero loss."""
    res = Model(DERIVATIONS / "staircase_K2.toml", gen).solve(0.05, 1000)
    t1, t2 = res["direction_escape_times"]
    assert t1 is not None and t2 is not None and t1 < t2
    assert res["escape_time"] == pytest.approx(t1)
    fp = res["fixed_point"]
    assert fp["m1_1"] == pytest.approx(1, abs=1e-6) and fp["m2_2"] == pytest.approx(1, abs=1e-6)
    assert abs(fp["m1_2"]) < 1e-6 and abs(fp["q1_2"]) < 1e-6
    assert res["stable"] and res["loss"][-1] < 1e-8
    # the JSON records the start it used
    assert set(res["initial_state"]) == set(res["overlaps"])


def test_committee_plateau_then_specialisation(gen):
    """The K = K* = 2 erf committee from a small random start: first an unspecialised plateau
    (every student unit overlaps both teacher units about equally), then specialisation to a
    permutation of the teacher (M a permutation matrix, Q = I, zero loss) at a stable point."""
    res = Model(DERIVATIONS / "committee_erf_K2.toml", gen).solve(0.5, 1000)
    t = np.array(res["t"])
    M = {k: np.array(v) for k, v in res["overlaps"].items() if k[0] == "m"}
    tau = res["escape_time"]
    assert tau is not None and tau > 50
    mid = (t > 0.2 * tau) & (t < 0.6 * tau)
    assert mid.sum() > 5
    # the plateau: all four overlaps of order 0.4 and within 0.1 of each other
    stack = np.array([M[k][mid] for k in ("m1_1", "m1_2", "m2_1", "m2_2")])
    assert np.all(stack > 0.2) and np.all(np.ptp(stack, axis=0) < 0.1)
    fp = res["fixed_point"]
    big = sorted(abs(fp[k]) for k in ("m1_1", "m1_2", "m2_1", "m2_2"))
    assert big[:2] == pytest.approx([0, 0], abs=1e-6)
    assert big[2:] == pytest.approx([1, 1], abs=1e-6)
    assert fp["q1_1"] == pytest.approx(1, abs=1e-6) and fp["q2_2"] == pytest.approx(1, abs=1e-6)
    assert res["stable"] and res["loss"][-1] < 1e-8


def test_sde_quartiles_contain_the_ode_escape(gen):
    """The finite-d SDE of the staircase from the same start: its escape-time quartiles over 200
    paths contain the ODE escape time (d = 1000)."""
    model = Model(DERIVATIONS / "staircase_K2.toml", gen)
    tau = model.solve(0.05, 1000)["escape_time"]
    sde = model.sde(0.05, 1000, runs=200, seed=1)
    q1, q3 = sde["quartiles"]
    assert sde["escaped_fraction"] == 1.0 and q1 <= tau <= q3
    assert sde["initial_state"] == model.solve(0.05, 1000)["initial_state"]


def test_cli_solve_json_and_drift_only_refusal(gen, capsys):
    code = main(["solve", str(DERIVATIONS / "staircase_K2.toml"), "--eta", "0.05", "--d",
                 "1000", "--at", "m2_2=0.02", "--start-seed", "4", "--out", str(gen), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["initial_state"]["m2_2"] == 0.02 and out["start_seed"] == 4
    assert len(out["direction_escape_times"]) == 2
    # the K = 3 committee's module is drift-only ([derivation] diffusion = false): the SDE
    # refuses
    code = main(["sde", str(DERIVATIONS / "committee_erf_K3.toml"), "--eta", "0.5", "--d",
                 "1000", "--runs", "4", "--out", str(gen)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("ssi: error:")
    assert "diffusion = false" in err[0]
    # an unrealisable start: one line, exit 2
    code = main(["solve", str(DERIVATIONS / "staircase_K2.toml"), "--eta", "0.05", "--d",
                 "1000", "--at", "q1_2=1.5", "--out", str(gen)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1 and "not realisable" in err[0]


def _step0(res, names, s):
    """The overlaps of seed s at step 0 of a simulation (its random start)."""
    return {k: float(res.overlaps[k][s, 0]) for k in names}


def test_committee_ode_and_sde_escapes_agree_with_the_simulator(gen, capsys):
    """The K = K* = 2 erf committee at eta = 0.5, d = 1000, 16 seeds of the exact reduced
    chain (the law of the d-dimensional SGD, tests/test_multi_simulate.py): the ODE started from
    each seed's own random start escapes the plateau (theta = 0.7, above the plateau's
    overlaps of about 0.45) with a median inside the simulator's quartiles, and the simulator's
    median lies inside the ODE's quartiles. The start dominates the spread: the symmetric
    plateau is left at a rate set by the initial asymmetry. `ssi sde --random-starts` (every
    path from its own random-like start, 40 paths, dt = 0.2): the simulator's median lies
    inside its quartiles and its median inside the simulator's."""
    model = Model(DERIVATIONS / "committee_erf_K2.toml", gen)
    res = model.simulate(0.5, 1000, 400_000, seeds=16, seed=1, method="reduced",
                         stop_when_escaped=True, threshold=0.7)
    sim = res.escape_times["escape"]
    assert np.all(np.isfinite(sim))
    names = model.overlaps
    ode = np.array([model.solve(0.5, 1000, threshold=0.7,
                                init=_step0(res, names, s))["escape_time"] for s in range(16)])
    sq1, smed, sq3 = np.percentile(sim, [25, 50, 75])
    oq1, omed, oq3 = np.percentile(ode, [25, 50, 75])
    assert sq1 <= omed <= sq3 and oq1 <= smed <= oq3
    code = main(["sde", str(DERIVATIONS / "committee_erf_K2.toml"), "--eta", "0.5", "--d",
                 "1000", "--runs", "40", "--dt", "0.2", "--threshold", "0.7", "--seed", "5",
                 "--random-starts", "--out", str(gen), "--json"])
    sde = json.loads(capsys.readouterr().out)
    assert code == 0 and sde["escaped_fraction"] == 1.0 and sde["random_starts"]
    assert sde["initial_state"] is None and sde["dt"] == 0.2
    q1, q3 = sde["quartiles"]
    assert q1 <= smed <= q3 and sq1 <= sde["median"] <= sq3, (sde, (sq1, smed, sq3))


def test_staircase_simulator_agrees_on_the_order_of_escapes(gen):
    """The staircase at eta = 0.05, d = 1000, 16 seeds: in the simulator too direction 1
    escapes before direction 2 (every seed), and the ODE's escape times per direction, started
    from each seed's start, have medians within the seeds' quartiles."""
    model = Model(DERIVATIONS / "staircase_K2.toml", gen)
    res = model.simulate(0.05, 1000, 60_000, seeds=16, seed=2, method="reduced")
    dirs = np.asarray(res.direction_escape_times)            # (K, seeds)
    assert np.all(np.isfinite(dirs)) and np.all(dirs[0] < dirs[1])
    names = model.overlaps
    ode = np.array([model.solve(0.05, 1000, init=_step0(res, names, s))["direction_escape_times"]
                    for s in range(16)]).T                     # (K, seeds)
    for k in range(2):
        q1, q3 = np.percentile(dirs[k], [25, 75])
        assert q1 <= np.median(ode[k]) <= q3, (k, np.median(ode[k]), q1, q3)


@pytest.mark.parametrize("command", ["max-lr"])  # sie: leaps instead (tests/test_leap.py)
def test_single_direction_analyses_refuse_several_directions(command, gen, capsys):
    code = main([command, str(DERIVATIONS / "staircase_K2.toml"), "--out", str(gen)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1 and "teacher.directions" in err[0]


@pytest.mark.parametrize("extra,word", [(["--random-starts"], "several directions"),
                                        (["--dt", "0"], "dt = 0"),
                                        (["--dt", "nan"], "dt = nan")])
def test_sde_options_refused_in_one_line(extra, word, gen, capsys):
    """--random-starts needs several directions; --dt must be a positive number."""
    code = main(["sde", str(DERIVATIONS / "he2_L1.toml"), "--eta", "0.05", "--d", "1000",
                 "--runs", "4", "--out", str(gen)] + extra)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("ssi: error:") and word in err[0]


def test_sde_random_starts_differ_per_path(gen):
    """With random_starts every path has its own start: the staircase's escape times spread
    more than from one start (same noise seed), and path i's start is start_seed + i's."""
    model = Model(DERIVATIONS / "staircase_K2.toml", gen)
    one = model.sde(0.05, 1000, runs=64, seed=3)
    many = model.sde(0.05, 1000, runs=64, seed=3, random_starts=True)
    assert many["random_starts"] and many["initial_state"] is None
    assert one["initial_state"] is not None and "random_starts" not in one
    assert many["quartiles"] != one["quartiles"]
