"""Every command on every shipped spec, with small sizes: it succeeds (and --json prints one JSON
object) or it refuses with exactly one `ssi: error:` line and exit code 2. Never a traceback, never
an internal error."""
import json

import pytest

from ssi_symbolic.cli import main

from .conftest import DERIVATIONS

SPECS = sorted(p.stem for p in DERIVATIONS.glob("*.toml"))


def _commands(spec, gen, tmp):
    s = str(DERIVATIONS / f"{spec}.toml")
    return {
        "evaluate": ["evaluate", s, "--out", gen, "--json"],
        "solve": ["solve", s, "--eta", "0.05", "--d", "1000", "--t-max", "50", "--out", gen,
                  "--json"],
        "sde": ["sde", s, "--eta", "0.05", "--d", "1000", "--runs", "8", "--t-max", "5",
                "--out", gen, "--json"],
        "simulate": ["simulate", s, "--eta", "0.05", "--d", "100", "--steps", "20",
                     "--seeds", "2", "--out", gen, "--json"],
        "sie": ["sie", s, "--out", gen, "--json"],
        "max-lr": ["max-lr", s, "--out", gen, "--json"],
        "fixed-points": ["fixed-points", s, "--eta", "0.05", "--out", gen, "--json"],
        "latex": ["latex", s, "--out", tmp / f"{spec}.tex"],
        "gain": ["gain", s, "--L", "1,2", "--d", "1000", "--out", tmp / "variants", "--json"],
        "landscape": ["landscape", s, "--out", gen, "--json"],
        "surface": ["surface", s, "--grid", "e=-1:1:5", "--grid", "m=-1:1:5",
                    "--out", tmp / f"{spec}.npz", "--generated", gen],
        "phase-diagram": ["phase-diagram", s, "--grid", "omega=0:1:3", "--grid", "a=0.5:1:2",
                          "--out", gen, "--json"],
    }


COMMANDS = list(_commands("x", "g", __import__("pathlib").Path("t")))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, gen):
    return gen, tmp_path_factory.mktemp("commands")


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("spec", SPECS)
def test_command_succeeds_or_refuses_in_one_line(spec, command, workdir, capsys):
    gen, tmp = workdir
    argv = [str(a) for a in _commands(spec, gen, tmp)[command]]
    code = main(argv)
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if code == 0:
        if "--json" in argv:
            json.loads(out)
        return
    assert code == 2, f"ssi {' '.join(argv)} exited {code}: {err}"
    errors = [ln for ln in lines if ln.startswith("ssi: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0] == lines[-1], err


def test_sde_runs_on_the_softmax_attention_model(gen, capsys):
    """The positional-semantic model (softmax attention backend) has an SDE: quartiles of the
    escape time (eta large enough that the paths escape within the horizon)."""
    code = main(["sde", str(DERIVATIONS / "positional_semantic.toml"), "--eta", "2",
                 "--d", "1000", "--runs", "16", "--t-max", "200", "--out", str(gen), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    res = json.loads(out)
    assert res["escaped_fraction"] > 0.5
    q1, q3 = res["quartiles"]
    assert q1 is not None and 0 < q1 <= res["median"] <= (q3 if q3 is not None else 1e300)
