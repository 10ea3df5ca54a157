"""Figures (matplotlib, the optional `plot` extra): what people would rather look at."""
from __future__ import annotations

from pathlib import Path

from .errors import SSIError

PHASE_COLOURS = {"plateau": "#dddddd", "escape": "#ffe0b0", "alignment": "#d0e8ff",
                 "converged": "#d8f0d0"}


def check_png(path) -> Path:
    """A .png output path whose folder exists (checked before any work is done)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise SSIError(f"--plot {path}: expected a .png file name")
    if not path.parent.exists():
        raise SSIError(f"--plot {path}: folder {path.parent} does not exist")
    return path


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SSIError("plots need matplotlib: pip install 'ssi-symbolic[plot]'") from None
    return plt


def trajectory_figure(result: dict, path, title: str | None = None) -> Path:
    """Overlaps and population loss against t = steps/d, phases shaded, escape marked."""
    plt = _pyplot()
    path = check_png(path)
    fig, (ax, axl) = plt.subplots(2, 1, figsize=(7, 6), sharex=True,
                                  gridspec_kw={"height_ratios": [2, 1]})
    t = result["t"]
    for ph in result.get("phases", []):
        for a in (ax, axl):
            a.axvspan(ph["start"], ph["end"], color=PHASE_COLOURS.get(ph["name"], "#eeeeee"),
                      alpha=0.6, lw=0)
        ax.text((ph["start"] + ph["end"]) / 2, 1.02, ph["name"], ha="center", va="bottom",
                fontsize=8, transform=ax.get_xaxis_transform())
    for name, vals in result["overlaps"].items():
        ax.plot(t, vals, label=name)
    if result.get("escape_time") is not None:
        ax.axvline(result["escape_time"], color="k", ls="--", lw=0.8,
                   label=f"escape t = {result['escape_time']:.4g}")
    ax.axhline(result.get("threshold", 0.5), color="grey", ls=":", lw=0.8)
    ax.set_ylabel("overlap")
    ax.legend(loc="best", fontsize=8)
    axl.plot(t, result["loss"], color="C3")
    axl.set_ylabel(f"population loss ({result.get('loss_kind', 'square')})")
    axl.set_xlabel("t = steps / d")
    fig.suptitle(title or f"{result.get('spec', '')}: eta = {result.get('eta')}, "
                 f"d = {result.get('d')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
