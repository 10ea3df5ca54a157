"""What the example scripts share: their command line (--out DIR, --quick) and figures."""
from __future__ import annotations

import argparse
from pathlib import Path

#: where the examples write generated modules and figures unless told otherwise (git-ignored)
DEFAULT_OUT = Path(__file__).resolve().parent / "output"


def command_line(doc: str, quick_help: str) -> argparse.ArgumentParser:
    """A parser with --out DIR (generated modules in DIR/generated, figures in DIR) and --quick;
    the first line of the script's docstring is its description."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help="folder for generated modules and figures (default examples/output)")
    ap.add_argument("--quick", action="store_true", help=quick_help)
    return ap


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save(fig, path: Path) -> None:
    """Lay out, write and close a figure, and say where it went."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    print("figure:", path)
