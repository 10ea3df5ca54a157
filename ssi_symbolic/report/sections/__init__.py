"""The report's sections, one module each. Every module computes its numbers (a plain dict,
``<key>_numbers(ctx)``), draws its figure from them (``<key>_figure(s)(ctx, data)``), writes its
markdown from them (``<key>_text(data, ...)``), and ``section_<key>(ctx) -> Section`` calls the
three; derivations and static have no figure."""
from .derivations import section_derivations
from .escape_vs_d import section_escape_vs_d
from .gain import section_gain
from .learning_rate import section_learning_rate
from .phase_diagram import section_phase_diagram
from .static import example_targets, section_static
from .trajectories import section_trajectories

__all__ = ["section_derivations", "section_static", "section_trajectories",
           "section_escape_vs_d", "section_gain", "section_phase_diagram",
           "section_learning_rate", "example_targets"]
