"""Running the report: SECTIONS in report order, run_section (an exception becomes the section's
error), the assembly of report.md, and run_report (derive, run the sections, write report.md,
report.json and the figures)."""
from __future__ import annotations

import importlib
import json
import tempfile
import time
import traceback
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from ..errors import SSIError
from ..version import __version__
from .context import Context, Progress, Section
from .format import jsonable, one_line
from .sections import (section_derivations, section_escape_vs_d, section_gain,
                       section_learning_rate, section_phase_diagram, section_static,
                       section_trajectories)
from .settings import FULL, QUICK, Settings

#: The sections in report order. A section is any function ctx -> Section (a module in
#: sections/); it may read ctx.settings (add fields to Settings with quick and full values) and
#: must write its figures with ctx.figure(name). Adding one is writing its module and inserting
#: its section_xxx here.
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
        importlib.import_module("matplotlib")
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
        sec = Section(key, title, text=f"**Error**: {one_line(exc)}",
                      errors=[f"{key}: {one_line(exc)}"])
        if ctx.progress.enabled and not isinstance(exc, SSIError):  # a bug: show where
            ctx.progress.stream.write("".join(traceback.format_exception(exc)))
    sec.seconds = time.perf_counter() - t0
    return sec


def _markdown(sections, ctx: Context, meta: dict) -> str:
    """report.md: the header, the errors, the settings, then every section with its figures."""
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
    write_atomic(out / "report.json", json.dumps(jsonable(report), indent=1) + "\n")
    prog.line(f"wrote {out / 'report.md'} and {out / 'report.json'} "
              f"({sum(len(s.figures) for s in done)} figures) in {meta['seconds']:.1f} s")
    return jsonable(report)


__all__ = ["SECTIONS", "run_section", "run_report"]
