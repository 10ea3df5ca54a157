"""Section 0: the derivation of every spec in derivations/ (no figure). Fills ctx.derived, which
the other sections read through ctx.spec_path."""
from __future__ import annotations

import time

from ...errors import SSIError
from ..context import Context, Section
from ..format import one_line, table


def derivations_numbers(ctx: Context) -> dict:
    """Derive every spec of ctx.derivations into ctx.generated (an entry per spec in
    ctx.derived). Returns {"numbers": report.json numbers, "entries": this run's entries in file
    order, "errors": one line per failed spec, "derivations", "generated": the folders}."""
    from ...backends.contract import checked
    from ...backends.files import load_module
    from ...backends.registry import generate
    from ...model.spec import load_spec
    files = sorted(ctx.derivations.glob("*.toml"))
    if not files:
        raise SSIError(f"no specs (*.toml) in {ctx.derivations}")
    entries, errors, names, t0 = [], [], {}, time.monotonic()
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
            entry["method"] = checked(load_module(path), spec).METHOD
        except Exception as exc:  # a spec that fails is reported, never skipped
            entry["status"] = "error"
            entry["error"] = one_line(exc)
            errors.append(f"derivation of {f.name} failed: {entry['error']}")
        entry["seconds"] = time.perf_counter() - t1
        ctx.derived[f.stem] = entry
        entries.append(entry)
        if ctx.progress.tty:
            ctx.progress.item(f"derive {f.name:28.28}", i, len(files), t0)
    ok = sum(1 for e in ctx.derived.values() if e["status"] != "error")
    return {"numbers": {"specs": ctx.derived, "succeeded": ok, "total": len(files)},
            "entries": entries, "errors": errors, "derivations": ctx.derivations,
            "generated": ctx.generated}


def derivations_text(data: dict) -> str:
    """The section's markdown: the count of successes and a table of the specs."""
    nums = data["numbers"]
    rows = [[f"`{e['file']}`", e["status"], e["method"] or "-", f"{e['seconds']:.2f}",
             e["error"] or ""] for e in data["entries"]]
    return (f"Every spec in `{data['derivations']}` derived with `backends.registry.generate` into "
            f"`{data['generated']}` (a module is rewritten only when its spec hash changed): "
            f"{nums['succeeded']} of {nums['total']} succeeded.\n\n"
            + table(["spec", "status", "method", "seconds", "error"], rows))


def section_derivations(ctx: Context) -> Section:
    """Derivation of every spec in derivations/."""
    data = derivations_numbers(ctx)
    return Section("derivations", "Derivations", text=derivations_text(data),
                   numbers=data["numbers"], errors=data["errors"])


__all__ = ["section_derivations", "derivations_numbers", "derivations_text"]
