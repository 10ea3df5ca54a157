"""Running a sweep: the plan (validation, the modules derived once), the executors (in this
process, a local process pool, an existing Dask cluster), the table written as points complete,
resuming, and the result in grid order.

    plan = plan_sweep(spec, grid, quantities, method, ...)   # validates, derives each module once
    result = run_sweep(plan, out="sweep.csv", scheduler=None) # rows in grid order

Every point is one task: its coordinates, the fixed settings, the key of its module's source
and its seed (`grid.point_seed`). The source texts travel once per worker (the pool's
initializer; Dask: scattered to every worker), never pickled functions. The same tasks give the
same numbers on every executor: the ODE is deterministic and the SDE and simulator draw from the
point's seed only.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import SSIError, SpecError, StateError
from ...version import __version__
from .grid import as_grids, check_grid_variables, point_seed, points
from .quantities import (METHOD_FREE, METHODS, QUANTITIES, evaluate_point, forget_modules,
                         run_dask_task, run_local_task, source_key)
from .table import Appender, coordinate, header, read_table, row_key, write_table

#: default runs per point: the defaults of `ssi sde` (paths) and `ssi simulate` (seeds)
DEFAULT_RUNS = {"sde": 1000, "simulate": 8}
#: Dask retries of a task that raised (a worker that dies has its tasks re-run anyway)
DASK_RETRIES = 2


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C during a sweep; the message says what was written and how to resume."""


@dataclass
class Plan:
    """A validated sweep: grids, quantities, fixed settings, the shipped module sources and the
    hashes that identify its rows."""

    spec: object
    grids: list
    quantities: list
    method: str
    runs: int
    seed: int
    t_max: float | None
    fixed: dict                 # eta, d, threshold values that are not swept
    params: dict                # --param overrides (not swept)
    simulator: str = "full"     # simulate: "full" (d-dimensional SGD) or "reduced"
    variants: dict = field(default_factory=dict)  # (L, batch) -> the spec there
    out_dir: str = "generated"                    # where modules are derived
    sources: dict = field(default_factory=dict)   # source key -> shipped module (`prepare`)
    module_of: dict = field(default_factory=dict)  # (L, batch) -> source key
    spec_hash: str = ""
    settings_hash: str = ""

    @property
    def names(self) -> list:
        return [n for n, _ in self.grids]

    @property
    def stochastic(self) -> bool:
        return self.method in ("sde", "simulate")

    def seeds_of(self, quantity: str) -> int:
        """The `seeds` column: the runs behind a value (0 for deterministic quantities)."""
        return self.runs if self.stochastic and quantity not in METHOD_FREE else 0


def parse_quantities(quantities, method: str) -> list:
    """The quantity names (a comma-separated string or a list), checked against QUANTITIES and
    against the method."""
    if method not in METHODS:
        raise SpecError(f"--method: expected one of {', '.join(METHODS)}, got {method!r}")
    if isinstance(quantities, str):
        quantities = quantities.split(",")
    qs = [q.strip() for q in (quantities or []) if q and q.strip()]
    if not qs:
        raise SpecError("--quantity: give at least one quantity")
    for q in qs:
        if q not in QUANTITIES:
            raise SpecError(f"--quantity: unknown quantity '{q}' (known: "
                            f"{', '.join(QUANTITIES)})")
        methods = QUANTITIES[q][0]
        if method not in methods:
            raise SpecError(f"--quantity {q}: not computed by --method {method} (only by "
                            f"{', '.join(methods)})")
    dup = sorted({q for q in qs if qs.count(q) > 1})
    if dup:
        raise SpecError(f"--quantity: '{dup[0]}' given twice")
    return qs


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def plan_sweep(spec, grid, quantities=("escape_time",), method="ode", params=None, runs=None,
               seed=0, eta=None, d=None, threshold=None, t_max=None, simulator="full",
               out_dir="generated") -> Plan:
    """Validate a sweep (SpecError / StateError with one line for any bad input); nothing is
    derived or written yet (`prepare` derives the modules)."""
    from ...model.checks import as_spec, check_eta_d, check_params
    spec = as_spec(spec)
    qs = parse_quantities(quantities, method)
    grids = as_grids(grid)
    overrides = {k: v for k, v in (params or {}).items()}
    check_grid_variables(grids, spec, tuple(overrides))
    check_params(spec, overrides)
    names = [n for n, _ in grids]
    fixed = {}
    for key, val, flag in (("eta", eta, "--eta X"), ("d", d, "--d D")):
        if key in names and val is not None:
            raise SpecError(f"--{key} and --grid {key}: give one of them")
        if key not in names:
            if val is None:
                if key == "eta" and all(q == "max_lr" for q in qs):
                    continue
                raise SpecError(f"{key}: not swept, so give {flag} (or --grid {key}=...)")
            fixed[key] = float(val)
    check_eta_d(fixed.get("eta"), fixed.get("d"))
    if "threshold" in names and threshold is not None:
        raise SpecError("--threshold and --grid threshold: give one of them")
    if "threshold" not in names:
        fixed["threshold"] = 0.5 if threshold is None else float(threshold)
        if not (math.isfinite(fixed["threshold"]) and fixed["threshold"] > 0):
            raise StateError(f"threshold = {threshold}: the escape threshold must be > 0")
    if t_max is not None and not (math.isfinite(t_max) and t_max > 0):
        raise StateError(f"--t-max {t_max}: expected a time > 0")
    stochastic = method in ("sde", "simulate")
    if runs is None:
        runs = DEFAULT_RUNS.get(method, 0)
    if stochastic and (isinstance(runs, bool) or int(runs) != runs or runs < 1):
        raise StateError(f"--runs: expected an integer >= 1, got {runs!r}")
    runs = int(runs) if stochastic else 0
    point_seed(seed, {})                                   # checks the seed
    ds = dict(grids).get("d", [fixed.get("d")])
    if method == "simulate":
        bad = next((v for v in ds if not float(v).is_integer()), None)
        if bad is not None:
            raise StateError(f"d = {bad:g}: the simulator needs an integer dimension")
    _check_simulator(simulator, method)
    if "max_lr" in qs and spec.schedule is not None:
        raise SpecError(f"{spec.where('training.schedule')}: max_lr is defined for a constant "
                        f"learning rate; remove the schedule or the quantity")
    Ls = [int(v) for v in dict(grids).get("L", [spec.L])]
    bs = [int(v) for v in dict(grids).get("batch", [spec.batch])]
    variants = {(L, b): _with_batch(spec.with_length(L), b)   # SpecError before any derivation
                for L in Ls for b in bs}
    plan = Plan(spec=spec, grids=grids, quantities=qs, method=method, runs=runs,
                seed=int(seed), t_max=None if t_max is None else float(t_max), fixed=fixed,
                params=overrides, variants=variants, out_dir=str(out_dir),
                simulator=simulator)
    # the spec and the tool that derives it (a changed derivation recomputes the rows)
    from ...backends.registry import backend_for
    plan.spec_hash = spec.hash(backend_for(spec).salt())[:16]
    plan.settings_hash = _hash({
        "fixed": fixed, "params": {k: float(v) for k, v in overrides.items()},
        # the schedule changes the dynamics, not the derived formulas (not in the spec hash)
        **({"schedule": str(spec.schedule)} if spec.schedule is not None else {}),
        "t_max": plan.t_max, **({"runs": runs, "seed": plan.seed} if stochastic else {}),
        **({"simulator": simulator} if method == "simulate" and simulator != "full" else {})})
    return plan


def _check_simulator(simulator: str, method: str) -> None:
    """--simulator: "full" or "reduced" (the exact overlap chain of MATH.md section 10), only
    with --method simulate."""
    if simulator not in ("full", "reduced"):
        raise SpecError(f"--simulator: expected full or reduced, got {simulator!r}")
    if simulator == "full":
        return
    if method != "simulate":
        raise SpecError(f"--simulator {simulator}: only with --method simulate")


def _with_batch(spec, b: int):
    """The spec with [training] batch = b (named <name>_b<b>), the spec itself for its own
    batch size."""
    if b == spec.batch:
        return spec
    if spec.raw is None:
        raise SpecError(f"{spec.where('training.batch')}: spec '{spec.name}' was not built from "
                        f"link strings, so it cannot be re-instantiated at another batch size")
    from ...model.spec import spec_from_dict
    data = json.loads(json.dumps(spec.raw))
    data.setdefault("training", {})["batch"] = b
    data["name"] = f"{spec.name}_b{b}"
    return spec_from_dict(data, source=f"{spec.source or spec.name} at batch = {b}")


def prepare(plan: Plan) -> Plan:
    """Derive (if out of date) and read the module of every (sequence length, batch size) of
    the plan, once: into plan.out_dir for the spec itself, into plan.out_dir/variants for the
    variants at another L or batch size."""
    if plan.sources:
        return plan
    needs_diffusion = plan.method == "sde" and any(q not in METHOD_FREE
                                                   for q in plan.quantities)
    for key, sp_ in plan.variants.items():
        folder = Path(plan.out_dir) if sp_ is plan.spec else Path(plan.out_dir) / "variants"
        src = _ship(sp_, folder, needs_diffusion)
        plan.sources[src["key"]] = src
        plan.module_of[key] = src["key"]
    return plan


def _ship(spec, folder: Path, diffusion: bool) -> dict:
    """The module of a spec as shipped to the workers: derived here if out of date (the full
    module when the SDE needs Cov(G); otherwise the full one when it is current, else the
    drift-only one, as `ssi simulate` does), checked against the module contract, read as text."""
    from ...backends.contract import checked, require
    from ...backends.files import load_module, module_path, read_hash
    from ...backends.registry import generate, is_current
    if diffusion or is_current(spec, folder, True):
        path, _ = generate(spec, folder)
    else:
        path, _ = generate(spec, folder, diffusion=False)
    mod = checked(load_module(path), spec)
    if diffusion:
        require(mod, "diffusion", "the SDE")
        require(mod, "finite_d_correction", "the SDE")
    text = Path(path).read_text()
    return {"key": source_key(text), "filename": Path(path).name, "text": text,
            "hash": read_hash(path), "spec": spec,
            "full": Path(path).name == module_path(spec, folder, True).name}


# ------------------------------------------------------------------------------------------
# executors: each yields the results of `evaluate_point` as the points complete
# ------------------------------------------------------------------------------------------

class _Serial:
    """Every point in this process, one after the other."""

    name = "serial"

    def __init__(self, sources, base):
        self.sources, self.base = sources, base

    def run(self, tasks):
        for t in tasks:
            yield evaluate_point(t, self.sources, self.base)

    def cancel(self):
        pass

    def close(self):
        pass


class _LocalPool:
    """A concurrent.futures process pool on this machine's cores (no Dask needed)."""

    name = "local"

    def __init__(self, sources, base, workers):
        from concurrent.futures import ProcessPoolExecutor
        self.workers = workers
        self.pool = ProcessPoolExecutor(max_workers=workers, initializer=_init_pool,
                                        initargs=(sources, base))
        self.futures = []

    def run(self, tasks):
        from concurrent.futures import as_completed
        self.futures = [self.pool.submit(run_local_task, t) for t in tasks]
        for f in as_completed(self.futures):
            yield f.result()

    def cancel(self):
        for f in self.futures:
            f.cancel()
        # the running points would finish first: stop their processes now
        procs = getattr(self.pool, "_processes", None) or {}
        for p in list(procs.values()):
            p.terminate()
        self.pool.shutdown(wait=False, cancel_futures=True)

    def close(self):
        self.pool.shutdown(wait=True)


def _init_pool(sources, base):
    from .quantities import _init_worker
    _init_worker(sources, base)


class _Dask:
    """An existing Dask distributed cluster: the module sources scattered to every worker once,
    one task per point with retries."""

    name = "dask"

    def __init__(self, sources, address):
        try:
            from distributed import Client
        except ImportError:
            raise SSIError("--scheduler needs Dask: pip install 'ssi-symbolic[cluster]' "
                           "(dask[distributed])") from None
        try:
            self.client = Client(address, timeout="15s", set_as_default=False)
        except (OSError, TimeoutError, ValueError, TypeError) as exc:
            raise SSIError(f"--scheduler {address}: cannot connect to a Dask scheduler: "
                           f"{' '.join(str(exc).split())}") from None
        self.workers = len(self.client.scheduler_info().get("workers", {}))
        self.sources = self.client.scatter([sources], broadcast=True, hash=False)[0]
        self.futures = []

    def run(self, tasks):
        from distributed import KilledWorker, as_completed
        self.futures = [self.client.submit(run_dask_task, t, self.sources, pure=False,
                                           retries=DASK_RETRIES) for t in tasks]
        task_of = {f.key: t for f, t in zip(self.futures, tasks)}
        for f in as_completed(self.futures, loop=self.client.loop):
            try:
                yield f.result()
            except KilledWorker as exc:   # the point itself kills workers (memory, a crash)
                t = task_of[f.key]
                why = f"error: the point killed Dask workers repeatedly ({exc})"
                yield {"index": t["index"], "wall_s": 0.0,
                       "values": {q: [None, " ".join(why.split())] for q in t["quantities"]}}

    def cancel(self):
        if self.futures:
            self.client.cancel(self.futures)
        self.client.close()

    def close(self):
        self.client.close()


class _Bar:
    """A one-line progress bar of points on stderr, redrawn with \\r at most every 0.2 s."""

    def __init__(self, label, total, stream=None, width=24):
        self.label, self.total, self.width = label, total, width
        self.stream = stream or sys.stderr
        self.start = self.last = time.monotonic()

    def update(self, done, force=False):
        now = time.monotonic()
        if not force and now - self.last < 0.2:
            return
        self.last = now
        frac = done / self.total if self.total else 1.0
        filled = int(round(frac * self.width))
        elapsed = now - self.start
        left = elapsed / done * (self.total - done) if done else float("nan")
        eta = f"{left:.0f}s" if math.isfinite(left) else "?"
        self.stream.write(f"\r{self.label} [{'#' * filled}{'.' * (self.width - filled)}] "
                          f"{done}/{self.total} points {elapsed:.0f}s ETA {eta}  ")
        self.stream.flush()

    def close(self, done):
        self.update(done, force=True)
        self.stream.write("\n")
        self.stream.flush()


# ------------------------------------------------------------------------------------------
# the sweep
# ------------------------------------------------------------------------------------------

def _task(plan: Plan, index: int, coords: dict, quantities) -> dict:
    vals = {**plan.fixed, **{k: v for k, v in coords.items()
                             if k in ("eta", "d", "threshold")}}
    L = int(coords.get("L", plan.spec.L))
    b = int(coords.get("batch", getattr(plan.spec, "batch", 1)))
    params = dict(plan.params)
    params.update({k: v for k, v in coords.items() if k in plan.spec.parameters})
    from ...model.checks import check_params
    return {"index": index, "coords": coords, "module": plan.module_of[(L, b)],
            "eta": vals.get("eta"), "d": vals["d"], "threshold": vals["threshold"],
            "params": check_params(plan.spec, params), "t_max": plan.t_max,
            "method": plan.method, "runs": plan.runs, "quantities": list(quantities),
            "simulator": plan.simulator,
            "seed": point_seed(plan.seed, coords), "version": __version__}


def _rows(plan: Plan, coords: dict, seed: int, result: dict) -> list:
    wall = round(float(result["wall_s"]), 6)
    out = []
    for q, (value, status) in result["values"].items():
        out.append({**{n: coordinate(n, coords[n]) for n in plan.names}, "quantity": q,
                    "value": None if value is None else float(value), "method": plan.method,
                    "seeds": plan.seeds_of(q), "status": status, "wall_s": wall,
                    "spec_hash": plan.spec_hash, "settings_hash": plan.settings_hash,
                    "point_seed": seed})
    return out


def check_out(out) -> Path:
    """The CSV output path: a .csv name in an existing folder."""
    out = Path(out)
    if out.suffix.lower() != ".csv":
        raise SpecError(f"--out {out}: expected a .csv file name")
    if not out.parent.exists():
        raise SpecError(f"--out {out}: folder {out.parent} does not exist")
    if out.is_dir():
        raise SpecError(f"--out {out}: is a folder")
    return out


def run_sweep(plan: Plan, out=None, plot=None, scheduler=None, workers=None,
              progress=False) -> dict:
    """Run the points of `plan` that `out` (a CSV, appended to as points complete) does not
    hold yet, on `scheduler` (a Dask address), or in this process (workers = 1), or on a local
    process pool of `workers` (default: all cores). Returns the sweep's rows in grid order (see
    `sweep`). Ctrl-C: SweepInterrupted after the running work is cancelled; the CSV then holds
    every completed point."""
    from ...plots import _pyplot, check_png
    t_start = time.perf_counter()
    names = plan.names
    if plot is not None:
        check_png(plot)
        _pyplot()                     # matplotlib missing: say so before any work
    if workers is not None and (isinstance(workers, bool) or int(workers) != workers
                                or workers < 1):
        raise StateError(f"--workers: expected an integer >= 1, got {workers!r}")
    out = None if out is None else check_out(out)
    existing = read_table(out, names) if out is not None else []
    prepare(plan)
    done = {}
    for r in existing:
        done.setdefault(row_key(r, names), r)
    pts = points(plan.grids)
    seeds = [point_seed(plan.seed, c) for c in pts]
    keys = [[(plan.spec_hash, plan.settings_hash, plan.method, q,
              tuple(float(c[n]) for n in names)) for q in plan.quantities] for c in pts]
    tasks = []
    for i, c in enumerate(pts):
        missing = [q for q, k in zip(plan.quantities, keys[i]) if k not in done]
        if missing:
            tasks.append(_task(plan, i, c, missing))
    base = tempfile.mkdtemp(prefix="ssi-sweep-")
    executor = None
    kind = None
    computed = {}
    bar = None
    try:
        if scheduler and tasks:
            executor = _Dask(plan.sources, scheduler)
        elif workers == 1 or len(tasks) <= 1:
            executor = _Serial(plan.sources, base)
        else:
            n = min(int(workers or os.cpu_count() or 1), len(tasks))
            executor = _Serial(plan.sources, base) if n == 1 else \
                _LocalPool(plan.sources, base, n)
        kind = executor.name
        appender = None
        if out is not None:
            write_table(out, names, existing)
            appender = Appender(out, names)
        if progress and tasks:
            bar = _Bar(f"sweep {plan.spec.name}", len(tasks))
            bar.update(0, force=True)
        try:
            for res in executor.run(tasks):
                i = res["index"]
                rows = _rows(plan, pts[i], seeds[i], res)
                computed[i] = rows
                if appender is not None:
                    appender.write(rows)
                if bar is not None:
                    bar.update(len(computed))
        except KeyboardInterrupt:
            executor.cancel()
            executor = None
            where = f"written to {out}" if out is not None else "computed"
            again = ("; run the same command again to compute the rest" if out is not None
                     else "")
            raise SweepInterrupted(f"sweep interrupted: {len(computed)} of {len(tasks)} points "
                                   f"{where}{again}") from None
        except BaseException:         # e.g. WorkerMismatch: stop the other points too
            executor.cancel()
            executor = None
            raise
        finally:
            if appender is not None:
                appender.close()
            if bar is not None:
                bar.close(len(computed))
    finally:
        if executor is not None:
            executor.close()
        forget_modules(base)
        shutil.rmtree(base, ignore_errors=True)
    # the table in grid order: computed rows and rows resumed from the file
    rows = []
    for i, c in enumerate(pts):
        new = {r["quantity"]: r for r in computed.get(i, [])}
        for q, k in zip(plan.quantities, keys[i]):
            rows.append(new[q] if q in new else done[k])
    if out is not None:
        mine = {row_key(r, names) for r in rows}
        others = [r for r in existing if row_key(r, names) not in mine]
        seen, kept = set(), []
        for r in others:
            k = row_key(r, names)
            if k not in seen:
                seen.add(k)
                kept.append(r)
        write_table(out, names, kept + rows)
    result = {
        "spec": plan.spec.name, "method": plan.method, "quantities": plan.quantities,
        "grid": {n: [coordinate(n, v) for v in vals] for n, vals in plan.grids},
        "fixed": plan.fixed, "params": plan.params,
        "runs": plan.runs, "seed": plan.seed, "t_max": plan.t_max,
        "simulator": plan.simulator if plan.method == "simulate" else None,
        "points": len(pts), "computed": len(computed), "resumed": len(pts) - len(tasks),
        "executor": f"dask {scheduler}" if kind == "dask" else kind,
        "out": None if out is None else str(out), "plot": None, "plot_note": None,
        "columns": header(names), "rows": rows,
        "wall_s": round(time.perf_counter() - t_start, 3),
    }
    if plot is not None:
        from .plot import sweep_figure
        p, note = sweep_figure(result, plot)
        result["plot"], result["plot_note"] = str(p), note
    return result


def sweep(spec, grid, quantities=("escape_time",), method="ode", params=None, runs=None,
          seed=0, out=None, plot=None, scheduler=None, eta=None, d=None, threshold=None,
          t_max=None, workers=None, simulator="full", out_dir="generated",
          progress=False) -> dict:
    """A parameter sweep (`ssi sweep --json`): every quantity at every point of the grid.

    grid: strings "eta=0.02:0.3:15" (count values, both ends included; ":log" for geometric
    spacing) or "d=1e3,1e4", (name, values) pairs or a dict; a name is a spec parameter, eta,
    d, L or threshold. quantities: names of `quantities.QUANTITIES` (a list or "a,b").
    method: "ode", "sde" or "simulate" (runs: SDE paths or simulated seeds per point; seed: the
    sweep seed from which every point's seed is derived; simulator: "full" d-dimensional SGD
    or the "reduced" overlap chain for method simulate). eta, d, threshold, params: the values
    that are not swept. out: CSV written as points complete (rows already in it with the same
    spec, settings, method, quantity and point are not computed again). plot: a PNG figure.
    scheduler: the address of an existing Dask scheduler; otherwise a local process pool of
    `workers` processes (default all cores; 1 runs in this process).

    Returns {"spec", "method", "quantities", "grid", "fixed", "params", "runs", "seed",
    "t_max", "simulator", "points", "computed", "resumed", "executor", "out", "plot", "plot_note",
    "columns", "rows", "wall_s"}; "rows" is the table in grid order (first grid variable
    slowest), one dict per point and quantity with the CSV's columns."""
    plan = plan_sweep(spec, grid, quantities, method, params=params, runs=runs, seed=seed,
                      eta=eta, d=d, threshold=threshold, t_max=t_max, simulator=simulator,
                      out_dir=out_dir)
    return run_sweep(plan, out=out, plot=plot, scheduler=scheduler, workers=workers,
                     progress=progress)


__all__ = ["Plan", "SweepInterrupted", "parse_quantities", "plan_sweep", "prepare", "run_sweep",
           "sweep",
           "check_out", "DEFAULT_RUNS"]
