"""Thresholds of a statistic before its closed form is expanded (closed_forms): how many
Phi and step thresholds a term of its expansion holds, decided on the unexpanded expression.

An orthant probability with a closed form has at most three thresholds, all of zero mean when
there are three (four Phi thresholds with orthant_quadrature, Plackett's integral): a term
with more makes the closed form refuse it (TooComplex) after the whole expansion, which for a
product of statistics with kinks is most of its cost. :func:`terms_refused` gives that
refusal before the expansion, exactly where it can be decided (the steps of relu, Heaviside,
Max and Min are tracked form by form, as the planning of a term merges them).
"""
from __future__ import annotations

import functools

import sympy as sp

from .gaussian import dag_any, dag_free_symbols


@functools.lru_cache(maxsize=4096)
def _direction(y, xs):
    """The coefficients of y in the variables xs, scaled so that the first nonzero one is 1
    (None when y is not a polynomial): parallel steps share it."""
    try:
        P = sp.Poly(y, *xs)
    except sp.PolynomialError:
        return None
    row = [P.coeff_monomial(x) for x in xs]
    lead = next((c for c in row if c != 0), 1)
    return tuple(sp.simplify(c / lead) for c in row)


def _threshold_count(expr, random) -> int:
    """Thresholds a product certainly holds: erf and erfc factors with their powers, plus one
    per direction of the steps (Heaviside, sign, |.|: parallel steps merge into one); Max/Min
    of n forms n - 1 each. Every term of its expansion keeps them."""
    n, directions = 0, set()
    xs = tuple(sorted(random, key=str))
    direction = lambda y: _direction(y, xs)

    kinds = (sp.erf, sp.erfc, sp.Heaviside, sp.sign, sp.Abs, sp.Max, sp.Min)
    for f in sp.Mul.make_args(expr):
        base, k = f.as_base_exp()
        # the type first: free symbols of a large polynomial factor cost seconds
        if (not isinstance(base, kinds) or not k.is_Integer
                or not (dag_free_symbols(base) & random)):
            continue
        if isinstance(base, (sp.erf, sp.erfc)):
            n += int(k)
        elif isinstance(base, (sp.Heaviside, sp.sign, sp.Abs)):
            row = direction(base.args[0])
            if row is not None:
                directions.add(row)
        elif isinstance(base, (sp.Max, sp.Min)) and len(base.args) == 2:
            # one step along a - b: Max(x, -1) and Max(x, 1) (hardtanh) share a direction
            row = direction(base.args[0] - base.args[1])
            if row is not None:
                directions.add(row)
        elif isinstance(base, (sp.Max, sp.Min)):
            n += len(base.args) - 1
    return n + len(directions)


def _cap(kinds, most: int = 6):
    """Sets of (thresholds, all of zero mean, steps) with the counts above `most` merged
    (refused either way, whatever the steps): a high power of a sum stays a small set."""
    if all(k[0] <= most for k in kinds):
        return kinds
    return frozenset((min(k[0], most + 1), k[1] if k[0] <= most else False, k[2])
                     for k in kinds)


def _zero_mean(form, mu) -> bool:
    """Whether the affine form a.x + b has mean zero under mean mu (symbolically)."""
    a, b = form
    return sp.expand(sum(c * m for c, m in zip(a, mu)) + b) == 0


def _merge_parallel_steps(hs):
    """Products of steps along one direction with numeric offsets as signed sums of single
    steps: H(y - l1) H(y - l2) = H(y - max l), H(y - l) H(u - y) = H(y - l) - H(y - u) for
    l < u (0 otherwise). A step with a symbolic offset or direction (a parameter) stays as
    it is. Returns [(sign, steps)] whose signed sum equals prod hs."""
    groups, rest = {}, []
    for a, b in hs:
        lead = next(c for c in a if c != 0)
        if not (b.is_number and lead.is_number):  # H(beta z - 1): beta's sign unknown
            rest.append((a, b))
            continue
        key = a if lead > 0 else tuple(-c for c in a)
        lo, hi = groups.get(key, (None, None))
        if lead > 0:  # a.x + b > 0  <=>  y > -b  with y = key.x
            lo = -b if lo is None else max(lo, -b)
        else:         # -y + b > 0   <=>  y < b
            hi = b if hi is None else min(hi, b)
        groups[key] = (lo, hi)
    out = [(1, tuple(rest))]
    for key, (lo, hi) in groups.items():
        if lo is not None and hi is not None:
            if hi <= lo:
                return []
            choices = [(1, (key, -lo)), (-1, (key, -hi))]
        elif lo is not None:
            choices = [(1, (key, -lo))]
        else:
            choices = [(1, (tuple(-c for c in key), hi))]
        out = [(s * s2, hs1 + (form,)) for s, hs1 in out for s2, form in choices]
    return out


def terms_refused(expr, random, affine, mean, orthant_quadrature: bool,
                  memos=None) -> bool:
    """Whether some term of the expansion of expr has more thresholds than any orthant
    probability with a closed form (what GaussianClosedForm._plan_term refuses after the
    expansion): decided on the unexpanded expression from the set of signatures its terms
    can have (a sum: the union; a product: the pairwise unions), a signature being (erf
    thresholds, all of them of zero mean, the step forms). affine(y): (a, b) with
    y = a.x + b, or None when y is not affine; mean: the mean of x.

    - erf/erfc: one threshold each (erf(y) = 2 Phi(sqrt 2 y) - 1 keeps a term with it).
    - Heaviside(y): the step form of y, normalised as the planning does (H(c y) = H(y),
      c > 0); Max/Min of affine forms: one signature per argument a_i != 0, the steps
      H(+-(a_i - a_j)) of its term. A signature whose steps hold H(y) and H(-y) is a term
      that vanishes; parallel steps with numeric offsets merge (_merge_parallel_steps) into
      one threshold per direction, as in the planning. With a step the limit is three
      thresholds (of zero mean when three), with or without orthant_quadrature.
    - |y| and sign(y) (2 H(y) - 1: their products cancel, |y| sign(y) = y) or a Max/Min
      with a difference free of the variables: not decided here (False).
    - exponentials, polynomials, deltas: no threshold.

    A term whose coefficient cancels in the expansion is counted too (a sum of the same
    erf products with opposite signs): such a statistic goes to quadrature, or term by term,
    never to a wrong value. gelu's finite-d terms were refused after 0.4 s of expansion
    each; the products of statistics of relu(z1 - z2) with exp(0.6 z1) Phi(0.8 z2), after a
    quarter of their derivation. memos: three dictionaries kept by the caller between calls
    with the same random, affine and mean (a closed-form engine asks of every factor and
    skeleton of a statistic, which share their sub-expressions)."""
    if dag_any(expr, lambda x: isinstance(x, (sp.Abs, sp.sign))):
        return False
    memo, fs_memo, forms = memos if memos is not None else ({}, {}, {})
    none = frozenset()

    def step(y):  # the planning's form of H(y): (a, b) / |first nonzero a|, or None
        if y not in forms:
            a, b = affine(y) or (None, None)
            lead = None if a is None else next((c for c in a if c != 0), None)
            forms[y] = None if lead is None else (
                tuple(sp.expand(c / abs(lead)) for c in a), sp.expand(b / abs(lead)))
        if forms[y] is None:
            raise _Undecided
        return forms[y]

    def times(s1, s2):
        return _cap(frozenset((n1 + n2, z1 and z2, h1 | h2) for n1, z1, h1 in s1
                              for n2, z2, h2 in s2))

    def kinds(x):  # frozenset of signatures of the terms of x (None in memo: undecided)
        if x in memo:
            if memo[x] is None:
                raise _Undecided
            return memo[x]
        try:
            out = signatures_of(x)
        except _Undecided:
            memo[x] = None
            raise
        memo[x] = out
        return out

    def signatures_of(x):
        if not (dag_free_symbols(x, fs_memo) & random):
            out = frozenset({(0, True, none)})
        elif x.is_Add:
            out = frozenset().union(*[kinds(a) for a in x.args])
        elif x.is_Mul:
            out = frozenset({(0, True, none)})
            for a in x.args:
                out = times(out, kinds(a))
        elif x.is_Pow and x.exp.is_Integer and x.exp >= 0:
            base, out = kinds(x.base), frozenset({(0, True, none)})
            for _ in range(int(x.exp)):
                out = times(out, base)
        elif isinstance(x, (sp.erf, sp.erfc)):
            form = affine(x.args[0])
            zero = form is not None and _zero_mean(form, mean)
            out = frozenset({(1, zero, none)})
        elif isinstance(x, sp.Heaviside):
            out = frozenset({(0, True, frozenset({step(x.args[0])}))})
        elif isinstance(x, (sp.Max, sp.Min)):
            sign = 1 if isinstance(x, sp.Max) else -1
            sigs = set()
            for i, a in enumerate(x.args):
                diffs = [sign * (a - b) for j, b in enumerate(x.args) if j != i]
                if any(not (d.free_symbols & random) for d in diffs):
                    raise _Undecided  # a tie broken by index, or a step of the parameters
                if a != 0:
                    sigs.add((0, True, frozenset(step(d) for d in diffs)))
            out = frozenset(sigs) or frozenset({(0, True, none)})
        else:  # exponentials, polynomials, deltas (and what the expansion refuses anyway)
            out = frozenset({(0, True, none)})
        return out

    try:
        signatures = kinds(expr)
    except _Undecided:
        return False
    most = 4 if orthant_quadrature else 3
    for n, zero, hs in signatures:
        if not hs:
            if n > most or (n == 3 and not zero and not orthant_quadrature):
                return True
            continue
        if any((tuple(-c for c in a), -b) in hs for a, b in hs):
            continue  # H(y) H(-y) = 0: the term vanishes
        for _, hs1 in _merge_parallel_steps(list(hs)):
            m = n + len(hs1)
            if m > 3 or (m == 3 and not (zero and all(_zero_mean(f, mean) for f in hs1))):
                return True
    return False


class _Undecided(Exception):
    """A factor whose thresholds terms_refused does not count (a step of a non-affine form,
    a tie between forms): no refusal is decided."""


__all__ = ["terms_refused"]
