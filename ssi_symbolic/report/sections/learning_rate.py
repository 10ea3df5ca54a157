"""Section 'learning_rate': the maximal learning rate of a few models (predict_max_lr), the ODE
escape time against eta up to it, and what the ODE does just above it."""
from __future__ import annotations

import time
from fractions import Fraction

import numpy as np

from ..context import Context, Section
from ..figures import pyplot, save
from ..format import fmt, one_line, table
from ..settings import THETA, Settings

TITLE = "The learning-rate limit"
LR_SPECS = ("phase_retrieval", "linear", "he2_L1")


def _fraction(lr) -> str | None:
    """lr as a small fraction "p/q" (denominator up to 1000, within 1e-8), else None."""
    if lr is None:
        return None
    f = Fraction(lr).limit_denominator(1000)
    if abs(float(f) - lr) < 1e-8 * max(1.0, abs(lr)):
        return f"{f.numerator}/{f.denominator}" if f.denominator != 1 else str(f.numerator)
    return None


def _escape_times(ctx: Context, name: str, lr: float, d: int) -> dict:
    """The ODE escape time on a grid of eta up to 0.99 lr (denser next to it), and the ODE at
    1.05 lr."""
    from ...numeric.ode import DynamicsError, initial_state, solve
    s = ctx.settings
    n_near = min(4, s.lr_points // 3)  # denser next to the limit
    etas = lr * np.concatenate([np.linspace(0.04, 0.9, s.lr_points - n_near),
                                1 - np.geomspace(0.06, 0.01, n_near)])
    taus, fails = [], 0
    for eta in etas:
        _, ode = ctx.model(name, float(eta))
        try:
            taus.append(solve(ode, initial_state(ode, d), theta=THETA,
                              n_grid=20).escape_time)
        except DynamicsError:
            taus.append(None)
            fails += 1
    taus = np.array([np.nan if v is None else v for v in taus])
    # just above the limit: what the ODE does there
    _, ode = ctx.model(name, 1.05 * lr)
    try:
        above = solve(ode, initial_state(ode, d), theta=THETA, n_grid=20)
        above_d = {"eta": 1.05 * lr, "escape_time": above.escape_time,
                   "fixed_point": above.fixed_point, "stable": above.stable,
                   "error": None}
    except DynamicsError as exc:
        above_d = {"eta": 1.05 * lr, "escape_time": None, "fixed_point": None,
                   "stable": None, "error": one_line(exc)}
    best = int(np.nanargmin(taus)) if np.isfinite(taus).any() else None
    return {"eta": etas, "ode_escape_time": taus, "failures": fails, "above_limit": above_d,
            "fastest_eta_on_grid": None if best is None else etas[best],
            "fastest_escape_time": None if best is None else taus[best]}


def learning_rate_numbers(ctx: Context) -> dict:
    """For each model of LR_SPECS: its maximal learning rate and, when there is one, the escape
    times up to it. Returns {"numbers": {model: ...}} (report.json)."""
    from ...analysis.predict import predict_max_lr
    d = ctx.settings.lr_d
    nums = {}
    t0 = time.monotonic()
    for i, name in enumerate(LR_SPECS, 1):
        res = predict_max_lr(ctx.spec_path(name), out_dir=ctx.generated)
        lr = res["max_lr"]
        entry = {"max_lr": lr, "fraction": _fraction(lr), "reason": res["reason"],
                 "leading_power": res.get("leading_power"), "a1": res.get("a1"),
                 "a2": res.get("a2"), "d": d}
        if lr is not None:
            entry.update(_escape_times(ctx, name, lr, d))
        nums[name] = entry
        ctx.progress.item("max-lr", i, len(LR_SPECS), t0)
    return {"numbers": nums}


def learning_rate_figure(ctx: Context, data: dict) -> list:
    """One panel per model: the ODE escape time against eta, and the limit. Returns [the PNG
    path]."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(LR_SPECS), figsize=(4.2 * len(LR_SPECS), 3.8))
    for ax, (name, entry) in zip(np.atleast_1d(axes), data["numbers"].items()):
        lr = entry["max_lr"]
        if lr is not None:
            ax.plot(entry["eta"], entry["ode_escape_time"], "o-", ms=3, color="C0",
                    label="ODE escape time")
            ax.axvline(lr, color="k", ls="--", lw=0.8, label=f"max eta = {lr:.4g}")
            ax.set_yscale("log")
            ax.set_xlim(0, 1.08 * lr)
        ax.set_xlabel("eta")
        ax.set_ylabel("ODE escape time t = steps / d")
        ax.set_title(f"{name} (d = {entry['d']})", fontsize=10)
        ax.legend(fontsize=8)
    return [save(plt, fig, ctx.figure("learning_rate"))]


def _above_limit(entry: dict) -> str:
    """What the ODE does at 1.05 times the limit, in words."""
    if entry["max_lr"] is None:
        return "-"
    above_d = entry["above_limit"]
    if above_d["error"]:
        return "leaves the ball"
    if above_d["escape_time"] is None:
        return "no escape"
    fp = ", ".join(f"{k} = {v:.3g}" for k, v in (above_d["fixed_point"] or {}).items())
    return (f"escapes at t = {above_d['escape_time']:.3g}, ends at {fp} "
            f"({'stable' if above_d['stable'] else 'unstable'})")


def learning_rate_text(data: dict, s: Settings) -> str:
    """The section's markdown: what the limit is, and the table of the models."""
    rows = []
    for name, entry in data["numbers"].items():
        fastest = (f"{entry['fastest_eta_on_grid']:.3g} (t = {entry['fastest_escape_time']:.3g})"
                   if entry.get("fastest_eta_on_grid") is not None else "-")
        rows.append([f"`{name}`", fmt(entry["max_lr"], ".10g"), entry["fraction"] or "-",
                     entry["reason"], fastest, _above_limit(entry)])
    return (
        "`predict_max_lr`: the largest eta for which the dynamics escape from m0 = 1/sqrt(d) "
        "(the O(eta^2) noise term of the drift must not cancel the O(eta) term) and the "
        "informative fixed point stays stable (Newton continuation in eta). \"fraction\" is the "
        "value recognised as a small fraction (within 1e-8). The last column is what the ODE "
        "does at 1.05 times the limit. The figure shows the ODE escape time from m0 = 1/sqrt(d), "
        f"d = {s.lr_d}, for eta up to 0.99 of the limit: it diverges at an escape limit (the "
        "drift at the origin vanishes) and stays finite at a stability limit.\n\n"
        + table(["model", "max eta", "fraction", "reason", "fastest eta on the grid",
                 "ODE at 1.05 max eta"], rows))


def section_learning_rate(ctx: Context) -> Section:
    """Maximal learning rate, and the ODE escape time against eta up to it."""
    data = learning_rate_numbers(ctx)
    return Section("learning_rate", TITLE, figures=learning_rate_figure(ctx, data),
                   text=learning_rate_text(data, ctx.settings), numbers=data["numbers"])


__all__ = ["section_learning_rate", "learning_rate_numbers", "learning_rate_figure",
           "learning_rate_text", "LR_SPECS"]
