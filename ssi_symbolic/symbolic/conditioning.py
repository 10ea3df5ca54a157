"""The dimensions of a quadrature node that only closed-form functions read, integrated in
closed form: erf((zs1 + zs2 + zs3)/sqrt 3) beside tanh(z1) tanh(z2) tanh(z3) is a
three-dimensional node, not a four-dimensional one.

Expectation._projected_node whitens the forms Y = A x a factor's functions read: Y = A mu +
L u with L lower triangular (Cholesky), u ~ N(0, I). With the forms of the functions without
a closed form first (:func:`closed_last`), those read only the first u; a u that only erf,
erfc and exponentials of affine or quadratic forms read (and polynomials: the conditional
moments) is integrated in closed form, term by term of the integrand as a polynomial in
those u and functions:

    E_v[v^a prod_i f_i(c_i0 + c_i . v + v^T C_i v)^b_i],  v ~ N(0, I) the closed u,

by the closed-form engine over v with every coefficient c that reads the other u (or
anything) a placeholder: one engine and one memo serve every node, and E[v erf(T0 + T1 v)] is
found once. A term without a closed form (erf(a + b v)^3: three shifted thresholds) keeps v
as a quadrature variable, in a node of its own. A node of closed functions alone, or whose
other functions are only steps, kinks and deltas (STEPS), is left as it is: it exists because
the closed form of its statistic was refused, and most of its terms would be again."""
from __future__ import annotations

import sympy as sp

from .gaussian import dag_free_symbols, dag_map, nonpolynomial_parts, poly_terms

#: functions taken in closed form over the dimensions only they read (their argument a
#: polynomial of at most this degree in those dimensions)
CLOSED_DEGREE = {sp.erf: 1, sp.erfc: 1, sp.exp: 2}
#: steps, kinks and deltas: a node whose other functions are only these is left as it is
#: (and a statistic holding one is never one smooth node, Expectation._whole_smooth_quadrature)
STEPS = (sp.Heaviside, sp.DiracDelta, sp.Abs, sp.sign, sp.Max, sp.Min)


def _closed_functions(expr, variables):
    """(closed functions, other non-polynomial parts) at the polynomial level of expr that
    read the variables: a closed function is one of CLOSED_DEGREE whose argument is a
    polynomial of at most that degree in them; any other (tanh, a step, a division, an erf
    of a non-polynomial argument) is other."""
    vs = set(variables)
    closed, other = set(), set()
    for x in nonpolynomial_parts(expr):
        if not (x.free_symbols & vs):
            continue
        degree = CLOSED_DEGREE.get(x.func)
        if degree is None:
            other.add(x)
            continue
        # the degree read off the terms (sp.Poly builds a coefficient domain: with the
        # radicals of a projection's coefficients, seconds and gigabytes)
        terms = poly_terms(sp.expand(x.args[0]), tuple(variables))
        if terms is None or max(map(sum, terms)) > degree:
            other.add(x)  # exp(-z^2 tanh(z)), exp(z^3): a function like any other
            continue
        closed.add(x)
    return closed, other


def closed_last(forms, rows_of_arg, factor, variables):
    """The forms (rows) reordered so that those read by closed functions only come last
    (stable otherwise); `rows_of_arg(arg)` gives an argument's rows."""
    closed, other = _closed_functions(factor, variables)
    if not closed or all(isinstance(o, STEPS) for o in other):
        return forms
    rows = set()
    for f in closed:
        rows.update(rows_of_arg(f.args[0]) or ())
    if not rows:
        return forms
    vs = set(variables)
    seen, stack = set(), list(other)
    while stack:  # the rows any other function reads (through its polynomial arguments)
        x = stack.pop()
        if x in seen or not (x.free_symbols & vs):
            continue
        seen.add(x)
        got = rows_of_arg(x) if not (x.is_Function or x.is_Pow) else None
        if got:
            rows.difference_update(got)
        else:
            stack.extend(x.args)
    return [f for f in forms if f not in rows] + [f for f in forms if f in rows]


def closed_dimensions(ex, integrand, us):
    """(integrand over the other u, integrand left over all u) with the u that only closed
    functions read (module docstring) integrated in closed form, or None when there is no
    such u (a kink's u is read by its step, never closed)."""
    closed, other = _closed_functions(integrand, us)
    if not closed or all(isinstance(o, STEPS) for o in other):
        # closed functions alone, or with steps: the node is there because their closed form
        # was refused (gelu's Cov(G), relu(z1 - z2) + z1/2 against exp(0.6 z1) Phi(0.8 z2):
        # TooComplex), and so would most of its terms be again (fuzz1031: 15 s -> 61 s)
        return None
    busy = set().union(*[o.free_symbols for o in other])
    # every u nothing else reads, those that enter polynomially only too (their moments come
    # with the closed forms: expanding the closed-form integrand for them took minutes)
    vs = tuple(u for u in us if u not in busy)
    if not any(f.free_symbols & set(vs) for f in closed):
        return None
    mine = [f for f in closed if f.free_symbols & set(vs)]
    mine.sort(key=sp.default_sort_key)
    # the integrand as a polynomial in v and the closed functions that read them (nothing
    # else reads v: a part free of v is a coefficient)
    terms = _poly_in(integrand, vs + tuple(mine), vs)
    if terms is None:
        return None
    done, left, conditions = [], [], []
    for alpha, c in terms.items():
        mono, powers = alpha[:len(vs)], alpha[len(vs):]
        fs = [(f, b) for f, b in zip(mine, powers) if b]
        h, back = _canonical(ex, vs, mono, fs)
        value, conds = _expect_closed(ex, vs, h)
        if value is None:
            # no closed form: the v its functions read stay quadrature variables for this
            # term; the others (independent N(0, 1)) by their moments E[v^a] = (a - 1)!!
            read = set().union(*[f.free_symbols for f, _ in fs])
            moment = sp.Mul(*[sp.factorial2(a - 1) if a % 2 == 0 else 0
                              for v, a in zip(vs, mono) if v not in read])
            if moment != 0:
                left.append(c * moment * sp.Mul(*[v ** a for v, a in zip(vs, mono) if v in read])
                            * sp.Mul(*[f ** b for f, b in fs]))
            continue
        done.append(c * dag_map(value, back))
        conditions.extend(dag_map(x, back) for x in conds)
    ex.conditions.extend((x, integrand) for x in conditions)
    return sp.Add(*done), sp.Add(*left)


def _poly_in(expr, gens, variables=None):
    """{alpha: coefficient} of expr as a polynomial in the generators gens (symbols, or
    sub-expressions such as erf(a + b v)), its coefficients left in product form (sums times
    sums are not multiplied out: the squared error of the L = 3 case, (F - t1 - t2 - t3)^2 in
    the generator F, keeps (t1 + t2 + t3)^2 whole, where distributing gave integrands three
    times as long); None when a generator's variables occur otherwise (inside another
    function, under a negative power). A sub-expression free of the symbols `variables`
    (by default the generators, then symbols) is a coefficient. Shared sub-expressions
    once."""
    gs = {g: i for i, g in enumerate(gens)}
    gset = frozenset(gens if variables is None else variables)
    zero, n, memo, free = (0,) * len(gens), len(gens), {}, {}

    def unit(i):
        return tuple(int(j == i) for j in range(n))

    def times(a, b):
        out = {}
        for ka, ca in a.items():
            for kb, cb in b.items():
                out.setdefault(tuple(x + y for x, y in zip(ka, kb)), []).append(ca * cb)
        return {k: sp.Add(*v) for k, v in out.items()}

    def rec(x):
        hit = memo.get(x)
        if hit is not None:
            return hit
        if not (dag_free_symbols(x, free) & gset):
            out = {zero: x}
        elif x in gs:
            out = {unit(gs[x]): sp.Integer(1)}
        elif x.is_Add:
            acc = {}
            for a in x.args:
                got = rec(a)
                if got is None:
                    return None
                for k, c in got.items():
                    acc.setdefault(k, []).append(c)
            out = {k: sp.Add(*v) for k, v in acc.items()}
        elif x.is_Mul:
            # the factors free of the generators multiplied once, into every coefficient at
            # the end (one at a time, they were a SymPy product per factor and per term)
            const, out = [], None
            for a in x.args:
                if not (dag_free_symbols(a, free) & gset):
                    const.append(a)
                    continue
                got = rec(a)
                if got is None:
                    return None
                out = got if out is None else times(out, got)
            if const:
                c = sp.Mul(*const)
                out = {k: c * v for k, v in out.items()}
        elif x.is_Pow and x.exp.is_Integer and x.exp >= 0:
            base = rec(x.base)
            if base is None:
                return None
            out = base
            for _ in range(int(x.exp) - 1):
                out = times(out, base)
        else:
            return None
        memo[x] = out
        return out

    got = rec(expr)
    return None if got is None else {k: c for k, c in got.items() if c != 0}


def _canonical(ex, vs, mono, functions):
    """(h, back): v^mono prod f(arg)^power with each coefficient of the arguments (as
    polynomials in v) that is not a number replaced by a placeholder T_ij (function i,
    coefficient j), and the map back. Numbered by position, the same product of another
    node is the same expression for the engine's memo (with the coefficients of the state
    left in, the engine's fractions made fuzz1031 twice as slow)."""
    h = [v ** a for v, a in zip(vs, mono)]
    back = {}
    memo = ex._given.setdefault("canonical", {})
    for i, (f, power) in enumerate(functions):
        key = (f, i, vs)
        if key not in memo:
            parts, placed = [], {}
            terms = sorted(poly_terms(sp.expand(f.args[0]), vs).items(), reverse=True)
            for j, (m, c) in enumerate(terms):
                if not c.is_Number:
                    t = sp.Symbol(f"_T{i}_{j}", real=True)
                    placed[t] = c
                    c = t
                parts.append(c * sp.Mul(*[v ** e for v, e in zip(vs, m)]))
            memo[key] = (f.func(sp.Add(*parts)), placed)
        g, placed = memo[key]
        h.append(g ** power)
        back.update(placed)
    return sp.Mul(*h), back


def _expect_closed(ex, vs, h):
    """(E[h], its existence conditions) over independent standard Gaussians vs by the
    closed-form engine (one per number of them, memoised by h); (None, None) when h has no
    closed form."""
    from .closed_forms import NoClosedForm
    n = len(vs)
    engine = ex._engine(("standard", vs), vs, [0] * n, sp.eye(n))
    seen = ex._given.setdefault(("values", vs), {})
    if h not in seen:
        n0 = len(engine.conditions)
        try:
            value = engine.expect(h)
        except NoClosedForm:
            value = None
        seen[h] = (value, list(engine.conditions[n0:]))
    return seen[h]


__all__ = ["closed_dimensions", "closed_last", "CLOSED_DEGREE", "STEPS"]
