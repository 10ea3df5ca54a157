"""ssi-symbolic: exact overlap equations of online SGD on sequence single-index models and
single-layer attention, from a model spec to generated NumPy code, predictions and LaTeX.

The pipeline, one sub-package per stage (imports point down this list, never up):

    model/      the spec: ModelSpec, TOML reading, the link vocabulary, argument checks
    symbolic/   SymPy: Gaussian expectations token by token, the Derivation, LaTeX
    backends/   a spec becomes generated/<name>.py: the registry, the exact and attention
                backends, the printer, the runtime helpers, the module contract
    numeric/    users of a generated module (no SymPy): evaluate, ODE, SDE, simulator
    analysis/   questions asked of a model: SIE and flatness, gain, landscapes, predictions
    report/     `ssi reproduce`: one module per report section
    api.py      Model: one call per command; cli.py: the `ssi` command line over it

Start with ``ssi_symbolic.load("derivations/he2_L1.toml")`` (see ssi_symbolic.api).
"""
from .version import __version__
from .api import Model, load, reproduce, sweep
from .errors import QuadratureWarning

__all__ = ["__version__", "Model", "load", "reproduce", "sweep", "QuadratureWarning"]
