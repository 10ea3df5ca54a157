"""The `ssi` command line: thin wrappers that parse arguments, call one method of
:class:`ssi_symbolic.api.Model` (or `reproduce`) and print a table or JSON.

    ssi derive SPEC... [--out DIR] [--force]     write generated/<name>.py, print its path
    ssi latex SPEC [--out FILE]                  LaTeX document (stdout without --out)
    ssi evaluate SPEC --at m=0.3 --at e=0.1 [--eta 0.05] [--d 1000] [--param k=v] [--json]
    ssi solve SPEC --eta 0.05 --d 1000 [--m0 X] [--e0 X] [--t-max T] [--threshold 0.5]
              [--param k=v] [--plot FILE.png] [--json]
    ssi sde SPEC --eta --d --runs N [--seed S] [--t-max T] [--dt DT] [--json]
    ssi max-lr SPEC [--json]
    ssi simulate SPEC --eta --d --steps N --seeds K [--seed S] [--method full|reduced]
              [--engine numpy|numba] [--batch B] [--init m1_1=0.3 ...] [--json]
    ssi sie SPEC [--json]
    ssi fixed-points SPEC --eta X [--json]
    ssi gain SPEC --L 1,2,4,8 [--eta X] [--lr-scaling same|max] [--d D] [--json]
    ssi reproduce [--out results/] [--quick]    derive every spec, write the report
    ssi sweep SPEC --grid eta=0.02:0.3:15 --grid d=1e3,1e4 --quantity escape_time
              [--method ode|sde|simulate] [--runs N] [--seed S] --out sweep.csv
              [--plot FILE.png] [--scheduler tcp://HOST:PORT] [--json]

Errors are one line on stderr (`ssi: error: ...`) with exit code 2; nothing is written then.
An unexpected exception (a bug) is one `ssi: internal error: ...` line with exit code 1
(SSI_DEBUG=1 shows the traceback).
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
import threading
import traceback
from pathlib import Path

from .version import __version__
from .errors import SSIError, SpecError
from .api import Model, reproduce
from .model.checks import as_spec
from .numeric.evaluate import DEFAULT_D, DEFAULT_ETA


def _key_value(text: str, what: str) -> tuple[str, float]:
    if "=" not in text:
        raise SpecError(f"{what} '{text}': expected name=value")
    k, v = text.split("=", 1)
    try:
        return k.strip(), float(v)
    except ValueError:
        raise SpecError(f"{what} '{text}': '{v}' is not a number") from None


def _pairs(items, what) -> dict:
    out = {}
    for it in items or []:
        k, v = _key_value(it, what)
        out[k] = v
    return out


def cmd_derive(args) -> int:
    from .backends.registry import generate
    specs = [as_spec(s) for s in args.spec]  # validate every spec before writing any
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise SpecError(f"two specs share the name '{dup[0]}': they would write one module")
    for spec in specs:
        path, written = generate(spec, args.out, force=args.force)
        if not written:
            print(f"up to date: {path}", file=sys.stderr)
        note = unverified_note(path)
        if note:
            print(note, file=sys.stderr)
        print(path)
    return 0


def unverified_note(path) -> str:
    """One `ssi: note:` line when a generated module has quadrature rules whose node count
    no probe showed to meet its tolerance (QUADRATURE_UNVERIFIED), else ""."""
    from .backends.files import unverified_message
    message = unverified_message(path)
    return f"ssi: note: {message}" if message else ""


def cmd_latex(args) -> int:
    from .backends.files import write_atomic
    model = Model(args.spec)
    if args.out:
        out = Path(args.out)
        if out.suffix.lower() != ".tex":
            raise SpecError(f"--out {out}: expected a .tex file name")
    text = model.latex()
    if args.out:
        write_atomic(args.out, text)
        print(args.out)
    else:
        sys.stdout.write(text)
    return 0


def _table(result: dict) -> str:
    names = result["overlaps"]
    rows = [f"spec {result['spec']}  method {result['method']}  eta {result['eta']}  "
            f"d {result['d']}",
            "state      " + "  ".join(f"{k}={v:.6g}" for k, v in result["state"].items()),
            f"loss       {result['loss']:.10g}",
            f"{'':10} {'drift':>16} {'O(eta)':>16} {'O(eta^2)':>16}"]
    for k in names:
        rows.append(f"d{k}/dt{'':{max(0, 4 - len(k))}} {result['drift'][k]:16.8g} "
                    f"{result['drift_eta1'][k]:16.8g} {result['drift_eta2'][k]:16.8g}")
    if result["diffusion"] is None:
        rows.append(f"diffusion: not available ({result['diffusion_unavailable']})")
    else:
        rows.append("diffusion D = Cov(G)/d (rows/cols " + ", ".join(names) + ")")
        for row in result["diffusion"]:
            rows.append("  " + "  ".join(f"{x:14.6g}" for x in row))
    if "quadrature" in result:
        qd = result["quadrature"]
        rows.append(f"quadrature: {qd['nodes_per_dimension']} nodes/dim, loss error estimate "
                    f"{qd['loss_error_estimate']:.2g}")
        if qd.get("unverified_rule_dimensions"):
            rows.append("quadrature: node counts not shown to meet the tolerance for the "
                        + ", ".join(f"{k}-d rules ({n} nodes/dim)" for k, n in
                                    qd["unverified_rule_dimensions"].items())
                        + "; drift error estimate "
                        + ", ".join(f"{k} {e:.2g}" for k, e in
                                    qd["drift_error_estimate"].items()))
    return "\n".join(rows)


def cmd_evaluate(args) -> int:
    res = Model(args.spec, args.out).evaluate(_pairs(args.at, "--at"), eta=args.eta, d=args.d,
                                              params=_pairs(args.param, "--param"))
    print(json.dumps(res) if args.json else _table(res))
    return 0


def _print(result: dict, as_json: bool, table) -> None:
    print(json.dumps(result) if as_json else table(result))


def _fmt(v, spec=".6g"):
    return "-" if v is None else format(v, spec)


def _start_options(p) -> None:
    """--at and --start-seed: the start of a model with several directions (MATH.md 8)."""
    p.add_argument("--at", action="append", metavar="NAME=VALUE",
                   help="several directions: initial overlap, e.g. --at m1_1=0.01 (the others "
                        "from the random-like start)")
    p.add_argument("--start-seed", type=int, default=0,
                   help="several directions: seed of the random-like start (0)")


def cmd_solve(args) -> int:
    from .plots import check_png, trajectory_figure
    model = Model(args.spec, args.out)
    if args.plot:
        check_png(args.plot)
    res = model.solve(args.eta, args.d, m0=args.m0, e0=args.e0, t_max=args.t_max,
                      threshold=args.threshold, params=_pairs(args.param, "--param"),
                      init=_pairs(args.at, "--at"), start_seed=args.start_seed)
    if args.plot:
        trajectory_figure(res, args.plot)

    def table(r):
        rows = [f"spec {r['spec']}  eta {r['eta']}  d {r['d']}  threshold {r['threshold']}  "
                f"loss {r['loss_kind']}"
                + (f"  batch {r['batch']}" if r["batch"] != 1 else "")
                + (f"  schedule eta * ({r['schedule']})" if r["schedule"] else ""),
                f"escape time            {_fmt(r['escape_time'])}",
                f"semantic escape time   {_fmt(r['semantic_escape_time'])}",
                f"positional escape time {_fmt(r['positional_escape_time'])}",
                f"alignment time         {_fmt(r['alignment_time'])}",
                *(["direction escape times " + "  ".join(
                    f"w{k + 1}: {_fmt(v)}" for k, v in enumerate(r["direction_escape_times"]))]
                  if "direction_escape_times" in r else []),
                "phases                 " + ", ".join(
                    f"{p['name']} [{p['start']:.4g}, {p['end']:.4g}]" for p in r["phases"]),
                "fixed point            " + "  ".join(
                    f"{k}={v:.6g}" for k, v in (r["fixed_point"] or {}).items())
                + f"  ({'stable' if r['stable'] else 'unstable'})",
                f"final loss             {r['loss'][-1]:.6g}"]
        if r.get("no_escape_reason"):
            rows.insert(2, f"no escape: {r['no_escape_reason']}")
        if args.plot:
            rows.append(f"plot                   {args.plot}")
        return "\n".join(rows)
    _print(res, args.json, table)
    return 0


def cmd_sde(args) -> int:
    res = Model(args.spec, args.out).sde(
        args.eta, args.d, runs=args.runs, seed=args.seed, t_max=args.t_max,
        params=_pairs(args.param, "--param"), threshold=args.threshold,
        progress=not args.json and sys.stderr.isatty(), init=_pairs(args.at, "--at"),
        start_seed=args.start_seed, dt=args.dt, random_starts=args.random_starts)

    def table(r):
        q = r["quartiles"]
        return (f"spec {r['spec']}  eta {r['eta']}  d {r['d']}  runs {r['runs']}  dt {r['dt']:.4g}\n"
                f"escape time median {_fmt(r['median'])}  quartiles [{_fmt(q[0])}, {_fmt(q[1])}]"
                f"  escaped fraction {r['escaped_fraction']:.3f}")
    _print(res, args.json, table)
    return 0


def cmd_max_lr(args) -> int:
    res = Model(args.spec, args.out).max_lr(params=_pairs(args.param, "--param"))
    _print(res, args.json, lambda r: f"max_lr {_fmt(r['max_lr'], '.10g')}\n{r['reason']}")
    return 0


def cmd_fixed_points(args) -> int:
    res = Model(args.spec, args.out).fixed_points(args.eta, params=_pairs(args.param, "--param"))

    def table(r):
        rows = [f"spec {r['spec']}  eta {r['eta']}  ({len(r['fixed_points'])} fixed points)"]
        for fp in r["fixed_points"]:
            rows.append("  " + "  ".join(f"{k}={v: .6g}" for k, v in fp["state"].items())
                        + f"  {'stable' if fp['stable'] else 'unstable'}  eigenvalues "
                        + ", ".join(f"{a:.4g}" + (f"{b:+.4g}i" if b else "")
                                    for a, b in fp["eigenvalues"]))
        return "\n".join(rows)
    _print(res, args.json, table)
    return 0


def cmd_simulate(args) -> int:
    res = Model(args.spec, args.out).simulate(
        args.eta, args.d, args.steps, seeds=args.seeds, seed=args.seed, m0=args.m0, e0=args.e0,
        threshold=args.threshold, params=_pairs(args.param, "--param"),
        progress=not args.json and sys.stderr.isatty(), stop_when_escaped=args.stop_when_escaped,
        method=args.method, batch=args.batch, init=_pairs(args.init, "--init") or None,
        engine=args.engine)
    out = res.to_json()

    def table(r):
        rows = [f"spec {res.spec_name}  method {res.method}"
                + (f" ({res.engine} engine)" if res.method == "reduced" else "")
                + f"  eta {res.eta}  d {res.d}  "
                f"batch {res.batch}  steps {res.steps}  seeds {res.seeds}  t_end {res.t[-1]:.4g}",
                "final mean overlaps  " + "  ".join(f"{k}={v[-1]:.4g}"
                                                    for k, v in r["mean"].items())]
        for kind, vals in r["escape_times"].items():
            done = [v for v in vals if v is not None]
            med = f"{sorted(done)[len(done) // 2]:.4g}" if done else "-"
            rows.append(f"{kind:10} escape: {len(done)}/{len(vals)} seeds, median {med}")
        for k, vals in enumerate(r.get("direction_escape_times") or []):
            done = [v for v in vals if v is not None]
            med = f"{sorted(done)[len(done) // 2]:.4g}" if done else "-"
            rows.append(f"{f'w{k + 1}':10} escape: {len(done)}/{len(vals)} seeds, median {med}")
        return "\n".join(rows)
    _print(out, args.json, table)
    return 0


def _leap_line(r: dict) -> str:
    """`ssi sie` of a spec with several directions: information exponents and leaps."""
    ies = ", ".join(f"{k}: {'none' if v is None else v}"
                    for k, v in r["information_exponents"].items())
    leaps = " -> ".join("{" + ",".join(str(k) for k in s["directions"]) + "}"
                        + f" ({s['leap']})" for s in r["leaps"]) or "none"
    line = (f"information exponents: {ies}; leaps: {leaps}; leap complexity "
            f"{'none' if r['leap_complexity'] is None else r['leap_complexity']}")
    if r["unreachable"]:
        line += "; unreachable: " + ", ".join(str(k) for k in r["unreachable"])
    return line + f"; method {r['method']}"


def cmd_sie(args) -> int:
    res = Model(args.spec, args.out).sie()
    if "information_exponents" in res:
        _print(res, args.json, _leap_line)
        return 0
    _print(res, args.json, lambda r: (f"SIE {r['sie']}  flatness {r['flatness']}  "
                                      f"method {r['method']}"))
    return 0


def _gain_table(r: dict) -> str:
    lines = [f"tau_untied / tau_tied of {r['spec']} (lr scaling {r['lr_scaling']}, "
             f"eta {_fmt(r['eta'])}, d {_fmt(r['d'])}, threshold {r['threshold']})",
             f"{'L':>4} {'eta tied':>10} {'tau tied':>12} {'eta untied':>10} {'tau untied':>12} "
             f"{'gain':>10}"]
    notes = []
    for row in r["rows"]:
        t, u = row["tied"], row["untied"]
        lines.append(f"{row['L']:>4} {_fmt(t['eta']):>10} {_fmt(t['escape_time']):>12} "
                     f"{_fmt(u['eta']):>10} {_fmt(u['escape_time']):>12} {_fmt(row['gain']):>10}")
        for who, x in (("tied", t), ("untied", u)):
            if x["reason"]:
                notes.append(f"L = {row['L']} {who}: {x['reason']}")
    fit = r["fit"]
    lines.append("fit: " + ("-" if fit is None else
                            f"gain ~ {fit['c']:.4g} L^{fit['alpha']:.4g} "
                            f"(rms log residual {fit['rms_log_residual']:.2g})"))
    return "\n".join(lines + notes)


def cmd_gain(args) -> int:
    try:
        Ls = [int(x) for x in args.L.split(",") if x.strip()]
    except ValueError:
        raise SpecError(f"--L: expected comma-separated integers like 1,2,4,8, got "
                        f"{args.L!r}") from None
    out = args.out if args.out is not None else str(Path("generated") / "variants")
    res = Model(args.spec).gain(Ls, eta=args.eta, d=args.d, lr_scaling=args.lr_scaling,
                                params=_pairs(args.param, "--param"), out_dir=out,
                                threshold=args.threshold, progress=not args.json)
    _print(res, args.json, _gain_table)
    return 0


def cmd_reproduce(args) -> int:
    rep = reproduce(out=args.out, quick=args.quick, generated=args.generated,
                    derivations=args.derivations)
    print(Path(args.out) / "report.md")
    if rep["errors"]:
        raise SSIError(f"reproduce: {len(rep['errors'])} error(s), the first: "
                       f"{rep['errors'][0]} (report written: {Path(args.out) / 'report.md'})")
    return 0


def cmd_landscape(args) -> int:
    res = Model(args.spec, args.out).landscape(params=_pairs(args.param, "--param"))

    def table(r):
        rows = [f"spec {r['spec']}  " + "  ".join(f"{k}={v:.6g}" for k, v in
                                                    r["parameters"].items())
                + f"  loss {r['loss_kind']}",
                f"region             {r['region']}",
                f"initial direction  {r['initial_direction']}  (Hessian at the origin, m/e: "
                + "; ".join(" ".join(f"{x:.6g}" for x in row) for row in r["hessian"]) + ")",
                "minima (e, m, loss):"]
        for mn in r["minima"]:
            rows.append(f"  e={mn['e']:.6f}  m={mn['m']:.6f}  loss={mn['loss']:.8g}  {mn['kind']}")
        return "\n".join(rows)
    _print(res, args.json, table)
    return 0


def cmd_surface(args) -> int:
    import numpy as np
    from .analysis.landscape import surface_figure
    from .plots import check_png
    out = Path(args.out_file)
    if out.suffix.lower() != ".npz":
        raise SpecError(f"--out {out}: expected a .npz file name")
    if not out.parent.exists():
        raise SpecError(f"--out {out}: folder {out.parent} does not exist")
    if args.plot:
        check_png(args.plot)
    res = Model(args.spec, args.gen).surface(args.grid or [],
                                             params=_pairs(args.param, "--param"))
    tmp = out.with_name(f".{out.name}.tmp.npz")
    np.savez(tmp, loss=res["loss"], axes=np.array(res["axes"]),
             **{k: res[k] for k in res["axes"]},
             **{f"param_{k}": v for k, v in res["parameters"].items()})
    tmp.replace(out)
    if args.plot:
        surface_figure(res, args.plot)
    finite = res["loss"][np.isfinite(res["loss"])]
    print(json.dumps({"out": str(out), "plot": args.plot, "shape": list(res["loss"].shape),
                      "min": float(finite.min()), "max": float(finite.max())}))
    return 0


def cmd_phase_diagram(args) -> int:
    from .analysis.landscape import phase_diagram_figure
    from .plots import check_png
    if args.plot:
        check_png(args.plot)
    res = Model(args.spec, args.out).phase_diagram(args.grid or [],
                                                   transition_along=args.transition,
                                                   params=_pairs(args.param, "--param"))
    if args.plot:
        phase_diagram_figure(res, args.plot)

    def table(r):
        rows = [f"spec {r['spec']}  loss {r['loss_kind']}"]
        if "region_index" in r:
            from collections import Counter
            cnt = Counter(i for row in r["region_index"] for i in row)
            for i, name in enumerate(r["regions"]):
                if cnt.get(i):
                    rows.append(f"  {cnt[i]:6d} points  {name}")
        for t in r.get("transition", []):
            rows.append("  transition  " + "  ".join(f"{k}={_fmt(v, '.10g')}"
                                                     for k, v in t.items()))
        if args.plot:
            rows.append(f"plot {args.plot}")
        return "\n".join(rows)
    _print(res, args.json, table)
    return 0


def cmd_sweep(args) -> int:
    from .analysis.sweep.run import SweepInterrupted, check_out
    from .plots import check_png
    check_out(args.out_csv)
    if args.plot:
        check_png(args.plot)
    try:
        res = Model(args.spec, args.generated).sweep(
            args.grid, quantities=args.quantity, method=args.method,
            params=_pairs(args.param, "--param"), runs=args.runs, seed=args.seed,
            out=args.out_csv, plot=args.plot, scheduler=args.scheduler, eta=args.eta, d=args.d,
            threshold=args.threshold, t_max=args.t_max, workers=args.workers,
            simulator=args.simulator, progress=not args.json and sys.stderr.isatty())
    except SweepInterrupted as exc:
        print(f"ssi: {exc}", file=sys.stderr)
        return 130

    def table(r):
        missing = [row for row in r["rows"] if row["value"] is None]
        rows = [f"sweep {r['spec']}  method {r['method']}  "
                + "  ".join(f"{k} ({len(v)})" for k, v in r["grid"].items())
                + f"  quantities {', '.join(r['quantities'])}",
                f"{r['points']} points: {r['computed']} computed ({r['executor']}), "
                f"{r['resumed']} already in {r['out']}  ({r['wall_s']:.1f} s)",
                f"{len(r['rows']) - len(missing)} values, {len(missing)} rows without a value "
                f"(see their status)",
                f"table                  {r['out']}"]
        if r["plot"]:
            rows.append(f"plot                   {r['plot']}")
        if r["plot_note"]:
            rows.append(f"note: {r['plot_note']}")
        return "\n".join(rows)
    _print(res, args.json, table)
    return 0


def _common(p, eta_required=True):
    p.add_argument("spec", help="model spec (TOML)")
    p.add_argument("--eta", type=float, required=eta_required, default=None,
                   help="learning rate per step")
    p.add_argument("--d", type=float, required=eta_required, default=None, help="dimension")
    p.add_argument("--param", action="append", metavar="NAME=VALUE",
                   help="parameter value overriding the spec's default")
    p.add_argument("--out", default="generated", help="folder of generated modules")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ssi", description="Exact overlap equations of online SGD "
                                "on sequence single-index models (see MATH.md).")
    p.add_argument("--version", action="version", version=f"ssi-symbolic {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("derive", help="derive and write generated/<name>.py")
    d.add_argument("spec", nargs="+", help="model spec(s) (TOML)")
    d.add_argument("--out", default="generated", help="output folder (default generated/)")
    d.add_argument("--force", action="store_true", help="regenerate even if up to date")
    d.set_defaults(func=cmd_derive)

    la = sub.add_parser("latex", help="LaTeX document of the loss, drift and diffusion")
    la.add_argument("spec")
    la.add_argument("--out", help="write to this .tex file instead of stdout")
    la.set_defaults(func=cmd_latex)

    ev = sub.add_parser("evaluate", help="loss, drift and diffusion at one state")
    ev.add_argument("spec")
    ev.add_argument("--at", action="append", metavar="NAME=VALUE",
                    help="overlap value, e.g. --at m=0.3 --at e=0.1 (missing: 0, q: 1)")
    ev.add_argument("--eta", type=float, default=DEFAULT_ETA, help="learning rate (0.05)")
    ev.add_argument("--d", type=float, default=DEFAULT_D, help="dimension for D (1000)")
    ev.add_argument("--param", action="append", metavar="NAME=VALUE",
                    help="parameter value overriding the spec's default")
    ev.add_argument("--out", default="generated", help="folder of generated modules")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(func=cmd_evaluate)

    so = sub.add_parser("solve", help="integrate the overlap ODE: escape, alignment, phases")
    _common(so)
    so.add_argument("--m0", type=float, default=None, help="initial m (default 1/sqrt(d))")
    so.add_argument("--e0", type=float, default=None, help="initial e (default 0)")
    _start_options(so)
    so.add_argument("--t-max", type=float, default=None, help="stop time (default: converged)")
    so.add_argument("--threshold", type=float, default=0.5, help="escape threshold theta")
    so.add_argument("--plot", default=None, metavar="FILE.png", help="draw the trajectory")
    so.set_defaults(func=cmd_solve)

    sd = sub.add_parser("sde", help="escape-time distribution of the finite-d SDE")
    _common(sd)
    sd.add_argument("--runs", type=int, default=1000, help="number of paths (1000)")
    sd.add_argument("--seed", type=int, default=0)
    sd.add_argument("--t-max", type=float, default=None)
    sd.add_argument("--threshold", type=float, default=0.5)
    sd.add_argument("--dt", type=float, default=None,
                    help="Euler-Maruyama step in t (default 0.005 / eta, at least 1 / d)")
    sd.add_argument("--random-starts", action="store_true",
                    help="several directions: every path from its own random-like start "
                         "(drawn with --start-seed + path index), as the simulator's seeds")
    _start_options(sd)
    sd.set_defaults(func=cmd_sde)

    ml = sub.add_parser("max-lr", help="maximal learning rate and why")
    _common(ml, eta_required=False)
    ml.set_defaults(func=cmd_max_lr)

    fp = sub.add_parser("fixed-points", help="fixed points of the drift and their stability")
    fp.add_argument("spec")
    fp.add_argument("--eta", type=float, required=True)
    fp.add_argument("--param", action="append", metavar="NAME=VALUE")
    fp.add_argument("--out", default="generated")
    fp.add_argument("--json", action="store_true")
    fp.set_defaults(func=cmd_fixed_points)

    si = sub.add_parser("simulate", help="finite-d online SGD, vectorised over seeds")
    _common(si)
    si.add_argument("--steps", type=int, required=True, help="SGD steps (t = steps / d)")
    si.add_argument("--seeds", type=int, default=8, help="independent runs (8)")
    si.add_argument("--seed", type=int, default=0)
    si.add_argument("--m0", type=float, default=None)
    si.add_argument("--e0", type=float, default=None)
    si.add_argument("--threshold", type=float, default=0.5)
    si.add_argument("--stop-when-escaped", action="store_true",
                    help="stop once every seed has escaped")
    si.add_argument("--method", default="full", metavar="full|reduced",
                    help="full: d-dimensional SGD (default); reduced: the exact Markov chain of "
                         "the overlaps (MATH.md 10), cost per step independent of d")
    si.add_argument("--engine", default="numpy", metavar="numpy|numba",
                    help="--method reduced: numpy (default, vectorised over seeds) or numba "
                         "(compiled, one random stream per seed, seeds on all cores; students "
                         "with one direction; needs the [fast] extra)")
    si.add_argument("--batch", type=int, default=None,
                    help="sequences averaged per step (default: the spec's [training] batch)")
    si.add_argument("--init", action="append", metavar="NAME=VALUE",
                    help="several directions: the start, e.g. --init m1_1=0.3 --init q1_2=0.1 "
                         "(missing overlaps 0, Q[k,k] = 1; default: random vectors per seed)")
    si.set_defaults(func=cmd_simulate)

    ie = sub.add_parser("sie", help="sequence information exponent and flatness index (several "
                        "directions: information exponents per direction and leaps)")
    ie.add_argument("spec")
    ie.add_argument("--out", default="generated", help="folder of generated modules")
    ie.add_argument("--json", action="store_true")
    ie.set_defaults(func=cmd_sie)

    ga = sub.add_parser("gain", help="tied versus untied escape times and their ratio in L")
    ga.add_argument("spec", help="model spec (TOML) whose links hold for any L (z, tsum, L)")
    ga.add_argument("--L", default="1,2,4,8", help="sequence lengths, comma-separated")
    ga.add_argument("--eta", type=float, default=0.05, help="common learning rate (same)")
    ga.add_argument("--lr-scaling", choices=("same", "max"), default="same",
                    help="same: the common eta; max: each student at the eta that minimises "
                    "its ODE escape time")
    ga.add_argument("--d", type=float, default=10_000, help="dimension (m0 = 1/sqrt(d))")
    ga.add_argument("--threshold", type=float, default=0.5, help="escape threshold")
    ga.add_argument("--param", action="append", metavar="NAME=VALUE")
    ga.add_argument("--out", default=None, help="folder for the derived variants "
                    "(default generated/variants, not committed)")
    ga.add_argument("--json", action="store_true", help="print one JSON object")
    ga.set_defaults(func=cmd_gain)
    rp = sub.add_parser("reproduce", help="derive every spec and write the report with figures")
    rp.add_argument("--out", default="results", help="report folder (default results/)")
    rp.add_argument("--quick", action="store_true",
                    help="smaller d, fewer seeds and paths (a few minutes)")
    rp.add_argument("--generated", default="generated",
                    help="folder of generated modules (default generated/)")
    rp.add_argument("--derivations", default="derivations",
                    help="folder of the specs to derive (default derivations/)")
    rp.set_defaults(func=cmd_reproduce)
    # softmax attention landscapes (issue 4)
    ls = sub.add_parser("landscape", help="minima, Hessian at the origin and region of an "
                        "attention spec")
    ls.add_argument("spec")
    ls.add_argument("--param", action="append", metavar="NAME=VALUE")
    ls.add_argument("--out", default="generated", help="folder of generated modules")
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=cmd_landscape)

    su = sub.add_parser("surface", help="loss on a grid of (e, m), NaN outside the unit disk")
    su.add_argument("spec")
    su.add_argument("--grid", action="append", metavar="NAME=START:STOP:COUNT", required=True,
                    help="e=-1:1:200 and m=-1:1:200 (both ends included)")
    su.add_argument("--param", action="append", metavar="NAME=VALUE")
    su.add_argument("--out", dest="out_file", required=True, metavar="FILE.npz")
    su.add_argument("--plot", default=None, metavar="FILE.png")
    su.add_argument("--generated", dest="gen", default="generated",
                    help="folder of generated modules")
    su.set_defaults(func=cmd_surface)

    ph = sub.add_parser("phase-diagram", help="regions on a parameter grid and the "
                        "semantic/positional transition")
    ph.add_argument("spec")
    ph.add_argument("--grid", action="append", metavar="NAME=START:STOP:COUNT", required=True)
    ph.add_argument("--transition", default=None, metavar="PARAM",
                    help="root-find the switch of the initial direction in this parameter")
    ph.add_argument("--param", action="append", metavar="NAME=VALUE")
    ph.add_argument("--plot", default=None, metavar="FILE.png")
    ph.add_argument("--out", default="generated", help="folder of generated modules")
    ph.add_argument("--json", action="store_true")
    ph.set_defaults(func=cmd_phase_diagram)

    sw = sub.add_parser("sweep", help="a quantity on a parameter grid, locally or on a Dask "
                        "cluster, written to a CSV table")
    sw.add_argument("spec", help="model spec (TOML)")
    sw.add_argument("--grid", action="append", metavar="NAME=START:STOP:COUNT", required=True,
                    help="eta=0.02:0.3:15 (both ends included; :log for geometric spacing) or "
                    "d=1e3,1e4,1e5; NAME: a spec parameter, eta, d, L, batch or "
                    "threshold (repeatable)")
    sw.add_argument("--quantity", default="escape_time",
                    help="comma-separated: escape_time, semantic_escape_time, "
                    "positional_escape_time, alignment_time, escaped_fraction, loss, max_lr")
    sw.add_argument("--method", choices=("ode", "sde", "simulate"), default="ode")
    sw.add_argument("--simulator", choices=("full", "reduced"), default="full",
                    help="--method simulate: d-dimensional SGD (full) or the exact overlap "
                    "chain (reduced, cost per step independent of d)")
    sw.add_argument("--runs", type=int, default=None,
                    help="SDE paths (sde, default 1000) or seeds (simulate, default 8) per point")
    sw.add_argument("--seed", type=int, default=0, help="sweep seed (per-point seeds from it)")
    sw.add_argument("--eta", type=float, default=None, help="learning rate when not swept")
    sw.add_argument("--d", type=float, default=None, help="dimension when not swept")
    sw.add_argument("--threshold", type=float, default=None,
                    help="escape threshold when not swept (0.5)")
    sw.add_argument("--t-max", type=float, default=None,
                    help="stop time (sde, simulate default: 4 x the ODE escape time)")
    sw.add_argument("--param", action="append", metavar="NAME=VALUE")
    sw.add_argument("--out", dest="out_csv", required=True, metavar="FILE.csv",
                    help="the table, appended to as points complete; a rerun skips its rows")
    sw.add_argument("--plot", default=None, metavar="FILE.png")
    sw.add_argument("--scheduler", default=None, metavar="tcp://HOST:PORT",
                    help="run on an existing Dask scheduler (pip install '.[cluster]')")
    sw.add_argument("--workers", type=int, default=None,
                    help="local processes (default: all cores; 1: in this process)")
    sw.add_argument("--generated", default="generated",
                    help="folder of generated modules (default generated/)")
    sw.add_argument("--json", action="store_true", help="print one JSON object with the rows")
    sw.set_defaults(func=cmd_sweep)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SSIError as exc:
        print(f"ssi: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into head & co.
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("ssi: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not bad input: one line, exit 1 (SSI_DEBUG=1: traceback)
        if os.environ.get("SSI_DEBUG"):
            raise
        where = traceback.extract_tb(exc.__traceback__)[-1]
        print(f"ssi: internal error: {type(exc).__name__}: {exc} (at {Path(where.filename).name}:"
              f"{where.lineno}; rerun with SSI_DEBUG=1 for the traceback and report it)",
              file=sys.stderr)
        return 1


#: commands whose process ends without freeing its objects one by one (see run)
QUICK_EXIT = frozenset({"derive"})


def run() -> None:
    """The program's entry point (the `ssi` script, `python -m ssi_symbolic`): main(), then the
    exit. After `ssi derive` the interpreter would free every expression of the derivation and
    SymPy's caches one by one (0.34-0.36 s after relu(z1) + erf(z2) with encoding, of a 5-6 s
    run); such a process ends at once instead, once its output is flushed and its exit handlers
    have run (its modules are written and closed by then). Any other command, or a process with
    other threads, exits normally."""
    argv = sys.argv[1:]
    code = main(argv)
    if argv and argv[0] in QUICK_EXIT and threading.active_count() == 1:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed pipe: nothing more can be said
                pass
        atexit._run_exitfuncs()
        os._exit(code or 0)  # main returns an int or None (success)
    sys.exit(code)


if __name__ == "__main__":
    run()
