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


def test_auxiliary_form_rebuilds_the_entries():
    """The cse form of a large Cov(G) with orthant probabilities (the erf committee's): putting
    the definitions a_k back, in reverse order, gives every entry and every orthant argument
    again, and the long subexpressions got their own a_k."""
    from ssi_symbolic.symbolic.closed_forms import NormalOrthant
    from ssi_symbolic.symbolic.latex import SPLIT_CHARS, auxiliary_form
    q, m = sp.symbols("q m", positive=True)
    r = [(q + k) / (3 * q + m + 2 + k) for k in range(6)]
    O1 = NormalOrthant(0, 0, 0, 0, *r)
    O2 = NormalOrthant(0, 0, 0, 0, *r[::-1])
    orth = {O1: sp.Symbol("_orthant_1"), O2: sp.Symbol("_orthant_2")}
    long = sp.Add(*[sp.sqrt(q + k) * m ** k / (1 + q) ** k for k in range(1, 12)])
    once = [sp.Add(*[sp.sqrt(q + k + j) * m ** k / (2 + q) ** k for k in range(1, 12)])
            for j in (1, 2)]   # long sums used once: the cse leaves them, the split names them
    entries = [long * sp.Symbol("_orthant_1") + sp.asin(r[0]) * long ** 2,
               sp.Symbol("_orthant_2") * (long + m) - sp.sqrt(long) * once[0] * once[1]]
    assert len(str(once[0])) > SPLIT_CHARS
    repl, reduced, defs = auxiliary_form(entries, orth)
    assert len(repl) > 1 and len(reduced) == 2 and set(defs) == set(orth.values())

    at = {q: sp.Rational(7, 10), m: sp.Rational(-3, 10), sp.Symbol("_orthant_1"): 2,
          sp.Symbol("_orthant_2"): 3}

    def value(e):   # the definitions put back in reverse order, then numbers (30 digits)
        for s, v in reversed(repl):
            e = e.xreplace({s: v})
        return complex(sp.N(e.xreplace(at), 30))
    for got, want in zip(reduced, entries):
        assert abs(value(got) - value(want)) < 1e-20
    for a, o in orth.items():
        assert all(abs(value(x) - value(y)) < 1e-20 for x, y in zip(defs[o].args, a.args))
    assert any(str(s).startswith("_aux_split_") for s, _ in repl)   # the split was needed
    assert all(len(str(v)) <= SPLIT_CHARS for _, v in repl)
    assert all(len(str(t)) <= SPLIT_CHARS for e in reduced for t in sp.Add.make_args(e))
