"""Section 2: ODE versus SDE versus simulated SGD for the He2 models, from m0 = 1/sqrt(d): the
escape times, one figure per model (the trajectories), and the table comparing them."""
from __future__ import annotations

import math
import time

import numpy as np

from ...errors import SSIError
from ..context import Context, Section
from ..figures import pyplot, save
from ..fits import median_inf
from ..format import fmt, table
from ..settings import THETA, Settings

TITLE = "ODE versus SDE versus simulation: the He2 models"
TRAJECTORY_SPECS = ("he2_L1", "tied_network_he2_L2", "tied_network_he2_L4")


def _stack_overlaps(names, overlaps) -> np.ndarray:
    """(n, seeds, T) from the simulator's {name: (seeds, T)}."""
    return np.stack([np.asarray(overlaps[k], dtype=float) for k in names])


def _relative(v, ref):
    """(v - ref) / ref, None when v is None or ref is not finite."""
    return (v - ref) / ref if v is not None and math.isfinite(ref) else None


def trajectories_numbers(ctx: Context) -> dict:
    """For each model of TRAJECTORY_SPECS: the ODE, the SDE (escape-time distribution and a
    recorded band) and the simulator. Returns {"numbers": {model: escape times and their
    comparison} (report.json), "curves": {model: the curves of its figure}}."""
    from ...numeric.ode import initial_state, solve
    from ...numeric.sde import simulate_sde
    from ...numeric.simulate import simulate
    s = ctx.settings
    d, eta = s.traj_d, s.traj_eta
    nums, curves = {}, {}
    for name in TRAJECTORY_SPECS:
        t_model = time.perf_counter()
        spec, ode = ctx.model(name, eta)
        x0 = initial_state(ode, d)
        tr = solve(ode, x0, theta=THETA)
        tau = tr.escape_time
        if tau is None:
            raise SSIError(f"{name}: the ODE does not escape at eta = {eta}, d = {d}")
        # the simulator: real d-dimensional SGD, until every seed has escaped (or the cap)
        steps = int(math.ceil(max(s.traj_cap, s.traj_span) * tau * d))
        if not ctx.progress.tty:  # the simulator draws its bar on a terminal only
            ctx.progress.line(f"  {name}: simulating d = {d}, {s.traj_seeds} seeds, at most "
                              f"{steps} steps ...")
        sim = simulate(spec, eta, d, steps, seeds=s.traj_seeds, seed=s.seed, theta=THETA,
                       out_dir=ctx.generated, progress=ctx.progress.tty,
                       record_every=max(1, int(1.5 * tau * d) // 300),
                       stop_when_escaped=True)
        r_sim = ode.radius(_stack_overlaps(ode.names, sim.overlaps))     # (seeds, T)
        esc_sim = np.asarray(sim.escape_times["escape"], dtype=float)
        sim_med = median_inf(esc_sim)
        n_esc = int(np.isfinite(esc_sim).sum())
        t_end = max(s.traj_span * tau, float(sim.t[-1]))
        tr_plot = solve(ode, x0, t_max=t_end, theta=THETA)
        # SDE: escape-time distribution (to every escape), and a recorded band up to t_end
        sde_esc = simulate_sde(ode, d, x0, runs=s.traj_runs, theta=THETA, seed=s.seed)
        summ = sde_esc.summary()
        rec = np.linspace(0.0, t_end, 240)
        band = simulate_sde(ode, d, x0, runs=s.traj_runs, t_max=t_end, theta=THETA,
                            seed=s.seed + 1, record_times=rec)
        r_sde = ode.radius(band.paths)                                   # (runs, T)
        q1, med, q3 = np.quantile(r_sde, [0.25, 0.5, 0.75], axis=0)
        curves[name] = {"t_sim": sim.t, "r_sim": r_sim, "t_sde": band.t_record,
                        "sde_q1": q1, "sde_median": med, "sde_q3": q3, "t_ode": tr_plot.t,
                        "r_ode": ode.radius(tr_plot.x), "positional": bool(spec.r)}
        nums[name] = {
            "d": d, "eta": eta, "theta": THETA, "t_end": t_end,
            "ode_escape_time": tau, "ode_alignment_time": tr.alignment_time,
            "ode_fixed_point": tr.fixed_point,
            "sde_median": summ["median"], "sde_quartiles": summ["quartiles"],
            "sde_escaped_fraction": summ["escaped_fraction"], "sde_runs": s.traj_runs,
            "sim_escape_times": esc_sim, "sim_median": sim_med, "sim_escaped": n_esc,
            "sim_seeds": sim.seeds, "sim_steps": steps,
            "ode_rel_error_vs_sim": _relative(tau, sim_med),
            "sde_rel_error_vs_sim": _relative(summ["median"], sim_med),
            "seconds": time.perf_counter() - t_model, "sim_seconds": sim.wall_time}
        ctx.progress.line(f"  {name}: ODE {tau:.3g}, SDE median {fmt(summ['median'])}, "
                          f"simulation median {fmt(sim_med)} "
                          f"({nums[name]['seconds']:.1f} s)")
    return {"numbers": nums, "curves": curves}


def trajectories_figures(ctx: Context, data: dict) -> list:
    """One figure per model: simulated seeds and their mean, the SDE quartile band and median,
    the ODE, the threshold and the ODE escape time. Returns the PNG paths."""
    plt = pyplot()
    paths = []
    for name, n in data["numbers"].items():
        c = data["curves"][name]
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for k in range(c["r_sim"].shape[0]):
            ax.plot(c["t_sim"], c["r_sim"][k], color="0.6", lw=0.6,
                    label="simulation, per seed" if k == 0 else None)
        ax.plot(c["t_sim"], c["r_sim"].mean(axis=0), color="C3", lw=1.6,
                label=f"simulation, mean of {n['sim_seeds']} seeds")
        ax.fill_between(c["t_sde"], c["sde_q1"], c["sde_q3"], color="C0", alpha=0.25,
                        label=f"SDE quartiles ({n['sde_runs']} paths)")
        ax.plot(c["t_sde"], c["sde_median"], color="C0", lw=1.4, label="SDE median")
        ax.plot(c["t_ode"], c["r_ode"], color="k", lw=1.6, ls="--", label="ODE")
        ax.axhline(THETA, color="grey", ls=":", lw=0.8)
        ax.axvline(n["ode_escape_time"], color="k", lw=0.6, ls="--")
        ax.set_xlim(0, n["t_end"])
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("t = steps / d")
        ax.set_ylabel("|(m, e)|" if c["positional"] else "|m|")
        ax.set_title(f"{name}: eta = {n['eta']}, d = {n['d']}, m0 = 1/sqrt(d)", fontsize=10)
        ax.legend(loc="upper left", fontsize=8)
        paths.append(save(plt, fig, ctx.figure(f"trajectories_{name}")))
    return paths


def trajectories_text(data: dict, s: Settings) -> str:
    """The section's markdown: what is compared, and the table of escape times."""
    rows = []
    for name, n in data["numbers"].items():
        q = n["sde_quartiles"]
        rows.append([f"`{name}`", fmt(n["ode_escape_time"]), fmt(n["sde_median"]),
                     f"[{fmt(q[0])}, {fmt(q[1])}]", fmt(n["sim_median"]),
                     f"{n['sim_escaped']}/{n['sim_seeds']}",
                     fmt(n["ode_rel_error_vs_sim"], "+.1%"),
                     fmt(n["sde_rel_error_vs_sim"], "+.1%")])
    return (
        f"Spherical online SGD at eta = {s.traj_eta}, d = {s.traj_d}, from m0 = 1/sqrt(d): the "
        f"ODE (d -> infinity drift), the median and quartiles of {s.traj_runs} Euler-Maruyama "
        f"paths of the finite-d SDE, and {s.traj_seeds} seeds of real d-dimensional SGD "
        f"(`simulate`, run until every seed has escaped or {s.traj_cap} times the ODE escape "
        f"time, the end of the plot); the vertical line is the ODE escape time. Escape: first t "
        f"with |(m, e)| >= {THETA}; the simulator's median counts seeds not escaped within the "
        "run as infinite. At finite d the plateau of an SIE-2 "
        "target ends at a random time: the SDE band shows the spread the seeds are expected "
        "to have around the ODE.\n\n"
        + table(["model", "ODE escape t", "SDE median", "SDE quartiles", "simulation median",
                 "escaped seeds", "ODE vs sim", "SDE vs sim"], rows))


def section_trajectories(ctx: Context) -> Section:
    """ODE, SDE band and simulated SGD from m0 = 1/sqrt(d) for the He2 models."""
    data = trajectories_numbers(ctx)
    return Section("trajectories", TITLE, figures=trajectories_figures(ctx, data),
                   text=trajectories_text(data, ctx.settings), numbers=data["numbers"])


__all__ = ["section_trajectories", "trajectories_numbers", "trajectories_figures",
           "trajectories_text", "TRAJECTORY_SPECS"]
