"""LaTeX export: a standalone document that pdflatex compiles."""
import os
import shutil
import subprocess

import pytest
import sympy as sp

from ssi_symbolic.cli import main
from ssi_symbolic.symbolic.derive import derive
from ssi_symbolic.symbolic.latex import document
from ssi_symbolic.model.spec import load_spec

from .conftest import DERIVATIONS

PDFLATEX = shutil.which("pdflatex")
needs_pdflatex = pytest.mark.skipif(PDFLATEX is None and not os.environ.get("CI"),
                                    reason="pdflatex not installed (CI installs it)")


@needs_pdflatex
@pytest.mark.parametrize("name", ["tied_he2_pe", "relu_student_he2", "linear_plain"])
def test_pdflatex_compiles(name, tmp_path, capsys):
    """`ssi latex SPEC --out FILE` writes a document that pdflatex turns into a PDF."""
    assert PDFLATEX, "pdflatex is required in CI (.ci/run installs texlive-latex-base)"
    tex = tmp_path / f"{name}.tex"
    assert main(["latex", str(DERIVATIONS / f"{name}.toml"), "--out", str(tex)]) == 0
    proc = subprocess.run([PDFLATEX, "-interaction=nonstopmode", "-halt-on-error", tex.name],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert (tmp_path / f"{name}.pdf").stat().st_size > 1000


def test_document_holds_every_formula():
    """Every drift and covariance entry appears, in the order of the overlaps."""
    D = derive(load_spec(DERIVATIONS / "tied_he2_pe.toml"))
    text = document(D)
    assert text.startswith(r"\documentclass") and text.rstrip().endswith(r"\end{document}")
    for label in [r"F^{(1)}_{m}", r"F^{(2)}_{m}", r"F^{(1)}_{e}", r"F^{(2)}_{e}",
                  r"\mathrm{Cov}(G)_{m m}", r"\mathrm{Cov}(G)_{m e}", r"\mathrm{Cov}(G)_{e e}"]:
        assert label in text
    # the loss of this model is 2 - 2 m^2 + 2 e^2 + e^4 (see test_oracles for the derivation)
    assert sp.expand(D.population_loss - (2 - 2 * sp.Symbol("m", real=True) ** 2
                                          + 2 * sp.Symbol("e", real=True) ** 2
                                          + sp.Symbol("e", real=True) ** 4)) == 0


def test_latex_stdout(capsys):
    assert main(["latex", str(DERIVATIONS / "linear.toml")]) == 0
    out = capsys.readouterr().out
    assert r"\begin{document}" in out
