"""Section 'phase_diagram': the regions of the positional-semantic attention model on an
(omega, a) grid, the transition curve omega_trans(a), and the analysis of a few points."""
from __future__ import annotations

import time

import numpy as np

from ..context import Context, Section
from ..format import fmt, table
from ..settings import Settings

TITLE = "Softmax attention: the positional-semantic phase diagram"
PHASE_SPEC = "positional_semantic"


def phase_diagram_numbers(ctx: Context) -> dict:
    """The phase diagram on settings.phase_omega x settings.phase_a points with the transition
    along omega, and the analysis at a = 1, omega = 0, 0.67, 1. Returns {"numbers":
    {"transition", "omega_trans_1", "points"} (report.json), "result": the phase_diagram
    result}."""
    from ...analysis.landscape import analyse, phase_diagram
    s = ctx.settings
    path_spec = ctx.spec_path(PHASE_SPEC)
    om = np.linspace(0, 1, s.phase_omega)
    aa = np.linspace(0.5, 1, s.phase_a)
    t0 = time.monotonic()
    res = phase_diagram(path_spec, [("omega", om), ("a", aa)], transition_along="omega",
                        out_dir=ctx.generated)
    ctx.progress.item("phase diagram", 1, 2, t0)
    points = []
    for omega, a in ((0.0, 1.0), (0.67, 1.0), (1.0, 1.0)):
        r = analyse(path_spec, {"omega": omega, "a": a}, out_dir=ctx.generated)
        points.append([omega, a, r["region"], r["initial_direction"],
                       f"(e, m) = ({r['global_minimum']['e']:.3f}, "
                       f"{r['global_minimum']['m']:.3f})"])
    ctx.progress.item("phase diagram", 2, 2, t0)
    at1 = [t["omega"] for t in res["transition"] if abs(t["a"] - 1) < 1e-12]
    return {"numbers": {"transition": res["transition"], "omega_trans_1": at1[0] if at1 else None,
                        "points": points}, "result": res}


def phase_diagram_figure(ctx: Context, data: dict) -> list:
    """The regions and the transition curve (analysis.landscape.phase_diagram_figure). Returns
    [the PNG path]."""
    from ...analysis.landscape import phase_diagram_figure as draw
    return [draw(data["result"], ctx.figure("phase_diagram"))]


def phase_diagram_text(data: dict, s: Settings) -> str:
    """The section's markdown: the command, omega_trans(1), and the table of the points."""
    res, nums = data["result"], data["numbers"]
    tr = [t for t in res["transition"] if t["omega"] is not None]
    at1 = nums["omega_trans_1"]
    return (
        f"`ssi phase-diagram derivations/{PHASE_SPEC}.toml --grid omega=0:1:{s.phase_omega} "
        f"--grid a=0.5:1:{s.phase_a} --transition omega` ({res['loss_kind']} loss "
        "1/2 ||y - y_hat||_F^2): the region of every grid point (MATH.md section 7) and the "
        "transition omega_trans(a) where the initial dynamics switch from semantic to "
        "positional (" + res["transition_method"] + "). omega_trans(1) = "
        + (fmt(at1, ".10g") if at1 is not None else "-")
        + f"; the transition exists for {len(tr)} of the {len(res['transition'])} values of a."
        "\n\n" + table(["omega", "a", "region", "initial dynamics", "global minimum"],
                       nums["points"]))


def section_phase_diagram(ctx: Context) -> Section:
    """Regions of the positional-semantic attention model on an (omega, a) grid with the
    transition curve omega_trans(a) (root finding on the exact Hessian at the origin)."""
    data = phase_diagram_numbers(ctx)
    return Section("phase_diagram", TITLE, figures=phase_diagram_figure(ctx, data),
                   text=phase_diagram_text(data, ctx.settings), numbers=data["numbers"])


__all__ = ["section_phase_diagram", "phase_diagram_numbers", "phase_diagram_figure",
           "phase_diagram_text", "PHASE_SPEC"]
