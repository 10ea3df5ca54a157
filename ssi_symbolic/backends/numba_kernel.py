"""Numba kernels of the exact reduced chain (MATH.md 10): the code generator behind
``engine="numba"`` of the reduced simulator (numeric/compiled.py runs them).

kernel_source(spec) prints the spec's teacher link, student link and its gradient (SymPy, one
common-subexpression elimination per kernel, parameters read from an array P) into the step
loop of one seed as straight-line scalar Python for Numba: per step and sequence of the batch
the frame coordinates g*_l, h_l (and zeta_la + C[l,a]) ~ N(0, 1), the fields, the residuals
with label noise, -dl/dz_l of the spec's loss, the sums A and B of the update and one
chi-square (Marsaglia and Tsang's exact method) for the rest of the tokens; then the update of
reduced.tied_step or reduced.untied_step, the escape checks and the records. The text is a
cache file (numeric.compiled.kernel_module writes it under SSI_CACHE_DIR, never into
generated/)."""
from __future__ import annotations

import sympy as sp

from ..errors import SpecError
from ..model.spec import link_entries
from .printing import cse

__all__ = ["kernel_source"]


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

        def _nested(self, name, expr):  # max(max(a, b), c): Numba's two-argument form
            args = [self._print(a) for a in expr.args]
            out = args[0]
            for a in args[1:]:
                out = f"{name}({out}, {a})"
            return out

        def _print_Max(self, expr):
            return self._nested("max", expr)

        def _print_Min(self, expr):
            return self._nested("min", expr)

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
