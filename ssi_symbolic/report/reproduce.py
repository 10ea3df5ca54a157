"""`ssi reproduce`: the project's main job (issue 5, item 4).

Derives every spec in derivations/ (codegen.generate into the generated-modules folder), then
writes a report of the paper's results as predicted by the tool:

    <out>/report.md       markdown, one section after the other, figures linked
    <out>/report.json     every section's numbers (JSON), the settings and the errors
    <out>/figures/*.png   the figures (matplotlib, Agg backend)

A section is a function ``section_xxx(ctx: Context) -> Section`` (markdown text, figure paths,
JSON-able numbers); SECTIONS lists them in report order, so adding a section is writing one
function and inserting it there (see the two hooks in SECTIONS). A section that raises is
reported as an error in the report (and the command exits with code 2 after writing it); a spec
that fails to derive is an error too, never skipped silently.

Progress goes to stderr: one line per section with its elapsed time and the total, a progress bar
(or, when stderr is not a terminal, one line per item) for the long parts. `quick` selects the
QUICK settings (smaller d, fewer seeds and paths), otherwise FULL. Conventions: MATH.md.
"""
from __future__ import annotations

import json
import math
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path
from typing import Callable

import numpy as np

from .. import __version__
from ..errors import SSIError

THETA = 0.5


# ---------------------------------------------------------------------------------------------
# settings, context, sections


@dataclass(frozen=True)
class Settings:
    """The knobs of a report run (times are t = steps / d, MATH.md section 4).

    traj_*: ODE vs SDE vs simulator trajectories (section 'trajectories'): dimension, learning
    rate, simulator seeds, SDE paths; the simulator runs until every seed has escaped (at most
    traj_cap times the ODE escape time) and the plot covers that run, and at least traj_span
    times the ODE escape time. escape_*: escape time versus d (section 'escape_vs_d'):
    learning rate, the d grid of the ODE and SDE, SDE paths per d, simulator d values per spec
    ({} skips the simulator) and seeds. lr_*: learning-rate limit (section 'learning_rate'): d for the ODE and the number of
    learning rates on the grid up to the limit. gain_*: tied versus untied gain (section 'gain'):
    sequence lengths, common eta, d of the ODE predictions, and the simulator check (L values,
    d, seeds). phase_*: grid sizes in omega and a of the phase diagram. seed: base random
    seed."""

    traj_d: int = 1000
    traj_eta: float = 0.1
    traj_seeds: int = 4
    traj_runs: int = 400
    traj_span: float = 1.1
    traj_cap: float = 3.0
    escape_eta: float = 0.1
    escape_ds: tuple = (500, 2000, 8000, 32000, 128000)
    escape_runs: int = 400
    escape_sim_ds: dict = field(default_factory=dict)
    escape_sim_seeds: int = 0
    lr_d: int = 1000
    lr_points: int = 12
    gain_Ls: tuple = (1, 2, 4)
    gain_eta: float = 0.05
    gain_d: int = 10_000
    gain_sim_Ls: tuple = (2,)
    gain_sim_d: int = 500
    gain_sim_seeds: int = 8
    phase_omega: int = 41
    phase_a: int = 21
    seed: int = 0


QUICK = Settings()
FULL = Settings(traj_d=2000, traj_seeds=8, traj_runs=1000,
                escape_ds=tuple(int(round(v)) for v in np.geomspace(500, 512_000, 11)),
                escape_runs=1000, escape_sim_ds={"linear": (500, 1000, 2000, 4000, 8000),
                                                 "he2_L1": (500, 1000, 2000, 4000)},
                escape_sim_seeds=8, lr_points=30, gain_Ls=(1, 2, 4, 8),
                gain_sim_Ls=(2, 4), gain_sim_d=500, phase_omega=101, phase_a=51)


@dataclass
class Section:
    """One part of the report: markdown text, figures (PNG paths, linked after the text in
    report.md), JSON-able numbers (report.json) and errors (one line each)."""

    key: str
    title: str
    text: str = ""
    figures: list = field(default_factory=list)
    numbers: dict = field(default_factory=dict)
    errors: list = field(default_factory=list)
    seconds: float = 0.0


class Progress:
    """Progress on a stream (stderr): section lines with elapsed times, and per-item progress of
    long parts (a redrawn bar on a terminal, one line per item otherwise)."""

    def __init__(self, stream=None, enabled=True):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = bool(enabled and getattr(self.stream, "isatty", lambda: False)())
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def line(self, text: str) -> None:
        if self.enabled:
            self.stream.write(text + "\n")
            self.stream.flush()

    def item(self, label: str, i: int, n: int, t0: float, width: int = 24) -> None:
        """Item i of n of a long part (i = 1..n) done; t0 = monotonic start of the part."""
        if not self.enabled:
            return
        el = time.monotonic() - t0
        if self.tty:
            filled = int(width * i / n)
            self.stream.write(f"\r  {label} [{'#' * filled}{'.' * (width - filled)}] {i}/{n} "
                              f"{el:6.1f} s  ")
            if i == n:
                self.stream.write("\n")
        else:
            self.stream.write(f"  {label}: {i}/{n} ({el:.1f} s)\n")
        self.stream.flush()


@dataclass
class Context:
    """What sections share: folders, settings, progress, and the derivation status of the specs
    (filled by section_derivations). `scratch` is a temporary folder for modules of specs made in
    Python (never generated/)."""

    out: Path
    generated: Path
    derivations: Path
    settings: Settings
    quick: bool
    progress: Progress
    scratch: Path
    derived: dict = field(default_factory=dict)
    modules: dict = field(default_factory=dict)

    @property
    def fig_dir(self) -> Path:
        return self.out / "figures"

    def figure(self, name: str) -> Path:
        """The path of figure `name` (a .png in <out>/figures)."""
        return self.fig_dir / f"{name}.png"

    def spec_path(self, name: str) -> Path:
        """derivations/<name>.toml; an error when it is missing or failed to derive."""
        path = self.derivations / f"{name}.toml"
        if not path.exists():
            raise SSIError(f"spec {path} not found")
        err = self.derived.get(name, {}).get("error")
        if err:
            raise SSIError(f"spec {name} failed to derive: {err}")
        return path

    def model(self, name: str, eta: float):
        """(spec, OverlapODE at eta with the spec's default parameters) for derivations/<name>."""
        from ..backends.registry import ensure_module
        from ..numeric.ode import OverlapODE
        from ..numeric.evaluate import check_params
        from ..model.spec import load_spec
        if name not in self.modules:  # load each module once per run
            spec = load_spec(self.spec_path(name))
            self.modules[name] = (spec, ensure_module(spec, self.generated))
        spec, mod = self.modules[name]
        return spec, OverlapODE(mod, eta, check_params(spec, None))


def _one_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}".rstrip(": ")


def _fmt(v, spec=".4g") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec)


def _num(v):
    """A float for JSON (None for NaN / infinities / None)."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _jsonable(obj):
    """Numbers, lists, dicts, numpy values and Paths as plain JSON (NaN -> None)."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return _num(obj)
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)


def _table(header: list, rows: list) -> str:
    """A markdown table."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def _pyplot():
    from ..plots import _pyplot as plt
    return plt()


def _median_inf(values) -> float:
    """Median with NaN (not escaped) counted as +infinity; NaN when the median is not reached."""
    v = np.where(np.isfinite(values), values, np.inf)
    med = float(np.median(v)) if v.size else math.nan
    return med if math.isfinite(med) else math.nan


def _fit_sqrt(ds, ts) -> dict:
    """Least-squares fit t = a + k d^-1/2 over the finite points."""
    ds, ts = np.asarray(ds, float), np.asarray(ts, float)
    ok = np.isfinite(ts)
    if ok.sum() < 2:
        return {"a": None, "k": None, "points": int(ok.sum())}
    k, a = np.polyfit(1.0 / np.sqrt(ds[ok]), ts[ok], 1)
    return {"a": float(a), "k": float(k), "points": int(ok.sum())}


def _fit_log(ds, ts) -> dict:
    """Least-squares fit t = a + b ln d over the finite points."""
    ds, ts = np.asarray(ds, float), np.asarray(ts, float)
    ok = np.isfinite(ts)
    if ok.sum() < 2:
        return {"a": None, "b": None, "points": int(ok.sum())}
    b, a = np.polyfit(np.log(ds[ok]), ts[ok], 1)
    return {"a": float(a), "b": float(b), "points": int(ok.sum())}


# ---------------------------------------------------------------------------------------------
# 0. derivations


def section_derivations(ctx: Context) -> Section:
    """Derivation of every spec in derivations/."""
    from ..backends.registry import generate
    from ..model.spec import load_spec
    sec = Section("derivations", "Derivations")
    files = sorted(ctx.derivations.glob("*.toml"))
    if not files:
        raise SSIError(f"no specs (*.toml) in {ctx.derivations}")
    rows, names, t0 = [], {}, time.monotonic()
    for i, f in enumerate(files, 1):
        if not ctx.progress.tty:  # which spec is deriving, should one take long
            ctx.progress.line(f"  derive {f.name} ...")
        t1 = time.perf_counter()
        entry = {"file": f.name, "status": None, "seconds": None, "method": None, "error": None}
        try:
            spec = load_spec(f)
            if spec.name in names:
                raise SSIError(f"specs {names[spec.name]} and {f.name} share the name "
                               f"'{spec.name}': they would write one module")
            names[spec.name] = f.name
            path, written = generate(spec, ctx.generated)
            entry["status"] = "derived" if written else "up to date"
            entry["method"] = _module_method(path)
        except Exception as exc:  # a spec that fails is reported, never skipped
            entry["status"] = "error"
            entry["error"] = _one_line(exc)
            sec.errors.append(f"derivation of {f.name} failed: {entry['error']}")
        entry["seconds"] = time.perf_counter() - t1
        ctx.derived[f.stem] = entry
        rows.append([f"`{f.name}`", entry["status"], entry["method"] or "-",
                     f"{entry['seconds']:.2f}", entry["error"] or ""])
        if ctx.progress.tty:
            ctx.progress.item(f"derive {f.name:28.28}", i, len(files), t0)
    ok = sum(1 for e in ctx.derived.values() if e["status"] != "error")
    sec.text = (f"Every spec in `{ctx.derivations}` derived with `codegen.generate` into "
                f"`{ctx.generated}` (a module is rewritten only when its spec hash changed): "
                f"{ok} of {len(files)} succeeded.\n\n"
                + _table(["spec", "status", "method", "seconds", "error"], rows))
    sec.numbers = {"specs": ctx.derived, "succeeded": ok, "total": len(files)}
    return sec


def _module_method(path) -> str | None:
    """The METHOD constant of a generated module, read from its source (no import)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith("METHOD"):
                return line.split("=", 1)[1].strip().strip("'\"")
    except OSError:
        return None
    return None


# ---------------------------------------------------------------------------------------------
# 1. SIE and flatness of the paper's example targets


def example_targets(derivations: Path) -> list:
    """The example targets of MATH.md section 5, each (label, spec, stated SIE, stated flatness,
    where the statement comes from); stated values None when nothing is stated."""
    from ..model.spec import load_spec, make_spec
    ks = (1, 2, 3)
    prod = " * ".join(f"He({k}, z{l})" for l, k in enumerate(ks, 1))
    return [
        ("sum_l z_l, L = 4", make_spec("ex_sum", 4, "z1 + z2 + z3 + z4"), 1, None,
         "MATH.md §5: sum_l z_l -> 1"),
        ("z1 z2", make_spec("ex_z1z2", 2, "z1 * z2"), 2, None, "MATH.md §5: z1 z2 -> 2"),
        ("He1(z1) He4(z2) + He2(z3) He2(z4)",
         make_spec("ex_he1he4_he2he2", 4, "He(1, z1)*He(4, z2) + He(2, z3)*He(2, z4)"),
         min(1 + 4, 2 + 2), None, "definition: min(1 + 4, 2 + 2)"),
        (f"prod_l He_k_l(z_l), k = {ks}", make_spec("ex_prod_he", len(ks), prod), sum(ks), None,
         "MATH.md §5: prod_l He_k_l -> sum_l k_l"),
        ("4/3 + He4(z1) + 2 He4(z2), opposite-paired encoding (he4_example_pe)",
         load_spec(derivations / "he4_example_pe.toml"), 4, 2,
         "paper / spec: SIE 4, flatness 2"),
    ]


def section_static(ctx: Context) -> Section:
    """SIE and flatness index of the paper's example targets."""
    from ..analysis.hermite import static_analysis
    sec = Section("static", "Sequence information exponent and flatness of example targets")
    ctx.spec_path("he4_example_pe")  # an error when it failed to derive
    rows, nums = [], []
    targets = example_targets(ctx.derivations)
    t0 = time.monotonic()
    for i, (label, spec, s_sie, s_flat, source) in enumerate(targets, 1):
        gen = ctx.generated if spec.source else ctx.scratch  # made in Python: scratch folder
        r = static_analysis(spec, out_dir=gen)
        agree = (s_sie is None or r["sie"] == s_sie) and (s_flat is None or
                                                          r["flatness"] == s_flat)
        if not agree:
            sec.errors.append(f"{label}: SIE {r['sie']}, flatness {r['flatness']} differ from the "
                              f"stated {s_sie}, {s_flat} ({source})")
        pos = "C = " + str([[float(c) for c in row] for row in spec.C]) if spec.r else "none"
        rows.append([label, spec.L, pos, r["sie"], r["flatness"], r["method"],
                     f"`{r['leading_terms']}`", source, "yes" if agree else "**no**"])
        nums.append({"target": label, "spec": spec.name, "L": spec.L, "positional": spec.r > 0,
                     "sie": r["sie"], "flatness": r["flatness"], "method": r["method"],
                     "student_sie": r["student_sie"], "leading_terms": r["leading_terms"],
                     "stated_sie": s_sie, "stated_flatness": s_flat, "agrees": agree})
        ctx.progress.item("sie", i, len(targets), t0)
    low = [r["target"] for r in nums if r["positional"] and r["flatness"] is not None
           and r["sie"] is not None and r["flatness"] < r["sie"]]
    lowered = (" The positional encoding lowers the flatness below the SIE for: "
               + "; ".join(low) + "." if low else "")
    sec.text = (
        "SIE: the smallest |alpha| >= 1 with a non-zero Hermite coefficient E[g He_alpha] of the "
        "teacher link (`hermite.sie`); flatness: the lowest order of a non-zero derivative of the "
        "population loss R at the origin jointly in (m, e) (`hermite.static_analysis`). The "
        "student link is the teacher's (tied, spherical SGD); the leading terms are the "
        "lowest-order homogeneous part of R." + lowered + "\n\n"
        + _table(["target", "L", "positional", "SIE", "flatness", "method",
                  "leading terms of R", "stated", "agrees"], rows))
    sec.numbers = {"targets": nums}
    return sec


# ---------------------------------------------------------------------------------------------
# 2. ODE vs SDE vs simulation for the He2 models

TRAJECTORY_SPECS = ("he2_L1", "tied_network_he2_L2", "tied_network_he2_L4")


def _stack_overlaps(names, overlaps) -> np.ndarray:
    """(n, seeds, T) from the simulator's {name: (seeds, T)}."""
    return np.stack([np.asarray(overlaps[k], dtype=float) for k in names])


def section_trajectories(ctx: Context) -> Section:
    """ODE, SDE band and simulated SGD from m0 = 1/sqrt(d) for the He2 models."""
    from ..numeric.ode import initial_state, solve
    from ..numeric.sde import simulate_sde
    from ..numeric.simulate import simulate
    s = ctx.settings
    d, eta = s.traj_d, s.traj_eta
    sec = Section("trajectories", "ODE versus SDE versus simulation: the He2 models")
    plt = _pyplot()
    rows, nums = [], {}
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
        sim_med = _median_inf(esc_sim)
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

        fig, ax = plt.subplots(figsize=(7, 4.2))
        for k in range(r_sim.shape[0]):
            ax.plot(sim.t, r_sim[k], color="0.6", lw=0.6,
                    label="simulation, per seed" if k == 0 else None)
        ax.plot(sim.t, r_sim.mean(axis=0), color="C3", lw=1.6,
                label=f"simulation, mean of {sim.seeds} seeds")
        ax.fill_between(band.t_record, q1, q3, color="C0", alpha=0.25,
                        label=f"SDE quartiles ({s.traj_runs} paths)")
        ax.plot(band.t_record, med, color="C0", lw=1.4, label="SDE median")
        rad_ode = ode.radius(tr_plot.x)
        ax.plot(tr_plot.t, rad_ode, color="k", lw=1.6, ls="--", label="ODE")
        ax.axhline(THETA, color="grey", ls=":", lw=0.8)
        ax.axvline(tau, color="k", lw=0.6, ls="--")
        ax.set_xlim(0, t_end)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("t = steps / d")
        ax.set_ylabel("|(m, e)|" if spec.r else "|m|")
        ax.set_title(f"{name}: eta = {eta}, d = {d}, m0 = 1/sqrt(d)", fontsize=10)
        ax.legend(loc="upper left", fontsize=8)
        fig.tight_layout()
        path = ctx.figure(f"trajectories_{name}")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        sec.figures.append(path)

        q = summ["quartiles"]
        rel = lambda v: (v - sim_med) / sim_med if v is not None and math.isfinite(sim_med) \
            else None
        nums[name] = {
            "d": d, "eta": eta, "theta": THETA, "t_end": t_end,
            "ode_escape_time": tau, "ode_alignment_time": tr.alignment_time,
            "ode_fixed_point": tr.fixed_point,
            "sde_median": summ["median"], "sde_quartiles": q,
            "sde_escaped_fraction": summ["escaped_fraction"], "sde_runs": s.traj_runs,
            "sim_escape_times": esc_sim, "sim_median": sim_med, "sim_escaped": n_esc,
            "sim_seeds": sim.seeds, "sim_steps": steps,
            "ode_rel_error_vs_sim": rel(tau), "sde_rel_error_vs_sim": rel(summ["median"]),
            "seconds": time.perf_counter() - t_model, "sim_seconds": sim.wall_time}
        rows.append([f"`{name}`", _fmt(tau), _fmt(summ["median"]),
                     f"[{_fmt(q[0])}, {_fmt(q[1])}]", _fmt(sim_med),
                     f"{n_esc}/{sim.seeds}", _fmt(nums[name]["ode_rel_error_vs_sim"], "+.1%"),
                     _fmt(nums[name]["sde_rel_error_vs_sim"], "+.1%")])
        ctx.progress.line(f"  {name}: ODE {tau:.3g}, SDE median {_fmt(summ['median'])}, "
                          f"simulation median {_fmt(sim_med)} "
                          f"({nums[name]['seconds']:.1f} s)")
    sec.text = (
        f"Spherical online SGD at eta = {eta}, d = {d}, from m0 = 1/sqrt(d): the ODE (d -> "
        f"infinity drift), the median and quartiles of {s.traj_runs} Euler-Maruyama paths of the "
        f"finite-d SDE, and {s.traj_seeds} seeds of real d-dimensional SGD (`simulate`, run until "
        f"every seed has escaped or {s.traj_cap} times the ODE escape time, the end of the plot); "
        f"the vertical line is the ODE escape time. Escape: first t "
        f"with |(m, e)| >= {THETA}; the simulator's median counts seeds not escaped within the "
        "run as infinite. At finite d the plateau of an SIE-2 "
        "target ends at a random time: the SDE band shows the spread the seeds are expected "
        "to have around the ODE.\n\n"
        + _table(["model", "ODE escape t", "SDE median", "SDE quartiles", "simulation median",
                  "escaped seeds", "ODE vs sim", "SDE vs sim"], rows))
    sec.numbers = nums
    return sec


# ---------------------------------------------------------------------------------------------
# 3. escape time versus d

ESCAPE_SPECS = ("linear", "he2_L1")


def section_escape_vs_d(ctx: Context) -> Section:
    """Escape time against log d for an SIE-1 and an SIE-2 target, with the fitted scaling."""
    from ..numeric.ode import initial_state, leading_drift, solve
    from ..analysis.hermite import sie
    from ..numeric.sde import simulate_sde
    from ..numeric.simulate import simulate
    s = ctx.settings
    eta = s.escape_eta
    sec = Section("escape_vs_d", "Escape time versus the dimension d")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(ESCAPE_SPECS), figsize=(5.2 * len(ESCAPE_SPECS), 4))
    nums, lines, rows = {}, [], []
    for ax, name in zip(np.atleast_1d(axes), ESCAPE_SPECS):
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
        sim_ds = tuple(s.escape_sim_ds.get(name, ())) if s.escape_sim_seeds else ()
        sim_rows = []
        t0 = time.monotonic()
        for i, d in enumerate(sim_ds, 1):
            x0 = initial_state(ode, d)
            tau = solve(ode, x0, theta=THETA, n_grid=20).escape_time
            steps = int(math.ceil(3 * tau * d))
            res = simulate(spec, eta, int(d), steps, seeds=s.escape_sim_seeds, seed=s.seed + i,
                           theta=THETA, out_dir=ctx.generated, progress=ctx.progress.tty,
                           stop_when_escaped=True, record_every=max(1, steps // 50))
            e = np.asarray(res.escape_times["escape"], dtype=float)
            sim_rows.append({"d": int(d), "escape_times": e, "median": _median_inf(e),
                             "escaped": int(np.isfinite(e).sum()), "seeds": res.seeds,
                             "seconds": res.wall_time})
            ctx.progress.item(f"{name} simulations over d", i, len(sim_ds), t0)
        fit_ode, fit_sde = _fit_log(ds, ode_t), _fit_log(ds, sde_m)
        fit_sim = _fit_log([r["d"] for r in sim_rows], [r["median"] for r in sim_rows])
        # expected scaling from the leading drift along m, dm/dt ~ c m^p with c = eta a1 (+
        # eta^2 a2 when of the same power), started at m0 = d^-1/2:
        #   p = 0 (SIE 1): t = t_inf - m0 / c + ..., a constant plus k d^-1/2 with k = -1/c;
        #   p = 1 (SIE 2): t = ln(theta / m0) / c + ... = a + b ln d with b = 1 / (2 c).
        c = eta * a1 + (eta * eta * a2 if p2 == p1 else 0.0)
        fit_ode_sqrt, fit_sde_sqrt = _fit_sqrt(ds, ode_t), _fit_sqrt(ds, sde_m)
        if p1 == 0:
            expected = {"law": "t = t_inf + k d^-1/2 -> const (SIE 1)", "k": -1.0 / c, "c": c}
            law = (f"t -> const, t = t_inf + k d^(-1/2) with k = -1/c = {-1 / c:.4g}. Fit: ODE "
                   f"t_inf = {_fmt(fit_ode_sqrt['a'])}, k = {_fmt(fit_ode_sqrt['k'])}; SDE "
                   f"median t_inf = {_fmt(fit_sde_sqrt['a'])}, k = {_fmt(fit_sde_sqrt['k'])}. "
                   f"For comparison with SIE 2, t = a + b ln d gives b = "
                   f"{_fmt(fit_ode['b'])} (ODE), {_fmt(fit_sde['b'])} (SDE)")
            curve = ("t_inf + k / sqrt(d)", fit_sde_sqrt["a"], fit_sde_sqrt["k"],
                     lambda dd, a, k: a + k / np.sqrt(dd))
        elif p1 == 1:
            expected = {"law": "t = a + b ln d (SIE 2)", "b": 1.0 / (2.0 * c), "c": c}
            law = (f"t = a + b ln d with b = 1/(2c) = {1 / (2 * c):.4g}. Fit: ODE b = "
                   f"{_fmt(fit_ode['b'])} (a = {_fmt(fit_ode['a'])}), SDE median b = "
                   f"{_fmt(fit_sde['b'])} (a = {_fmt(fit_sde['a'])})"
                   + (f", simulator medians b = {_fmt(fit_sim['b'])} ({fit_sim['points']} "
                      f"values of d, {s.escape_sim_seeds} seeds each)"
                      if fit_sim["b"] is not None else ""))
            curve = ("a + b ln d", fit_sde["a"], fit_sde["b"],
                     lambda dd, a, b: a + b * np.log(dd))
        else:
            expected = {"law": f"t ~ d^{(p1 - 1) / 2:g} (SIE {p1 + 1})"}
            law = expected["law"] + f". Fit t = a + b ln d: ODE b = {_fmt(fit_ode['b'])}"
            curve = None
        span = (ode_t[np.isfinite(ode_t)].max() / ode_t[np.isfinite(ode_t)].min()
                if np.isfinite(ode_t).any() else None)
        nums[name] = {"sie": k, "leading_power": p1, "a1": a1, "a2": a2, "eta": eta, "d": ds,
                      "ode_escape_time": ode_t, "sde_median": sde_m, "sde_quartiles": sde_q,
                      "sde_runs": s.escape_runs, "simulation": sim_rows, "fit_ode": fit_ode,
                      "fit_sde": fit_sde, "fit_sim": fit_sim, "fit_ode_sqrt": fit_ode_sqrt,
                      "fit_sde_sqrt": fit_sde_sqrt, "expected": expected,
                      "ode_max_over_min": span}
        lines.append(f"- `{name}` (SIE {k}; near the origin dm/dt ~ c m^{p1}, c = {c:.4g}): "
                     f"expected {law}"
                     + (f"; the ODE escape time changes by a factor {span:.4g} over the "
                        f"{ds.max() / ds.min():.0f}-fold range of d." if span else "."))
        by_d = {r["d"]: f"{_fmt(r['median'])} ({r['escaped']}/{r['seeds']} seeds)"
                for r in sim_rows}
        mine = [[f"`{name}`", int(d), _fmt(ode_t[j]), _fmt(sde_m[j]),
                 f"[{_fmt(sde_q[j][0])}, {_fmt(sde_q[j][1])}]", by_d.pop(int(d), "")]
                for j, d in enumerate(ds)]
        mine += [[f"`{name}`", dd, "", "", "", v] for dd, v in by_d.items()]
        rows += sorted(mine, key=lambda row: row[1])
        # figure
        ax.plot(ds, ode_t, "k.-", label="ODE")
        lo = sde_m - np.array([np.nan if q[0] is None else q[0] for q in sde_q])
        hi = np.array([np.nan if q[1] is None else q[1] for q in sde_q]) - sde_m
        ax.errorbar(ds, sde_m, yerr=[lo, hi], fmt="o", color="C0", ms=4, capsize=3,
                    label=f"SDE median, quartiles ({s.escape_runs} paths)")
        for r in sim_rows:
            ax.plot([r["d"]] * len(r["escape_times"]), r["escape_times"], ".", color="0.6",
                    ms=3)
        if sim_rows:
            ax.plot([r["d"] for r in sim_rows], [r["median"] for r in sim_rows], "s",
                    color="C3", ms=6, mfc="none", label="simulation median (dots: seeds)")
        if curve is not None and curve[1] is not None:
            dd = np.geomspace(ds.min(), ds.max(), 50)
            ax.plot(dd, curve[3](dd, curve[1], curve[2]), color="C0", ls=":", lw=1,
                    label=f"SDE fit {curve[0]}")
        ax.set_xscale("log")
        ax.set_xlabel("d")
        ax.set_ylabel("escape time t = steps / d")
        ax.set_title(f"{name} (SIE {k}), eta = {eta}", fontsize=10)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = ctx.figure("escape_vs_d")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    sec.figures.append(path)
    sim_note = ("Simulator medians at a few d are included." if any(
        nums[n]["simulation"] for n in nums) else "The simulator is not run here (--quick).")
    sec.text = (
        f"Escape time (|(m, e)| >= {THETA}) from m0 = 1/sqrt(d) at eta = {eta}, against log d: "
        f"ODE, and the median and quartiles of the SDE ({s.escape_runs} paths per d). "
        f"{sim_note} The expected law follows from the leading drift along m near the origin, "
        "dm/dt ~ c m^(SIE-1) (`dynamics.leading_drift`).\n\n" + "\n".join(lines) + "\n\n"
        + _table(["model", "d", "ODE", "SDE median", "SDE quartiles", "simulation median"],
                 rows))
    sec.numbers = nums
    return sec


# ---------------------------------------------------------------------------------------------
# 4. learning-rate limit

LR_SPECS = ("phase_retrieval", "linear", "he2_L1")


def section_learning_rate(ctx: Context) -> Section:
    """Maximal learning rate, and the ODE escape time against eta up to it."""
    from ..numeric.ode import DynamicsError, initial_state, solve
    from ..analysis.predict import predict_max_lr
    s = ctx.settings
    d = s.lr_d
    sec = Section("learning_rate", "The learning-rate limit")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(LR_SPECS), figsize=(4.2 * len(LR_SPECS), 3.8))
    nums, rows = {}, []
    t0 = time.monotonic()
    for i, (ax, name) in enumerate(zip(np.atleast_1d(axes), LR_SPECS), 1):
        res = predict_max_lr(ctx.spec_path(name), out_dir=ctx.generated)
        lr = res["max_lr"]
        frac = None
        if lr is not None:
            f = Fraction(lr).limit_denominator(1000)
            if abs(float(f) - lr) < 1e-8 * max(1.0, abs(lr)):
                frac = f"{f.numerator}/{f.denominator}" if f.denominator != 1 else str(f.numerator)
        entry = {"max_lr": lr, "fraction": frac, "reason": res["reason"],
                 "leading_power": res.get("leading_power"), "a1": res.get("a1"),
                 "a2": res.get("a2"), "d": d}
        if lr is not None:
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
                           "stable": None, "error": _one_line(exc)}
            best = int(np.nanargmin(taus)) if np.isfinite(taus).any() else None
            entry.update({"eta": etas, "ode_escape_time": taus, "failures": fails,
                          "above_limit": above_d,
                          "fastest_eta_on_grid": None if best is None else etas[best],
                          "fastest_escape_time": None if best is None else taus[best]})
            ax.plot(etas, taus, "o-", ms=3, color="C0", label="ODE escape time")
            ax.axvline(lr, color="k", ls="--", lw=0.8, label=f"max eta = {lr:.4g}")
            ax.set_yscale("log")
            ax.set_xlim(0, 1.08 * lr)
        ax.set_xlabel("eta")
        ax.set_ylabel("ODE escape time t = steps / d")
        ax.set_title(f"{name} (d = {d})", fontsize=10)
        ax.legend(fontsize=8)
        if lr is not None:
            if above_d["error"]:
                what = "leaves the ball"
            elif above_d["escape_time"] is None:
                what = "no escape"
            else:
                fp = ", ".join(f"{k} = {v:.3g}" for k, v in (above_d["fixed_point"] or {}).items())
                what = (f"escapes at t = {above_d['escape_time']:.3g}, ends at {fp} "
                        f"({'stable' if above_d['stable'] else 'unstable'})")
        else:
            what = "-"
        nums[name] = entry
        fastest = (f"{entry['fastest_eta_on_grid']:.3g} (t = {entry['fastest_escape_time']:.3g})"
                   if entry.get("fastest_eta_on_grid") is not None else "-")
        rows.append([f"`{name}`", _fmt(lr, ".10g"), frac or "-", res["reason"], fastest, what])
        ctx.progress.item("max-lr", i, len(LR_SPECS), t0)
    fig.tight_layout()
    path = ctx.figure("learning_rate")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    sec.figures.append(path)
    sec.text = (
        "`predict_max_lr`: the largest eta for which the dynamics escape from m0 = 1/sqrt(d) "
        "(the O(eta^2) noise term of the drift must not cancel the O(eta) term) and the "
        "informative fixed point stays stable (Newton continuation in eta). \"fraction\" is the "
        "value recognised as a small fraction (within 1e-8). The last column is what the ODE "
        "does at 1.05 times the limit. The figure shows the ODE escape time from m0 = 1/sqrt(d), "
        f"d = {d}, for eta up to 0.99 of the limit: it diverges at an escape limit (the drift "
        "at the origin vanishes) and stays finite at a stability limit.\n\n"
        + _table(["model", "max eta", "fraction", "reason", "fastest eta on the grid",
                  "ODE at 1.05 max eta"], rows))
    sec.numbers = nums
    return sec



# ---------------------------------------------------------------------------------------------
# tied versus untied gain (issue 5)

#: the families whose gain the report shows (their links hold for every L: tsum, L): the
#: sum-of-He2 target of the paper (SIE 2) and its SIE-1 twin with a He1 part per token
GAIN_SPECS = ("tied_network_he2_L2", "tied_network_he12_L2")
#: the pathological targets (a token-symmetric tied student cannot learn them)
PATHOLOGICAL_SPECS = ("pathological_linear", "pathological_he2")


def _gain_family(ctx: Context, name: str, variants) -> dict:
    """One family's gain: its teacher's SIE, the ODE gain at a common eta and at each student's
    best eta, and the simulator's check at settings.gain_sim_Ls."""
    from ..analysis.gain import predict_gain, simulated_gain
    from ..analysis.hermite import sie
    from ..model.spec import load_spec
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


def section_gain(ctx: Context) -> Section:
    """tau_untied / tau_tied against L (ODE, common eta and each student's best eta), its power
    law, the simulator's check at a few L, for an SIE-2 and an SIE-1 family; and the
    pathological targets."""
    from ..analysis.gain import escape_prediction
    from ..model.spec import load_spec
    s = ctx.settings
    sec = Section("gain", "Tied versus untied students: the sequence-length gain")
    variants = ctx.scratch / "variants"
    families = {name: _gain_family(ctx, name, variants) for name in GAIN_SPECS}
    patho = []
    for name in PATHOLOGICAL_SPECS:
        ps = load_spec(ctx.spec_path(name))
        tied = escape_prediction(ps, s.gain_eta, s.gain_d, out_dir=variants)
        untied = escape_prediction(ps.untied_student(), s.gain_eta, s.gain_d, out_dir=variants)
        patho.append({"spec": name, "teacher": str(ps.teacher), "student": str(ps.student),
                      "tied": tied, "untied": untied})
    plt = _pyplot()
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
    fig.tight_layout()
    path = ctx.figure("gain")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    sec.figures.append(path)

    def fit_text(res):
        f = res["fit"]
        return "-" if f is None else f"gain ~ {f['c']:.4g} L^{f['alpha']:.4g}"

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
    for name, fam in families.items():
        same, best = fam["same_eta"], fam["best_eta"]
        rows = [[a["L"], _fmt(a["tied"]["escape_time"]), _fmt(a["untied"]["escape_time"]),
                 _fmt(a["gain"]), _fmt(b["tied"]["eta"]), _fmt(b["untied"]["eta"]),
                 _fmt(b["gain"])] for a, b in zip(same["rows"], best["rows"])]
        sim_rows = [[r["L"], _fmt(r["tied"]["ode"]), _fmt(r["tied"]["sim_median"]),
                     _fmt(r["untied"]["ode"]), _fmt(r["untied"]["sim_median"]),
                     _fmt(r["ode_gain"]),
                     f"{_fmt(r['sim_gain'])} [{_fmt(r['sim_gain_range'][0])}, "
                     f"{_fmt(r['sim_gain_range'][1])}]", "yes" if r["inside"] else "no"]
                    for r in fam["simulator"]]
        parts.append(
            f"**SIE {fam['sie']}: `{name}`** (teacher {fam['teacher']}, student "
            f"{fam['student']}). Common learning rate: {fit_text(same)}; each student at its "
            f"own best learning rate (the one minimising its ODE escape time, "
            f"`--lr-scaling max`): "
            f"{fit_text(best)}.\n\n"
            + _table(["L", "tau tied", "tau untied", "gain (same eta)", "best eta tied",
                      "best eta untied", "gain (best eta)"], rows)
            + ("\n\nSimulator check:\n\n"
               + _table(["L", "ODE tied", "sim tied", "ODE untied", "sim untied", "ODE gain",
                         "sim gain [range]", "ODE inside"], sim_rows)
               if sim_rows else ""))
    patho_rows = [[f"`{p['spec']}`", p["teacher"], p["student"],
                   p["tied"]["reason"] or _fmt(p["tied"]["escape_time"]),
                   _fmt(p["untied"]["escape_time"]) if p["untied"]["learnable"]
                   else p["untied"]["reason"]] for p in patho]
    parts.append(
        "Pathological targets (antisymmetric in the tokens, student symmetric in them): the "
        "tied student's drift vanishes, so it is reported as not learnable; the untied student "
        "escapes.\n\n"
        + _table(["spec", "teacher", "student", "tied", "untied escape time"], patho_rows))
    sec.text = "\n\n".join(parts)
    sec.numbers = {"families": families, "pathological": patho}
    return sec


# ---------------------------------------------------------------------------------------------
# positional-semantic phase diagram (issue 4)

PHASE_SPEC = "positional_semantic"


def section_phase_diagram(ctx: Context) -> Section:
    """Regions of the positional-semantic attention model on an (omega, a) grid with the
    transition curve omega_trans(a) (root finding on the exact Hessian at the origin)."""
    from ..analysis.landscape import analyse, phase_diagram, phase_diagram_figure
    s = ctx.settings
    sec = Section("phase_diagram", "Softmax attention: the positional-semantic phase diagram")
    path_spec = ctx.spec_path(PHASE_SPEC)
    om = np.linspace(0, 1, s.phase_omega)
    aa = np.linspace(0.5, 1, s.phase_a)
    t0 = time.monotonic()
    res = phase_diagram(path_spec, [("omega", om), ("a", aa)], transition_along="omega",
                        out_dir=ctx.generated)
    ctx.progress.item("phase diagram", 1, 2, t0)
    path = phase_diagram_figure(res, ctx.figure("phase_diagram"))
    sec.figures.append(path)
    points = []
    for omega, a in ((0.0, 1.0), (0.67, 1.0), (1.0, 1.0)):
        r = analyse(path_spec, {"omega": omega, "a": a}, out_dir=ctx.generated)
        points.append([omega, a, r["region"], r["initial_direction"],
                       f"(e, m) = ({r['global_minimum']['e']:.3f}, "
                       f"{r['global_minimum']['m']:.3f})"])
    ctx.progress.item("phase diagram", 2, 2, t0)
    tr = [t for t in res["transition"] if t["omega"] is not None]
    at1 = [t["omega"] for t in res["transition"] if abs(t["a"] - 1) < 1e-12]
    sec.text = (
        f"`ssi phase-diagram derivations/{PHASE_SPEC}.toml --grid omega=0:1:{s.phase_omega} "
        f"--grid a=0.5:1:{s.phase_a} --transition omega` ({res['loss_kind']} loss "
        "1/2 ||y - y_hat||_F^2): the region of every grid point (MATH.md section 7) and the "
        "transition omega_trans(a) where the initial dynamics switch from semantic to "
        "positional (" + res["transition_method"] + "). omega_trans(1) = "
        + (_fmt(at1[0], ".10g") if at1 and at1[0] is not None else "-")
        + f"; the transition exists for {len(tr)} of the {len(res['transition'])} values of a."
        "\n\n" + _table(["omega", "a", "region", "initial dynamics", "global minimum"], points))
    sec.numbers = {"transition": res["transition"], "omega_trans_1": at1[0] if at1 else None,
                   "points": points}
    return sec


# ---------------------------------------------------------------------------------------------
# the report

#: The sections in report order. Hooks for sections others add (issue 5):
#:   - "section_gain" (tied versus untied gain against L, with its power-law fit): insert after
#:     section_escape_vs_d, i.e. SECTIONS.insert(SECTIONS.index(section_escape_vs_d) + 1, ...);
#:   - "section_phase_diagram" (positional-semantic phase diagram with the transition curve
#:     omega_trans(a)): insert right before section_learning_rate.
#: A section is any function ctx -> Section; it may read ctx.settings (add fields to Settings
#: with quick and full values) and must write its figures with ctx.figure(name).
SECTIONS: list[Callable[[Context], Section]] = [
    section_derivations,
    section_static,
    section_trajectories,
    section_escape_vs_d,
    section_gain,
    section_phase_diagram,
    section_learning_rate,
]


def _check_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SSIError("ssi reproduce needs matplotlib for its figures: "
                       "pip install 'ssi-symbolic[plot]'") from None


def run_section(fn, ctx: Context) -> Section:
    """Run one section; an exception becomes the section's error (one line; the traceback of an
    unexpected exception, not an SSIError, also goes to the progress stream)."""
    t0 = time.perf_counter()
    try:
        sec = fn(ctx)
    except Exception as exc:
        title = (fn.__doc__ or fn.__name__).strip().splitlines()[0].rstrip(".")
        key = fn.__name__.removeprefix("section_")
        sec = Section(key, title, text=f"**Error**: {_one_line(exc)}",
                      errors=[f"{key}: {_one_line(exc)}"])
        if ctx.progress.enabled and not isinstance(exc, SSIError):  # a bug: show where
            ctx.progress.stream.write("".join(traceback.format_exception(exc)))
    sec.seconds = time.perf_counter() - t0
    return sec


def _markdown(sections, ctx: Context, meta: dict) -> str:
    mode = "quick" if ctx.quick else "full"
    out = ["# Sequence single-index models: reproduction report", "",
           f"Written by `ssi reproduce{' --quick' if ctx.quick else ''}` (ssi-symbolic "
           f"{__version__}) on {meta['finished']}, {mode} settings, in "
           f"{meta['seconds']:.1f} s. Conventions: MATH.md (time t = steps / d, per-step "
           f"learning rate eta, loss 1/2 ||y - y_hat||^2, spherical SGD). Numbers: "
           f"`report.json`.", ""]
    errors = [e for s in sections for e in s.errors]
    if errors:
        out += ["## Errors", ""] + [f"- {e}" for e in errors] + [""]
    out += ["Settings: " + ", ".join(f"{k} = {v}" for k, v in asdict(ctx.settings).items()), ""]
    for i, s in enumerate(sections):
        out += [f"## {i}. {s.title}", "", s.text.strip(), ""]
        for f in s.figures:
            rel = Path(f).resolve().relative_to(ctx.out.resolve())
            out += [f"![{Path(f).stem}]({rel.as_posix()})", ""]
        out += [f"*({s.seconds:.1f} s)*", ""]
    return "\n".join(out)


def run_report(out="results", quick=False, generated="generated", derivations="derivations",
               settings: Settings | None = None, sections=None, progress=True,
               stream=None) -> dict:
    """Derive every spec of `derivations` into `generated`, run the sections (default SECTIONS)
    with QUICK or FULL settings (or `settings`), and write <out>/report.md, <out>/report.json
    and <out>/figures/*.png. Returns the report.json object (keys: command, mode, settings,
    started, finished, seconds, errors, sections {key: {title, seconds, figures, numbers,
    errors}})."""
    _check_matplotlib()
    out, generated, derivations = Path(out), Path(generated), Path(derivations)
    if not derivations.is_dir():
        raise SSIError(f"--derivations {derivations}: not a folder")
    if out.exists() and not out.is_dir():
        raise SSIError(f"--out {out}: exists and is not a folder")
    (out / "figures").mkdir(parents=True, exist_ok=True)
    generated.mkdir(parents=True, exist_ok=True)
    settings = settings or (QUICK if quick else FULL)
    prog = Progress(stream, enabled=progress)
    started = datetime.now(timezone.utc)
    sections = list(SECTIONS if sections is None else sections)
    done = []
    with tempfile.TemporaryDirectory(prefix="ssi-reproduce-") as scratch:
        ctx = Context(out=out, generated=generated, derivations=derivations, settings=settings,
                      quick=quick, progress=prog, scratch=Path(scratch))
        prog.line(f"ssi reproduce ({'quick' if quick else 'full'}): {len(sections)} sections "
                  f"-> {out}/report.md")
        for i, fn in enumerate(sections, 1):
            name = fn.__name__.removeprefix("section_")
            prog.line(f"[{i}/{len(sections)}] {name} ...")
            t0 = time.monotonic()
            sec = run_section(fn, ctx)
            status = f"{len(sec.errors)} error(s)" if sec.errors else "done"
            prog.line(f"[{i}/{len(sections)}] {name}: {status} in {time.monotonic() - t0:.1f} s "
                      f"(total {prog.elapsed():.1f} s)")
            done.append(sec)
    finished = datetime.now(timezone.utc)
    meta = {"finished": finished.strftime("%Y-%m-%d %H:%M UTC"), "seconds": prog.elapsed()}
    # figures: only those that exist are named (a failed section names none)
    for s in done:
        s.figures = [Path(f) for f in s.figures if Path(f).exists()]
    report = {
        "command": "ssi reproduce" + (" --quick" if quick else ""),
        "version": __version__, "mode": "quick" if quick else "full",
        "settings": asdict(settings), "started": started.isoformat(),
        "finished": finished.isoformat(), "seconds": meta["seconds"],
        "errors": [e for s in done for e in s.errors],
        "sections": {s.key: {"title": s.title, "seconds": s.seconds,
                             "figures": [Path(f).resolve().relative_to(out.resolve()).as_posix()
                                         for f in s.figures],
                             "numbers": s.numbers, "errors": s.errors} for s in done},
    }
    from ..backends.files import write_atomic
    write_atomic(out / "report.md", _markdown(done, ctx, meta))
    write_atomic(out / "report.json", json.dumps(_jsonable(report), indent=1) + "\n")
    prog.line(f"wrote {out / 'report.md'} and {out / 'report.json'} "
              f"({sum(len(s.figures) for s in done)} figures) in {meta['seconds']:.1f} s")
    return _jsonable(report)


__all__ = ["Settings", "QUICK", "FULL", "Section", "Context", "Progress", "SECTIONS",
           "run_report", "run_section", "example_targets", "section_derivations",
           "section_static", "section_trajectories", "section_escape_vs_d",
           "section_learning_rate"]
