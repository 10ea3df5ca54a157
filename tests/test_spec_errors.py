"""Bad input gives a one-line error naming the problem, a non-zero exit code, and writes nothing."""
import json
import os

import pytest

from ssi_symbolic.cli import main
from ssi_symbolic.errors import SpecError
from ssi_symbolic.model.spec import load_spec, make_spec

GOOD = """
name = "ok"
L = 2
[teacher]
link = "z1 * z2"
"""


def _snapshot(folder):
    return sorted((p.relative_to(folder), p.stat().st_mtime_ns) for p in folder.rglob("*"))


def run_cli(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


BAD_SPECS = {
    "malformed TOML": ('name = "x"\nL = 2\n[teacher\nlink = "z1"\n', "malformed TOML"),
    "unknown name": ('name = "x"\nL = 2\n[teacher]\nlink = "z1 + foo"\n', "unknown name 'foo'"),
    "unknown function": ('name = "x"\nL = 1\n[teacher]\nlink = "bessel(z1)"\n',
                         "unknown function 'bessel'"),
    "z index beyond L": ('name = "x"\nL = 2\n[teacher]\nlink = "z1 + z3"\n',
                         "'z3' refers to token 3 but L = 2"),
    "shape mismatch": ('name = "x"\nL = 2\n[teacher]\nlink = "z1"\n'
                       '[student]\nlink = "Matrix([z1, z2])"\n', "does not match the teacher"),
    "positional rows": ('name = "x"\nL = 2\n[teacher]\nlink = "z1"\n'
                        '[student]\npositional = [[1.0], [-1.0], [0.0]]\n', "L = 2 rows"),
    "positional ragged": ('name = "x"\nL = 2\n[teacher]\nlink = "z1"\n'
                          '[student]\npositional = [[1.0, 2.0], [-1.0]]\n', "same length"),
    "missing teacher": ('name = "x"\nL = 2\n', "teacher.link: missing"),
    "bad L": ('name = "x"\nL = 0\n[teacher]\nlink = "z1"\n', "L: expected"),
    "bad name": ('name = "not a name"\nL = 1\n[teacher]\nlink = "z1"\n', "name: expected"),
    "reserved parameter": ('name = "x"\nL = 1\n[parameters]\nm = 1.0\n[teacher]\nlink = "z1"\n',
                           "parameters.m"),
    "negative noise": ('name = "x"\nL = 1\n[teacher]\nlink = "z1"\n[loss]\nnoise = -1.0\n',
                       "loss.noise"),
    "unknown loss": ('name = "x"\nL = 1\n[teacher]\nlink = "z1"\n[loss]\nkind = "hinge"\n',
                     "unknown loss 'hinge'"),
    "spherical not bool": ('name = "x"\nL = 1\n[teacher]\nlink = "z1"\n[training]\n'
                           'spherical = "yes"\n', "training.spherical"),
    "syntax error": ('name = "x"\nL = 1\n[teacher]\nlink = "z1 +* 2"\n', "cannot parse"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_spec_cli(case, tmp_path, capsys):
    """`ssi derive` on a bad spec: exit 2, one line naming file and problem, nothing written."""
    text, needle = BAD_SPECS[case]
    spec = tmp_path / "bad.toml"
    spec.write_text(text)
    out_dir = tmp_path / "gen"
    before = _snapshot(tmp_path)
    code, out, err = run_cli(["derive", str(spec), "--out", str(out_dir)], capsys)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert needle in lines[0]
    assert "bad.toml" in lines[0]
    assert _snapshot(tmp_path) == before
    assert not out_dir.exists()


@pytest.mark.parametrize("argv, needle", [
    (["--at", "m=0.9", "--at", "e=0.9"], "outside the unit ball"),
    (["--at", "m=1.5"], "outside the unit ball"),
    (["--at", "m=0.1", "--eta", "0"], "eta = 0.0"),
    (["--at", "m=0.1", "--eta", "-0.1"], "learning rate must be > 0"),
    (["--at", "m=0.1", "--d", "0.5"], "d = 0.5"),
    (["--at", "x=0.1"], "unknown overlap 'x'"),
    (["--at", "m=abc"], "not a number"),
    (["--at", "m=0.1", "--param", "nope=1"], "unknown parameter 'nope'"),
])
def test_bad_state_cli(argv, needle, tmp_path, capsys):
    """`ssi evaluate` with bad numbers: exit 2, one line naming the value, nothing generated."""
    spec = tmp_path / "ok.toml"
    spec.write_text(GOOD + '[student]\npositional = [[1.0], [-1.0]]\n')
    before = _snapshot(tmp_path)
    code, out, err = run_cli(["evaluate", str(spec), "--out", str(tmp_path / "gen"), "--json"]
                             + argv, capsys)
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1
    assert needle in err
    assert _snapshot(tmp_path) == before


def test_latex_out_must_be_tex(tmp_path, capsys):
    spec = tmp_path / "ok.toml"
    spec.write_text(GOOD)
    code, _, err = run_cli(["latex", str(spec), "--out", str(spec)], capsys)
    assert code == 2 and ".tex" in err
    assert spec.read_text() == GOOD  # the user's file is untouched


def test_missing_file(tmp_path, capsys):
    code, _, err = run_cli(["derive", str(tmp_path / "nope.toml"), "--out", str(tmp_path)],
                           capsys)
    assert code == 2 and "nope.toml" in err and "cannot read" in err


def test_one_bad_spec_among_many_writes_nothing(tmp_path, capsys, spec_files):
    """All specs are validated before any module is written."""
    bad = tmp_path / "bad.toml"
    bad.write_text(BAD_SPECS["unknown name"][0])
    out_dir = tmp_path / "gen"
    code, _, _ = run_cli(["derive", str(spec_files[0]), str(bad), "--out", str(out_dir)], capsys)
    assert code == 2
    assert not out_dir.exists()


def test_python_spec_errors():
    with pytest.raises(SpecError, match="'z2' refers to token 2 but L = 1"):
        make_spec("x", 1, "z1 + z2")
    with pytest.raises(SpecError, match="student.positional"):
        make_spec("x", 2, "z1", positional=[[1.0, 2.0]])


def test_good_spec_and_defaults(tmp_path, capsys):
    spec = tmp_path / "ok.toml"
    spec.write_text(GOOD)
    s = load_spec(spec)
    assert s.student == s.teacher and s.spherical and s.r == 0 and s.loss == "square"
    code, out, _ = run_cli(["evaluate", str(spec), "--at", "m=0.2", "--json",
                            "--out", str(tmp_path / "gen")], capsys)
    assert code == 0
    res = json.loads(out)
    assert res["overlaps"] == ["m"] and res["method"] == "exact"
    assert set(res) >= {"overlaps", "state", "loss", "drift", "drift_eta1", "drift_eta2",
                        "diffusion", "method"}
    assert os.path.exists(tmp_path / "gen" / "ok.py")
