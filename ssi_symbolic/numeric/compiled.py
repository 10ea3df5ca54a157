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
``_untied_source``). Not implemented here (refused in one line naming the reason, use
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
import sympy as sp

from ..errors import SpecError, StateError

__all__ = ["ENGINES", "BLOCK", "numba_available", "kernel_source", "cache_dir", "kernel_module",
           "run_chain"]

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


def _unsupported(spec) -> str | None:
    """Why the compiled engine does not run this spec (None: it does)."""
    if spec.multi:
        return (f"spec '{spec.name}' has several directions (K* = {spec.teacher_directions}, "
                f"K = {spec.student_directions})")
    if spec.untied and spec.C:
        return f"spec '{spec.name}' has an untied student with a positional encoding"
    return None


def _scalar_printer():
    from sympy.printing.pycode import PythonCodePrinter

    class _Printer(PythonCodePrinter):
        """Python scalar code for Numba: math functions, Max/Min as nested max/min, sign and
        Heaviside as conditional expressions."""

        def _print_Max(self, expr):
            args = [self._print(a) for a in expr.args]
            out = args[0]
            for a in args[1:]:
                out = f"max({out}, {a})"
            return out

        def _print_Min(self, expr):
            args = [self._print(a) for a in expr.args]
            out = args[0]
            for a in args[1:]:
                out = f"min({out}, {a})"
            return out

        def _print_sign(self, expr):
            x = self._print(expr.args[0])
            return f"(0.0 if {x} == 0.0 else math.copysign(1.0, {x}))"

        def _print_Heaviside(self, expr):
            x = self._print(expr.args[0])
            h0 = 0.5 if len(expr.args) < 2 else float(expr.args[1])
            return f"(0.0 if {x} < 0.0 else ({h0!r} if {x} == 0.0 else 1.0))"

        def _print_DiracDelta(self, expr):
            raise SpecError("the student link's gradient has a Dirac delta (a jump in the "
                            "link): online SGD on it is not defined")

    return _Printer({"fully_qualified_modules": True, "standard": "python3"})


def kernel_source(spec) -> str:
    """The Python source of the Numba kernel of a student with one direction (module
    docstring): function
    ``run(rng, X, k0, k1, cs, P, rec, every, nsteps, esc, theta2, stop, noise_sd, df, batch)`` that
    advances one seed's state X = (m, rho, e_1..e_r) (tied; untied: _untied_source) from step
    k0 to at most k1 and returns the last step made. cs: the c = eta_k / (b d) of steps k0+1..k1 (length 1: a constant); P: the
    parameter values in spec order; rec: (columns, records) of this seed, written at the steps
    k % every == 0 and k == nsteps; esc: (5,) int64 [escape, semantic, positional, first,
    first-is-semantic] steps (-1: not yet), updated in place; stop: 0 none, 1 the seed's escape,
    2 its first escape along one direction; df = d - 2 - r, batch = b."""
    from ..model.spec import link_entries
    from ..backends.printing import cse
    why = _unsupported(spec)
    if why is not None:
        raise SpecError(f"engine numba: {why}; use engine numpy")
    L, r, b_loss = spec.L, spec.r, spec.loss
    if b_loss not in ("square", "norm"):
        raise SpecError(f"{spec.where('loss.kind')}: engine numba implements the square and "
                        f"norm losses, not {b_loss!r}")
    zt, zs = spec.variables("teacher"), spec.variables("student")
    T = [sp.sympify(x) for x in link_entries(spec.teacher)]
    S = [sp.sympify(x) for x in link_entries(spec.student)]
    if len(T) != len(S):
        raise SpecError(f"{spec.where('student.link')}: teacher and student links have "
                        f"{len(T)} and {len(S)} entries")
    K = len(S)
    grad = [sp.diff(s, z) for s in S for z in zs]
    pnames = list(spec.parameters)
    # the teacher's fields are z*_l = g*_l: rename them so one CSE spans both links
    tnames = [sp.Symbol(f"gs{l + 1}", real=True) for l in range(L)]
    snames = [sp.Symbol(f"z{l + 1}", real=True) for l in range(L)]
    sub_t, sub_s = {}, {}
    for e in T:
        for s_ in e.free_symbols:
            if s_.name in pnames:
                sub_t[s_] = sp.Symbol(f"P[{pnames.index(s_.name)}]", real=True)
    for v, n in zip(zt, tnames):
        sub_t[v] = n
    for e in S + grad:
        for s_ in e.free_symbols:
            if s_.name in pnames:
                sub_s[s_] = sp.Symbol(f"P[{pnames.index(s_.name)}]", real=True)
    for v, n in zip(zs, snames):
        sub_s[v] = n
    T = [e.xreplace(sub_t) for e in T]
    S = [e.xreplace(sub_s) for e in S]
    grad = [e.xreplace(sub_s) for e in grad]
    printer = _scalar_printer()
    pr = printer.doprint
    # the teacher's part depends on the draws only; the student's on the fields
    repl_t, red_t = cse(T, prefix="_t")
    repl_s, red_s = cse(S + grad, prefix="_s")
    C = [[float(c) for c in row] for row in spec.C] if r else []
    untied = bool(spec.untied)
    ind = " " * 12
    lines = []
    add = lines.append
    for l in range(L):
        add(f"{ind}gs{l + 1} = rng.standard_normal()")
        add(f"{ind}h{l + 1} = rng.standard_normal()")
        for a in range(r):
            add(f"{ind}zt{l + 1}_{a + 1} = rng.standard_normal() + {C[l][a]!r}")
        if untied:                     # token l's own weights: z_l = m_l g*_l + rho_l h_l
            field = f"m{l + 1} * gs{l + 1} + rho{l + 1} * h{l + 1}"
        else:
            field = f"m * gs{l + 1} + rho * h{l + 1}" + "".join(
                f" + e{a + 1} * zt{l + 1}_{a + 1}" for a in range(r))
        add(f"{ind}z{l + 1} = {field}")
    for s_, v in repl_t:
        add(f"{ind}{s_} = {pr(v)}")
    for k in range(K):
        add(f"{ind}y{k} = {pr(red_t[k])}")
    for s_, v in repl_s:
        add(f"{ind}{s_} = {pr(v)}")
    for k in range(K):
        add(f"{ind}r{k} = y{k} - ({pr(red_s[k])})")
        add(f"{ind}if noise_sd > 0.0:")
        add(f"{ind}    r{k} += noise_sd * rng.standard_normal()")
    if b_loss == "norm":
        add(f"{ind}rn = math.sqrt(" + " + ".join(f"r{k} * r{k}" for k in range(K)) + ")")
        add(f"{ind}rn = 1.0 / rn if rn > 0.0 else 0.0")
    for l in range(L):
        terms = " + ".join(f"r{k} * ({pr(red_s[K + k * L + l])})" for k in range(K))
        add(f"{ind}g{l + 1} = " + (f"({terms}) * rn" if b_loss == "norm" else terms))
        if untied:                     # per token: A_m,l, A_h,l and B_l
            add(f"{ind}Am{l + 1} += g{l + 1} * gs{l + 1}")
            add(f"{ind}Ah{l + 1} += g{l + 1} * h{l + 1}")
            add(f"{ind}B{l + 1} += g{l + 1} * g{l + 1}")
            continue
        add(f"{ind}A0 += g{l + 1} * gs{l + 1}")
        add(f"{ind}A1 += g{l + 1} * h{l + 1}")
        for a in range(r):
            add(f"{ind}Ae{a + 1} += g{l + 1} * zt{l + 1}_{a + 1}")
        add(f"{ind}B += g{l + 1} * g{l + 1}")
    per_seq = "\n".join(lines)
    if untied:
        return _untied_source(spec, per_seq)
    e_names = [f"e{a + 1}" for a in range(r)]
    e_load = "".join(f"    e{a + 1} = X[{2 + a}]\n" for a in range(r))
    e_store = "".join(f"    X[{2 + a}] = e{a + 1}\n" for a in range(r))
    ae_zero = "".join(f"        Ae{a + 1} = 0.0\n" for a in range(r))
    e_step = "".join(f"        e{a + 1} += c * Ae{a + 1}\n" for a in range(r))
    en2 = " + ".join(f"e{a + 1} * e{a + 1}" for a in range(r)) or "0.0"
    norm = ("        nn = 1.0 / math.sqrt(m * m + rho * rho + en2)\n"
            "        m *= nn\n        rho *= nn\n"
            + "".join(f"        e{a + 1} *= nn\n" for a in range(r))
            + "        en2 = " + en2 + "\n") if spec.spherical else ""
    plain_q = "" if spec.spherical else "            rec[1 + R, j] = q\n"
    return _HEADER.format(name=spec.name, module=__name__, r=r) + f'''

@njit(cache=True, nogil=True)
def run(rng, X, k0, k1, cs, P, rec, every, nsteps, esc, theta2, stop, noise_sd, df, batch):
    m = X[0]
    rho = X[1]
{e_load}    en2 = {en2}
    ncs = cs.shape[0]
    dd, cc, inv_a = chisquare_params(df)
    k = k0
    while k < k1:
        k += 1
        c = cs[0] if ncs == 1 else cs[k - k0 - 1]
        A0 = 0.0
        A1 = 0.0
        B = 0.0
{ae_zero}        for i in range(batch):
{per_seq}
        chi = chisquare(rng, dd, cc, inv_a)
        m += c * A0
{e_step}        t = rho + c * A1
        rho = math.sqrt(t * t + c * c * B * chi)
        en2 = {en2}
{norm}        m2 = m * m
        n2 = m2 + en2
        if n2 >= theta2:
            if esc[0] < 0:
                esc[0] = k
            sem = m2 >= theta2
            pos = R > 0 and en2 >= theta2
            if sem and esc[1] < 0:
                esc[1] = k
            if pos and esc[2] < 0:
                esc[2] = k
            if (sem or pos) and esc[3] < 0:
                esc[3] = k
                esc[4] = 1 if m2 >= en2 else 0
        if k % every == 0 or k == nsteps:
            j = k // every if k % every == 0 else k // every + 1
            q = m2 + rho * rho + en2
            rec[0, j] = m
{"".join(f"            rec[{1 + a}, j] = e{a + 1}{chr(10)}" for a in range(r))}{plain_q}            rec[rec.shape[0] - 1, j] = q
        if (stop == 1 and esc[0] >= 0) or (stop == 2 and esc[3] >= 0):
            break
    X[0] = m
    X[1] = rho
{e_store}    return k
'''


_HEADER = '''"""Numba kernel of the reduced chain of spec {name!r} (ssi-symbolic
{module}; MATH.md 10): a cache file, written by ssi-symbolic, never edited by hand."""
import math

from numba import njit

R = {r}


@njit(cache=True, nogil=True)
def chisquare_params(df):
    """(dd, cc, inv_a) of chisquare for df > 0 degrees of freedom."""
    a = 0.5 * df
    inv_a = 0.0
    if a < 1.0:
        inv_a = 1.0 / a
        a += 1.0
    dd = a - 1.0 / 3.0
    return dd, 1.0 / math.sqrt(9.0 * dd), inv_a


@njit(cache=True, nogil=True)
def chisquare(rng, dd, cc, inv_a):
    """chi^2(df) = 2 Gamma(df / 2) by Marsaglia and Tsang's exact rejection method: with
    a' = df / 2 (or df / 2 + 1 when df < 2), dd = a' - 1/3, cc = 1 / sqrt(9 dd); for df < 2 the
    Gamma(a' - 1) variate is Gamma(a') U^(1/a) (inv_a = 1/a, else 0)."""
    while True:
        x = rng.standard_normal()
        v = 1.0 + cc * x
        if v <= 0.0:
            continue
        v = v * v * v
        u = rng.random()
        x2 = x * x
        if u < 1.0 - 0.0331 * x2 * x2:
            break
        if math.log(u) < 0.5 * x2 + dd * (1.0 - v + math.log(v)):
            break
    g = dd * v
    if inv_a > 0.0:
        g *= rng.random() ** inv_a
    return 2.0 * g
'''


def _untied_source(spec, per_seq: str) -> str:
    """The kernel of an untied student (reduced.untied_step): state X = (m_1..m_L,
    rho_1..rho_L); per step and token l, m_l' = m_l + c A_m,l and rho_l' = sqrt((rho_l +
    c A_h,l)^2 + c^2 B_l chi_l), chi_l ~ chi^2(d - 2) one per token, then (spherical SGD) every
    m_l', rho_l' times sqrt(L / sum_l (m_l'^2 + rho_l'^2)); escape when mean_l m_l^2 >= theta^2
    (the untied _Book: 'escape', 'semantic' and the first escape, semantic); records m_l, q_l,
    mean q_l."""
    L = spec.L
    toks = range(1, L + 1)
    i4, i8, i12 = " " * 4, " " * 8, " " * 12
    load = "".join(f"{i4}m{l} = X[{l - 1}]\n{i4}rho{l} = X[{L + l - 1}]\n" for l in toks)
    store = "".join(f"{i4}X[{l - 1}] = m{l}\n{i4}X[{L + l - 1}] = rho{l}\n" for l in toks)
    zero = "".join(f"{i8}Am{l} = 0.0\n{i8}Ah{l} = 0.0\n{i8}B{l} = 0.0\n" for l in toks)
    step = "".join(f"{i8}chi = chisquare(rng, dd, cc, inv_a)\n{i8}m{l} += c * Am{l}\n"
                   f"{i8}t = rho{l} + c * Ah{l}\n"
                   f"{i8}rho{l} = math.sqrt(t * t + c * c * B{l} * chi)\n" for l in toks)
    tot = " + ".join(f"m{l} * m{l} + rho{l} * rho{l}" for l in toks)
    norm = (f"{i8}nn = math.sqrt({L}.0 / ({tot}))\n"
            + "".join(f"{i8}m{l} *= nn\n{i8}rho{l} *= nn\n" for l in toks)
            if spec.spherical else "")
    msq = " + ".join(f"m{l} * m{l}" for l in toks)
    rec = "".join(f"{i12}rec[{l - 1}, j] = m{l}\n"
                  f"{i12}rec[{L + l - 1}, j] = m{l} * m{l} + rho{l} * rho{l}\n" for l in toks)
    qmean = " + ".join(f"rec[{L + l - 1}, j]" for l in toks)
    return _HEADER.format(name=spec.name, module=__name__, r=0) + f'''

@njit(cache=True, nogil=True)
def run(rng, X, k0, k1, cs, P, rec, every, nsteps, esc, theta2, stop, noise_sd, df, batch):
{load}    ncs = cs.shape[0]
    dd, cc, inv_a = chisquare_params(df)
    k = k0
    while k < k1:
        k += 1
        c = cs[0] if ncs == 1 else cs[k - k0 - 1]
{zero}        for i in range(batch):
{per_seq}
{step}{norm}        if ({msq}) >= {L}.0 * theta2:
            if esc[0] < 0:
                esc[0] = k
            if esc[1] < 0:
                esc[1] = k
            if esc[3] < 0:
                esc[3] = k
                esc[4] = 1
        if k % every == 0 or k == nsteps:
            j = k // every if k % every == 0 else k // every + 1
{rec}{i12}rec[{2 * L}, j] = ({qmean}) / {L}.0
        if (stop == 1 and esc[0] >= 0) or (stop == 2 and esc[3] >= 0):
            break
{store}    return k
'''


def kernel_module(spec):
    """The kernel module of a spec (module docstring; its functions `run`, `chisquare` and
    `chisquare_params`): the source is written to cache_dir()/kernels/k_<hash>.py (atomically,
    once) and imported; Numba compiles a function on its first call (or loads its cache).
    SpecError for a spec the kernel does not implement."""
    if not numba_available():
        raise StateError("engine numba: Numba is not installed (pip install "
                         "'ssi-symbolic[fast]', or pip install numba); use engine numpy")
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
        if etas is None:
            return c_const
        if k0 % BLOCK == 0 and k1 - k0 == BLOCK or (k0 % BLOCK == 0 and k1 == steps):
            with rates_lock:
                if k0 not in rates_cache:
                    if len(rates_cache) > 64:
                        rates_cache.clear()
                    rates_cache[k0] = np.ascontiguousarray(etas(k0 + 1, k1 - k0)
                                                           / (batch * d))
                return rates_cache[k0]
        return np.ascontiguousarray(etas(k0 + 1, k1 - k0) / (batch * d))

    # step 0: records and checks of the start, as _Book.start
    columns = lambda: np.column_stack(book.columns(*_book_state(spec, X)))
    rec[:, :, 0] = columns()
    book.start(*_book_state(spec, X))
    for s in range(seeds):            # thresholds crossed at the start (step 0)
        esc[s, 0] = book.esc["escape"][s]
        esc[s, 1] = book.esc["semantic"][s]
        esc[s, 2] = book.esc["positional"][s]
        esc[s, 3] = book.first[s]
        if book.first[s] >= 0:
            esc[s, 4] = 1 if book.kinds[s] == "semantic" else 0
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
        rec[:, :, n_grid] = np.where(at_end[:, None], columns(), np.nan)
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
