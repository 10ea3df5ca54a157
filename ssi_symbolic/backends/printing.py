"""Printing SymPy expressions as vectorised NumPy/SciPy source: the one printer every backend
uses (SciPy printer with broadcasting max/min/Heaviside), Horner forms, one common-subexpression
elimination over all outputs of a module, and the text of a function definition."""
from __future__ import annotations

from pathlib import Path

import sympy as sp
from sympy.printing.numpy import SciPyPrinter
from sympy.simplify.cse_main import Unevaluated, match_common_args, tree_cse

from ..symbolic.gaussian import dag_any, dag_diff, dag_free_symbols, dag_map, multiply_terms
from .files import HASH_PREFIX


class _Printer(SciPyPrinter):
    """SciPy printer whose max/min/step functions broadcast elementwise."""

    def _handle_UnevaluatedExpr(self, expr):
        # CodePrinter.doprint rewrites re(UnevaluatedExpr(x)) of a real x to x by a replace()
        # over every printed expression (a fifth of the printing time); the derivations build
        # no UnevaluatedExpr, and numpy.real of a real array is that array anyway
        return expr

    def _print_Max(self, expr):
        out = self._print(expr.args[0])
        for a in expr.args[1:]:
            out = f"numpy.maximum({out}, {self._print(a)})"
        return out

    def _print_Min(self, expr):
        out = self._print(expr.args[0])
        for a in expr.args[1:]:
            out = f"numpy.minimum({out}, {self._print(a)})"
        return out

    def _print_Pow(self, expr, rational=False):
        # small integer powers as products: numpy's power is several times slower than multiply
        b, k = expr.base, expr.exp
        if k.is_Integer and 2 <= k <= 16 and (b.is_Symbol or b.is_Function):
            base = self._print(b)
            return "(" + "*".join([base] * int(k)) + ")"
        return super()._print_Pow(expr, rational=rational)

    def _print_NormalCDF2(self, expr):
        return "_bvn({})".format(", ".join(self._print(a) for a in expr.args))

    def _print_NormalOrthant(self, expr):
        return "_orthant({})".format(", ".join(self._print(a) for a in expr.args))

    def _print_Heaviside(self, expr):
        return f"numpy.heaviside({self._print(expr.args[0])}, 0.5)"


_PRINTER = _Printer({"fully_qualified_modules": True, "inline": True,
                     "allow_unknown_functions": False, "order": "none"})


def pycode(expr) -> str:
    """Vectorised NumPy/SciPy source for a SymPy expression."""
    return _PRINTER.doprint(expr)


def horner(expr, gens):
    """Nested (Horner) form of an expression polynomial in the state: several times fewer
    array operations than the expanded sum. Non-polynomial expressions are left alone."""
    memo = {}
    free = dag_free_symbols(expr, memo)
    gens = [g for g in gens if isinstance(g, sp.Symbol) and g in free]
    if not gens:
        return expr
    g = set(gens)
    if dag_any(expr, lambda f: (isinstance(f, sp.Function) or (
            f.is_Pow and not (f.exp.is_Integer and f.exp >= 0)))
            and bool(dag_free_symbols(f, memo) & g)):
        return expr  # a closed form or a quadrature node: not a polynomial in the state
    others = sorted(free - set(gens), key=str)
    k = len(gens)
    terms = {}
    try:  # every symbol a generator: much faster than coefficients in a polynomial domain
        if not expanded_form(expr):  # Poly would refuse it, after printing it in its error
            raise sp.PolynomialError
        poly = sp.Poly(expr, *gens, *others, expand=False)
    except sp.PolynomialError:
        # not expanded: expand, then split each term into its monomial in the state and the
        # rest (a Poly over every symbol is slow when a hundred quadrature placeholders are)
        index = {x: i for i, x in enumerate(gens)}
        for key, c in _expanded(expr).items():
            mon, rest = [0] * k, [c]
            for b, e in key:
                if b in index and e > 0:
                    mon[index[b]] += e
                elif b.free_symbols & g:
                    return expr
                else:
                    rest.append(b ** e)
            terms.setdefault(tuple(mon), []).append(sp.Mul(*rest))
        if max((sum(mon) for mon in terms), default=0) <= 1:
            return expr
        return horner_terms({mon: sp.Add(*cs) for mon, cs in terms.items()}, gens)
    if poly.total_degree() <= 1:
        return expr
    for mon, c in poly.terms():
        rest = sp.Mul(c, *[o ** e for o, e in zip(others, mon[k:]) if e])
        terms.setdefault(mon[:k], []).append(rest)
    return horner_terms({mon: sp.Add(*cs) for mon, cs in terms.items()}, gens)


def expanded_form(expr) -> bool:
    """Whether no term of the sum expr has a factor that is a sum (or a power of one) holding
    symbols: what sp.Poly(expr, ..., expand=False) needs."""
    for t in sp.Add.make_args(expr):
        for f in sp.Mul.make_args(t):
            b = f.base if f.is_Pow else f
            if b.is_Add and b.free_symbols:
                return False
    return True


def _expanded(expr) -> dict:
    """The terms of sp.expand(expr) as {frozenset of (atom, exponent): number}: the same sum
    (a term is its number times the product of its atoms' powers), computed with
    dictionaries over distinct sub-expressions. Atoms are what is neither a number, a sum, a
    product nor a positive integer power of a sum or product (symbols, functions, radicals of
    numbers, 1/(sum)), each as sp.expand leaves it. sp.expand rebuilds and re-sorts a SymPy
    product at every step of the distribution: a Cov(G) entry holding a hundred quadrature
    placeholders took 1.9 s."""
    memo, one = {}, sp.Integer(1)

    def atom(x):
        y = sp.expand(x)
        if y != x:
            return walk(y)
        if x.is_Pow and x.exp.is_Integer and not x.base.is_Number:
            return {frozenset([(x.base, int(x.exp))]): one}  # x^2 x^-1 is x, as in a Mul
        return {frozenset([(x, 1)]): one}

    times = multiply_terms

    def walk(x):
        hit = memo.get(x)
        if hit is not None:
            return hit
        if x.is_Number:
            out = {frozenset(): x}
        elif x.is_Add:
            out = {}
            for a in x.args:
                for key, c in walk(a).items():
                    out[key] = out.get(key, 0) + c
        elif x.is_Mul:
            out = {frozenset(): one}
            for a in x.args:
                out = times(out, walk(a))
        elif x.is_Pow and x.exp.is_Integer and x.exp > 0 and (x.base.is_Add or x.base.is_Mul):
            base, out = walk(x.base), {frozenset(): one}
            for _ in range(int(x.exp)):
                out = times(out, base)
        else:
            out = atom(x)
        memo[x] = out = {key: c for key, c in out.items() if c != 0}
        return out

    return walk(expr)


def horner_terms(terms, gens):
    """sum_monom coeff * gens^monom, nested as (...(P_k x + P_{k-1}) x ...) in gens[0]."""
    if not gens:
        return sp.Add(*terms.values())
    x, rest = gens[0], gens[1:]
    by_power = {}
    for mon, c in terms.items():
        by_power.setdefault(mon[0], {})[mon[1:]] = c
    powers = sorted(by_power, reverse=True)
    acc = sp.Integer(0)
    for i, k in enumerate(powers):
        acc = acc + horner_terms(by_power[k], rest)
        nxt = powers[i + 1] if i + 1 < len(powers) else 0
        if k - nxt:
            acc = acc * x ** (k - nxt)
    return acc


MAX_ADD_TERMS = 24


def _cse_hints(exprs, evaluate=True):
    """Substitutions for tree_cse: every Add and Mul of several arguments offered to
    match_common_args (a + b + c and sin(a + b) share a + b), and x**-k written (x**k)**-1 so
    that x**k and its reciprocal share x**k (x**k built unevaluated with evaluate=False: for
    a large x, SymPy's Pow asks about the sign of x, seconds for the nested radicals of a
    projection)."""
    hints, adds, muls, seen = {}, [], [], set()
    stack = [e for e in exprs if not e.is_Atom]
    while stack:
        e = stack.pop()
        if e in seen:
            continue
        seen.add(e)
        stack.extend(a for a in e.args if not a.is_Atom)
        if e.is_Add:
            adds.append(e)
        elif e.is_Mul:
            muls.append(e)
        elif e.is_Pow and e.exp.could_extract_minus_sign():
            hints[e] = Unevaluated(sp.Pow, (sp.Pow(e.base, -e.exp, evaluate=evaluate), -1))
    match_common_args(sp.Add, adds, hints)
    match_common_args(sp.Mul, muls, hints)
    return hints


def cse(exprs, prefix="_x", evaluate_powers=True):
    """Common-subexpression elimination over all `exprs` at once, then long sums split into
    partial sums of at most MAX_ADD_TERMS terms (a sum of thousands of terms on one line
    overflows Python's compiler). evaluate_powers=False: the reciprocal powers of the hints
    built unevaluated (_cse_hints)."""
    symbols = sp.numbered_symbols(prefix)
    # SymPy's cse is its opt_cse (hints: shared sub-sums and sub-products, 1/x for x**-k,
    # x for -x) then tree_cse. The hints here are opt_cse's without the minus signs: those
    # asked could_extract_minus_sign of every node (half of cse's time for gelu's module)
    # and wrapped each negated node in an extra product (15 % more operations, gelu and
    # relu + erf). order="none": the expressions' own argument order (deterministic,
    # independent of the hash seed); "canonical" sorts every argument list first, 20-40 %
    # of cse's time, with the same operation count
    exprs = [sp.sympify(e) for e in exprs]
    repl, reduced = tree_cse(exprs, symbols, _cse_hints(exprs, evaluate_powers), "none")
    out = []
    split_names = sp.numbered_symbols(prefix + "s")

    def walk(e):
        if e.is_Atom:
            return e
        args = [walk(a) for a in e.args]
        if e.is_Add and len(args) > MAX_ADD_TERMS:
            while len(args) > MAX_ADD_TERMS:
                parts = []
                for k in range(0, len(args), MAX_ADD_TERMS):
                    sym = next(split_names)
                    out.append((sym, sp.Add(*args[k:k + MAX_ADD_TERMS], evaluate=False)))
                    parts.append(sym)
                args = parts
            return sp.Add(*args, evaluate=False)
        if args == list(e.args):
            return e
        return e.func(*args, evaluate=False) if e.is_Add or e.is_Mul else e.func(*args)

    for sym, val in repl:
        val = walk(val)
        out.append((sym, val))
    reduced = [walk(r) for r in reduced]
    return out, reduced


def hoist_constant_parts(exprs, variables, prefix="_h"):
    """(exprs with every largest sub-expression free of `variables` replaced by a symbol,
    [(symbol, sub-expression)]): the quadrature integrands' state-only parts (the projection's
    nested radicals, the closed forms' coefficients) taken out before the integrands are
    rebuilt (combine_exp, cse). Rebuilding a product that holds such a part asked SymPy's
    assumptions about it again, Pow(big, -1/2) querying the sign of big at every ancestor:
    most of the node functions' time for leaky_relu(z1 - z2, 0.1) + z1/2 against
    sigmoid(0.8 z1) Phi(0.8 z2). An exponential of a state-only argument keeps its exp with
    the argument taken out, so that combine_exp still merges it with the others of its
    product. Numbers and symbols stay in place. Each distinct part gets one symbol."""
    vs, free, parts, seen = set(variables), {}, {}, set()
    stack = list(reversed(exprs))
    while stack:
        x = stack.pop()
        if x.is_Atom or x in seen:
            continue
        seen.add(x)
        if not (dag_free_symbols(x, free) & vs) and not isinstance(x, sp.exp):
            parts[x] = sp.Symbol(f"{prefix}{len(parts)}", real=True)
        else:
            stack.extend(reversed(x.args))
    memo = {}  # the ancestors rebuilt unevaluated: evaluated, they took twice as long
    return ([dag_map(e, parts, keep_order=True, memo=memo, evaluate=False) for e in exprs],
            [(sym, part) for part, sym in parts.items()])


def closure(outputs, repl_index, repl, free=None):
    """Indices of the CSE replacements needed (transitively) by `outputs`, in order. `free`, a
    dict index -> free symbols of that replacement, memoises them across calls (a module's
    functions share most of their replacements)."""
    free = {} if free is None else free

    def symbols_of(k):
        hit = free.get(k)
        if hit is None:
            hit = free[k] = repl[k][1].free_symbols
        return hit
    need, stack = set(), [s for o in outputs for s in o.free_symbols if s in repl_index]
    while stack:
        s = stack.pop()
        if s in need:
            continue
        need.add(s)
        stack.extend(x for x in symbols_of(repl_index[s]) if x in repl_index)
    return sorted(repl_index[s] for s in need)


def function_source(name, args, doc, body_lines, ret):
    lines = [f"def {name}({', '.join(args)}):", f'    """{doc}"""']
    lines += [f"    {ln}" for ln in body_lines]
    lines.append(f"    return {ret}")
    return "\n".join(lines) + "\n"


def tuple_source(items) -> str:
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"



def module_header(spec, doc: list, spec_hash: str, tool: str, body: list,
                  backend: str = "") -> str:
    """The header every generated module starts with: its docstring ("Generated by ssi-symbolic
    [(backend)] from <spec file>: do not edit ..." and then `doc`), the spec-hash line that
    `files.read_hash` reads, the tool line, the module's only two imports, then `body` (its
    constants)."""
    src = Path(spec.source).name if spec.source else "(Python spec)"
    by = f"ssi-symbolic ({backend})" if backend else "ssi-symbolic"
    return "\n".join([f'"""Generated by {by} from {src}: do not edit; regenerate with '
                      f"`ssi derive`.", *doc, '"""', f"{HASH_PREFIX}{spec_hash}",
                      f"# tool: {tool}", "import numpy", "import scipy.special", "", *body])


__all__ = ["module_header", "pycode", "horner", "cse", "hoist_constant_parts", "closure",
           "function_source", "tuple_source", "forward_jacobian", "MAX_ADD_TERMS"]


def forward_jacobian(repl, repl_index, outputs, state, prefix="_dx"):
    """Forward-mode differentiation of the assignments of a common-subexpression elimination:
    for every replacement x_k = v_k(state, x_<k) needed by `outputs`, its gradient

        d x_k / d s_j = dv_k/ds_j + sum_i (dv_k/dx_i) (d x_i / d s_j)

    written as new assignments, each the derivative of one small v_k (the chain rule on the
    DAG, exact; cost linear in its size, where differentiating the expanded outputs repeats
    every shared subtree). Returns (lines, grads): lines, a list of (symbol, expression) in
    order, and grads[o][j] = d outputs[o] / d state[j] in terms of the replacements, the state
    and those symbols. Unevaluated derivatives (a function without a known derivative) raise
    ValueError, so the caller can fall back to differentiating the whole expression."""
    names = sp.numbered_symbols(prefix)
    zero = sp.Integer(0)
    n = len(state)
    grad = {}      # replacement symbol -> [d/ds_j]
    lines = []

    # the replacements hold real numbers: differentiated as real symbols (else Abs, sign and
    # sqrt differentiate into re/im derivatives)
    real = {s: sp.Symbol(s.name, real=True) for s, _ in repl}
    back = {r: s for s, r in real.items()}

    def name(e):
        if e.is_Atom or e == zero:
            return e
        if e.has(sp.Derivative):
            raise ValueError(f"unevaluated derivative in {e}")
        s = next(names)
        lines.append((s, e))
        return s

    def gradient(v):
        free = v.free_symbols
        vr = v.xreplace({a: real[a] for a in free if a in real})
        row = [dag_diff(vr, x).xreplace(back) if x in free else zero for x in state]
        for a in sorted(free, key=str):
            ga = grad.get(a)
            if ga is None or all(g == zero for g in ga):
                continue
            pa = dag_diff(vr, real[a]).xreplace(back)
            if pa == zero:
                continue
            if sum(g != zero for g in ga) > 1:
                pa = name(pa)
            row = [r + pa * g if g != zero else r for r, g in zip(row, ga)]
        for r in row:
            if r.has(sp.Derivative):
                raise ValueError(f"unevaluated derivative in {r}")
        return row

    for k in closure(outputs, repl_index, repl):
        s, v = repl[k]
        grad[s] = [name(r) for r in gradient(v)]
    grads = [gradient(o) for o in outputs]
    assert all(len(g) == n for g in grads)
    return lines, grads
