"""What one sweep point computes, on whichever process runs it (the sweep's own process, a local
worker process or a Dask worker).

The generated module arrives as source text (derived once by the sweep's process); the first
point a process sees writes it into a folder of that process and imports it, later points reuse
the import. Nothing here derives: a module whose hash does not match the spec (a worker with
another version of the tool) stops the sweep with WorkerMismatch instead.

Quantities (MATH.md section 5; `t_max` is the sweep's --t-max):

    escape_time             ode: first t with |(m, e)| >= threshold on the ODE from
                            m0 = 1/sqrt(d), e0 = 0 (`ssi solve`); sde: the median over the runs
                            of the SDE paths' escape times (`ssi sde`); simulate: the median over
                            the seeds of real SGD's escape times (`ssi simulate`, the full or
                            the reduced simulator as the sweep says). Paths or seeds
                            that have not escaped by t_max count as +infinity, so the median exists
                            while at least half of them escaped.
    semantic_escape_time    the same for |m| >= threshold (ode, simulate)
    positional_escape_time  the same for ||e|| >= threshold (ode, simulate)
    alignment_time          ode: first t after the escape within 1e-2 of the stable fixed point
    escaped_fraction        sde, simulate: the fraction of runs that escaped by t_max
    loss                    the population loss R at the end of the ODE run (at t_max, or once
                            converged), every method
    max_lr                  the maximal learning rate (`ssi max-lr`) at the point's parameters
                            and d, every method (no eta dependence)

For sde and simulate without --t-max, t_max is T_CAP times the ODE escape time at the point (a
point whose ODE does not escape then has no value, with the ODE's reason as status).
"""
from __future__ import annotations

import hashlib
import math
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from ...errors import SSIError
from ...version import __version__

METHODS = ("ode", "sde", "simulate")

#: quantity -> (methods that compute it, one-line definition)
QUANTITIES = {
    "escape_time": (METHODS, "first t with |(m, e)| >= threshold (sde, simulate: median over "
                             "runs, non-escaped runs counting as +infinity)"),
    "semantic_escape_time": (("ode", "simulate"), "first t with |m| >= threshold"),
    "positional_escape_time": (("ode", "simulate"), "first t with ||e|| >= threshold"),
    "alignment_time": (("ode",), "first t after the escape within 1e-2 of the fixed point"),
    "escaped_fraction": (("sde", "simulate"), "fraction of runs escaped by t_max"),
    "loss": (METHODS, "population loss at the end of the ODE run"),
    "max_lr": (METHODS, "maximal learning rate (ssi max-lr) at the point's parameters and d"),
}
#: quantities that do not depend on the method (computed from the drift / the ODE)
METHOD_FREE = ("loss", "max_lr")
#: default t_max of sde and simulate points: this many times the point's ODE escape time
T_CAP = 4.0


class WorkerMismatch(SSIError):
    """A worker cannot run a point as the sweep's process planned it (another tool version)."""


class _NoValue(Exception):
    """A quantity has no value at this point; the message is the row's status."""


# ------------------------------------------------------------------------------------------
# generated modules shipped as source text
# ------------------------------------------------------------------------------------------

_LOCK = threading.Lock()
_MODULES: dict = {}          # (base folder, source key) -> (module, folder)
_WORKER: dict = {}           # a local pool worker's sources and base folder (_init_worker)


def source_key(text: str) -> str:
    """The key of a module's source text (sha256, 16 hex digits)."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _module(src: dict, base: str):
    """(module, folder): the module of a shipped source, written into base/<key>/<filename> and
    imported on first use in this process, from the cache afterwards."""
    from ...backends.contract import checked
    from ...backends.files import load_module, read_hash, write_atomic
    key = (base, src["key"])
    with _LOCK:
        if key not in _MODULES:
            folder = Path(base) / f"{os.getpid()}-{src['key']}"
            path = folder / src["filename"]
            write_atomic(path, src["text"])
            if read_hash(path) != src["hash"]:
                raise WorkerMismatch(f"module {src['filename']}: the shipped source lost its "
                                     f"hash line")
            _MODULES[key] = (checked(load_module(path), src["spec"]), folder)
        return _MODULES[key]


def forget_modules(base: str) -> None:
    """Drop the cached modules written under `base` (the folder is about to be removed)."""
    with _LOCK:
        for key in [k for k in _MODULES if k[0] == str(base)]:
            del _MODULES[key]


def _init_worker(sources: dict, base: str) -> None:
    """Initializer of a local pool worker: keep the sources and the base folder; ignore SIGINT
    (Ctrl-C reaches the whole process group; the sweep's process cancels the work)."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _WORKER["sources"], _WORKER["base"] = sources, base


def run_local_task(task: dict) -> dict:
    """A point on a local pool worker (sources from the initializer)."""
    return evaluate_point(task, _WORKER["sources"], _WORKER["base"])


def run_dask_task(task: dict, sources: dict) -> dict:
    """A point on a Dask worker: modules go into the worker's local directory (removed with the
    worker), or a temporary folder outside a worker."""
    try:
        from distributed import get_worker
        base = os.path.join(get_worker().local_directory, "ssi-sweep")
    except (ImportError, ValueError):
        base = os.path.join(tempfile.gettempdir(), f"ssi-sweep-{os.getpid()}")
    return evaluate_point(task, sources, base)


# ------------------------------------------------------------------------------------------
# one point
# ------------------------------------------------------------------------------------------

def _one_line(exc) -> str:
    return " ".join(str(exc).split())


def _median(times) -> tuple[float, int]:
    """(median with non-finite times as +infinity, number of finite times)."""
    t = np.asarray(times, dtype=float)
    full = np.where(np.isfinite(t), t, np.inf)
    with np.errstate(invalid="ignore"):          # inf - inf between two infinite neighbours
        med = float(np.quantile(full, 0.5))
    return (med if not math.isnan(med) else math.inf), int(np.count_nonzero(np.isfinite(t)))


class _Point:
    """The lazily computed results of one point: the ODE trajectory, the SDE ensemble, the
    simulation and max_lr, each computed at most once (its exception too)."""

    def __init__(self, task, src, mod, folder):
        self.task, self.src, self.mod, self.folder = task, src, mod, folder
        self.eta, self.d, self.theta = task["eta"], task["d"], task["threshold"]
        self.params, self.t_max, self.method = task["params"], task["t_max"], task["method"]
        self._cache = {}

    def _once(self, name, fn):
        if name not in self._cache:
            try:
                self._cache[name] = (True, fn())
            except (SSIError, _NoValue) as exc:
                self._cache[name] = (False, exc)
        ok, val = self._cache[name]
        if not ok:
            raise val
        return val

    # -------------------------------------------------------------- the computations
    def ode(self):
        """The OverlapODE at the point (with the spec's learning-rate schedule, if any)."""
        from ...numeric.ode import OverlapODE
        from ...model.checks import check_eta_d
        check_eta_d(self.eta, self.d)
        spec = self.src["spec"]
        return OverlapODE(self.mod, self.eta, self.params,
                          schedule=spec.schedule_factor(self.params))

    def trajectory(self):
        """The ODE run of `ssi solve` at the point. When the escape time is all that is asked
        of it, the run stops at the escape (the same steps up to there, so the same escape
        time, in about half the work); a run that does not escape goes on to the end anyway."""
        from ...numeric.ode import initial_state, solve
        full = {"alignment_time", "loss"}
        if self.method == "ode":
            full |= {"semantic_escape_time", "positional_escape_time"}
        stop = not (full & set(self.task["quantities"]))

        def run():
            ode = self.ode()
            return solve(ode, initial_state(ode, self.d), t_max=self.t_max, theta=self.theta,
                         stop_at_escape=stop)
        return self._once("ode", run)

    def no_escape_reason(self) -> str:
        """Why the ODE does not escape (as `ssi solve` says it)."""
        from ..gain import learnability
        tr = self.trajectory()
        ok, why = learnability(self.mod, self.params)
        if not ok:
            return why
        if self.t_max is not None and tr.t[-1] >= self.t_max * (1 - 1e-9):
            return f"|(m, e)| stays below {self.theta} up to t_max = {self.t_max:g}"
        fp = {k: round(v, 6) for k, v in (tr.fixed_point or {}).items()}
        return (f"the dynamics converge to {fp} before |(m, e)| reaches {self.theta} (eta too "
                f"large, see `ssi max-lr`, or an uninformative fixed point)")

    def cap(self) -> float:
        """t_max of an sde / simulate point: --t-max, or T_CAP times the ODE escape time."""
        if self.t_max is not None:
            return float(self.t_max)
        tr = self.trajectory()
        if tr.escape_time is None:
            raise _NoValue(f"no escape: the ODE does not escape ({self.no_escape_reason()}), "
                           f"so there is no default t_max for the {self.method}; give --t-max")
        return max(T_CAP * tr.escape_time, 1.0)

    def sde(self):
        from ...numeric.ode import initial_state
        from ...numeric.sde import simulate_sde

        def run():
            ode = self.ode()
            return simulate_sde(ode, self.d, initial_state(ode, self.d),
                                runs=self.task["runs"], t_max=self.cap(), theta=self.theta,
                                seed=self.task["seed"])
        return self._once("sde", run)

    def simulation(self):
        from ...backends.registry import is_current
        from ...numeric.simulate import simulate
        spec = self.src["spec"]

        def run():
            if not is_current(spec, self.folder, self.src["full"]):
                raise WorkerMismatch(
                    f"module {self.src['filename']}: this worker's ssi-symbolic does not "
                    f"produce the hash the sweep's process derived it with (another version); "
                    f"install the same version on every worker")
            t_end = self.cap()
            steps = max(1, int(math.ceil(t_end * self.d)))
            early = not ({"semantic_escape_time", "positional_escape_time"}
                         & set(self.task["quantities"]))
            how = self.task.get("simulator", "full")
            extra = {} if how == "full" else {"method": how}
            return simulate(spec, self.eta, int(self.d), steps, seeds=self.task["runs"],
                            seed=self.task["seed"], theta=self.theta, params=self.params,
                            record_every=steps, progress=False, out_dir=self.folder,
                            stop_when_escaped=early, **extra), t_end
        return self._once("simulate", run)

    def max_lr(self):
        from ...numeric.ode import max_learning_rate
        return self._once("max_lr", lambda: max_learning_rate(self.mod, self.params, d=self.d))

    # -------------------------------------------------------------- the quantities
    def quantity(self, q: str) -> float:
        """The value of quantity q at this point; _NoValue (status) or SSIError otherwise."""
        if q == "max_lr":
            res = self.max_lr()
            if res["max_lr"] is None:
                raise _NoValue(f"no max_lr: {res['reason']}")
            return float(res["max_lr"])
        if q == "loss":
            return float(self.trajectory().loss[-1])
        kind = {"escape_time": "escape", "semantic_escape_time": "semantic",
                "positional_escape_time": "positional"}.get(q)
        if self.method == "ode":
            return self._ode_quantity(q, kind)
        if self.method == "sde":
            res = self.sde()
            med, n = _median(res.escape_times)
            if q == "escaped_fraction":
                return n / res.runs
            if not math.isfinite(med):
                raise _NoValue(f"no escape: {n} of {res.runs} paths escaped by t_max = "
                               f"{res.t_max:.6g} (the median is infinite)")
            return med
        res, t_end = self.simulation()
        if q == "escaped_fraction":
            return _median(res.escape_times["escape"])[1] / res.seeds
        if kind == "positional" and not self.mod.R:
            raise _NoValue("no positional overlap: the spec has no positional encoding")
        med, n = _median(res.escape_times[kind])
        if not math.isfinite(med):
            what = {"escape": "|(m, e)|", "semantic": "|m|", "positional": "||e||"}[kind]
            raise _NoValue(f"no escape: {what} reached {self.theta} in {n} of {res.seeds} seeds "
                           f"by t_max = {t_end:.6g} (the median is infinite)")
        return med

    def _ode_quantity(self, q, kind) -> float:
        tr = self.trajectory()
        t_end = float(tr.t[-1])
        if q == "escape_time":
            if tr.escape_time is None:
                raise _NoValue(f"no escape: {self.no_escape_reason()}")
            return float(tr.escape_time)
        if q == "alignment_time":
            if tr.escape_time is None:
                raise _NoValue(f"no escape: {self.no_escape_reason()}")
            if tr.alignment_time is None:
                raise _NoValue(f"no alignment: the state does not come within 1e-2 of the "
                               f"fixed point by t = {t_end:.6g}")
            return float(tr.alignment_time)
        if kind == "positional" and not self.mod.R:
            raise _NoValue("no positional overlap: the spec has no positional encoding")
        value = tr.semantic_escape_time if kind == "semantic" else tr.positional_escape_time
        if value is None:
            what = "|m|" if kind == "semantic" else "||e||"
            raise _NoValue(f"no {kind} escape: {what} stays below {self.theta} up to "
                           f"t = {t_end:.6g}")
        return float(value)


def evaluate_point(task: dict, sources: dict, base: str) -> dict:
    """The requested quantities at one point: {"index", "values": {quantity: [value or None,
    status]}, "wall_s"}. A quantity without a value (no escape, a DynamicsError or StateError,
    max_lr undefined) gets the reason as status ("ok" otherwise); an unexpected exception gets
    "internal error: ..." (a bug to report). WorkerMismatch stops the sweep."""
    t0 = time.perf_counter()
    if task["version"] != __version__:
        raise WorkerMismatch(f"the sweep runs ssi-symbolic {task['version']}, this worker "
                             f"{__version__}: install the same version on every worker")
    src = sources[task["module"]]
    mod, folder = _module(src, base)
    point = _Point(task, src, mod, folder)
    values = {}
    for q in task["quantities"]:
        try:
            values[q] = [point.quantity(q), "ok"]
        except WorkerMismatch:
            raise
        except _NoValue as exc:
            values[q] = [None, _one_line(exc)]
        except SSIError as exc:
            values[q] = [None, f"error: {_one_line(exc)}"]
        except Exception as exc:  # a bug: reported in the row, the sweep goes on
            values[q] = [None, f"internal error: {type(exc).__name__}: {_one_line(exc)}"]
    return {"index": task["index"], "values": values, "wall_s": time.perf_counter() - t0}


__all__ = ["METHODS", "QUANTITIES", "METHOD_FREE", "T_CAP", "WorkerMismatch", "source_key",
           "evaluate_point", "run_local_task", "run_dask_task", "forget_modules"]
