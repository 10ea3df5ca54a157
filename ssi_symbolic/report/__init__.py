"""`ssi reproduce`: the project's main job (issue 5, item 4).

Derives every spec in derivations/ (backends.registry.generate into the generated-modules folder), then
writes a report of the paper's results as predicted by the tool:

    <out>/report.md       markdown, one section after the other, figures linked
    <out>/report.json     every section's numbers (JSON), the settings and the errors
    <out>/figures/*.png   the figures (matplotlib, Agg backend)

The package, one job per module (imports point down this list; nothing but this file imports
run.py):

    settings.py   Settings, the QUICK and FULL values, the escape threshold THETA
    context.py    Section (one part of the report), Context (what sections share), Progress
    format.py     numbers in markdown, plain JSON, markdown tables, exceptions as one line
    fits.py       fits of the escape time against d, the median with non-escaped runs
    figures.py    matplotlib (Agg) and saving a figure
    sections/     one module per section: derivations, static, trajectories, escape_vs_d,
                  gain, phase_diagram, learning_rate; each computes its numbers (a plain
                  dict), then draws its figure and writes its markdown from them, and
                  section_xxx(ctx) -> Section calls the three
    run.py        SECTIONS (the report order), run_section, report.md, run_report

A section is a function ``section_xxx(ctx: Context) -> Section`` (markdown text, figure paths,
JSON-able numbers); adding one is writing its module in sections/ and inserting it in SECTIONS.
A section that raises is reported as an error in the report (and the command exits with code 2
after writing it); a spec that fails to derive is an error too, never skipped silently.

Progress goes to stderr: one line per section with its elapsed time and the total, a progress bar
(or, when stderr is not a terminal, one line per item) for the long parts. `quick` selects the
QUICK settings (smaller d, fewer seeds and paths), otherwise FULL. Conventions: MATH.md.
"""
from .context import Context, Progress, Section
from .run import SECTIONS, run_report, run_section
from .sections import (example_targets, section_derivations, section_escape_vs_d, section_gain,
                       section_learning_rate, section_phase_diagram, section_static,
                       section_trajectories)
from .settings import FULL, QUICK, THETA, Settings

__all__ = ["Settings", "QUICK", "FULL", "THETA", "Section", "Context", "Progress", "SECTIONS",
           "run_report", "run_section", "example_targets", "section_derivations",
           "section_static", "section_trajectories", "section_escape_vs_d", "section_gain",
           "section_phase_diagram", "section_learning_rate"]
