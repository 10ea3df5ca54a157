"""The figures' plumbing: pyplot (matplotlib, Agg backend) and saving a figure as the report's
PNG."""
from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the Agg backend (an SSIError when matplotlib is missing)."""
    from ..plots import _pyplot
    return _pyplot()


def save(plt, fig, path: Path) -> Path:
    """Lay out `fig`, write it to `path` (PNG, 110 dpi), close it; returns `path`."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["pyplot", "save"]
