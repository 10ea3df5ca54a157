"""Finite-d online SGD on a sequence single-index model (MATH.md sections 1, 2, 4, 5).

This is the ground truth the ODE/SDE predictions are checked against: real d-dimensional online
SGD, no reduced or low-dimensional shortcut. The only thing taken from the generated module of the
spec is the links (``teacher_link``, ``student_link``, ``student_link_gradient``), the same
functions the predictions are derived from.

Setup, per seed (the seeds are a batch axis; every seed is an independent run):

- a random orthonormal frame (w*/sqrt(d), u_1, .., u_r) from the QR factorisation of a Gaussian
  d x (1 + r) matrix: |w*|^2 = d, the u_a orthonormal and orthogonal to w*;
- the initial weights w = m0 w* + sqrt(d) sum_a e0_a u_a + s n, with n a random vector
  orthogonal to the frame, |n|^2 = d, and s = sqrt(1 - m0^2 - |e0|^2): exactly the overlaps
  (m0, e0) and q0 = 1 (for spherical and for plain SGD).

One step (fresh sample; X = G / sqrt(d) with G standard normal, shape (seeds, L, d), one draw):

    z*_l = g_l . w* / sqrt(d),     z_l = g_l . w / sqrt(d) + sum_a C[l,a] e_a
    y_k  = g*_k(z*) (+ sqrt(Delta) xi_k),  y_hat_k = g_k(z)
    dl_l = -sum_k (y_k - y_hat_k) dg_k/dz_l
    w   <- w - (eta / sqrt(d)) (sum_l dl_l g_l + sum_a (sum_l dl_l C[l,a]) u_a)
    spherical: w <- sqrt(d) w / |w|

which is grad_w = sum_l dl_l (x_l + p_l / sqrt(d)) with p_l = sum_a C[l,a] u_a. Both
projections come from one batched matmul of G with the rows (w*, w); the gradient direction from
one batched matmul of the coefficients (dl, dl C) with the rows (g_1..g_L, u_1..u_r). After every
step the overlaps m = w.w*/d, e_a = u_a.w/sqrt(d), q = |w|^2/d are recomputed from the stored w
(not updated incrementally, so they carry no accumulated round-off). There is no Python loop over
tokens or seeds; the per-step Python work is a fixed number of NumPy calls.

Escape times are measured at step resolution: the thresholds ||(m, e)|| >= theta, |m| >= theta
and ||e|| >= theta are checked after every step (and at step 0) on the overlaps computed
anyway for the next step, independently of the record grid; the time reported is (first step at
which the threshold holds) / d, NaN if never reached. The raw overlaps are used for plain SGD too
(no division by sqrt(q)), as in MATH.md section 5.

Random numbers: one ``numpy.random.Generator(SFC64(seed))`` per run (SFC64 draws normals ~20%
faster than the default PCG64 here). Its stream does not depend on ``record_every``,
``stop_when_escaped`` or ``progress``, so those options never change a trajectory.

Measured speed (one effective CPU, NumPy 2.4, float64, progress off): seeds = 8, L = 2,
d = 2000 (tied_he2_pe): about 2000 steps/s, ~0.5 ms/step of which ~0.35 ms is drawing the
32000 normals of X (the floor for real d-dimensional SGD with NumPy's generator); float32 is not
faster, as the normal generator dominates. seeds = 8, L = 1, d = 1000 (linear): ~5500 steps/s.
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

__all__ = ["SimulationResult", "simulate", "make_frame", "initial_weights"]

# An untied student (MATH.md section 6) has one weight vector w_l per token: z_l = g_l . w_l /
# sqrt(d), w_l <- w_l - (eta / sqrt(d)) dl_l g_l, and spherical SGD rescales the flattened
# vector: (w_1..w_L) <- sqrt(L d) (w_1..w_L) / |(w_1..w_L)|. Recorded: m_l = w_l . w* / d,
# q_l = |w_l|^2 / d; escape when sqrt(sum_l m_l^2 / L) >= theta (see `_simulate_untied`).

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
            "wall_time": self.wall_time,
            "t": _jsonable(self.t),
            "overlaps": {k: _jsonable(v) for k, v in self.overlaps.items()},
            "mean": {k: _jsonable(v) for k, v in self.mean().items()},
            "escape_times": {k: _jsonable(v) for k, v in self.escape_times.items()},
        }


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


# ----------------------------------------------------------------------------------------------
# frame and initial weights
# ----------------------------------------------------------------------------------------------

def make_frame(rng, seeds, d, r):
    """Per seed a teacher w* (|w*|^2 = d) and r orthonormal u_a orthogonal to it.

    Returns (wstar, U) of shapes (seeds, d) and (seeds, r, d), float64: the QR factorisation of a
    Gaussian d x (1 + r) matrix, i.e. a uniformly random orthonormal frame."""
    Q, _ = np.linalg.qr(rng.standard_normal((seeds, d, 1 + r)))      # (S, d, 1 + r)
    Q = Q.transpose(0, 2, 1)
    return math.sqrt(d) * Q[:, 0], np.ascontiguousarray(Q[:, 1:])


def initial_weights(rng, wstar, U, m0, e0):
    """w = m0 w* + sqrt(d) sum_a e0_a u_a + s n with n random, orthogonal to w* and the u_a,
    |n|^2 = d and s = sqrt(1 - m0^2 - |e0|^2): overlaps exactly (m0, e0) and |w|^2 = d."""
    S, d = wstar.shape
    sqrtd = math.sqrt(d)
    e0 = np.asarray(e0, dtype=float).reshape(-1)
    Q = np.concatenate([wstar[:, None, :] / sqrtd, U], axis=1)       # orthonormal rows
    n = rng.standard_normal((S, d))
    for _ in range(2):                                                # twice: exact projection
        n -= np.einsum("skd,sk->sd", Q, np.einsum("skd,sd->sk", Q, n))
    n *= (sqrtd / np.linalg.norm(n, axis=1))[:, None]
    s0 = math.sqrt(max(0.0, 1.0 - m0 * m0 - float(e0 @ e0)))
    return m0 * wstar + sqrtd * np.einsum("a,sad->sd", e0, U) + s0 * n


class _Book:
    """The per-step bookkeeping of a simulator loop (tied or untied): records of the overlaps
    every `record_every` steps and at the last one (names + ('q_norm',)), the first step at
    which each seed crosses each escape threshold (-1: never), the progress bar, and the early
    stop once every seed has escaped.

    columns(*state) -> the record's rows, one (seeds,) array per record name; check(esc, k,
    *state) marks in esc the seeds that cross a threshold at step k."""

    def __init__(self, spec, names, seeds, steps, d, record_every, progress, stop_when_escaped,
                 columns, check):
        self.spec, self.steps, self.d, self.every = spec, steps, d, record_every
        self.stop_when_escaped = stop_when_escaped
        self.columns, self.check = columns, check
        self.rec_names = tuple(names) + ("q_norm",)
        n_rec = steps // record_every + 1 + (1 if steps % record_every else 0)
        self.rec = np.full((len(self.rec_names), seeds, n_rec), np.nan)
        self.rec_steps = np.zeros(n_rec, dtype=np.int64)
        self.esc = {key: np.full(seeds, -1, dtype=np.int64)
                    for key in ("escape", "semantic", "positional")}
        self.j = self.k = 0
        self.stopped_early = False
        self.bar = _Progress(f"simulate {spec.name}", steps, d, seeds) if progress else None
        self.started = time.perf_counter()

    def _record(self, k, state):
        self.rec_steps[self.j] = k
        self.rec[:, :, self.j] = np.stack(self.columns(*state))
        self.j += 1

    def start(self, *state):
        """Record and check the initial state (step 0)."""
        self._record(0, state)
        self.check(self.esc, 0, *state)
        self.started = time.perf_counter()

    def _escaped(self) -> int:
        return int(np.count_nonzero(self.esc["escape"] >= 0))

    def step(self, k, *state) -> bool:
        """Book step k's state; True when the loop should stop (every seed has escaped and
        stop_when_escaped; that step is then recorded too)."""
        self.k = k
        self.check(self.esc, k, *state)
        if k % self.every == 0 or k == self.steps:
            self._record(k, state)
        if self.bar is not None and time.monotonic() - self.bar.last >= PROGRESS_INTERVAL:
            self.bar.update(k, self._escaped())
        if self.stop_when_escaped and (self.esc["escape"] >= 0).all():
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
        if not np.all(np.isfinite(rec)):
            warnings.warn(f"simulate {self.spec.name}: non-finite overlaps (the SGD diverged at "
                          f"eta = {fields['eta']:g}); they are reported as NaN", RuntimeWarning,
                          stacklevel=3)
            rec = np.where(np.isfinite(rec), rec, np.nan)
        return SimulationResult(
            t=self.rec_steps[:j] / d, overlaps={n: rec[i] for i, n in enumerate(self.rec_names)},
            escape_times={key: np.where(v >= 0, v / d, np.nan) for key, v in self.esc.items()},
            spec_name=self.spec.name, d=d, steps=self.steps, record_every=self.every,
            steps_run=self.k, stopped_early=self.stopped_early, wall_time=wall, **fields)


# ----------------------------------------------------------------------------------------------
# the simulator
# ----------------------------------------------------------------------------------------------

def simulate(spec, eta, d, steps, seeds=8, seed=0, m0=None, e0=None, theta=0.5,
             record_every=None, params=None, progress=True, out_dir="generated",
             dtype=np.float64, stop_when_escaped=False) -> SimulationResult:
    """Run `seeds` independent online-SGD runs of `steps` steps in dimension d.

    spec: a ModelSpec or the path of a TOML spec; its generated module supplies the links (the
    full module if up to date, else the drift-only one, generated if needed).
    eta: per-step learning rate (> 0). d: input dimension (integer >= L + r + 2). m0, e0:
    initial overlaps (defaults 1/sqrt(d) and 0; e0 a number for r = 1 or a list of r numbers),
    with q0 = 1. theta: escape threshold. record_every: steps
    between records (default ceil(steps / 500)); the last step is always recorded. params:
    overrides of the spec's parameter defaults. dtype: float64 or float32 for the
    d-dimensional arrays (the links are evaluated in float64). stop_when_escaped: stop as soon
    as every seed has escaped (||(m, e)|| >= theta); the records are then truncated at that step.
    """
    from ..model.spec import ModelSpec, load_spec
    if isinstance(spec, (str, Path)):
        spec = load_spec(spec)
    if not isinstance(spec, ModelSpec):
        raise SpecError(f"spec: expected a ModelSpec or the path of a TOML spec, got {spec!r}")
    L, r = spec.L, spec.r
    eta = _real_arg("eta", eta)
    if eta <= 0:
        raise StateError(f"eta: the learning rate must be > 0, got {eta:g}")
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
    if seed is not None:
        seed = _int_arg("seed", seed, 0)
    m0, e0 = _initial_state(spec, d, m0, e0)
    mod = _load_module(spec, out_dir)
    pvals = _parameters(spec, mod, params)
    if spec.untied:
        return _simulate_untied(spec, mod, pvals, eta, d, steps, seeds, seed, m0, theta,
                                record_every, progress, dtype, stop_when_escaped)

    S = seeds
    sqrtd = math.sqrt(d)
    C = np.array([[float(c) for c in row] for row in spec.C], dtype=float).reshape(L, r)
    noise_sd = math.sqrt(float(spec.noise))
    spherical = bool(spec.spherical)
    teacher, student, gradient = mod.teacher_link, mod.student_link, mod.student_link_gradient

    rng = np.random.Generator(np.random.SFC64(seed))

    wstar, U = make_frame(rng, S, d, r)
    w0 = initial_weights(rng, wstar, U, m0, e0)

    # W rows: 0 = w*, 1 = w (the trained weights, a view), 2.. = u_a.
    W = np.empty((S, 2 + r, d), dtype=dtype)
    W[:, 0] = wstar
    W[:, 1] = w0
    W[:, 2:] = U
    del wstar, U, w0
    w = W[:, 1]
    W_proj = W[:, :2].transpose(0, 2, 1)                              # (S, d, 2): w*, w
    # X rows 0..L-1 = g_l (fresh N(0, 1) every step), rows L.. = u_a (fixed)
    Xbuf = np.empty((L + r, S, d), dtype=dtype)
    Xbuf[L:] = W[:, 2:].transpose(1, 0, 2)
    G = Xbuf[:L]                                                      # contiguous: filled in place
    Xs = Xbuf.transpose(1, 0, 2)                                      # (S, L + r, d) view
    Gs = Xs[:, :L]
    proj = np.empty((S, L, 2), dtype=dtype)
    coef = np.zeros((S, 1, L + r), dtype=dtype)
    direction = np.empty((S, 1, d), dtype=dtype)
    ov = np.empty((S, 2 + r, 1), dtype=dtype)
    K = None
    xi = None
    step_scale = eta / sqrtd
    inv_sqrtd = 1.0 / sqrtd
    inv_d = 1.0 / d

    def overlaps_now():
        np.matmul(W, w[:, :, None], out=ov)
        o = ov[:, :, 0].astype(float)
        return o[:, 0] * inv_d, o[:, 2:] * inv_sqrtd, o[:, 1] * inv_d  # m, e (S, r), q

    def columns(m, e, q):
        return [m] + [e[:, a] for a in range(r)] + ([] if spherical else [q]) + [q]

    theta2 = theta * theta
    pending = [True]

    def check_escape(esc, k, m, e, q):
        """Mark the seeds that reach a threshold at step k (cheap when none can)."""
        e2 = np.einsum("sa,sa->s", e, e) if r else 0.0
        n2 = m * m + e2
        if not pending[0] or n2.max() < theta2:                      # |m|, ||e|| <= ||(m, e)||
            return
        for key, hit in (("escape", n2 >= theta2), ("semantic", m * m >= theta2),
                         ("positional", (e2 >= theta2) if r else None)):
            if hit is not None:
                new = hit & (esc[key] < 0)
                if new.any():
                    esc[key][new] = k
        pending[0] = bool((esc["escape"] < 0).any() or (esc["semantic"] < 0).any()
                          or (r and (esc["positional"] < 0).any()))

    book = _Book(spec, spec.overlap_names, S, steps, d, record_every, progress,
                 stop_when_escaped, columns, check_escape)
    m, e, q = overlaps_now()
    mu = C @ e.T                                                      # (L, S): p_l . w / sqrt(d)
    book.start(m, e, q)
    try:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            for k in range(1, steps + 1):
                rng.standard_normal(out=G, dtype=dtype)
                np.matmul(Gs, W_proj, out=proj)
                zz = proj.astype(float, copy=False) * inv_sqrtd      # (S, L, 2)
                zs = zz[:, :, 0].T                                    # (L, S) z*_l
                zw = zz[:, :, 1].T + mu                               # (L, S) z_l
                y = np.asarray(teacher(*zs, **pvals), dtype=float)
                if K is None:
                    K = y.shape[0]
                    if noise_sd > 0:
                        xi = np.empty((K, S))
                yh = np.asarray(student(*zw, **pvals), dtype=float)
                res = y.reshape(K, -1) - yh.reshape(K, -1)            # (K, S) or (K, 1)
                if noise_sd > 0:
                    rng.standard_normal(out=xi)
                    res = res + noise_sd * xi
                # (K, L, S), or (K, L) for a gradient that does not depend on z
                dg = np.asarray(gradient(*zw, **pvals), dtype=float).reshape(K, L, -1)
                # coefficients of g_l (dl_l) and u_a ((dl C)_a), times -eta / sqrt(d)
                dl = np.einsum("ks,kls->sl", np.broadcast_to(res, (K, S)),
                               np.broadcast_to(dg, (K, L, S)))        # = -dl_l
                dl *= step_scale
                coef[:, 0, :L] = dl
                if r:
                    coef[:, 0, L:] = dl @ C
                np.matmul(coef, Xs, out=direction)
                w += direction[:, 0]
                if spherical:
                    nrm2 = np.einsum("sd,sd->s", w, w)
                    w *= np.sqrt(d / nrm2)[:, None]
                m, e, q = overlaps_now()
                mu = C @ e.T
                if book.step(k, m, e, q):
                    break
    finally:
        book.close()
    return book.result(eta=eta, seeds=S, theta=theta, m0=m0, e0=e0, params=pvals, seed=seed,
                       spherical=spherical)


def _simulate_untied(spec, mod, pvals, eta, d, steps, seeds, seed, m0, theta, record_every,
                     progress, dtype, stop_when_escaped) -> SimulationResult:
    """Finite-d online SGD of an untied student (MATH.md section 6), batched over seeds.

    Start: w_l = m0 w* + sqrt(1 - m0^2) n_l with n_l random, orthogonal to w*, |n_l|^2 = d,
    independent across tokens (so m_l = m0 and q_l = 1 exactly). Step: fresh G (L, seeds, d),
    z*_l = g_l . w* / sqrt(d), z_l = g_l . w_l / sqrt(d), dl_l from the links of the generated
    module, w_l <- w_l - (eta / sqrt(d)) dl_l g_l, then the spherical rescaling of the flattened
    weights to |W|^2 = L d. The semantic overlap is sqrt(sum_l m_l^2 / L) (|m| when tied)."""
    L, S = spec.L, seeds
    sqrtd = math.sqrt(d)
    noise_sd = math.sqrt(float(spec.noise))
    teacher, student, gradient = mod.teacher_link, mod.student_link, mod.student_link_gradient
    rng = np.random.Generator(np.random.SFC64(seed))
    wstar, _ = make_frame(rng, S, d, 0)
    W = np.empty((S, L + 1, d), dtype=dtype)                         # row 0 = w*, 1.. = w_l
    W[:, 0] = wstar
    for l in range(L):
        W[:, 1 + l] = initial_weights(rng, wstar, np.zeros((S, 0, d)), m0, ())
    Ws = W[:, 1:]
    G = np.empty((L, S, d), dtype=dtype)

    def overlaps_now():
        ms = np.einsum("sld,sd->ls", Ws, W[:, 0]).astype(float) / d      # (L, S)
        qs = np.einsum("sld,sld->ls", Ws, Ws).astype(float) / d
        return ms, qs

    def columns(ms, qs):
        return list(ms) + list(qs) + [qs.mean(axis=0)]

    def check_escape(esc, k, ms, qs):
        sem = np.sqrt(np.mean(ms ** 2, axis=0))
        for key in ("escape", "semantic"):
            new = (sem >= theta) & (esc[key] < 0)
            esc[key][new] = k

    book = _Book(spec, spec.overlap_names, S, steps, d, record_every, progress,
                 stop_when_escaped, columns, check_escape)
    book.start(*overlaps_now())
    K = None
    try:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            for k in range(1, steps + 1):
                rng.standard_normal(out=G, dtype=dtype)
                zs = np.einsum("lsd,sd->ls", G, W[:, 0]).astype(float) / sqrtd
                zw = np.einsum("lsd,sld->ls", G, Ws).astype(float) / sqrtd
                y = np.asarray(teacher(*zs, **pvals), dtype=float)
                K = y.shape[0] if K is None else K
                yh = np.asarray(student(*zw, **pvals), dtype=float)
                res = y.reshape(K, -1) - yh.reshape(K, -1)
                if noise_sd > 0:
                    res = res + noise_sd * rng.standard_normal((K, S))
                dg = np.asarray(gradient(*zw, **pvals), dtype=float).reshape(K, L, -1)
                dl = np.einsum("ks,kls->ls", np.broadcast_to(res, (K, S)),
                               np.broadcast_to(dg, (K, L, S)))          # = -dl_l
                Ws += (eta / sqrtd) * dl.T[:, :, None].astype(dtype) * G.transpose(1, 0, 2)
                if spec.spherical:
                    nrm2 = np.einsum("sld,sld->s", Ws, Ws)
                    Ws *= np.sqrt(L * d / nrm2)[:, None, None]
                if book.step(k, *overlaps_now()):
                    break
    finally:
        book.close()
    return book.result(eta=eta, seeds=S, theta=theta, m0=m0, e0=(), params=pvals, seed=seed,
                       spherical=bool(spec.spherical))
