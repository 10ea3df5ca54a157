"""What the sections share and return: Section (one part of the report), Context (folders,
settings, progress, the derivation status of the specs, the loaded models) and Progress (the
progress lines on stderr)."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SSIError
from .settings import Settings


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
        from ..model.checks import check_params
        from ..model.spec import load_spec
        if name not in self.modules:  # load each module once per run
            spec = load_spec(self.spec_path(name))
            self.modules[name] = (spec, ensure_module(spec, self.generated))
        spec, mod = self.modules[name]
        return spec, OverlapODE(mod, eta, check_params(spec, None))


__all__ = ["Section", "Progress", "Context"]
