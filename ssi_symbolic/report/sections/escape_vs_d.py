"""Section 3: the escape time against log d for an SIE-1 and an SIE-2 target (ODE, SDE and,
in the full report, the simulator), with the scaling expected from the leading drift and the
fits of it."""
from __future__ import annotations

import math
import time

import numpy as np

from ..context import Context, Section
from ..figures import pyplot, save
from ..fits import fit_log, fit_sqrt, median_inf
from ..format import fmt, table
from ..settings import THETA, Settings

TITLE = "Escape time versus the dimension d"
ESCAPE_SPECS = ("linear", "he2_L1")


def _simulations(ctx: Context, name: str, spec, ode, eta: float, method: str = "full",
                 skipped: list | None = None) -> list:
    """The simulator's escape times at settings.escape_sim_ds[name] (method "full", the
    d-dimensional simulator) or settings.escape_reduced_ds[name] (method "reduced", the exact
    chain of MATH.md 10: the numba engine when Numba is installed, else the NumPy one, which
    skips the d above settings.escape_reduced_numpy_max_d and lists them in `skipped`), none
    when the settings give no seeds: one row per d."""
    from ...numeric.ode import initial_state, solve
    from ...numeric.simulate import simulate
    s = ctx.settings
    ds_of, seeds = ((s.escape_sim_ds, s.escape_sim_seeds) if method == "full" else
                    (s.escape_reduced_ds, s.escape_reduced_seeds))
    sim_ds = tuple(ds_of.get(name, ())) if seeds else ()
    engine = "numpy"
    if method == "reduced":
        from ...numeric.compiled import numba_available
        if numba_available() and not spec.multi:
            engine = "numba"       # the compiled chain: the same law, ~100x less per step
        else:
            too_big = [int(d) for d in sim_ds if d > s.escape_reduced_numpy_max_d]
            if too_big and skipped is not None:
                skipped.extend(too_big)
            sim_ds = tuple(d for d in sim_ds if d <= s.escape_reduced_numpy_max_d)
    sim_rows = []
    t0 = time.monotonic()
    for i, d in enumerate(sim_ds, 1):
        x0 = initial_state(ode, d)
        tau = solve(ode, x0, theta=THETA, n_grid=20).escape_time
        steps = int(math.ceil(3 * tau * d))
        res = simulate(spec, eta, int(d), steps, seeds=seeds, seed=s.seed + i,
                       theta=THETA, out_dir=ctx.generated, progress=ctx.progress.tty,
                       stop_when_escaped=True, record_every=max(1, steps // 50),
                       method=method, engine=engine, records_after_escape=False)
        e = np.asarray(res.escape_times["escape"], dtype=float)
        fin = e[np.isfinite(e)]
        sim_rows.append({"d": int(d), "escape_times": e, "median": median_inf(e),
                         "quartiles": ([float(q) for q in np.percentile(fin, [25, 75])]
                                       if fin.size == e.size else None),
                         "escaped": int(np.isfinite(e).sum()), "seeds": res.seeds,
                         "seconds": res.wall_time, "method": method, "engine": engine})
        ctx.progress.item(f"{name} {method} simulations over d", i, len(sim_ds), t0)
    return sim_rows


def escape_vs_d_numbers(ctx: Context) -> dict:
    """For each model of ESCAPE_SPECS: the ODE escape time and the SDE median and quartiles on
    settings.escape_ds, the simulator's medians, the fits and the expected law. Returns
    {"numbers": {model: ...} (report.json), "c": {model: the coefficient c of the leading drift
    dm/dt ~ c m^p}}."""
    from ...numeric.ode import initial_state, leading_drift, solve
    from ...analysis.hermite import sie
    from ...numeric.sde import simulate_sde
    s = ctx.settings
    eta = s.escape_eta
    nums, coefficients = {}, {}
    for name in ESCAPE_SPECS:
        spec, ode = ctx.model(name, eta)
        k = sie(spec.teacher, spec.L)["sie"]
        p1, a1, p2, a2 = leading_drift(ode.mod, ode.params)
        ds = np.array(s.escape_ds, dtype=float)
        ode_t, sde_med, sde_q = [], [], []
        t0 = time.monotonic()
        for i, d in enumerate(ds, 1):
            x0 = initial_state(ode, d)
            ode_t.append(solve(ode, x0, theta=THETA, n_grid=20).escape_time)
            summ = simulate_sde(ode, d, x0, runs=s.escape_runs, theta=THETA,
                                seed=s.seed + i).summary()
            sde_med.append(summ["median"])
            sde_q.append(summ["quartiles"])
            ctx.progress.item(f"{name} ODE + SDE over d", i, len(ds), t0)
        ode_t = np.array([np.nan if v is None else v for v in ode_t])
        sde_m = np.array([np.nan if v is None else v for v in sde_med])
        sim_rows = _simulations(ctx, name, spec, ode, eta)
        red_skipped: list = []
        red_rows = _simulations(ctx, name, spec, ode, eta, "reduced", red_skipped)
        fit_ode, fit_sde = fit_log(ds, ode_t), fit_log(ds, sde_m)
        fit_sim = fit_log([r["d"] for r in sim_rows], [r["median"] for r in sim_rows])
        fit_red = fit_log([r["d"] for r in red_rows], [r["median"] for r in red_rows])
        # expected scaling from the leading drift along m, dm/dt ~ c m^p with c = eta a1 (+
        # eta^2 a2 when of the same power), started at m0 = d^-1/2:
        #   p = 0 (SIE 1): t = t_inf - m0 / c + ..., a constant plus k d^-1/2 with k = -1/c;
        #   p = 1 (SIE 2): t = ln(theta / m0) / c + ... = a + b ln d with b = 1 / (2 c).
        c = eta * a1 + (eta * eta * a2 if p2 == p1 else 0.0)
        fit_ode_sqrt, fit_sde_sqrt = fit_sqrt(ds, ode_t), fit_sqrt(ds, sde_m)
        if p1 == 0:
            expected = {"law": "t = t_inf + k d^-1/2 -> const (SIE 1)", "k": -1.0 / c, "c": c}
        elif p1 == 1:
            expected = {"law": "t = a + b ln d (SIE 2)", "b": 1.0 / (2.0 * c), "c": c}
        else:
            expected = {"law": f"t ~ d^{(p1 - 1) / 2:g} (SIE {p1 + 1})"}
        span = (ode_t[np.isfinite(ode_t)].max() / ode_t[np.isfinite(ode_t)].min()
                if np.isfinite(ode_t).any() else None)
        coefficients[name] = c
        nums[name] = {"sie": k, "leading_power": p1, "a1": a1, "a2": a2, "eta": eta, "d": ds,
                      "ode_escape_time": ode_t, "sde_median": sde_m, "sde_quartiles": sde_q,
                      "sde_runs": s.escape_runs, "simulation": sim_rows, "fit_ode": fit_ode,
                      "reduced": red_rows, "fit_reduced": fit_red,
                      "reduced_skipped_d": red_skipped,
                      "fit_sde": fit_sde, "fit_sim": fit_sim, "fit_ode_sqrt": fit_ode_sqrt,
                      "fit_sde_sqrt": fit_sde_sqrt, "expected": expected,
                      "ode_max_over_min": span}
    return {"numbers": nums, "c": coefficients}


def _sde_fit_curve(n: dict):
    """(label, a, slope, t(d, a, slope)) of the fit drawn through the SDE medians: t_inf +
    k d^-1/2 for SIE 1, a + b ln d for SIE 2; None otherwise."""
    if n["leading_power"] == 0:
        return ("t_inf + k / sqrt(d)", n["fit_sde_sqrt"]["a"], n["fit_sde_sqrt"]["k"],
                lambda dd, a, k: a + k / np.sqrt(dd))
    if n["leading_power"] == 1:
        return ("a + b ln d", n["fit_sde"]["a"], n["fit_sde"]["b"],
                lambda dd, a, b: a + b * np.log(dd))
    return None


def escape_vs_d_figure(ctx: Context, data: dict) -> list:
    """One panel per model: ODE, SDE medians with quartile bars, simulated seeds and medians,
    and the SDE fit, against d on a log axis. Returns [the PNG path]."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(ESCAPE_SPECS), figsize=(5.2 * len(ESCAPE_SPECS), 4))
    for ax, (name, n) in zip(np.atleast_1d(axes), data["numbers"].items()):
        ds, sde_m, sde_q, sim_rows = n["d"], n["sde_median"], n["sde_quartiles"], n["simulation"]
        ax.plot(ds, n["ode_escape_time"], "k.-", label="ODE")
        lo = sde_m - np.array([np.nan if q[0] is None else q[0] for q in sde_q])
        hi = np.array([np.nan if q[1] is None else q[1] for q in sde_q]) - sde_m
        ax.errorbar(ds, sde_m, yerr=[lo, hi], fmt="o", color="C0", ms=4, capsize=3,
                    label=f"SDE median, quartiles ({n['sde_runs']} paths)")
        for r in sim_rows:
            ax.plot([r["d"]] * len(r["escape_times"]), r["escape_times"], ".", color="0.6",
                    ms=3)
        if sim_rows:
            ax.plot([r["d"] for r in sim_rows], [r["median"] for r in sim_rows], "s",
                    color="C3", ms=6, mfc="none", label="simulation median (dots: seeds)")
        red = n["reduced"]
        if red:
            ax.plot([r["d"] for r in red], [r["median"] for r in red], "D", color="C2", ms=5,
                    mfc="none", label=f"reduced simulator median ({red[0]['seeds']} seeds)")
        curve = _sde_fit_curve(n)
        if curve is not None and curve[1] is not None:
            dd = np.geomspace(ds.min(), ds.max(), 50)
            ax.plot(dd, curve[3](dd, curve[1], curve[2]), color="C0", ls=":", lw=1,
                    label=f"SDE fit {curve[0]}")
        ax.set_xscale("log")
        ax.set_xlabel("d")
        ax.set_ylabel("escape time t = steps / d")
        ax.set_title(f"{name} (SIE {n['sie']}), eta = {n['eta']}", fontsize=10)
        ax.legend(fontsize=8)
    return [save(plt, fig, ctx.figure("escape_vs_d"))]


def _law(n: dict, c: float, s: Settings) -> str:
    """The expected law of one model with the fitted coefficients."""
    p1 = n["leading_power"]
    fit_ode, fit_sde, fit_sim = n["fit_ode"], n["fit_sde"], n["fit_sim"]
    if p1 == 0:
        fit_ode_sqrt, fit_sde_sqrt = n["fit_ode_sqrt"], n["fit_sde_sqrt"]
        return (f"t -> const, t = t_inf + k d^(-1/2) with k = -1/c = {-1 / c:.4g}. Fit: ODE "
                f"t_inf = {fmt(fit_ode_sqrt['a'])}, k = {fmt(fit_ode_sqrt['k'])}; SDE "
                f"median t_inf = {fmt(fit_sde_sqrt['a'])}, k = {fmt(fit_sde_sqrt['k'])}. "
                f"For comparison with SIE 2, t = a + b ln d gives b = "
                f"{fmt(fit_ode['b'])} (ODE), {fmt(fit_sde['b'])} (SDE)")
    if p1 == 1:
        return (f"t = a + b ln d with b = 1/(2c) = {1 / (2 * c):.4g}. Fit: ODE b = "
                f"{fmt(fit_ode['b'])} (a = {fmt(fit_ode['a'])}), SDE median b = "
                f"{fmt(fit_sde['b'])} (a = {fmt(fit_sde['a'])})"
                + (f", simulator medians b = {fmt(fit_sim['b'])} ({fit_sim['points']} "
                   f"values of d, {s.escape_sim_seeds} seeds each)"
                   if fit_sim["b"] is not None else "")
                + (f", reduced-simulator medians b = {fmt(n['fit_reduced']['b'])} "
                   f"({n['fit_reduced']['points']} values of d, {s.escape_reduced_seeds} seeds "
                   f"each; {100 * (n['fit_reduced']['b'] * 2 * c - 1):+.1f} % from 1/(2c))"
                   if n["fit_reduced"]["b"] is not None else ""))
    return n["expected"]["law"] + f". Fit t = a + b ln d: ODE b = {fmt(fit_ode['b'])}"


def _rows(name: str, n: dict) -> list:
    """The table rows of one model, by d: ODE, SDE and (where run) simulator."""
    ds, ode_t, sde_m, sde_q = n["d"], n["ode_escape_time"], n["sde_median"], n["sde_quartiles"]
    cell = lambda r: f"{fmt(r['median'])} ({r['escaped']}/{r['seeds']} seeds)"
    by_d = {r["d"]: cell(r) for r in n["simulation"]}
    red_d = {r["d"]: cell(r) for r in n["reduced"]}
    mine = [[f"`{name}`", int(d), fmt(ode_t[j]), fmt(sde_m[j]),
             f"[{fmt(sde_q[j][0])}, {fmt(sde_q[j][1])}]", by_d.pop(int(d), ""),
             red_d.pop(int(d), "")] for j, d in enumerate(ds)]
    for dd in sorted(set(by_d) | set(red_d)):
        mine.append([f"`{name}`", dd, "", "", "", by_d.get(dd, ""), red_d.get(dd, "")])
    return sorted(mine, key=lambda row: row[1])


def escape_vs_d_text(data: dict, s: Settings) -> str:
    """The section's markdown: the expected law and the fits per model, and the table."""
    nums, lines, rows = data["numbers"], [], []
    for name, n in nums.items():
        c, span, ds = data["c"][name], n["ode_max_over_min"], n["d"]
        lines.append(f"- `{name}` (SIE {n['sie']}; near the origin dm/dt ~ c "
                     f"m^{n['leading_power']}, c = {c:.4g}): expected {_law(n, c, s)}"
                     + (f"; the ODE escape time changes by a factor {span:.4g} over the "
                        f"{ds.max() / ds.min():.0f}-fold range of d." if span else "."))
        rows += _rows(name, n)
    sim_note = ("Simulator medians at a few d are included." if any(
        nums[n]["simulation"] for n in nums) else "The d-dimensional simulator is not run here "
                                                  "(--quick).")
    if any(nums[n]["reduced"] for n in nums):
        engines = sorted({r.get("engine", "numpy") for n in nums.values()
                          for r in n["reduced"]})
        sim_note += (f" The exact reduced simulator (MATH.md section 10: the same law, a cost "
                     f"per step independent of d; {' and '.join(engines)} engine) gives "
                     f"medians over {s.escape_reduced_seeds} seeds up to larger d.")
    for name, n in nums.items():
        if n.get("reduced_skipped_d"):
            sim_note += (f" Not run for `{name}` at d = "
                         f"{', '.join(str(d) for d in n['reduced_skipped_d'])}: Numba is not "
                         f"installed (pip install -e \".[fast]\"), and the NumPy engine (about "
                         f"0.1 ms per step) would take hours there.")
    return (
        f"Escape time (|(m, e)| >= {THETA}) from m0 = 1/sqrt(d) at eta = {s.escape_eta}, against "
        f"log d: ODE, and the median and quartiles of the SDE ({s.escape_runs} paths per d). "
        f"{sim_note} The expected law follows from the leading drift along m near the origin, "
        "dm/dt ~ c m^(SIE-1) (`dynamics.leading_drift`).\n\n" + "\n".join(lines) + "\n\n"
        + table(["model", "d", "ODE", "SDE median", "SDE quartiles", "simulation median",
                 "reduced simulator median"], rows))


def section_escape_vs_d(ctx: Context) -> Section:
    """Escape time against log d for an SIE-1 and an SIE-2 target, with the fitted scaling."""
    data = escape_vs_d_numbers(ctx)
    return Section("escape_vs_d", TITLE, figures=escape_vs_d_figure(ctx, data),
                   text=escape_vs_d_text(data, ctx.settings), numbers=data["numbers"])


__all__ = ["section_escape_vs_d", "escape_vs_d_numbers", "escape_vs_d_figure",
           "escape_vs_d_text", "ESCAPE_SPECS"]
