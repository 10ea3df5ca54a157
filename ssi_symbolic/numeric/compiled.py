"""The exact reduced chain of a tied or untied student (MATH.md 10, :mod:`.reduced`) compiled
with Numba:
``simulate(..., method="reduced", engine="numba")``, ``ssi simulate --method reduced --engine
numba``. Numba is an optional dependency (``pip install "ssi-symbolic[fast]"``); without it
this engine is refused in one line and the NumPy engine (the default) is unchanged.

The chain is the one of :func:`.reduced.tied_step`, step for step: per step and sequence i of
the mini-batch, L tokens with the frame coordinates g*_il, h_il, zeta_ila ~ N(0, 1) (independent),
the fields

    z*_il = g*_il,   z_il = m g*_il + rho h_il + sum_a e_a (zeta_ila + C[l,a]),

the residuals r_ik = g*_k(z*_i) - g_k(z_i) (+ sqrt(Delta) xi_ik), -dl_il = sum_k r_ik dg_k/dz_l
(square loss; divided by ||r_i|| for the norm loss), and with c = eta_k / (b d)

    m' = m + c sum_il mdl_il g*_il,   e_a' = e_a + c sum_il mdl_il (zeta_ila + C[l,a]),
    rho' = sqrt((rho + c sum_il mdl_il h_il)^2 + c^2 (sum_il mdl_il^2) chi),  chi ~ chi^2(d - 2 - r),

then (spherical SGD) (m', rho', e') / sqrt(m'^2 + rho'^2 + |e'|^2). The teacher link, the
student link and its gradient are printed from the spec's SymPy expressions (one common
subexpression elimination over the three) into straight-line scalar code inside the step loop,
the parameters read from an array, so one compiled kernel serves every parameter value.

What differs from the NumPy engine is the order of work and of random numbers, not the law:

- each seed s has its own generator ``Generator(SFC64(ss))``, ss = ``SeedSequence(seed)
  .spawn(seeds)[s]``, read in step order; a seed's trajectory therefore depends on (seed, s)
  and the model only, never on the other seeds, on the block size or on the number of threads;
- the seeds are run one after another (each on a thread, in a pool of ``workers`` threads; the
  kernel releases the GIL), each for blocks of ``BLOCK`` steps, with its escape checks and
  records made inside the kernel: no Python work per step;
- with a stop rule (``stop_when_escaped``), a seed stops at its own escape; the seeds that
  stopped earlier are then continued, from their saved state and generator, to the step at which
  the last seed stopped, so the records are those of the NumPy engine's booking. With
  ``records_after_escape=False`` this continuation is skipped: a seed's records after its own
  stop are NaN (escape-time studies, which need nothing after the escape).

The kernel source is written to a cache folder (``SSI_CACHE_DIR`` or ``$XDG_CACHE_HOME/
ssi-symbolic``, default ``~/.cache/ssi-symbolic``), ``kernels/<hash>.py`` named by the hash of
its text, and compiled by Numba with ``cache=True``: the first run of a model compiles (a few
seconds), later runs load the machine code. Nothing is written into ``generated/``.

An untied student (:func:`.reduced.untied_step`) has the state (m_1..m_L, rho_1..rho_L), one
chi^2(d - 2) per token and step, and the spherical constraint over all tokens (see
backends/numba_kernel.py, which prints the kernels). Not implemented here (refused in one line naming the reason, use
``engine="numpy"``): several student or teacher directions.
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..errors import SpecError, StateError

__all__ = ["ENGINES", "BLOCK", "numba_available", "cache_dir", "kernel_module", "run_chain"]

#: engines of the reduced simulator
ENGINES = ("numpy", "numba")
#: steps per kernel call (the granularity of progress updates and of schedule rates)
BLOCK = 2 ** 16

# stop rules in the kernel (the _Book's stop_on)
_STOP = {None: 0, "escape": 1, "first": 2}

_KERNELS: dict = {}
_LOCK = threading.Lock()


def numba_available() -> bool:
    """True when Numba can be imported."""
    return importlib.util.find_spec("numba") is not None


def cache_dir() -> Path:
    """The folder of compiled kernels: $SSI_CACHE_DIR, else $XDG_CACHE_HOME/ssi-symbolic, else
    ~/.cache/ssi-symbolic; its kernels/ sub-folder holds the kernel sources."""
    env = os.environ.get("SSI_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ssi-symbolic"


def kernel_module(spec):
    """The kernel module of a spec (module docstring; its functions `run`, `chisquare` and
    `chisquare_params`): the source is written to cache_dir()/kernels/k_<hash>.py (atomically,
    once) and imported; Numba compiles a function on its first call (or loads its cache).
    SpecError for a spec the kernel does not implement."""
    if not numba_available():
        raise StateError("engine numba: Numba is not installed (pip install "
                         "'ssi-symbolic[fast]', or pip install numba); use engine numpy")
    from ..backends.numba_kernel import kernel_source   # SymPy only when a kernel is built
    src = kernel_source(spec)
    key = hashlib.sha256(src.encode()).hexdigest()[:20]
    with _LOCK:
        if key in _KERNELS:
            return _KERNELS[key]
        folder = cache_dir() / "kernels"
        path = folder / f"k_{key}.py"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if not path.exists() or path.read_text() != src:
                from ..backends.files import write_atomic
                write_atomic(path, src)
        except OSError as exc:
            raise StateError(f"engine numba: cannot write the kernel cache {path}: "
                             f"{exc.strerror or exc}; set SSI_CACHE_DIR to a writable "
                             f"folder") from None
        name = f"_ssi_kernel_{key}"
        spec_ = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec_)
        sys.modules[name] = mod
        spec_.loader.exec_module(mod)
        _KERNELS[key] = mod
        return mod


def _compile_error(spec, exc) -> SpecError:
    msg = str(exc).strip().splitlines()
    first = next((x for x in msg if x.strip()), type(exc).__name__)
    return SpecError(f"engine numba: Numba cannot compile the links of spec '{spec.name}' "
                     f"({first[:200]}); use engine numpy")


def _book_state(spec, X):
    """The state arguments of the simulator's _Book (its check and its record columns) from the
    kernel states X (S, nx): tied (m, e (S, r), q), untied (m_l (L, S), q_l (L, S))."""
    if spec.untied:
        L = spec.L
        ms, rhos = X[:, :L].T.copy(), X[:, L:].T
        return ms, ms * ms + rhos * rhos
    return X[:, 0].copy(), X[:, 2:].copy(), (X * X).sum(axis=1)


def run_chain(spec, book, pvals, seeds, seed, d, steps, batch, eta, etas, theta, m0, e0,
              stop_on, records_after_escape=True, workers=None):
    """Run the compiled chain (tied or untied student) for every seed and fill `book` (the
    simulator's _Book of that student: records, escape steps, first escapes and kinds, the
    early stop) as the NumPy engine's loop would (module docstring for the order of the work).
    etas: None or rates(k0, n) (simulate._schedule_rates)."""
    run = kernel_module(spec).run
    r = spec.r
    P = np.array([float(pvals[p]) for p in spec.parameters], dtype=float)
    streams = np.random.SeedSequence(seed).spawn(seeds)
    rngs = [np.random.Generator(np.random.SFC64(s)) for s in streams]
    if spec.untied:                   # (m_1..m_L, rho_1..rho_L), q_l = 1
        X = np.empty((seeds, 2 * spec.L))
        X[:, :spec.L], X[:, spec.L:] = m0, math.sqrt(max(0.0, 1.0 - m0 * m0))
    else:                             # (m, rho, e_1..e_r), q = 1
        e0 = np.asarray(e0, dtype=float).reshape(-1)
        rho0 = math.sqrt(max(0.0, 1.0 - m0 * m0 - float(e0 @ e0)))
        X = np.empty((seeds, 2 + r))
        X[:, 0], X[:, 1], X[:, 2:] = m0, rho0, e0[None, :]
    esc = np.full((seeds, 5), -1, dtype=np.int64)
    every = book.every
    rec = np.full((seeds,) + book.rec.shape[::2], np.nan)       # (S, columns, records)
    theta2 = float(theta) * float(theta)
    df = float(d - 2 - r)
    noise_sd = math.sqrt(float(spec.noise))
    stop = _STOP[stop_on]
    c_const = np.array([eta / (batch * d)])
    rates_cache: dict = {}
    rates_lock = threading.Lock()

    def cs_of(k0, k1):
        """c = eta_k / (b d) of steps k0+1..k1: the rates of a block are computed once and
        shared by the seeds (the threads run different seeds through the same blocks)."""
        if etas is None:
            return c_const
        with rates_lock:
            if (k0, k1) not in rates_cache:
                if len(rates_cache) > 64:
                    rates_cache.clear()
                rates_cache[(k0, k1)] = np.ascontiguousarray(etas(k0 + 1, k1 - k0)
                                                             / (batch * d))
            return rates_cache[(k0, k1)]

    # step 0: the _Book records and checks the start; the kernel's arrays take them over
    book.start(*_book_state(spec, X))
    rec[:, :, 0] = book.rec[:, :, 0].T
    esc[:, 0], esc[:, 1] = book.esc["escape"], book.esc["semantic"]
    esc[:, 2], esc[:, 3] = book.esc["positional"], book.first
    esc[:, 4] = np.where(book.first >= 0,
                         [1 if kind == "semantic" else 0 for kind in book.kinds], -1)
    done_steps = np.zeros(seeds, dtype=np.int64)
    progress = {"steps": 0}
    plock = threading.Lock()
    try:                              # compile (or load) once, on a copy: zero steps
        run(rngs[0], X[0].copy(), 0, 0, c_const, P, rec[0].copy(), every, steps,
            esc[0].copy(), theta2, 0, noise_sd, df, batch)
    except Exception as exc:          # Numba's typing errors of the printed links
        if type(exc).__module__.startswith("numba"):
            raise _compile_error(spec, exc) from None
        raise

    def stopped(s):
        return (stop == 1 and esc[s, 0] >= 0) or (stop == 2 and esc[s, 3] >= 0)

    cancel = threading.Event()

    def advance(s, target, rule):
        """Seed s from its step done_steps[s] to `target` (or its stop under `rule`)."""
        k = int(done_steps[s])
        while k < target and not (rule and stopped(s)) and not cancel.is_set():
            k1 = min(target, (k // BLOCK + 1) * BLOCK)
            k_new = run(rngs[s], X[s], k, k1, cs_of(k, k1), P, rec[s], every, steps, esc[s],
                        theta2, rule, noise_sd, df, batch)
            with plock:
                progress["steps"] += k_new - k
            k = k_new
            done_steps[s] = k

    def show():
        if book.bar is not None:
            book.bar.update(int(progress["steps"] / seeds),
                            int(np.count_nonzero(esc[:, 0] >= 0)))

    def run_all(target, rule):
        nw = max(1, min(workers or os.cpu_count() or 1, seeds))
        if nw == 1:
            for s in range(seeds):
                advance(s, target, rule)
                show()
            return
        pool = ThreadPoolExecutor(max_workers=nw)
        try:
            futures = [pool.submit(advance, s, target, rule) for s in range(seeds)]
            while not all(f.done() for f in futures):
                time.sleep(0.05)
                show()
            for f in futures:
                f.result()
        except BaseException:          # Ctrl-C or an error: the threads stop within a block
            cancel.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    run_all(steps, stop)
    k_end = steps
    if stop:
        col = 0 if stop == 1 else 3
        if (esc[:, col] >= 0).all():
            k_end = int(esc[:, col].max())
        if records_after_escape and (done_steps < k_end).any():
            # continue the seeds that stopped earlier to the last seed's stop, or to `steps`
            # when some seed never stops (the records of the NumPy engine's booking)
            run_all(k_end, 0)
    # the book: escape steps, first escapes, records (with the one at k_end)
    book.esc["escape"][:] = esc[:, 0]
    book.esc["semantic"][:] = esc[:, 1]
    book.esc["positional"][:] = esc[:, 2]
    book.first[:] = esc[:, 3]
    book.kinds = [None if esc[s, 3] < 0 else ("semantic" if esc[s, 4] else "positional")
                  for s in range(seeds)]
    n_grid = k_end // every + 1
    j_end = n_grid + (1 if k_end % every else 0)
    if k_end % every and k_end != steps:
        # the final record at the stop step, from the states there (NaN for a seed stopped
        # earlier and not continued)
        at_end = done_steps == k_end
        columns = np.column_stack(book.columns(*_book_state(spec, X)))
        rec[:, :, n_grid] = np.where(at_end[:, None], columns, np.nan)
    book.rec[:, :, :j_end] = rec[:, :, :j_end].transpose(1, 0, 2)
    book.rec_steps[:n_grid] = np.arange(n_grid) * every
    if j_end > n_grid:
        book.rec_steps[n_grid] = k_end
    book.j = j_end
    book.k = k_end
    book.stopped_early = k_end < steps
    if not records_after_escape:
        book.simulated_to = done_steps.copy()
    return book
