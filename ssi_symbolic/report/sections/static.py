"""Section 1: the SIE and the flatness index of the paper's example targets (no figure), each
checked against the value stated in MATH.md section 5 or by the paper."""
from __future__ import annotations

import time
from pathlib import Path

from ..context import Context, Section
from ..format import table

TITLE = "Sequence information exponent and flatness of example targets"


def example_targets(derivations: Path) -> list:
    """The example targets of MATH.md section 5, each (label, spec, stated SIE, stated flatness,
    where the statement comes from); stated values None when nothing is stated."""
    from ...model.spec import load_spec, make_spec
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


def static_numbers(ctx: Context) -> dict:
    """The static analysis of every example target. Returns {"numbers": {"targets": [...]}
    (report.json), "positional": each target's C matrix (None without positional encoding),
    "sources": where each stated value comes from, "errors": the targets whose SIE or flatness
    differ from the stated ones}."""
    from ...analysis.hermite import static_analysis
    ctx.spec_path("he4_example_pe")  # an error when it failed to derive
    nums, positional, sources, errors = [], [], [], []
    targets = example_targets(ctx.derivations)
    t0 = time.monotonic()
    for i, (label, spec, s_sie, s_flat, source) in enumerate(targets, 1):
        gen = ctx.generated if spec.source else ctx.scratch  # made in Python: scratch folder
        r = static_analysis(spec, out_dir=gen)
        agree = (s_sie is None or r["sie"] == s_sie) and (s_flat is None or
                                                          r["flatness"] == s_flat)
        if not agree:
            errors.append(f"{label}: SIE {r['sie']}, flatness {r['flatness']} differ from the "
                          f"stated {s_sie}, {s_flat} ({source})")
        positional.append([[float(c) for c in row] for row in spec.C] if spec.r else None)
        sources.append(source)
        nums.append({"target": label, "spec": spec.name, "L": spec.L, "positional": spec.r > 0,
                     "sie": r["sie"], "flatness": r["flatness"], "method": r["method"],
                     "student_sie": r["student_sie"], "leading_terms": r["leading_terms"],
                     "stated_sie": s_sie, "stated_flatness": s_flat, "agrees": agree})
        ctx.progress.item("sie", i, len(targets), t0)
    return {"numbers": {"targets": nums}, "positional": positional, "sources": sources,
            "errors": errors}


def static_text(data: dict) -> str:
    """The section's markdown: the definitions, the targets whose positional encoding lowers the
    flatness below the SIE, and a table of the targets."""
    nums = data["numbers"]["targets"]
    rows = [[r["target"], r["L"], "none" if C is None else "C = " + str(C), r["sie"],
             r["flatness"], r["method"], f"`{r['leading_terms']}`", source,
             "yes" if r["agrees"] else "**no**"]
            for r, C, source in zip(nums, data["positional"], data["sources"])]
    low = [r["target"] for r in nums if r["positional"] and r["flatness"] is not None
           and r["sie"] is not None and r["flatness"] < r["sie"]]
    lowered = (" The positional encoding lowers the flatness below the SIE for: "
               + "; ".join(low) + "." if low else "")
    return (
        "SIE: the smallest |alpha| >= 1 with a non-zero Hermite coefficient E[g He_alpha] of the "
        "teacher link (`hermite.sie`); flatness: the lowest order of a non-zero derivative of the "
        "population loss R at the origin jointly in (m, e) (`hermite.static_analysis`). The "
        "student link is the teacher's (tied, spherical SGD); the leading terms are the "
        "lowest-order homogeneous part of R." + lowered + "\n\n"
        + table(["target", "L", "positional", "SIE", "flatness", "method",
                 "leading terms of R", "stated", "agrees"], rows))


def section_static(ctx: Context) -> Section:
    """SIE and flatness index of the paper's example targets."""
    data = static_numbers(ctx)
    return Section("static", TITLE, text=static_text(data), numbers=data["numbers"],
                   errors=data["errors"])


__all__ = ["section_static", "static_numbers", "static_text", "example_targets"]
