"""The example scripts of examples/ run (with --quick, writing into a temporary folder) and
draw their figure."""
import subprocess
import sys

import pytest

from .conftest import ROOT

EXAMPLES = {
    "derive_new_variant.py": "new_variant.png",
    "ode_sde_simulation.py": "ode_sde_simulation.png",
    "phase_diagram.py": "phase_diagram.png",
}


@pytest.mark.parametrize("script", sorted(EXAMPLES))
def test_example_runs(script, tmp_path):
    pytest.importorskip("matplotlib")
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    figure = tmp_path / EXAMPLES[script]
    assert figure.is_file() and figure.stat().st_size > 1000
    assert "figure:" in proc.stdout
    assert (tmp_path / "generated").is_dir()          # generated modules went to --out
