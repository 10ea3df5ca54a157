"""Which specs the attention backend writes, what it requires of them, and the SymPy
forms of their links (numerically stable softmax, the teacher split into parameter and token
parts)."""
from __future__ import annotations

import numpy as np
import sympy as sp

from ...errors import SpecError
from ...model.spec import ModelSpec, link_entries, token_symbols


# ----------------------------------------------------------------------------- routing
def _has_exp(expr) -> bool:
    return any(sp.sympify(x).has(sp.exp) for x in link_entries(expr))


def _has_softmax_exp(expr, L: int) -> bool:
    """True when the link has softmax structure: a normalisation 1 / (sum of exps) in which
    some exp has an argument of degree >= 2 in the tokens (attention scores z_i z_j). A
    Gaussian bump exp(-z1^2/2), a sigmoid or a tanh is not softmax: the exact backend takes it
    (closed forms or quadrature)."""
    zs = token_symbols(L)

    def score_exp(e):
        try:
            return sp.Poly(e.args[0], *zs).total_degree() >= 2
        except sp.PolynomialError:
            return True

    for x in link_entries(expr):
        for p in sp.sympify(x).atoms(sp.Pow):
            if p.exp.is_negative and any(score_exp(e) for e in p.base.atoms(sp.exp)):
                return True
    return False


def handles(spec: ModelSpec) -> bool:
    """True for the specs this backend writes: a student link with a softmax (an exp of
    attention scores z_i z_j) or the non-squared norm loss."""
    return spec.loss == "norm" or _has_softmax_exp(spec.student, spec.L)


def _check(spec: ModelSpec) -> None:
    where = spec.where
    if not _has_exp(spec.student) and not _has_exp(spec.teacher):
        raise SpecError(f"{where('loss.kind')}: the norm loss is supported only for softmax "
                        f"attention specs (links with exp/softmax_rows)")
    if not spec.spherical:
        raise SpecError(f"{where('training.spherical')}: the attention backend needs spherical "
                        f"SGD (q = 1)")
    if spec.r != 1:
        raise SpecError(f"{where('student.positional')}: the attention backend needs exactly one "
                        f"positional direction (r = 1), got r = {spec.r}")
    params = {sp.Symbol(p, real=True) for p in spec.parameters}
    for s in link_entries(spec.student):
        bad = sorted(str(x) for x in sp.sympify(s).free_symbols & params)
        if bad:
            raise SpecError(f"{where('student.link')}: the attention backend needs a "
                            f"parameter-free student, found '{bad[0]}'")


# ----------------------------------------------------------------------------- SymPy helpers
def stable(expr):
    """Rewrite softmax entries exp(x) / sum_k exp(y_k) as 1 / sum_k exp(y_k - x): the same
    function, one exponential fewer and no overflow of the numerator."""
    expr = sp.sympify(expr)

    def is_exp_sum(f):
        return (f.is_Pow and f.exp == -1 and f.base.is_Add
                and all(isinstance(t, sp.exp) for t in f.base.args))

    def rule(e):
        nums = [f for f in e.args if isinstance(f, sp.exp)]
        dens = [f for f in e.args if is_exp_sum(f)]
        if len(nums) != 1 or len(dens) != 1:
            return e
        x = nums[0].args[0]
        rest = sp.Mul(*[f for f in e.args if f is not nums[0] and f is not dens[0]])
        return rest / sp.Add(*[sp.exp(sp.expand(t.args[0] - x)) for t in dens[0].base.args])

    return expr.replace(lambda e: e.is_Mul, rule)


def split_teacher(spec: ModelSpec):
    """T_i = sum_p c_p f_p + b_i: returns (pieces, b) with pieces a list of (i, c_p, f_p) (c_p
    parameters only, f_p tokens only) and b the list of parameter-only parts per entry."""
    zs = set(token_symbols(spec.L))
    pieces, b = [], []
    for i, t in enumerate(link_entries(spec.teacher)):
        t = sp.expand(sp.sympify(t), deep=False, power_exp=False, log=False, multinomial=False)
        const = sp.Integer(0)
        groups = {}
        for term in sp.Add.make_args(t):
            coef, zpart = term.as_independent(*zs, as_Add=False)
            if zpart == 1:
                const += coef
            else:
                groups[zpart] = groups.get(zpart, 0) + coef
        # merge z-parts with the same coefficient (e.g. the polynomial terms of one link)
        by_coef = {}
        for zpart, coef in groups.items():
            coef = sp.simplify(coef)
            by_coef[coef] = by_coef.get(coef, 0) + zpart
        for coef, f in by_coef.items():
            pieces.append((i, coef, f))
        b.append(const)
    return pieces, b


def _numeric(exprs, L):
    """A NumPy function (z1..zL) -> list of arrays for SymPy expressions in the tokens.

    An entry that equals 1 minus (or minus) an earlier entry (the rows of a 2-column softmax
    and their derivatives; checked at 256 random points to 1e-13) is computed from it, saving
    its exponentials."""
    exprs = [stable(x) for x in exprs]
    probe = _numeric_plain(exprs, L)(*np.random.default_rng(7).normal(0, 2, size=(L, 256)))
    comp = {}
    for j in range(len(exprs)):
        for i in range(j):
            if i in comp:
                continue
            if np.all(np.abs(probe[i] + probe[j] - 1) < 1e-13):
                comp[j] = (i, 1.0)
                break
            if np.all(np.abs(probe[i] + probe[j]) < 1e-13):
                comp[j] = (i, 0.0)
                break
    base = [j for j in range(len(exprs)) if j not in comp]
    fn = _numeric_plain([exprs[j] for j in base], L)

    def call(*z):
        vals = dict(zip(base, fn(*z)))
        return [vals[j] if j in vals else comp[j][1] - vals[comp[j][0]]
                for j in range(len(exprs))]
    return call


def _numeric_plain(exprs, L):
    fn = sp.lambdify(token_symbols(L), list(exprs), modules="numpy", cse=True)

    def call(*z):
        with np.errstate(over="ignore"):
            out = fn(*z)
        shape = np.broadcast(*z).shape
        return [np.broadcast_to(np.asarray(o, dtype=float), shape) for o in out]
    return call
