"""`ssi reproduce --quick`: the report, its figures and numbers checked against values that do not
come from the code under test (definitions, closed-form solutions of exact drifts).

The report is written into a temporary folder, from a temporary copy of generated/ (the command
derives every spec there; generated/ itself is never written by the tests)."""
import json
import math
import re
import shutil

import numpy as np
import pytest

from ssi_symbolic.cli import main
from ssi_symbolic.errors import SSIError

from .conftest import DERIVATIONS, GENERATED, copy_generated

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """Run `ssi reproduce --quick` once: (exit code, output folder, report.json)."""
    gen = copy_generated(tmp_path_factory.mktemp("generated"))
    out = tmp_path_factory.mktemp("results")
    code = main(["reproduce", "--quick", "--out", str(out), "--generated", str(gen),
                 "--derivations", str(DERIVATIONS)])
    data = json.loads((out / "report.json").read_text())
    return code, out, data


def test_report_and_every_figure(report):
    code, out, data = report
    assert code == 0, data["errors"]
    assert data["errors"] == []
    text = (out / "report.md").read_text()
    named = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert named, "the report names no figure"
    for rel in named:
        path = out / rel
        assert path.is_file(), rel
        assert path.read_bytes()[:8] == PNG_MAGIC, rel
        import matplotlib.image as mpimg
        img = mpimg.imread(path)
        assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    on_disk = {p.relative_to(out).as_posix() for p in (out / "figures").glob("*.png")}
    assert on_disk == set(named)
    # every section is in both files, with its figures listed in report.json
    from ssi_symbolic.report import SECTIONS
    keys = [fn.__name__.removeprefix("section_") for fn in SECTIONS]
    assert list(data["sections"]) == keys
    assert sorted(f for s in data["sections"].values() for f in s["figures"]) == sorted(named)
    for s in data["sections"].values():
        assert f"{s['title']}" in text


def test_every_spec_derived(report):
    _, _, data = report
    specs = data["sections"]["derivations"]["numbers"]["specs"]
    assert set(specs) == {p.stem for p in DERIVATIONS.glob("*.toml")}
    assert all(s["status"] in ("derived", "up to date") for s in specs.values()), specs


def test_sie_by_definition(report):
    """SIE from the definition: z1 z2 has no order-1 coefficient and E[z1 z2 He1(z1) He1(z2)]
    = 1; sum_l z_l has E[z1 He1(z1)] = 1; prod He_k_l(z_l) has its only coefficient at
    |alpha| = sum k_l; the He4 example: the paper's SIE 4 and flatness 2."""
    _, _, data = report
    rows = {r["spec"]: r for r in data["sections"]["static"]["numbers"]["targets"]}
    assert rows["ex_z1z2"]["sie"] == 2
    assert rows["ex_sum"]["sie"] == 1
    assert rows["ex_prod_he"]["sie"] == 1 + 2 + 3
    assert rows["ex_he1he4_he2he2"]["sie"] == 4
    assert rows["he4_example_pe"]["sie"] == 4 and rows["he4_example_pe"]["flatness"] == 2


def _tau_linear(eta, d, theta=0.5):
    """Closed form: dm/dt = eta (1 - m)(1 + b m), b = 1 - eta (the exact linear drift)."""
    b = 1 - eta
    G = lambda m: math.log((1 + b * m) / (1 - m)) / (1 + b)
    return (G(theta) - G(1 / math.sqrt(d))) / eta


def _tau_he2(eta, d, theta=0.5):
    """Closed form: dm/dt = c m (1 - m^2), c = eta (2 - 6 eta) (the exact He2/sqrt 2 drift)."""
    c = eta * (2 - 6 * eta)
    F = lambda m: math.log(m) - 0.5 * math.log(1 - m * m)
    return (F(theta) - F(1 / math.sqrt(d))) / c


def test_escape_times_match_closed_forms(report):
    _, _, data = report
    sec = data["sections"]["escape_vs_d"]["numbers"]
    for name, tau in (("linear", _tau_linear), ("he2_L1", _tau_he2)):
        eta = sec[name]["eta"]
        for d, t in zip(sec[name]["d"], sec[name]["ode_escape_time"]):
            assert t == pytest.approx(tau(eta, d), rel=1e-6), (name, d)
    # SIE 2: t = a + b ln d with b = 1 / (2 eta (2 - 6 eta)) up to the (1 - m0^2) term
    eta = sec["he2_L1"]["eta"]
    assert sec["he2_L1"]["fit_ode"]["b"] == pytest.approx(1 / (2 * eta * (2 - 6 * eta)),
                                                           rel=1e-2)
    # SIE 1: t -> const; t = t_inf + k / sqrt(d) with k = -1 / eta (drift eta at m = 0)
    b = 1 - sec["linear"]["eta"]
    t_inf = math.log((1 + b * 0.5) / 0.5) / (1 + b) / sec["linear"]["eta"]  # m0 = 0
    assert sec["linear"]["fit_ode_sqrt"]["a"] == pytest.approx(t_inf, rel=1e-2)
    assert sec["linear"]["fit_ode_sqrt"]["k"] == pytest.approx(-1 / sec["linear"]["eta"],
                                                              rel=5e-2)


def test_reduced_simulator_rows_bracket_the_ode(report):
    """The quick report runs the exact reduced simulator for he2_L1 at d = 1000 (64 seeds):
    every seed escapes and the closed-form ODE escape time lies between the simulated
    quartiles."""
    _, _, data = report
    he2 = data["sections"]["escape_vs_d"]["numbers"]["he2_L1"]
    rows = he2["reduced"]
    assert [r["d"] for r in rows] == [1000] and rows[0]["method"] == "reduced"
    assert rows[0]["escaped"] == rows[0]["seeds"] == 64
    q1, q3 = rows[0]["quartiles"]
    assert q1 <= _tau_he2(he2["eta"], 1000) <= q3, (q1, q3)


def test_trajectory_numbers(report):
    """The ODE escape time of he2_L1 in the trajectory section is the closed form; every model
    reports an SDE median and simulated escape times."""
    _, _, data = report
    sec = data["sections"]["trajectories"]["numbers"]
    he2 = sec["he2_L1"]
    assert he2["ode_escape_time"] == pytest.approx(_tau_he2(he2["eta"], he2["d"]), rel=1e-6)
    for name, r in sec.items():
        assert r["sde_median"] is not None and r["sde_median"] > 0, name
        assert len(r["sim_escape_times"]) == r["sim_seeds"], name


def test_learning_rate_limits(report):
    """Exact drifts: phase retrieval eta (4 - 24 eta) m (1 - m^2) -> 1/6; He2/sqrt 2
    eta (2 - 6 eta) m (1 - m^2) -> 1/3; linear: the fixed point m = 1 is stable for eta < 2."""
    _, _, data = report
    sec = data["sections"]["learning_rate"]["numbers"]
    assert sec["phase_retrieval"]["max_lr"] == pytest.approx(1 / 6, abs=1e-9)
    assert sec["phase_retrieval"]["fraction"] == "1/6"
    assert sec["he2_L1"]["max_lr"] == pytest.approx(1 / 3, abs=1e-9)
    assert sec["linear"]["max_lr"] == pytest.approx(2, rel=1e-6)
    taus = np.array(sec["phase_retrieval"]["ode_escape_time"], dtype=float)
    assert np.all(np.isfinite(taus))
    assert taus[-1] > 10 * taus.min()  # diverges towards the escape limit


def test_gain_section(report):
    """Both gain families (SIE 2 and SIE 1) are symmetric in the tokens: along m_1 = ... = m_L
    the untied student's O(eta) and O(eta^2) drifts are the tied one's divided by L (README), so
    the ODE gain is exactly L at a common eta and at each student's best eta. The simulator's
    gain range, recomputed here from its quartiles, holds L. The pathological targets: the tied
    student has no escape time, the untied one has."""
    _, _, data = report
    sec = data["sections"]["gain"]["numbers"]
    assert {f["sie"] for f in sec["families"].values()} == {1, 2}
    for name, fam in sec["families"].items():
        for key in ("same_eta", "best_eta"):
            for row in fam[key]["rows"]:
                assert row["gain"] == pytest.approx(row["L"], rel=1e-6), (name, key, row["L"])
        assert fam["simulator"], name
        for r in fam["simulator"]:
            (tq1, tq3), (uq1, uq3) = r["tied"]["sim_quartiles"], r["untied"]["sim_quartiles"]
            assert uq1 / tq3 <= r["L"] <= uq3 / tq1, (name, r)
    for p in sec["pathological"]:
        assert p["tied"]["escape_time"] is None and "zero leading drift" in p["tied"]["reason"]
        assert p["untied"]["escape_time"] > 0


def test_failing_spec_and_section_are_reported(tmp_path):
    """A spec that fails to derive and a section that raises are errors in the report (and
    exit code 2 with one line on the command line), never skipped."""
    from ssi_symbolic.report import Section, run_report, section_derivations
    der = tmp_path / "derivations"
    der.mkdir()
    shutil.copy(DERIVATIONS / "linear.toml", der / "linear.toml")
    (der / "broken.toml").write_text('name = "broken"\nL = 1\n[teacher]\nlink = "nosuch(z1)"\n')

    def section_boom(ctx):
        """A section that fails."""
        raise RuntimeError("boom")

    def section_ok(ctx):
        """A section that works."""
        return Section("ok", "Fine", text="fine")

    rep = run_report(out=tmp_path / "res", generated=tmp_path / "gen", derivations=der,
                     sections=[section_derivations, section_boom, section_ok], progress=False)
    assert any("broken.toml" in e for e in rep["errors"])
    assert any("boom" in e for e in rep["errors"])
    assert rep["sections"]["ok"]["errors"] == []
    text = (tmp_path / "res" / "report.md").read_text()
    assert "## Errors" in text and "broken.toml" in text and "boom" in text
    assert (tmp_path / "gen" / "linear.py").exists()


def test_cli_errors(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("")
    assert main(["reproduce", "--out", str(f), "--generated", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ssi: error:") and "--out" in err[0]


def test_missing_matplotlib_is_one_clear_error(tmp_path, monkeypatch):
    import sys
    from ssi_symbolic.report import run_report
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SSIError, match="matplotlib"):
        run_report(out=tmp_path / "res", generated=tmp_path / "gen", derivations=DERIVATIONS,
                   progress=False)
    assert not (tmp_path / "res").exists()


def test_sde_record_times(tmp_path):
    """simulate_sde(record_times=...) keeps every path's state at the requested times (the
    band of the trajectory figures): the start is x0, paths run on after escaping."""
    from ssi_symbolic.backends.files import load_module
    from ssi_symbolic.numeric.ode import OverlapODE, initial_state
    from ssi_symbolic.numeric.sde import simulate_sde
    shutil.copy(GENERATED / "linear.py", tmp_path / "linear.py")
    ode = OverlapODE(load_module(tmp_path / "linear.py"), 0.1)
    x0 = initial_state(ode, 1000)
    rec = np.linspace(0, 20, 11)
    res = simulate_sde(ode, 1000, x0, runs=50, t_max=20, record_times=rec, seed=3)
    assert res.paths.shape == (1, 50, 11)
    assert np.allclose(res.t_record, rec, atol=res.dt)
    assert np.all(res.paths[0, :, 0] == x0[0])
    assert np.all(np.isfinite(res.escape_times))            # every path escapes by t = 20
    assert np.all(res.paths[0, :, -1] > 0.9)                 # and goes on towards m = 1
    with pytest.raises(SSIError, match="record_times"):
        simulate_sde(ode, 1000, x0, runs=5, t_max=1, record_times=[0.5, 0.2])
