"""The public Python API: one call per command, the same results as the CLI.

    import ssi_symbolic as ssi

    model = ssi.load("derivations/he2_L1.toml")          # or ssi.Model.from_links(...)
    model.derive()                                       # generated/he2_L1.py
    print(model.latex())                                 # LaTeX of R, the drift and Cov(G)
    model.evaluate(m=0.3, eta=0.05, d=1000)              # `ssi evaluate --json`
    model.solve(eta=0.05, d=1000)                        # `ssi solve --json`
    model.sde(eta=0.05, d=1000, runs=1000)               # `ssi sde --json`
    model.simulate(eta=0.05, d=1000, steps=40000)        # `ssi simulate --json`
    model.sie(); model.max_lr(); model.fixed_points(eta=0.05)
    model.gain(Ls=(1, 2, 4, 8)); model.landscape(); model.surface(...); model.phase_diagram(...)
    model.sweep(["eta=0.02:0.3:15", "d=1e3,1e4"], "escape_time", out="sweep.csv")  # `ssi sweep`
    ssi.reproduce("results", quick=True)                 # `ssi reproduce`

Every method returns the JSON-able dict the CLI prints with --json (simulate returns the
SimulationResult, whose to_json() is that dict). Errors are SSIError subclasses with the one-line
message the CLI prints after `ssi: error:`.
"""
from __future__ import annotations

from pathlib import Path

from .backends.contract import ContractError
from .backends.registry import backend_for, ensure_module, generate
from .errors import QuadratureWarning
from .model.checks import as_spec
from .model.spec import ModelSpec, make_spec

DEFAULT_VARIANTS = Path("generated") / "variants"


class Model:
    """A model spec and its generated module (in `out_dir`, default generated/).

    The module is derived on first use (only when the spec or the tool changed since the
    module was written); `derive(force=True)` rewrites it."""

    def __init__(self, spec, out_dir="generated"):
        self.spec: ModelSpec = as_spec(spec)
        self.out_dir = Path(out_dir)

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls, path, out_dir="generated") -> "Model":
        """The model of a TOML spec file."""
        return cls(path, out_dir)

    @classmethod
    def from_links(cls, name: str, L: int, teacher, student=None, out_dir="generated",
                   **options) -> "Model":
        """A model from link strings, as `model.spec.make_spec(name, L, teacher, student,
        positional=None, parameters=None, noise=0.0, spherical=True)`."""
        return cls(make_spec(name, L, teacher, student, **options), out_dir)

    def __repr__(self) -> str:
        return (f"Model({self.spec.name!r}, L={self.spec.L}, overlaps={self.overlaps}, "
                f"backend={self.backend!r})")

    # ------------------------------------------------------------------ what it is
    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def overlaps(self) -> tuple[str, ...]:
        """The state names, in the order of every vector and matrix (MATH.md sections 2, 8)."""
        return tuple(self.spec.overlap_names)

    @property
    def parameters(self) -> dict:
        """The spec's parameters and their default values."""
        return {k: float(v) for k, v in self.spec.parameters.items()}

    @property
    def backend(self) -> str:
        """The backend that writes this model's module ("exact" or "attention")."""
        return backend_for(self.spec).name

    # ------------------------------------------------------------------ derivation
    def derive(self, force: bool = False) -> Path:
        """Write the generated module (if out of date, or always with force); its path. A
        module whose quadrature rules have node counts not shown to meet its tolerance
        (QUADRATURE_UNVERIFIED) gives a QuadratureWarning saying which, as `ssi derive`
        prints its note."""
        import warnings
        from .backends.files import unverified_message
        path, _ = generate(self.spec, self.out_dir, force=force)
        message = unverified_message(path)
        if message:
            warnings.warn(message, QuadratureWarning, stacklevel=2)
        return path

    @property
    def module(self):
        """The generated module (derived if needed), checked against the module contract."""
        return ensure_module(self.spec, self.out_dir)

    def derivation(self):
        """The symbolic Derivation (SymPy expressions of R, the drift parts, Cov(G) and the
        O(1/d) drift) of an exact-backend model."""
        if self.backend != "exact":
            raise ContractError(f"model '{self.name}' is written by the {self.backend} "
                                f"backend (quadrature tables): it has no symbolic derivation")
        from .symbolic.derive import derive
        return derive(self.spec)

    def latex(self) -> str:
        """A standalone LaTeX document of R, the drift (both orders in eta) and Cov(G)."""
        from .symbolic.latex import document
        if self.backend != "exact":
            raise ContractError(f"latex: model '{self.name}' is written by the {self.backend} "
                                f"backend (quadrature tables in (m, e)): there are no closed-form "
                                f"formulas to print")
        return document(self.derivation())

    # ------------------------------------------------------------------ predictions
    def evaluate(self, at: dict | None = None, eta: float = 0.05, d: float = 1000,
                 params: dict | None = None, **overlaps) -> dict:
        """Loss, drift (total, O(eta), O(eta^2)) and diffusion at one state, given as a dict
        or as keywords (missing overlaps 0, q 1): `ssi evaluate --json`."""
        from .numeric.evaluate import evaluate
        return evaluate(self.spec, {**(at or {}), **overlaps}, eta=eta, d=d, params=params,
                        out_dir=self.out_dir)

    def solve(self, eta: float, d: float = 1000, m0=None, e0=None, t_max=None,
              threshold: float = 0.5, params: dict | None = None, init: dict | None = None,
              start_seed: int = 0) -> dict:
        """The ODE from m0 = 1/sqrt(d), e0 = 0: escape, alignment, phases, fixed point
        (`ssi solve --json`). Several directions: from a random-like start (M, E, Q of random
        vectors in dimension d, drawn with start_seed; init = {overlap: value} overrides),
        with per-direction escape times."""
        from .analysis.predict import predict_solve
        return predict_solve(self.spec, eta, d, m0=m0, e0=e0, t_max=t_max,
                             threshold=threshold, params=params, out_dir=self.out_dir,
                             init=init, start_seed=start_seed)

    def sde(self, eta: float, d: float, runs: int = 1000, seed: int = 0, t_max=None,
            threshold: float = 0.5, params: dict | None = None, progress: bool = False,
            init: dict | None = None, start_seed: int = 0, dt: float | None = None,
            random_starts: bool = False) -> dict:
        """Escape-time distribution of the finite-d SDE over `runs` paths (`ssi sde --json`);
        the start as in `solve`. dt: the Euler-Maruyama step in t (default 0.005 / eta, at
        least 1 / d). random_starts (several directions): path i from its own random-like
        start, drawn with start_seed + i, as the simulator's seeds."""
        from .analysis.predict import predict_sde
        return predict_sde(self.spec, eta, d, runs=runs, seed=seed, t_max=t_max,
                           threshold=threshold, params=params, out_dir=self.out_dir,
                           progress=progress, init=init, start_seed=start_seed, dt=dt,
                           random_starts=random_starts)

    def simulate(self, eta: float, d: int, steps: int, seeds: int = 8, seed: int = 0,
                 m0=None, e0=None, threshold: float = 0.5, params: dict | None = None,
                 progress: bool = False, stop_when_escaped: bool = False,
                 method: str = "full", batch: int | None = None, schedule=None, **options):
        """Online SGD, vectorised over seeds: a SimulationResult whose to_json() is
        `ssi simulate --json`. method "full": real d-dimensional SGD; "reduced": the exact
        Markov chain of the overlaps (MATH.md 10, same law, cost per step independent of d).
        batch: sequences averaged per step (default: the spec's, else 1); schedule: None or
        f(t) -> factor of eta (default: the spec's schedule, if any). options engine="numba"
        (method "reduced", tied students: the chain compiled with Numba) and
        records_after_escape=False (records NaN after each seed's escape): see
        numeric.simulate.simulate. Several directions
        (MATH.md 8): every seed starts at random unit vectors, or exactly at the overlaps
        init={"m1_2": 0.3, ...} (options init=, missing names 0 and Q[k,k] = 1); the result
        adds direction_escape_times (K, seeds)."""
        from .numeric.simulate import simulate
        return simulate(self.spec, eta, d, steps, seeds=seeds, seed=seed, m0=m0, e0=e0,
                        theta=threshold, params=params, progress=progress,
                        out_dir=self.out_dir, stop_when_escaped=stop_when_escaped,
                        method=method, batch=batch, schedule=schedule, **options)

    def sie(self) -> dict:
        """Sequence information exponent of the teacher link and flatness index of R at the
        origin (`ssi sie --json`). Several directions: the information exponent of each
        teacher direction and the leap structure of the teacher link instead (keys
        information_exponents, leaps, leap_complexity, unreachable; the student link is not
        analysed; teacher overlaps P must be the identity)."""
        from .analysis.hermite import static_analysis
        return static_analysis(self.spec, out_dir=self.out_dir)

    def max_lr(self, params: dict | None = None, d: float = 10_000) -> dict:
        """The largest learning rate that still escapes and keeps the informative fixed point
        stable (`ssi max-lr --json`)."""
        from .analysis.predict import predict_max_lr
        return predict_max_lr(self.spec, params=params, d=d, out_dir=self.out_dir)

    def fixed_points(self, eta: float, params: dict | None = None) -> dict:
        """Fixed points of the drift at eta with their stability (`ssi fixed-points --json`)."""
        from .analysis.predict import predict_fixed_points
        return predict_fixed_points(self.spec, eta, params=params, out_dir=self.out_dir)

    def gain(self, Ls=(1, 2, 4, 8), eta: float = 0.05, d: float = 10_000,
             lr_scaling: str = "same", threshold: float = 0.5, params: dict | None = None,
             out_dir=DEFAULT_VARIANTS, progress: bool = False) -> dict:
        """tau_untied / tau_tied for every L, with a power-law fit (`ssi gain --json`)."""
        from .analysis.gain import predict_gain
        return predict_gain(self.spec, Ls, eta=eta, d=d, lr_scaling=lr_scaling, params=params,
                            out_dir=out_dir, theta=threshold, progress=progress)

    def landscape(self, params: dict | None = None) -> dict:
        """Minima, Hessian at the origin and region of an attention model
        (`ssi landscape --json`)."""
        from .analysis.landscape import analyse
        return analyse(self.spec, params=params, out_dir=self.out_dir)

    def surface(self, grids, params: dict | None = None) -> dict:
        """The loss on a grid of (m, e): grids = [("e", values), ("m", values)] or strings
        "e=-1:1:200" (`ssi surface`)."""
        from .analysis.landscape import parse_grid, surface
        return surface(self.spec, _grids(grids, parse_grid), params=params,
                       out_dir=self.out_dir)

    def phase_diagram(self, grids=(), transition_along: str | None = None,
                      params: dict | None = None) -> dict:
        """Regions on a parameter grid and the semantic/positional transition
        (`ssi phase-diagram --json`)."""
        from .analysis.landscape import parse_grid, phase_diagram
        return phase_diagram(self.spec, _grids(grids, parse_grid),
                             transition_along=transition_along, params=params,
                             out_dir=self.out_dir)

    def sweep(self, grid, quantities=("escape_time",), method: str = "ode",
              params: dict | None = None, runs=None, seed: int = 0, out=None, plot=None,
              scheduler=None, eta=None, d=None, threshold=None, t_max=None, workers=None,
              simulator: str = "full", progress: bool = False) -> dict:
        """Quantities on a parameter grid, locally or on a Dask scheduler, with resume from
        the CSV `out` (`ssi sweep --json`; see `ssi_symbolic.analysis.sweep.run.sweep`)."""
        from .analysis.sweep.run import sweep
        return sweep(self.spec, grid, quantities, method, params=params, runs=runs, seed=seed,
                     out=out, plot=plot, scheduler=scheduler, eta=eta, d=d,
                     threshold=threshold, t_max=t_max, workers=workers, simulator=simulator,
                     out_dir=self.out_dir, progress=progress)


def _grids(grids, parse_grid):
    return [parse_grid(g) if isinstance(g, str) else (g[0], g[1]) for g in grids]


def load(path, out_dir="generated") -> Model:
    """The model of a TOML spec file (`Model.load`)."""
    return Model.load(path, out_dir)


def sweep(spec, grid, quantities=("escape_time",), method: str = "ode", out_dir="generated",
          **options) -> dict:
    """`ssi sweep --json`: `Model(spec, out_dir).sweep(grid, quantities, method, ...)`."""
    return Model(spec, out_dir).sweep(grid, quantities, method, **options)


def reproduce(out="results", quick: bool = False, generated="generated",
              derivations="derivations") -> dict:
    """`ssi reproduce`: derive every spec of `derivations` and write the report into `out`."""
    from .report import run_report
    return run_report(out=out, quick=quick, generated=generated, derivations=derivations)


__all__ = ["Model", "load", "reproduce", "sweep"]
