"""Finite-d online SGD on a sequence single-index model (MATH.md sections 1, 2, 4, 5, 6, 7, 9, 10).

This is the ground truth the ODE/SDE predictions are checked against: real d-dimensional online
SGD (``method="full"``, the default), no reduced or low-dimensional shortcut.
``method="reduced"`` samples instead the exact Markov chain of the overlaps of MATH.md section 10
(:mod:`ssi_symbolic.numeric.reduced`): the same law, the same links, residual and loss
gradient, the same recording and escape times, at a cost per step independent of d.

The only thing taken from the generated module of the spec is the links (``teacher_link``,
``student_link``, ``student_link_gradient``: the flattened output entries, so scalar, vector,
matrix and trace links alike), the same functions the predictions are derived from. One loop serves tied, untied and attention specs; the step itself
(loss gradient of the spec's loss kind, label noise, update, spherical or plain normalisation)
is the one of :mod:`ssi_symbolic.numeric.sgd_step`, one function per convention.

Setup, per seed (the seeds are a batch axis; every seed is an independent run):

- a random orthonormal frame (w*/sqrt(d), u_1, .., u_r) from the QR factorisation of a Gaussian
  d x (1 + r) matrix: |w*|^2 = d, the u_a orthonormal and orthogonal to w*;
- the initial weights w = m0 w* + sqrt(d) sum_a e0_a u_a + s n, with n a random vector
  orthogonal to the frame, |n|^2 = d, and s = sqrt(1 - m0^2 - |e0|^2): exactly the overlaps
  (m0, e0) and q0 = 1 (for spherical and for plain SGD); m0 = e0 = 0 starts orthogonal to w*
  and the u_a.

One step (fresh sample; X = G / sqrt(d) with G standard normal, shape (seeds, L, d), one draw):

    z*_l = g_l . w* / sqrt(d),     z_l = g_l . w / sqrt(d) + sum_a C[l,a] e_a
    y_k  = g*_k(z*) (+ sqrt(Delta) xi_k),  y_hat_k = g_k(z),  r_k = y_k - y_hat_k
    dl_l = -sum_k r_k dg_k/dz_l              (square loss 1/2 ||y - y_hat||^2)
    dl_l = -sum_k r_k dg_k/dz_l / ||r||      (norm loss ||y - y_hat||_F)
    w   <- w - (eta / sqrt(d)) (sum_l dl_l g_l + sum_a (sum_l dl_l C[l,a]) u_a)
    spherical: w <- sqrt(d) w / |w|

which is grad_w = sum_l dl_l (x_l + p_l / sqrt(d)) with p_l = sum_a C[l,a] u_a. Both
projections come from one batched matmul of G with the rows (w*, w); the gradient direction from
one batched matmul of the coefficients (dl, dl C) with the rows (g_1..g_L, u_1..u_r). After every
step the overlaps m = w.w*/d, e_a = u_a.w/sqrt(d), q = |w|^2/d are recomputed from the stored w
(not updated incrementally, so they carry no accumulated round-off). There is no Python loop over
tokens or seeds; the per-step Python work is a fixed number of NumPy calls. The untied student
(MATH.md 6) is the same loop with w_l <- w_l - (eta / sqrt(d)) dl_l g_l and the flattened
spherical constraint sum_l |w_l|^2 = L d.

Several teacher and student directions (MATH.md 8, ``spec.multi``): per seed the QR factorisation
of a Gaussian d x (K* + r + K) matrix gives orthonormal f_1..f_K*, u_1..u_r, v_1..v_K; the
teachers are w*_j = sqrt(d) sum_i L_P[j,i] f_i (L_P the Cholesky factor of P, so
w*_j . w*_j' / d = P[j,j']), the K students w_k either uniform on their spheres |w_k|^2 = d,
independently (the default), or sqrt(d) (A f + E u + R v) with exactly the overlaps of
``init`` (sgd_step.multi_start). Per step z*_{j,l} = g_l . w*_j / sqrt(d), z_{k,l} =
g_l . w_k / sqrt(d) + sum_a C[l,a] E[k,a], the links take them in the order of
spec.variables, -dl is (S, K L), and w_k <- w_k - eta sum_l dl_{k,l} (x_l + p_l / sqrt(d)),
each w_k then back on its own sphere for spherical SGD (sgd_step.MultiStudent). Recorded:
M, E, Q under spec.overlap_names and q_norm = mean_k Q[k,k]; direction k escapes at the first
step with max_j |M[k,j]| >= theta, the run at the first direction's
(result.direction_escape_times). Batch 1 only (the spec refuses others).

Mini-batches (MATH.md 9, ``batch = b``, from the argument or ``spec.batch``): a step draws b
independent sequences and averages their gradients, w <- w - (eta / b) sum_i grad_w l_i (the
links are evaluated once on the b S sequences). Learning-rate schedules (``schedule = f``, from
the argument or ``spec.schedule_factor(parameters)``): step k = 1, 2, .. takes the state from
t = (k - 1) / d to k / d with the rate eta f((k - 1) / d), the rate at the time it starts from
(the Euler convention of the ODE); f is called on arrays of those times, a chunk at a time.

Escape times are measured at step resolution: the thresholds ||(m, e)|| >= theta, |m| >= theta
and ||e|| >= theta are checked after every step (and at step 0) on the overlaps computed
anyway for the next step, independently of the record grid; the time reported is (first step at
which the threshold holds) / d, NaN if never reached. The raw overlaps are used for plain SGD too
(no division by sqrt(q)), as in MATH.md section 5.

Random numbers: one ``numpy.random.Generator(SFC64(seed))`` per run (SFC64 draws normals ~20%
faster than the default PCG64 here), consumed in the order frame, initial weights, then per step
G and (with label noise) xi. Its stream does not depend on ``record_every``,
``stop_when_escaped`` or ``progress``, so those options never change a trajectory.

Measured speed (one effective CPU, NumPy 2.4, float64, progress off): seeds = 8, L = 2,
d = 2000 (tied_he2_pe): about 2000 steps/s, ~0.5 ms/step of which ~0.35 ms is drawing the
32000 normals of X (the floor for real d-dimensional SGD with NumPy's generator); float32 is not
faster, as the normal generator dominates. seeds = 8, L = 1, d = 1000 (linear): ~5500 steps/s.
Positional-semantic attention (L = 2, K = 4 entries, seeds = 6, d = 1000, a 2-core machine
shared with other jobs): ~0.5 ms of CPU per step, of which the three link calls of the
generated module take ~0.24 ms (the gradient alone ~0.13 ms), the 12000 normals ~0.12 ms and
the d-dimensional products ~0.1 ms; 300000 steps (t = 300) take ~2.5 min of CPU.
"""
from __future__ import annotations

import math
import numbers
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import SpecError, StateError
from .sgd_step import (MultiStudent, TiedStudent, UntiedStudent, check_conventions,
                       initial_weights, loss_gradient, make_frame, multi_min_d, multi_start,
                       residual)

__all__ = ["SimulationResult", "simulate", "simulate_first_escape", "make_frame",
           "initial_weights"]

# An untied student (MATH.md section 6) has one weight vector w_l per token: z_l = g_l . w_l /
# sqrt(d), w_l <- w_l - (eta / sqrt(d)) dl_l g_l, and spherical SGD rescales the flattened
# vector: (w_1..w_L) <- sqrt(L d) (w_1..w_L) / |(w_1..w_L)|. Recorded: m_l = w_l . w* / d,
# q_l = |w_l|^2 / d; escape when sqrt(sum_l m_l^2 / L) >= theta (see `_untied_escape_check`).

#: Default number of records over a run (record_every = ceil(steps / this)).
DEFAULT_RECORDS = 500
#: Minimum seconds between two progress-bar updates.
PROGRESS_INTERVAL = 0.1


@dataclass
class SimulationResult:
    """Overlap trajectories of a batch of independent finite-d SGD runs.

    t: (T,) recorded times step / d, starting at 0. overlaps: name -> (seeds, T) array for every
    name of ``spec.overlap_names`` (m, e or e1.., q for plain SGD), plus 'q_norm' = |w|^2 / d
    always (measured on the stored weights; 1 up to round-off for spherical SGD).
    escape_times: {"escape", "semantic", "positional"} -> (seeds,) first t with ||(m, e)|| >=
    theta, |m| >= theta, ||e|| >= theta (NaN when not reached; positional is NaN for r = 0).
    escape_kinds: per seed the direction of the first escape along one direction, at the first
    step where |m| >= theta or ||e|| >= theta: 'semantic' when |m| >= ||e|| at that step, else
    'positional'; None when neither was reached (not part of the JSON output).
    method: "full" (d-dimensional SGD) or "reduced" (the exact overlap chain); batch: sequences
    per step; scheduled: whether a learning-rate schedule multiplied eta; engine: "numpy" or
    "numba" (compiled reduced chain).

    Several directions (MATH.md 8; empty or None for a single-direction spec, and then absent
    from the JSON): directions = (K*, K); init: the explicit start {overlap name: value}, None
    for the random one; direction_escape_times: (K, seeds), the first t at which
    max_j |M[k,j]| >= theta for direction k. Then escape_times['escape'] (= 'semantic') is the
    first direction's, 'positional' the first t with some ||E[k,:]|| >= theta, and q_norm is
    the mean over k of |w_k|^2 / d.
    """

    t: np.ndarray
    overlaps: dict
    escape_times: dict
    spec_name: str
    eta: float
    d: int
    steps: int
    seeds: int
    theta: float
    m0: float = float("nan")
    e0: tuple = ()
    params: dict = field(default_factory=dict)
    seed: int | None = None
    record_every: int = 1
    steps_run: int = 0
    stopped_early: bool = False
    spherical: bool = True
    wall_time: float = 0.0
    escape_kinds: tuple = ()
    method: str = "full"
    batch: int = 1
    scheduled: bool = False
    engine: str = "numpy"
    directions: tuple = ()
    init: dict | None = None
    direction_escape_times: np.ndarray | None = None

    def mean(self) -> dict:
        """name -> (T,) mean over seeds of every recorded overlap."""
        return {k: np.mean(v, axis=0) for k, v in self.overlaps.items()}

    def to_json(self) -> dict:
        """A JSON-able dict (NaN and infinities become None)."""
        return {
            "spec_name": self.spec_name, "eta": self.eta, "d": self.d, "steps": self.steps,
            "steps_run": self.steps_run, "stopped_early": self.stopped_early,
            "seeds": self.seeds, "seed": self.seed, "theta": self.theta,
            "m0": _num(self.m0), "e0": [_num(x) for x in self.e0],
            "params": {k: _num(v) for k, v in self.params.items()},
            "spherical": self.spherical, "record_every": self.record_every,
            "wall_time": self.wall_time, "method": self.method, "batch": self.batch,
            "schedule": self.scheduled, "engine": self.engine,
            "t": _jsonable(self.t),
            "overlaps": {k: _jsonable(v) for k, v in self.overlaps.items()},
            "mean": {k: _jsonable(v) for k, v in self.mean().items()},
            "escape_times": {k: _jsonable(v) for k, v in self.escape_times.items()},
        } | ({} if self.direction_escape_times is None else {
            "directions": list(self.directions),
            "init": None if self.init is None else {k: _num(v) for k, v in self.init.items()},
            "direction_escape_times": _jsonable(self.direction_escape_times),
        })


def _num(x):
    x = float(x)
    return x if math.isfinite(x) else None


def _jsonable(a):
    a = np.asarray(a, dtype=float)
    out = a.tolist()
    if np.all(np.isfinite(a)):
        return out

    def fix(v):
        return [fix(x) for x in v] if isinstance(v, list) else _num(v)
    return fix(out)


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------

def _int_arg(name, value, minimum, hint=""):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        if isinstance(value, numbers.Real) and float(value).is_integer():
            value = int(value)
        else:
            raise StateError(f"{name}: expected an integer >= {minimum}{hint}, got {value!r}")
    value = int(value)
    if value < minimum:
        raise StateError(f"{name}: expected an integer >= {minimum}{hint}, got {value}")
    return value


def _real_arg(name, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(float(value)):
        raise StateError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


def _initial_state(spec, d, m0, e0):
    r = spec.r
    m0 = 1.0 / math.sqrt(d) if m0 is None else _real_arg("m0", m0)
    if e0 is None:
        e0 = [0.0] * r
    elif isinstance(e0, numbers.Real) and not isinstance(e0, bool):
        if r == 1:
            e0 = [e0]
        elif r == 0 and float(e0) == 0.0:
            e0 = []
        else:
            raise StateError(f"e0: expected a list of r = {r} positional overlaps "
                             f"(spec '{spec.name}'), got {e0!r}")
    else:
        try:
            e0 = list(e0)
        except TypeError:
            raise StateError(f"e0: expected a number or a list of r = {r} numbers, "
                             f"got {e0!r}") from None
        if len(e0) != r:
            raise StateError(f"e0: expected r = {r} positional overlaps (spec '{spec.name}'), "
                             f"got {len(e0)}: {e0!r}")
    e0 = [_real_arg(f"e0[{a}]", x) for a, x in enumerate(e0)]
    norm2 = m0 * m0 + sum(x * x for x in e0)
    if norm2 > 1.0 + 1e-12:
        raise StateError(f"initial state (m0, e0) = ({m0:g}, {e0}) has norm "
                         f"{math.sqrt(norm2):.6g} > 1: outside the unit ball (|w|^2 / d = 1 "
                         f"at start)")
    return m0, tuple(e0)


def _parameters(spec, mod, params):
    values = {k: float(v) for k, v in spec.parameters.items()}
    for k, v in (params or {}).items():
        if k not in values:
            raise SpecError(f"params: unknown parameter '{k}' for model '{spec.name}' "
                            f"(parameters: {', '.join(values) or 'none'})")
        values[k] = _real_arg(f"params.{k}", v)
    names = tuple(mod.PARAMETERS)
    if set(names) != set(values):
        raise SpecError(f"generated module of '{spec.name}' has parameters {names}, the spec "
                        f"{tuple(values)}: regenerate it")
    return values


#: methods of `simulate`: the d-dimensional SGD and the exact chain of the overlaps (MATH.md 10)
METHODS = ("full", "reduced")
#: steps per evaluation of a learning-rate schedule
SCHEDULE_CHUNK = 1024


def _batch_arg(spec, batch):
    """The mini-batch size: the explicit argument, else `spec.batch` (default 1)."""
    if batch is not None:
        return _int_arg("batch", batch, 1)
    return int(spec.batch)  # validated when the spec was read


def _schedule_rates(spec, schedule, eta, d, pvals):
    """None (constant eta) or rates(k0, n): the learning rates eta f((k - 1) / d) of the steps
    k = k0..k0+n-1, as an (n,) float64 array. f is the explicit `schedule` argument, else
    `spec.schedule_factor(pvals)` (None: no schedule). StateError
    for a schedule that is not callable or whose factor is not finite and >= 0."""
    if schedule is None:
        schedule = spec.schedule_factor(dict(pvals))
        if schedule is None:
            return None
    if not callable(schedule):
        raise StateError(f"schedule: expected None or a callable f(t) -> learning-rate factor, "
                         f"got {schedule!r}")

    def rates(k0, n):
        t = (np.arange(k0 - 1, k0 - 1 + n, dtype=float)) / d
        try:
            f = np.broadcast_to(np.asarray(schedule(t), dtype=float), t.shape)
        except (TypeError, ValueError) as exc:
            raise StateError(f"schedule: f(t) must return a number or an array of the shape of "
                             f"t (it is called on arrays of times): {exc}") from None
        bad = ~(np.isfinite(f) & (f >= 0))
        if bad.any():
            i = int(np.argmax(bad))
            raise StateError(f"schedule: the learning-rate factor must be finite and >= 0, got "
                             f"f({t[i]:g}) = {f[i]!r}")
        return eta * f
    return rates


def _load_module(spec, out_dir):
    """The module whose links (teacher_link, student_link, student_link_gradient) the
    simulator evaluates: the full module when it is up to date, otherwise the drift-only one,
    generated if needed (`registry.links_module`). The simulator never asks for Cov(G), whose
    derivation for long untied sequences takes far longer than the simulation itself."""
    from ..backends.registry import links_module
    return links_module(spec, out_dir)


# ----------------------------------------------------------------------------------------------
# progress bar
# ----------------------------------------------------------------------------------------------

class _Progress:
    """A one-line progress bar on stderr, redrawn at most every PROGRESS_INTERVAL seconds."""

    def __init__(self, label, total, d, seeds, stream=None, width=24):
        self.label, self.total, self.d, self.seeds = label, total, d, seeds
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.start = self.last = time.monotonic()
        self.shown = False

    def update(self, k, escaped, force=False):
        now = time.monotonic()
        if not force and now - self.last < PROGRESS_INTERVAL:
            return
        self.last = now
        frac = k / self.total
        filled = int(self.width * frac)
        elapsed = now - self.start
        rate = k / elapsed if elapsed > 0 else 0.0
        left = (self.total - k) / rate if rate > 0 else float("inf")
        eta_s = f"{left:.0f}s" if math.isfinite(left) else "?"
        line = (f"\r{self.label} [{'#' * filled}{'.' * (self.width - filled)}] {100 * frac:5.1f}% "
                f"step {k}/{self.total} t={k / self.d:.4g} escaped {escaped}/{self.seeds} "
                f"{rate:,.0f} steps/s ETA {eta_s}  ")
        self.stream.write(line)
        self.stream.flush()
        self.shown = True

    def close(self, k, escaped):
        self.update(k, escaped, force=True)
        self.stream.write("\n")
        self.stream.flush()


class _Book:
    """The per-step bookkeeping of the simulator loop (tied or untied student): records of the
    overlaps every `record_every` steps and at the last one (names + ('q_norm',)), the first step
    at which each seed crosses each escape threshold (-1: never), the first step at which |m|
    or ||e|| reaches theta with its direction (`first`, `kinds`), the progress bar, and the
    early stop: stop_on None (never), "escape" (every seed has ||(m, e)|| >= theta) or "first"
    (every seed has |m| >= theta or ||e|| >= theta).

    columns(*state) -> the record's rows, one (seeds,) array per record name; check(book, k,
    *state) marks (with `mark`) the seeds that cross a threshold at step k."""

    STOP_RULES = (None, "escape", "first")

    def __init__(self, spec, names, seeds, steps, d, record_every, progress, stop_on,
                 columns, check):
        if stop_on not in self.STOP_RULES:
            raise StateError(f"stop_on: expected one of {self.STOP_RULES}, got {stop_on!r}")
        self.spec, self.steps, self.d, self.every = spec, steps, d, record_every
        self.stop_on = stop_on
        self.columns, self.check = columns, check
        self.rec_names = tuple(names) + ("q_norm",)
        n_rec = steps // record_every + 1 + (1 if steps % record_every else 0)
        self.rec = np.full((len(self.rec_names), seeds, n_rec), np.nan)
        self.rec_steps = np.zeros(n_rec, dtype=np.int64)
        self.esc = {key: np.full(seeds, -1, dtype=np.int64)
                    for key in ("escape", "semantic", "positional")}
        self.first = np.full(seeds, -1, dtype=np.int64)
        self.kinds = [None] * seeds
        self.dir_esc = None            # (K, seeds) escape steps of the directions (multi)
        self.simulated_to = None       # (seeds,) last step run per seed, when not all were
        self.j = self.k = 0
        self.stopped_early = False
        self.bar = _Progress(f"simulate {spec.name}", steps, d, seeds) if progress else None
        self.started = time.perf_counter()

    def mark(self, k, key, hit):
        """Set the escape step of `key` to k for the seeds in the boolean mask `hit` that had
        not crossed that threshold yet."""
        new = hit & (self.esc[key] < 0)
        if new.any():
            self.esc[key][new] = k

    def mark_first(self, k, hit, semantic):
        """Set `first` to k and the direction ('semantic' where the mask `semantic` holds, else
        'positional') for the seeds in `hit` not marked yet."""
        new = hit & (self.first < 0)
        if new.any():
            self.first[new] = k
            for s in np.flatnonzero(new):
                self.kinds[s] = "semantic" if semantic[s] else "positional"

    def _record(self, k, state):
        self.rec_steps[self.j] = k
        self.rec[:, :, self.j] = np.stack(self.columns(*state))
        self.j += 1

    def start(self, *state):
        """Record and check the initial state (step 0)."""
        self._record(0, state)
        self.check(self, 0, *state)
        self.started = time.perf_counter()

    def _escaped(self) -> int:
        return int(np.count_nonzero(self.esc["escape"] >= 0))

    def _done(self) -> bool:
        if self.stop_on is None:
            return False
        steps = self.esc["escape"] if self.stop_on == "escape" else self.first
        return bool((steps >= 0).all())

    def step(self, k, *state) -> bool:
        """Book step k's state; True when the loop should stop (the stop rule holds for every
        seed; that step is then recorded too)."""
        self.k = k
        self.check(self, k, *state)
        if k % self.every == 0 or k == self.steps:
            self._record(k, state)
        if self.bar is not None and time.monotonic() - self.bar.last >= PROGRESS_INTERVAL:
            self.bar.update(k, self._escaped())
        if self._done():
            if k % self.every and k != self.steps:
                self._record(k, state)
            self.stopped_early = k < self.steps
            return True
        return False

    def close(self):
        """Close the progress bar (also after an error)."""
        if self.bar is not None:
            self.bar.close(self.k, self._escaped())
            self.bar = None

    def result(self, **fields) -> SimulationResult:
        """The SimulationResult of the records so far (non-finite overlaps, from a diverged
        run, become NaN with a warning) with the escape steps as times step / d."""
        wall = time.perf_counter() - self.started
        self.close()
        j, d = self.j, self.d
        rec = self.rec[:, :, :j]
        finite = np.isfinite(rec)
        if self.simulated_to is not None:        # records a seed was not run to (by design)
            finite |= (self.rec_steps[:j][None, :] > self.simulated_to[:, None])[None]
        if not np.all(finite):
            warnings.warn(f"simulate {self.spec.name}: non-finite overlaps (the SGD diverged at "
                          f"eta = {fields['eta']:g}); they are reported as NaN", RuntimeWarning,
                          stacklevel=4)
            rec = np.where(np.isfinite(rec), rec, np.nan)
        if self.dir_esc is not None:
            fields["direction_escape_times"] = np.where(self.dir_esc >= 0, self.dir_esc / d,
                                                        np.nan)
        return SimulationResult(
            t=self.rec_steps[:j] / d, overlaps={n: rec[i] for i, n in enumerate(self.rec_names)},
            escape_times={key: np.where(v >= 0, v / d, np.nan) for key, v in self.esc.items()},
            spec_name=self.spec.name, d=d, steps=self.steps, record_every=self.every,
            steps_run=self.k, stopped_early=self.stopped_early, wall_time=wall,
            escape_kinds=tuple(self.kinds), **fields)


# ----------------------------------------------------------------------------------------------
# escape checks and records of the two students
# ----------------------------------------------------------------------------------------------

def _tied_book(spec, seeds, steps, d, theta, record_every, progress, stop_on):
    """The _Book of a tied student: state (m, e (S, r), q); records m, e_a, (q for plain SGD),
    q_norm; thresholds ||(m, e)||, |m|, ||e|| >= theta checked on the squared overlaps (cheap
    when no seed is near a threshold)."""
    r, spherical = spec.r, bool(spec.spherical)
    theta2 = theta * theta
    pending = [True]

    def columns(m, e, q):
        return [m] + [e[:, a] for a in range(r)] + ([] if spherical else [q]) + [q]

    def check(book, k, m, e, q):
        e2 = np.einsum("sa,sa->s", e, e) if r else 0.0
        m2 = m * m
        n2 = m2 + e2
        if not pending[0] or n2.max() < theta2:                      # |m|, ||e|| <= ||(m, e)||
            return
        sem = m2 >= theta2
        book.mark(k, "escape", n2 >= theta2)
        book.mark(k, "semantic", sem)
        if r:
            pos = e2 >= theta2
            book.mark(k, "positional", pos)
            book.mark_first(k, sem | pos, m2 >= e2)
        else:
            book.mark_first(k, sem, sem)
        esc = book.esc
        pending[0] = bool((esc["escape"] < 0).any() or (esc["semantic"] < 0).any()
                          or (r and (esc["positional"] < 0).any()))

    return _Book(spec, spec.overlap_names, seeds, steps, d, record_every, progress, stop_on,
                 columns, check)


def _untied_book(spec, seeds, steps, d, theta, record_every, progress, stop_on):
    """The _Book of an untied student: state (m_l, q_l) as (L, S); records m_1..m_L, q_1..q_L
    and q_norm = mean_l q_l; escape (and semantic escape) when sqrt(sum_l m_l^2 / L) >= theta."""

    def columns(ms, qs):
        return list(ms) + list(qs) + [qs.mean(axis=0)]

    def check(book, k, ms, qs):
        hit = np.sqrt(np.mean(ms ** 2, axis=0)) >= theta
        book.mark(k, "escape", hit)
        book.mark(k, "semantic", hit)
        book.mark_first(k, hit, hit)

    return _Book(spec, spec.overlap_names, seeds, steps, d, record_every, progress, stop_on,
                 columns, check)


def _multi_book(spec, seeds, steps, d, theta, record_every, progress, stop_on):
    """The _Book of a student with several directions (MATH.md 8): state (M (S, K, K*),
    E (S, K, r), Q (S, K, K)); records spec.overlap_names (M row by row, E, Q[k,h] for k <= h
    or k < h) and q_norm = mean_k Q[k,k]. Direction k escapes when max_j |M[k,j]| >= theta
    (book.dir_esc, (K, S)); 'escape' and 'semantic' when the first direction does, 'positional'
    when some ||E[k,:]|| >= theta; the first of the two gives `first` and the kind."""
    K, Ks, r = spec.student_directions, spec.teacher_directions, spec.r
    spherical = bool(spec.spherical)
    pairs = [(k, h) for k in range(K) for h in range(k, K) if not (spherical and h == k)]
    theta2 = theta * theta

    def columns(M, E, Q):
        return ([M[:, k, j] for k in range(K) for j in range(Ks)]
                + [E[:, k, a] for k in range(K) for a in range(r)]
                + [Q[:, k, h] for k, h in pairs]
                + [np.einsum("skk->s", Q) / K])

    def check(book, k, M, E, Q):
        m2 = (M * M).max(axis=2)                                      # (S, K)
        e2 = np.einsum("ska,ska->sk", E, E).max(axis=1) if r else None
        if m2.max() < theta2 and (e2 is None or e2.max() < theta2):
            return
        hit = m2 >= theta2                                            # (S, K)
        for j in range(K):
            new = hit[:, j] & (book.dir_esc[j] < 0)
            if new.any():
                book.dir_esc[j][new] = k
        sem_all = m2.max(axis=1)
        sem = sem_all >= theta2
        book.mark(k, "escape", sem)
        book.mark(k, "semantic", sem)
        if r:
            pos = e2 >= theta2
            book.mark(k, "positional", pos)
            book.mark_first(k, sem | pos, sem_all >= e2)
        else:
            book.mark_first(k, sem, sem)

    book = _Book(spec, spec.overlap_names, seeds, steps, d, record_every, progress, stop_on,
                 columns, check)
    book.dir_esc = np.full((K, seeds), -1, dtype=np.int64)
    return book


# ----------------------------------------------------------------------------------------------
# the simulator
# ----------------------------------------------------------------------------------------------

def _sgd_loop(spec, mod, pvals, student, rng, book, steps, seeds, dtype, batch=1, etas=None):
    """Run the online-SGD steps 1..steps (MATH.md 4; module docstring), booking each one.

    Per step: the learning rate of the step when there is a schedule (etas(k0, n): the rates of
    steps k0..k0+n-1, student.set_eta), the draws (tokens G into the student's buffer, then
    label noise xi when Delta > 0, (K, seeds b)), fields (z*, z) from the student, links of the
    generated module, residual with label noise (sgd_step.residual), -dl from the spec's loss
    kind (sgd_step.loss_gradient), the student's update and normalisation, then its overlaps.
    With several student directions the link gradient has K L entries per output entry (the
    fields z{k}_{l}, spec.variables("student")) and -dl is (S, K L)."""
    L = spec.L * (spec.student_directions if spec.multi else 1)
    noise_sd = math.sqrt(float(spec.noise))
    dl_of = loss_gradient(spec)
    teacher, link, gradient = mod.teacher_link, mod.student_link, mod.student_link_gradient
    asarray, normal, G = np.asarray, rng.standard_normal, student.G
    K = None
    xi = None
    book.start(*student.state())
    try:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            for k in range(1, steps + 1):
                if etas is not None:
                    j = (k - 1) % SCHEDULE_CHUNK
                    if j == 0:
                        rates = etas(k, min(SCHEDULE_CHUNK, steps - k + 1))
                    student.set_eta(rates[j])
                normal(out=G, dtype=dtype)
                zs, zw = student.fields()                            # (L, S b) each
                y = asarray(teacher(*zs, **pvals), dtype=float)
                if K is None:
                    K = y.shape[0]
                    if noise_sd > 0:
                        xi = np.empty((K, seeds * batch))
                y_hat = asarray(link(*zw, **pvals), dtype=float)
                if noise_sd > 0:
                    normal(out=xi)
                res = residual(y, y_hat, K, noise_sd, xi)            # (K, S) or (K, 1)
                # (K, L, S), or (K, L, 1) for a gradient that does not depend on z
                dg = asarray(gradient(*zw, **pvals), dtype=float).reshape(K, L, -1)
                student.update(dl_of(res, dg))
                if book.step(k, *student.state()):
                    break
    finally:
        book.close()


def _simulate(spec, eta, d, steps, seeds, seed, m0, e0, theta, record_every, params, progress,
              out_dir, dtype, stop_on, method="full", batch=None,
              schedule=None, init=None, engine="numpy",
              records_after_escape=True) -> SimulationResult:
    """`simulate` with the stop rule of _Book (None, "escape" or "first")."""
    from ..model.spec import ModelSpec, load_spec
    if isinstance(spec, (str, Path)):
        spec = load_spec(spec)
    if not isinstance(spec, ModelSpec):
        raise SpecError(f"spec: expected a ModelSpec or the path of a TOML spec, got {spec!r}")
    check_conventions(spec)
    if method not in METHODS:
        raise StateError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    from .compiled import ENGINES
    if engine not in ENGINES:
        raise StateError(f"engine: expected one of {', '.join(ENGINES)}, got {engine!r}")
    if engine != "numpy" and method != "reduced":
        raise StateError(f"engine: the {engine} engine runs the reduced simulator; use "
                         f"method='reduced' (got method={method!r})")
    if not isinstance(records_after_escape, bool):
        raise StateError(f"records_after_escape: expected true or false, got "
                         f"{records_after_escape!r}")
    L, r = spec.L, spec.r
    eta = _real_arg("eta", eta)
    if eta <= 0:
        raise StateError(f"eta: the learning rate must be > 0, got {eta:g}")
    if spec.multi:
        if engine != "numpy":
            raise SpecError(f"engine {engine}: spec '{spec.name}' has several directions "
                            f"(K* = {spec.teacher_directions}, K = {spec.student_directions}); "
                            f"the compiled chain has one student direction: use "
                            f"engine numpy")
        return _apply_records_rule(_simulate_multi(
            spec, eta, d, steps, seeds, seed, m0, e0, theta, record_every, params, progress,
            out_dir, dtype, stop_on, method, batch, schedule, init), records_after_escape,
            stop_on)
    if init is not None:
        raise StateError(f"init: spec '{spec.name}' has one teacher and one student direction: "
                         f"give its start as m0 and e0")
    d = _int_arg("d", d, L + r + 2, f" (L + r + 2 for spec '{spec.name}')")
    steps = _int_arg("steps", steps, 1)
    seeds = _int_arg("seeds", seeds, 1)
    theta = _real_arg("theta", theta)
    if theta <= 0:
        raise StateError(f"theta: the escape threshold must be > 0, got {theta:g}")
    if record_every is None:
        record_every = max(1, math.ceil(steps / DEFAULT_RECORDS))
    record_every = _int_arg("record_every", record_every, 1)
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise StateError(f"dtype: expected float64 or float32, got {dtype!r}") from None
    if dtype not in (np.dtype(np.float64), np.dtype(np.float32)):
        raise StateError(f"dtype: expected float64 or float32, got {dtype}")
    if method == "reduced" and dtype != np.dtype(np.float64):
        raise StateError(f"dtype: the reduced simulator has no d-dimensional arrays and runs in "
                         f"float64, got {dtype}")
    batch = _batch_arg(spec, batch)
    if seed is not None:
        seed = _int_arg("seed", seed, 0)
    m0, e0 = _initial_state(spec, d, m0, e0)
    mod = _load_module(spec, out_dir)
    if mod.LOSS != spec.loss:
        raise SpecError(f"{spec.where('loss.kind')}: the generated module of '{spec.name}' has "
                        f"the loss {mod.LOSS!r}, the spec {spec.loss!r}: regenerate it")
    pvals = _parameters(spec, mod, params)
    etas = _schedule_rates(spec, schedule, eta, d, pvals)

    make_book = _untied_book if spec.untied else _tied_book
    if spec.untied:
        e0 = ()
    if method == "reduced" and engine == "numba":
        from .compiled import run_chain
        book = make_book(spec, seeds, steps, d, theta, record_every, progress, stop_on)
        try:
            run_chain(spec, book, pvals, seeds, seed, d, steps, batch, eta, etas, theta, m0,
                      e0, stop_on, records_after_escape)
        finally:
            book.close()
    elif method == "reduced":
        from .reduced import reduced_chain, reduced_loop
        chain = reduced_chain(spec, seeds, d, m0, e0, batch)
        book = make_book(spec, seeds, steps, d, theta, record_every, progress, stop_on)
        reduced_loop(spec, mod, pvals, chain, seed, book, steps, seeds, batch, eta, d, etas)
    else:
        rng = np.random.Generator(np.random.SFC64(seed))
        if spec.untied:
            student = UntiedStudent(spec, rng, seeds, d, m0, eta, dtype, batch)
        else:
            student = TiedStudent(spec, rng, seeds, d, m0, e0, eta, dtype, batch)
        book = make_book(spec, seeds, steps, d, theta, record_every, progress, stop_on)
        _sgd_loop(spec, mod, pvals, student, rng, book, steps, seeds, dtype, batch, etas)
    return _apply_records_rule(
        book.result(eta=eta, seeds=seeds, theta=theta, m0=m0, e0=e0, params=pvals, seed=seed,
                    spherical=bool(spec.spherical), method=method, batch=batch,
                    scheduled=etas is not None, engine=engine), records_after_escape, stop_on)


def _apply_records_rule(result, records_after_escape, stop_on):
    """records_after_escape=False with a stop rule: every record of a seed after its own stop
    (its escape, or its first escape for stop_on "first") becomes NaN, whichever engine ran it
    (the numba engine has not simulated those steps at all)."""
    if records_after_escape or stop_on is None:
        return result
    times = result.escape_times["escape"] if stop_on == "escape" else np.fmin(
        result.escape_times["semantic"], result.escape_times["positional"])
    after = result.t[None, :] > np.where(np.isnan(times), np.inf, times)[:, None]
    for v in result.overlaps.values():
        v[after] = np.nan
    return result


def _common_args(spec, d, min_d, hint, steps, seeds, theta, record_every, dtype, method):
    """The validated (d, steps, seeds, theta, record_every, dtype) of a run."""
    d = _int_arg("d", d, min_d, hint)
    steps = _int_arg("steps", steps, 1)
    seeds = _int_arg("seeds", seeds, 1)
    theta = _real_arg("theta", theta)
    if theta <= 0:
        raise StateError(f"theta: the escape threshold must be > 0, got {theta:g}")
    if record_every is None:
        record_every = max(1, math.ceil(steps / DEFAULT_RECORDS))
    record_every = _int_arg("record_every", record_every, 1)
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise StateError(f"dtype: expected float64 or float32, got {dtype!r}") from None
    if dtype not in (np.dtype(np.float64), np.dtype(np.float32)):
        raise StateError(f"dtype: expected float64 or float32, got {dtype}")
    if method == "reduced" and dtype != np.dtype(np.float64):
        raise StateError(f"dtype: the reduced simulator has no d-dimensional arrays and runs in "
                         f"float64, got {dtype}")
    return d, steps, seeds, theta, record_every, dtype


def _simulate_multi(spec, eta, d, steps, seeds, seed, m0, e0, theta, record_every, params,
                    progress, out_dir, dtype, stop_on, method, batch, schedule, init):
    """`_simulate` for a spec with several teacher or student directions (MATH.md 8): the
    d-dimensional SGD of sgd_step.MultiStudent or the exact chain reduced.ReducedMulti, booked
    by _multi_book; the start is `init` (sgd_step.multi_start) or random."""
    Ks, K = spec.teacher_directions, spec.student_directions
    if m0 is not None or e0 is not None:
        raise StateError(f"m0/e0: spec '{spec.name}' has several directions (K* = {Ks}, "
                         f"K = {K}): give the start as init={{name: value}} over its overlaps "
                         f"{', '.join(spec.overlap_names)} (missing 0, Q[k,k] = 1; default: "
                         f"random vectors)")
    d, steps, seeds, theta, record_every, dtype = _common_args(
        spec, d, multi_min_d(spec), f" (K* + r + K + L for spec '{spec.name}')", steps, seeds,
        theta, record_every, dtype, method)
    batch = _batch_arg(spec, batch)
    if batch != 1:
        raise StateError(f"batch: mini-batches with several directions are not supported "
                         f"(spec '{spec.name}'), got batch = {batch}; use batch = 1")
    if seed is not None:
        seed = _int_arg("seed", seed, 0)
    X0 = multi_start(spec, init)
    mod = _load_module(spec, out_dir)
    if mod.LOSS != spec.loss:
        raise SpecError(f"{spec.where('loss.kind')}: the generated module of '{spec.name}' has "
                        f"the loss {mod.LOSS!r}, the spec {spec.loss!r}: regenerate it")
    if tuple(getattr(mod, "DIRECTIONS", (1, 1))) != (Ks, K):
        raise SpecError(f"generated module of '{spec.name}' has the directions "
                        f"{tuple(getattr(mod, 'DIRECTIONS', (1, 1)))}, the spec {(Ks, K)}: "
                        f"regenerate it")
    pvals = _parameters(spec, mod, params)
    etas = _schedule_rates(spec, schedule, eta, d, pvals)
    book = _multi_book(spec, seeds, steps, d, theta, record_every, progress, stop_on)
    if method == "reduced":
        from .reduced import ReducedMulti, reduced_multi_loop
        chain = ReducedMulti(spec, seeds, d, X0, seed)
        reduced_multi_loop(spec, mod, pvals, chain, seed, book, steps, seeds, eta, d, etas)
    else:
        rng = np.random.Generator(np.random.SFC64(seed))
        student = MultiStudent(spec, rng, seeds, d, X0, eta, dtype)
        _sgd_loop(spec, mod, pvals, student, rng, book, steps, seeds, dtype, 1, etas)
    return book.result(eta=eta, seeds=seeds, theta=theta, params=pvals, seed=seed,
                       spherical=bool(spec.spherical), method=method, batch=batch,
                       scheduled=etas is not None, directions=(Ks, K),
                       init=None if init is None else {k: float(v) for k, v in init.items()})


def simulate(spec, eta, d, steps, seeds=8, seed=0, m0=None, e0=None, theta=0.5,
             record_every=None, params=None, progress=True, out_dir="generated",
             dtype=np.float64, stop_when_escaped=False, method="full", batch=None,
             schedule=None, init=None, engine="numpy",
             records_after_escape=True) -> SimulationResult:
    """Run `seeds` independent online-SGD runs of `steps` steps in dimension d.

    spec: a ModelSpec or the path of a TOML spec (tied or untied student, any link shape, loss
    "square" or "norm", with or without label noise, spherical or plain: each honoured as the
    spec states it, SpecError naming the key for a convention the simulator does not implement);
    its generated module supplies the links (the full module if up to date, else the drift-only
    one, generated if needed).
    eta: per-step learning rate (> 0). d: input dimension (integer >= L + r + 2). m0, e0:
    initial overlaps (defaults 1/sqrt(d) and 0; e0 a number for r = 1 or a list of r numbers),
    with q0 = 1. theta: escape threshold. record_every: steps
    between records (default ceil(steps / 500)); the last step is always recorded. params:
    overrides of the spec's parameter defaults. dtype: float64 or float32 for the
    d-dimensional arrays (the links are evaluated in float64). stop_when_escaped: stop as soon
    as every seed has escaped (||(m, e)|| >= theta); the records are then truncated at that step.
    method: "full" (d-dimensional SGD, the default) or "reduced" (the exact chain of the
    overlaps, MATH.md 10, float64, cost per step independent of d; its own random stream).
    batch: sequences per step, w <- w - (eta / b) sum_i grad l_i (default: spec.batch, else 1).
    schedule: None or f(t) -> factor, vectorised over arrays of t: step k uses the rate
    eta f((k - 1) / d) (default: spec.schedule_factor(parameter values)).
    engine (method="reduced"): "numpy" (the default, vectorised over seeds) or "numba" (the
    chain of a tied or untied student with one direction compiled with Numba, one random stream
    per seed, seeds on threads: module compiled; Numba is the optional extra [fast]). The two have the same law, not the
    same random numbers. records_after_escape: with stop_when_escaped, False leaves the records
    of a seed after its own escape NaN instead of running it on to the last seed's escape
    (escape-time studies; the numba engine then skips that work).

    Several teacher or student directions (spec.multi, MATH.md 8): K* teacher vectors with
    the overlaps P, K student vectors tied across the tokens, every one on its own sphere for
    spherical SGD; d >= K* + r + K + L, batch 1. The start is random per seed (each w_k
    uniform on |w_k|^2 = d, independently) unless init = {overlap name: value} gives it (names
    of spec.overlap_names, missing ones 0, Q[k,k] = 1; the same overlaps for every seed;
    StateError if they are not those of vectors); m0 and e0 are refused. Recorded: the
    overlaps M, E, Q of spec.overlap_names and the per-direction escape times
    (result.direction_escape_times, (K, seeds): first t with max_j |M[k,j]| >= theta);
    escape_times['escape'] is the first direction's. method="reduced" is the exact chain of
    (M, E, Q) (reduced.ReducedMulti).
    """
    return _simulate(spec, eta, d, steps, seeds, seed, m0, e0, theta, record_every, params,
                     progress, out_dir, dtype, "escape" if stop_when_escaped else None,
                     method, batch, schedule, init, engine, records_after_escape)


def simulate_first_escape(spec, eta, d, steps, seeds=8, seed=0, m0=None, e0=None, theta=0.5,
                          record_every=None, params=None, progress=False, out_dir="generated",
                          dtype=np.float64, method="full", batch=None,
                          schedule=None, init=None, engine="numpy",
                          records_after_escape=True) -> SimulationResult:
    """`simulate`, stopped as soon as every seed has |m| >= theta or ||e|| >= theta (instead of
    ||(m, e)|| >= theta): the escape along one direction. Its `escape_kinds` say which
    direction each seed escaped along ('semantic' when |m| >= ||e|| at the first step where
    either reaches theta) and min(escape_times['semantic'], escape_times['positional']) when.
    engine, records_after_escape: as `simulate` (the escape being the first one here)."""
    return _simulate(spec, eta, d, steps, seeds, seed, m0, e0, theta, record_every, params,
                     progress, out_dir, dtype, "first", method, batch, schedule, init, engine,
                     records_after_escape)
