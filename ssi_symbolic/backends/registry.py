"""One registry of backends: each turns a spec into generated module source; one function picks
the backend for a spec.

    exact       the symbolic path (symbolic.derive + backends.exact): Gaussian moments token by
                token, tensor Gauss-Hermite nodes where a link is not polynomial
    attention   softmax attention and the norm loss (backends.attention): quadrature tables

Consumers call :func:`generate`, :func:`ensure_module` or :func:`links_module`; none of them
needs to know which backend wrote a module (they ask :mod:`ssi_symbolic.backends.contract`
what it can do).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..model.spec import ModelSpec
from . import attention, exact
from .contract import checked
from .files import load_module, module_path, read_hash


@dataclass(frozen=True)
class Backend:
    """A way to turn a spec into a generated module.

    handles(spec): whether this backend writes the spec's module.
    generate(spec, out_dir, force, diffusion) -> (path, written).
    salt(diffusion) -> the string hashed with the spec into the module's SPEC_HASH.
    drift_only: whether diffusion=False gives a separate, cheaper <name>_drift_only.py."""

    name: str
    handles: Callable[[ModelSpec], bool]
    generate: Callable
    salt: Callable[[bool], str]
    drift_only: bool


#: in order of preference: the first backend that handles a spec writes its module
BACKENDS = (
    Backend("attention", attention.handles, attention.generate, attention.salt, False),
    Backend("exact", lambda spec: True, exact.generate, exact.salt, True),
)


def backend_for(spec: ModelSpec) -> Backend:
    """The backend that writes the module of a spec (SpecError for a mini-batch spec or one
    with several directions on the attention backend, whose tables are for one sequence per
    step and one head)."""
    backend = next(b for b in BACKENDS if b.handles(spec))
    if backend.name == "attention" and spec.multi:
        from ..errors import SpecError
        raise SpecError(f"{spec.where('student.directions')}: softmax attention with several "
                        f"heads (directions) is not supported yet")
    if backend.name != "exact" and not spec.diffusion:
        from ..errors import SpecError
        raise SpecError(f"{spec.where('derivation.diffusion')}: the {backend.name} backend has "
                        f"no drift-only module")
    if backend.name == "attention" and spec.batch != 1:
        from ..errors import SpecError
        raise SpecError(f"{spec.where('training.batch')}: mini-batches are not implemented for "
                        f"softmax attention or the norm loss (batch = 1 only)")
    return backend


def generate(spec: ModelSpec, out_dir="generated", force: bool = False,
             diffusion: bool = True) -> tuple[Path, bool]:
    """Write <out_dir>/<name>.py (or <name>_drift_only.py for diffusion=False, or for a spec
    with [derivation] diffusion = false, where the backend has such a module) unless it is up
    to date. Returns (path, written)."""
    return backend_for(spec).generate(spec, out_dir, force=force,
                                      diffusion=diffusion and spec.diffusion)


def is_current(spec: ModelSpec, out_dir="generated", diffusion: bool = True) -> bool:
    """Whether the module file of a spec exists and carries the spec's current hash."""
    b = backend_for(spec)
    full = (diffusion and spec.diffusion) or not b.drift_only
    return read_hash(module_path(spec, out_dir, full)) == spec.hash(b.salt(full))


def ensure_module(spec: ModelSpec, out_dir="generated", diffusion: bool = True):
    """Generate if needed, then load and check against the module contract: the generated
    module of a spec."""
    path, _ = generate(spec, out_dir, diffusion=diffusion)
    return checked(load_module(path), spec)


def links_module(spec: ModelSpec, out_dir="generated"):
    """A module with the spec's links and link gradients (all a simulator needs): the full
    module when it is up to date, else the drift-only one, generated if needed, so a simulation
    never waits for a Cov(G) derivation."""
    if spec.diffusion and is_current(spec, out_dir, True):
        return checked(load_module(module_path(spec, out_dir, True)), spec)
    return ensure_module(spec, out_dir, diffusion=False)


__all__ = ["Backend", "BACKENDS", "backend_for", "generate", "is_current", "ensure_module",
           "links_module"]
