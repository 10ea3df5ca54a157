"""Section 'gain': tied versus untied students, the gain tau_untied / tau_tied against the
sequence length L (ODE at a common eta and at each student's best eta, its power law, the
simulator's check), for an SIE-2 and an SIE-1 family; and the pathological targets."""
from __future__ import annotations

import time

import numpy as np

from ..context import Context, Section
from ..figures import pyplot, save
from ..format import fmt, table
from ..settings import THETA, Settings

TITLE = "Tied versus untied students: the sequence-length gain"
#: the families whose gain the report shows (their links hold for every L: tsum, L): the
#: sum-of-He2 target of the paper (SIE 2) and its SIE-1 twin with a He1 part per token
GAIN_SPECS = ("tied_network_he2_L2", "tied_network_he12_L2")
#: the pathological targets (a token-symmetric tied student cannot learn them)
PATHOLOGICAL_SPECS = ("pathological_linear", "pathological_he2")


def _gain_family(ctx: Context, name: str, variants) -> dict:
    """One family's gain: its teacher's SIE, the ODE gain at a common eta and at each student's
    best eta, and the simulator's check at settings.gain_sim_Ls."""
    from ...analysis.gain import predict_gain, simulated_gain
    from ...analysis.hermite import sie
    from ...model.spec import load_spec
    s = ctx.settings
    spec = load_spec(ctx.spec_path(name))
    t0 = time.monotonic()
    same = predict_gain(spec, s.gain_Ls, eta=s.gain_eta, d=s.gain_d, out_dir=variants)
    ctx.progress.item(f"gain {name} (same eta)", 1, 3, t0)
    best = predict_gain(spec, s.gain_Ls, d=s.gain_d, lr_scaling="max", out_dir=variants)
    ctx.progress.item(f"gain {name} (best eta)", 2, 3, t0)
    sims = []
    for L in s.gain_sim_Ls:
        ctx.progress.line(f"  gain: simulating {name} at L = {L}, tied and untied, "
                          f"d = {s.gain_sim_d}, {s.gain_sim_seeds} seeds "
                          f"({time.monotonic() - t0:.0f} s)")
        sims.append(simulated_gain(spec, L, s.gain_eta, s.gain_sim_d, s.gain_sim_seeds,
                                   seed=s.seed, out_dir=variants, cap=s.traj_cap))
    ctx.progress.item(f"gain {name} (simulator)", 3, 3, t0)
    return {"spec": name, "teacher": str(spec.teacher), "student": str(spec.student),
            "sie": sie(spec.teacher, spec.L)["sie"], "same_eta": same, "best_eta": best,
            "simulator": sims}


def gain_numbers(ctx: Context) -> dict:
    """The gain of every family of GAIN_SPECS and the tied and untied escape predictions of the
    PATHOLOGICAL_SPECS. Returns {"numbers": {"families", "pathological"}} (report.json)."""
    from ...analysis.gain import escape_prediction
    from ...model.spec import load_spec
    s = ctx.settings
    variants = ctx.scratch / "variants"
    families = {name: _gain_family(ctx, name, variants) for name in GAIN_SPECS}
    patho = []
    for name in PATHOLOGICAL_SPECS:
        ps = load_spec(ctx.spec_path(name))
        tied = escape_prediction(ps, s.gain_eta, s.gain_d, out_dir=variants)
        untied = escape_prediction(ps.untied_student(), s.gain_eta, s.gain_d, out_dir=variants)
        patho.append({"spec": name, "teacher": str(ps.teacher), "student": str(ps.student),
                      "tied": tied, "untied": untied})
    return {"numbers": {"families": families, "pathological": patho}}


def gain_figure(ctx: Context, data: dict) -> list:
    """The gain against L on log axes: ODE at the common and at the best eta with the power-law
    fits, and the simulated gains with their quartile range. Returns [the PNG path]."""
    s = ctx.settings
    families = data["numbers"]["families"]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for (name, fam), color in zip(families.items(), ("C0", "C1", "C2", "C3")):
        for res, lab, mk, ls in ((fam["same_eta"], f"eta = {s.gain_eta}", "o", "-"),
                                 (fam["best_eta"], "best eta", "s", "--")):
            Ls = [r["L"] for r in res["rows"] if r["gain"] is not None]
            gs = [r["gain"] for r in res["rows"] if r["gain"] is not None]
            ax.loglog(Ls, gs, mk + ls, color=color, mfc="none" if mk == "s" else color,
                      label=f"SIE {fam['sie']} ({name}), ODE, {lab}")
            if res["fit"]:
                xs = np.array([min(Ls), max(Ls)], dtype=float)
                ax.loglog(xs, res["fit"]["c"] * xs ** res["fit"]["alpha"], ":", color="grey")
        for r in fam["simulator"]:
            lo, hi = r["sim_gain_range"]
            ax.errorbar([r["L"]], [r["sim_gain"]],
                        yerr=[[r["sim_gain"] - lo], [hi - r["sim_gain"]]],
                        fmt="x", color=color, mec="k", capsize=3)
    if any(f["simulator"] for f in families.values()):
        ax.plot([], [], "kx", label=f"simulated (d = {s.gain_sim_d}, {s.gain_sim_seeds} seeds, "
                                    f"medians, quartile range)")
    ax.set_xlabel("sequence length L")
    ax.set_ylabel("tau_untied / tau_tied")
    ax.set_title(f"Gain of tying (ODE at d = {s.gain_d})", fontsize=10)
    ax.legend(fontsize=6.5)
    return [save(plt, fig, ctx.figure("gain"))]


def _fit_text(res: dict) -> str:
    f = res["fit"]
    return "-" if f is None else f"gain ~ {f['c']:.4g} L^{f['alpha']:.4g}"


def _family_text(name: str, fam: dict) -> str:
    """One family: its power laws, the gain tables and the simulator check."""
    same, best = fam["same_eta"], fam["best_eta"]
    rows = [[a["L"], fmt(a["tied"]["escape_time"]), fmt(a["untied"]["escape_time"]),
             fmt(a["gain"]), fmt(b["tied"]["eta"]), fmt(b["untied"]["eta"]),
             fmt(b["gain"])] for a, b in zip(same["rows"], best["rows"])]
    sim_rows = [[r["L"], fmt(r["tied"]["ode"]), fmt(r["tied"]["sim_median"]),
                 fmt(r["untied"]["ode"]), fmt(r["untied"]["sim_median"]),
                 fmt(r["ode_gain"]),
                 f"{fmt(r['sim_gain'])} [{fmt(r['sim_gain_range'][0])}, "
                 f"{fmt(r['sim_gain_range'][1])}]", "yes" if r["inside"] else "no"]
                for r in fam["simulator"]]
    return (
        f"**SIE {fam['sie']}: `{name}`** (teacher {fam['teacher']}, student "
        f"{fam['student']}). Common learning rate: {_fit_text(same)}; each student at its "
        f"own best learning rate (the one minimising its ODE escape time, "
        f"`--lr-scaling max`): "
        f"{_fit_text(best)}.\n\n"
        + table(["L", "tau tied", "tau untied", "gain (same eta)", "best eta tied",
                 "best eta untied", "gain (best eta)"], rows)
        + ("\n\nSimulator check:\n\n"
           + table(["L", "ODE tied", "sim tied", "ODE untied", "sim untied", "ODE gain",
                    "sim gain [range]", "ODE inside"], sim_rows)
           if sim_rows else ""))


def gain_text(data: dict, s: Settings) -> str:
    """The section's markdown: what is compared, one part per family, the pathological
    targets."""
    nums = data["numbers"]
    parts = [
        "`ssi gain derivations/<spec>.toml`: the ODE escape time (threshold "
        f"{THETA}) from m0 = 1/sqrt(d), d = {s.gain_d}, of the tied student and of the untied "
        "one (one weight vector per token, spherical constraint on the flattened vector; it "
        "starts with every m_l = 1/sqrt(d) along its escape direction), and the gain "
        "tau_untied / tau_tied. The paper reports a gain growing linearly in L for the "
        "sum-of-He2 target at a common learning rate. The simulator check runs real SGD; it "
        "reports medians of the escape times over the seeds and the gain range from the "
        "quartiles (the ODE starts from the typical overlap 1/sqrt(d) and has no noise, so it "
        "is compared with the median)."]
    parts += [_family_text(name, fam) for name, fam in nums["families"].items()]
    patho_rows = [[f"`{p['spec']}`", p["teacher"], p["student"],
                   p["tied"]["reason"] or fmt(p["tied"]["escape_time"]),
                   fmt(p["untied"]["escape_time"]) if p["untied"]["learnable"]
                   else p["untied"]["reason"]] for p in nums["pathological"]]
    parts.append(
        "Pathological targets (antisymmetric in the tokens, student symmetric in them): the "
        "tied student's drift vanishes, so it is reported as not learnable; the untied student "
        "escapes.\n\n"
        + table(["spec", "teacher", "student", "tied", "untied escape time"], patho_rows))
    return "\n\n".join(parts)


def section_gain(ctx: Context) -> Section:
    """tau_untied / tau_tied against L (ODE, common eta and each student's best eta), its power
    law, the simulator's check at a few L, for an SIE-2 and an SIE-1 family; and the
    pathological targets."""
    data = gain_numbers(ctx)
    return Section("gain", TITLE, figures=gain_figure(ctx, data),
                   text=gain_text(data, ctx.settings), numbers=data["numbers"])


__all__ = ["section_gain", "gain_numbers", "gain_figure", "gain_text", "GAIN_SPECS",
           "PATHOLOGICAL_SPECS"]
