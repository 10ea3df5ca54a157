"""`ssi sweep` (issue 14): grids, per-point seeds, the tidy CSV, resume, failing points, the CLI's
errors, Ctrl-C, and the same table from a local run and from a real Dask cluster (also when a
worker is killed mid-sweep)."""
import csv
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import ssi_symbolic as ssi
from ssi_symbolic.analysis.sweep import run as sweep_run
from ssi_symbolic.analysis.sweep.grid import as_grids, parse_grid, point_seed, points
from ssi_symbolic.analysis.sweep.run import SweepInterrupted
from ssi_symbolic.cli import main
from ssi_symbolic.errors import SSIError
from ssi_symbolic.model.spec import load_spec

from .conftest import DERIVATIONS

HE2 = str(DERIVATIONS / "he2_L1.toml")
COLUMNS_2D = ["eta", "d", "quantity", "value", "method", "seeds", "status", "wall_s",
              "spec_hash", "settings_hash", "point_seed"]


def _strip(rows):
    """The rows without wall_s (the only column that differs between two runs)."""
    return [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]


def _csv(path):
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


# ------------------------------------------------------------------------------------------
# grids and seeds
# ------------------------------------------------------------------------------------------

def test_grid_ranges_include_both_ends_and_lists_keep_their_order():
    name, vals = parse_grid("eta=0.02:0.3:15")
    assert name == "eta" and len(vals) == 15
    assert vals[0] == 0.02 and vals[-1] == 0.3
    assert np.allclose(np.diff(vals), 0.02)
    assert parse_grid("d=1e3,1e4,1e5") == ("d", [1000.0, 10000.0, 100000.0])
    assert parse_grid("d=1e5, 1e3") == ("d", [100000.0, 1000.0])
    name, vals = parse_grid("d=1e3:1e5:3:log")
    assert vals[0] == 1e3 and vals[-1] == 1e5 and math.isclose(vals[1], 1e4)
    assert parse_grid("eta=0.1") == ("eta", [0.1])
    assert parse_grid("eta=0.1:0.1:1") == ("eta", [0.1])
    grids = as_grids(["eta=0.1:0.3:3", "d=1e3,1e4"])
    pts = points(grids)
    assert len(pts) == 6 and pts[0] == {"eta": 0.1, "d": 1e3} and pts[1] == {"eta": 0.1, "d": 1e4}
    assert as_grids({"eta": [0.1, 0.2]}) == [("eta", [0.1, 0.2])]


@pytest.mark.parametrize("text", ["eta", "eta=", "eta=a:b:3", "eta=0.1:0.2:x", "eta=0.1:0.2",
                                  "eta=0.1:0.2:1", "eta=0.1:0.2:0", "d=1e3:1e5:3:lin",
                                  "d=0:1e5:3:log", "eta=0.1,0.1", "eta=0.1,nan", "1x=1,2"])
def test_bad_grids_are_one_line_errors(text):
    with pytest.raises(SSIError) as err:
        parse_grid(text)
    assert "\n" not in str(err.value) and str(err.value).startswith("--grid")


def test_point_seeds_are_deterministic_and_depend_on_seed_and_coordinates():
    a = point_seed(0, {"eta": 0.1, "d": 1000.0})
    assert a == point_seed(0, {"d": 1e3, "eta": 0.1})              # order and spelling free
    assert 0 <= a < 2 ** 63
    others = {point_seed(1, {"eta": 0.1, "d": 1000.0}), point_seed(0, {"eta": 0.2, "d": 1000.0}),
              point_seed(0, {"eta": 0.1, "d": 1001.0}), point_seed(0, {"eta": 0.1})}
    assert a not in others and len(others) == 4
    # the same in a fresh interpreter (no dependence on Python's hash randomisation)
    code = ("from ssi_symbolic.analysis.sweep.grid import point_seed;"
            "print(point_seed(0, {'eta': 0.1, 'd': 1000.0}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"})
    assert int(out.stdout) == a


# ------------------------------------------------------------------------------------------
# a local sweep against direct calls
# ------------------------------------------------------------------------------------------

def test_local_ode_sweep_equals_direct_solves(gen, tmp_path, capsys):
    out = tmp_path / "sweep.csv"
    res = ssi.sweep(HE2, ["eta=0.05:0.25:3", "d=1e3,1e4"],
                    "escape_time,alignment_time,loss,max_lr", out=out, out_dir=gen, workers=2)
    assert res["executor"] == "local" and res["computed"] == 6 and res["resumed"] == 0
    rows = _csv(out)
    assert rows[0] == COLUMNS_2D
    assert len(rows) == 1 + 6 * 4
    model = ssi.Model(HE2, gen)
    lr = model.max_lr(d=1000)["max_lr"]
    got = {(r["eta"], r["d"], r["quantity"]): r for r in res["rows"]}
    etas = res["grid"]["eta"]
    assert etas[0] == 0.05 and etas[-1] == 0.25 and math.isclose(etas[1], 0.15)
    for eta in etas:
        for d in (1000.0, 10000.0):
            direct = model.solve(eta=eta, d=d)           # independent: the `ssi solve` path
            assert got[(eta, d, "escape_time")]["value"] == direct["escape_time"]
            assert got[(eta, d, "alignment_time")]["value"] == direct["alignment_time"]
            assert got[(eta, d, "loss")]["value"] == direct["loss"][-1]
            assert math.isclose(got[(eta, d, "max_lr")]["value"], lr, rel_tol=1e-12)
    assert all(r["status"] == "ok" and r["method"] == "ode" and r["seeds"] == 0
               for r in res["rows"])
    # grid order (first variable slowest, quantities in the order given), in the CSV too
    assert [(r["eta"], r["d"]) for r in res["rows"][::4]] == [
        (e, d) for e in etas for d in (1000.0, 10000.0)]
    assert [r["quantity"] for r in res["rows"][:4]] == ["escape_time", "alignment_time", "loss",
                                                        "max_lr"]
    assert [row[:4] for row in rows[1:]] == [[repr(r["eta"]), repr(r["d"]), r["quantity"],
                                              repr(r["value"])] for r in res["rows"]]
    # the CLI's --json gives the same rows (here read back from the CSV: nothing recomputed)
    code = main(["sweep", HE2, "--grid", "eta=0.05:0.25:3", "--grid", "d=1e3,1e4", "--quantity",
                 "escape_time,alignment_time,loss,max_lr", "--out", str(out), "--generated",
                 str(gen), "--json"])
    cli = json.loads(capsys.readouterr().out)
    assert code == 0 and cli["computed"] == 0 and cli["resumed"] == 6
    assert cli["rows"] == res["rows"]


def test_sweeps_over_L_and_parameters_use_the_variant_specs(gen, tmp_path):
    spec = DERIVATIONS / "tied_network_he2_L2.toml"
    res = ssi.sweep(spec, ["L=1,3"], "escape_time", eta=0.05, d=1000, out_dir=gen, workers=1)
    for row in res["rows"]:
        variant = load_spec(spec).with_length(row["L"])
        direct = ssi.Model(variant, gen / "variants").solve(eta=0.05, d=1000)
        assert row["value"] == direct["escape_time"]
    assert (gen / "variants" / "tied_network_he2_L2_L3_drift_only.py").exists()
    # a spec parameter swept (noisy_linear_pe: alpha, with positional overlaps e1, e2)
    pe = DERIVATIONS / "noisy_linear_pe.toml"
    res = ssi.sweep(pe, ["alpha=0.2,0.8"], "escape_time,positional_escape_time,loss",
                    eta=0.1, d=1000, out_dir=gen, workers=1)
    model = ssi.Model(pe, gen)
    assert res["rows"][0]["value"] != res["rows"][3]["value"]
    for row in res["rows"]:
        direct = model.solve(eta=0.1, d=1000, params={"alpha": row["alpha"]})
        want = direct["loss"][-1] if row["quantity"] == "loss" else direct[row["quantity"]]
        assert row["value"] == want or (want is None and row["status"].startswith("no "))


def test_batch_is_swept(gen, tmp_path):
    from ssi_symbolic.model.spec import make_spec
    res = ssi.sweep(HE2, ["batch=1,2"], "escape_time", eta=0.3, d=1000, out_dir=gen, workers=1)
    direct2 = ssi.Model(make_spec("he2_L1_b2", 1, "He(2, z1) / sqrt(2)", batch=2),
                        tmp_path).solve(eta=0.3, d=1000)
    direct1 = ssi.Model(HE2, gen).solve(eta=0.3, d=1000)
    assert [r["value"] for r in res["rows"]] == [direct1["escape_time"], direct2["escape_time"]]


def test_sde_and_simulate_points_match_direct_calls_with_the_point_seed(gen):
    res = ssi.sweep(HE2, ["eta=0.1,0.2"], "escape_time,escaped_fraction", method="sde",
                    runs=40, d=1000, seed=3, out_dir=gen, workers=1)
    model = ssi.Model(HE2, gen)
    for row in res["rows"]:
        seed = point_seed(3, {"eta": row["eta"]})
        assert row["point_seed"] == seed and row["seeds"] == 40
        tau = model.solve(eta=row["eta"], d=1000)["escape_time"]
        sde = model.sde(eta=row["eta"], d=1000, runs=40, seed=seed, t_max=4 * tau)
        want = sde["median"] if row["quantity"] == "escape_time" else sde["escaped_fraction"]
        assert row["value"] == want
    res = ssi.sweep(HE2, ["eta=0.2"], "escape_time,semantic_escape_time", method="simulate",
                    runs=3, d=100, t_max=40, seed=5, out_dir=gen, workers=1)
    seed = point_seed(5, {"eta": 0.2})
    sim = model.simulate(eta=0.2, d=100, steps=4000, seeds=3, seed=seed)
    med = float(np.median(np.where(np.isnan(sim.escape_times["escape"]), np.inf,
                                   sim.escape_times["escape"])))
    assert [r["value"] for r in res["rows"]] == [med, med]      # L = 1: semantic = escape
    assert res["rows"][0]["seeds"] == 3
    # the reduced simulator (MATH.md 10), where this version's simulator has it
    import inspect
    from ssi_symbolic.numeric.simulate import simulate
    args = (HE2, ["eta=0.2"], "escape_time")
    opts = dict(method="simulate", simulator="reduced", runs=3, d=100, t_max=40, seed=5,
                out_dir=gen, workers=1)
    if "method" not in inspect.signature(simulate).parameters:
        with pytest.raises(SSIError, match="no reduced method"):
            ssi.sweep(*args, **opts)
        return
    res = ssi.sweep(*args, **opts)
    sim = model.simulate(eta=0.2, d=100, steps=4000, seeds=3, seed=seed, method="reduced",
                         stop_when_escaped=True)
    med = float(np.median(np.where(np.isnan(sim.escape_times["escape"]), np.inf,
                                   sim.escape_times["escape"])))
    assert res["rows"][0]["value"] == med and res["simulator"] == "reduced"


# ------------------------------------------------------------------------------------------
# resume, failing points, Ctrl-C
# ------------------------------------------------------------------------------------------

class _Counter:
    """evaluate_point wrapped: counts the points computed; raises KeyboardInterrupt at call
    number `interrupt_at` (1-based) when set."""

    def __init__(self, monkeypatch, interrupt_at=None):
        self.calls, self.interrupt_at = 0, interrupt_at
        self.real = sweep_run.evaluate_point
        monkeypatch.setattr(sweep_run, "evaluate_point", self)

    def __call__(self, task, sources, base):
        self.calls += 1
        if self.interrupt_at == self.calls:
            raise KeyboardInterrupt
        return self.real(task, sources, base)


def test_resume_computes_only_the_missing_points(gen, tmp_path, monkeypatch):
    out = tmp_path / "r.csv"
    args = dict(grid=["eta=0.05:0.25:3", "d=1e3,1e4"], quantities="escape_time,loss",
                out=out, workers=1)
    model = ssi.Model(HE2, gen)
    counter = _Counter(monkeypatch, interrupt_at=4)
    with pytest.raises(SweepInterrupted, match="3 of 6 points written"):
        model.sweep(**args)
    assert counter.calls == 4
    rows = _csv(out)                       # a valid partial table: header + 3 points
    assert rows[0][:2] == ["eta", "d"] and len(rows) == 1 + 3 * 2
    counter = _Counter(monkeypatch)
    res = model.sweep(**args)
    assert counter.calls == 3 and res["computed"] == 3 and res["resumed"] == 3
    full = res["rows"]
    # delete two points' rows (and one quantity of a third): only those are computed again
    mid = repr(full[2]["eta"])              # 0.15000000000000002 (np.linspace)
    kept = [r for r in _csv(out)[1:] if not (r[0] in ("0.05", "0.25") and r[1] == "1000.0")
            and not (r[0] == mid and r[1] == "10000.0" and r[2] == "loss")]
    with open(out, "w", newline="") as fh:
        csv.writer(fh).writerows([COLUMNS_2D] + kept)
    counter = _Counter(monkeypatch)
    res = model.sweep(**args)
    assert counter.calls == 3 and res["computed"] == 3
    assert _strip(res["rows"]) == _strip(full)
    counter = _Counter(monkeypatch)
    assert model.sweep(**args)["computed"] == 0 and counter.calls == 0
    # other settings are other rows: a new threshold computes everything, keeps the old rows
    counter = _Counter(monkeypatch)
    res = model.sweep(**args, threshold=0.4)
    assert counter.calls == 6 and len(_csv(out)) == 1 + 2 * 12
    assert all(r["settings_hash"] != full[0]["settings_hash"] for r in res["rows"])


def test_failing_points_are_rows_with_the_reason(gen, tmp_path):
    out = tmp_path / "f.csv"
    res = ssi.sweep(HE2, ["eta=0.1,0.5"], "escape_time,alignment_time,loss", d=1000, out=out,
                    out_dir=gen, workers=1)
    by = {(r["eta"], r["quantity"]): r for r in res["rows"]}
    assert by[(0.1, "escape_time")]["status"] == "ok"
    for q in ("escape_time", "alignment_time"):           # eta above max_lr = 1/3
        assert by[(0.5, q)]["value"] is None
        assert by[(0.5, q)]["status"].startswith("no escape: the dynamics converge")
    assert by[(0.5, "loss")]["status"] == "ok"
    assert any(r[2] == "" and r[5].startswith("no escape") for r in _csv(out)[1:])
    # no escape before t_max (SDE), and a StateError of the simulator (d below L + r + 2)
    res = ssi.sweep(HE2, ["eta=0.1"], "escape_time,escaped_fraction", method="sde", runs=20,
                    d=1000, t_max=10, out_dir=gen, workers=1)
    assert res["rows"][0]["status"].startswith("no escape:") and res["rows"][1]["status"] == "ok"
    res = ssi.sweep(HE2, ["d=2,100"], "escape_time", method="simulate", runs=2, eta=0.2,
                    t_max=5, out_dir=gen, workers=1)
    assert res["rows"][0]["status"].startswith("error: d:") and res["rows"][0]["value"] is None
    assert res["rows"][1]["status"] in ("ok",) or res["rows"][1]["status"].startswith("no esc")


def test_ctrl_c_exits_130_and_leaves_a_valid_partial_table(gen, tmp_path):
    out = tmp_path / "int.csv"
    cmd = [sys.executable, "-m", "ssi_symbolic", "sweep", HE2, "--grid", "eta=0.02:0.3:20",
           "--grid", "d=1e3:1e5:20:log", "--out", str(out), "--generated", str(gen)]
    # as from a shell: SIGINT at its default even when this process ignores it (a pytest
    # worker can inherit SIG_IGN, and Python then installs no KeyboardInterrupt handler)
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and p.poll() is None:
            if out.exists() and len(out.read_text().splitlines()) >= 6:
                break
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert err.strip().startswith("ssi: sweep interrupted:") and "run the same command" in err
    rows = _csv(out)
    assert rows[0] == COLUMNS_2D and 5 <= len(rows) - 1 < 400
    assert all(len(r) == len(COLUMNS_2D) and r[6] == "ok" for r in rows[1:])


# ------------------------------------------------------------------------------------------
# the command line and the figure
# ------------------------------------------------------------------------------------------

BAD = [
    (["--grid", "eta=0.1:0.2:x", "--d", "1000"], "count"),
    (["--grid", "eta=0.1,0.2", "--grid", "eta=0.3", "--d", "1000"], "given twice"),
    (["--grid", "nope=1,2", "--eta", "0.1", "--d", "1000"], "unknown variable 'nope'"),
    (["--grid", "eta=0.1,0.2", "--d", "1000", "--quantity", "speed"], "unknown quantity"),
    (["--grid", "eta=0.1,0.2", "--d", "1000", "--quantity", "alignment_time", "--method",
      "sde"], "not computed by --method sde"),
    (["--grid", "eta=0.1,0.2"], "give --d D"),
    (["--grid", "eta=0.1,0.2", "--d", "1000", "--param", "c=1"], "unknown parameter"),
    (["--grid", "eta=-0.1,0.2", "--d", "1000"], "must be > 0"),
    (["--grid", "eta=0.1,0.2", "--d", "1000", "--plot", "x.jpg"], ".png"),
    (["--grid", "eta=0.1", "--grid", "d=1e3", "--eta", "0.1"], "give one of them"),
    (["--grid", "d=100.5,200", "--eta", "0.1", "--method", "simulate"], "integer dimension"),
    (["--grid", "eta=0.1", "--d", "1000", "--runs", "0", "--method", "sde"], "--runs"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[m for _, m in BAD])
def test_cli_errors_are_one_line_exit_2_and_write_nothing(argv, message, gen, tmp_path,
                                                           capsys):
    out = tmp_path / "bad.csv"
    code = main(["sweep", HE2, *argv, "--out", str(out), "--generated", str(gen)])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ssi: error:"), err
    assert message in lines[0]
    assert not out.exists() and not list(tmp_path.iterdir())


def test_cli_refuses_a_table_of_another_sweep_and_a_missing_scheduler(gen, tmp_path, capsys):
    out = tmp_path / "other.csv"
    out.write_text("x,quantity\n1,loss\n")
    code = main(["sweep", HE2, "--grid", "eta=0.1", "--d", "1000", "--out", str(out),
                 "--generated", str(gen)])
    err = capsys.readouterr().err
    assert code == 2 and "are not this sweep's" in err and out.read_text() == "x,quantity\n1,loss\n"
    code = main(["sweep", HE2, "--grid", "eta=0.1", "--d", "1000", "--out",
                 str(tmp_path / "sub" / "a.csv"), "--generated", str(gen)])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    code = main(["sweep", HE2, "--grid", "eta=0.1", "--d", "1000", "--out",
                 str(tmp_path / "a.txt"), "--generated", str(gen)])
    assert code == 2 and "expected a .csv" in capsys.readouterr().err


def test_without_dask_the_local_default_runs_and_scheduler_is_one_error(gen, tmp_path,
                                                                        monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "distributed", None)     # as if dask were not installed
    res = ssi.sweep(HE2, ["eta=0.1,0.2"], "escape_time", d=1000, out_dir=gen, workers=2)
    assert res["executor"] == "local" and all(r["status"] == "ok" for r in res["rows"])
    out = tmp_path / "s.csv"
    code = main(["sweep", HE2, "--grid", "eta=0.1,0.2", "--d", "1000", "--out", str(out),
                 "--generated", str(gen), "--scheduler", "tcp://127.0.0.1:1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pip install 'ssi-symbolic[cluster]'" in err[0]
    assert not out.exists()


def test_a_worker_of_another_version_stops_the_sweep(gen):
    plan = sweep_run.prepare(sweep_run.plan_sweep(HE2, ["eta=0.1"], d=1000, out_dir=gen))
    task = sweep_run._task(plan, 0, {"eta": 0.1}, ["escape_time"])
    from ssi_symbolic.analysis.sweep.quantities import WorkerMismatch, evaluate_point
    res = evaluate_point(task, plan.sources, str(gen / "w"))
    assert res["values"]["escape_time"][1] == "ok"
    with pytest.raises(WorkerMismatch, match="install the same version"):
        evaluate_point({**task, "version": "0.0.0"}, plan.sources, str(gen / "w"))


def test_progress_bar_redraws_one_line():
    import io
    buf = io.StringIO()
    bar = sweep_run._Bar("sweep he2_L1", 4, stream=buf)
    bar.update(0, force=True)
    bar.update(2, force=True)
    bar.close(4)
    text = buf.getvalue()
    assert text.count("\r") == 3 and text.endswith("\n") and "4/4 points" in text


def test_figures_lines_heat_maps_and_a_slice(gen, tmp_path):
    pytest.importorskip("matplotlib")
    one = ssi.sweep(HE2, ["eta=0.05:0.3:4"], "escape_time,loss", d=1000, out_dir=gen,
                    workers=1, plot=tmp_path / "one.png")
    two = ssi.sweep(HE2, ["eta=0.05,0.1", "d=1e3,1e4"], "escape_time", out_dir=gen, workers=1,
                    plot=tmp_path / "two.png")
    three = ssi.sweep(HE2, ["eta=0.05,0.1", "d=1e3,1e4", "threshold=0.4,0.5"], "escape_time",
                      out_dir=gen, workers=1, plot=tmp_path / "three.png")
    for r in (one, two, three):
        assert os.path.getsize(r["plot"]) > 5000
    assert one["plot_note"] is None and two["plot_note"] is None
    assert "threshold = 0.4" in three["plot_note"]


# ------------------------------------------------------------------------------------------
# a real Dask cluster on 127.0.0.1
# ------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Cluster:
    """`dask scheduler` and two `dask worker --nthreads 1 --no-nanny` processes."""

    def __init__(self, folder):
        self.port = _free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.procs = []
        dask = [sys.executable, "-m", "dask"]
        log = open(folder / "dask.log", "w")
        self.procs.append(subprocess.Popen(
            dask + ["scheduler", "--host", "127.0.0.1", "--port", str(self.port),
                    "--no-dashboard"], stdout=log, stderr=log, cwd=folder))
        self.workers = [subprocess.Popen(
            dask + ["worker", self.address, "--nthreads", "1", "--no-nanny", "--no-dashboard",
                    "--host", "127.0.0.1", "--name", f"w{i}", "--local-directory",
                    str(folder / f"w{i}")], stdout=log, stderr=log, cwd=folder)
            for i in range(2)]
        self.procs += self.workers
        from distributed import Client
        with Client(self.address, timeout="30s") as c:
            c.wait_for_workers(2, timeout=60)

    def close(self):
        """Stop the workers, then the scheduler (SIGTERM, SIGKILL after 5 s)."""
        for group in (self.workers, self.procs[:1]):
            for p in group:
                if p.poll() is None:
                    p.terminate()
            for p in group:
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


@pytest.fixture
def cluster(tmp_path):
    pytest.importorskip("distributed")
    c = None
    try:
        c = _Cluster(tmp_path)
        yield c
    finally:
        if c is not None:
            c.close()


def test_dask_cluster_gives_the_table_of_the_local_run(cluster, gen, tmp_path):
    args = dict(grid=["eta=0.1,0.2", "d=1e3,1e4"], quantities="escape_time,escaped_fraction,loss",
                method="sde", runs=60, seed=7, out_dir=gen)
    remote = ssi.sweep(HE2, **args, out=tmp_path / "dask.csv", scheduler=cluster.address)
    local = ssi.sweep(HE2, **args, out=tmp_path / "local.csv", workers=2)
    assert remote["executor"].startswith("dask") and local["executor"] == "local"
    assert remote["computed"] == local["computed"] == 4
    assert _strip(remote["rows"]) == _strip(local["rows"])
    cut = lambda rows: [r[:7] + r[8:] for r in rows]         # the CSVs, without wall_s
    assert cut(_csv(tmp_path / "dask.csv")) == cut(_csv(tmp_path / "local.csv"))


def test_dask_worker_killed_mid_sweep_gives_the_same_table(cluster, gen, tmp_path):
    # SDE points of about a second each: the kill lands while the other worker is busy
    argv = ["sweep", HE2, "--grid", "eta=0.06:0.16:3", "--grid", "d=1e3,1e4", "--method", "sde",
            "--runs", "1500", "--seed", "11", "--generated", str(gen), "--json"]
    out = tmp_path / "killed.csv"
    cmd = [sys.executable, "-m", "ssi_symbolic", *argv, "--out", str(out), "--scheduler",
           cluster.address]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and p.poll() is None:
            if out.exists() and len(out.read_text().splitlines()) >= 2:
                break
            time.sleep(0.02)
        rows_at_kill = len(out.read_text().splitlines()) - 1
        cluster.workers[1].send_signal(signal.SIGKILL)
        cluster.workers[1].wait(timeout=10)
        still_running = p.poll() is None
        stdout, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert still_running and rows_at_kill < 6          # the sweep was mid-way at the kill
    remote = json.loads(stdout)
    local = sweep_run.sweep(HE2, ["eta=0.06:0.16:3", "d=1e3,1e4"], method="sde", runs=1500,
                            seed=11, out_dir=gen, workers=2)
    assert remote["computed"] == 6
    assert _strip(remote["rows"]) == _strip(local["rows"])
