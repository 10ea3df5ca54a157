"""The real part of a closed form built from complex exponentials (cos and sin enter the
closed-form engine as (e^{iy} +- e^{-iy}) / 2): taken by one walk over the expression's
distinct sub-expressions, and the test that refuses an erf of a complex argument first."""
from __future__ import annotations

import sympy as sp

from .gaussian import dag_any


class _Refused(Exception):
    """I somewhere real_part does not split (inside a function other than exp, or a
    fractional power)."""


def complex_inside_function(total) -> bool:
    """Whether I occurs inside the arguments of a function other than exp in total (an erf
    of a complex argument: real_part refuses it; this refuses before that walk, at worst
    sending to quadrature a sum whose complex erf terms would have cancelled)."""
    def complex_function(x):
        return (isinstance(x, sp.Function) and not isinstance(x, sp.exp)
                and any(dag_any(a, lambda y: y is sp.I) for a in x.args))
    return dag_any(total, complex_function)


def real_part(total):
    """Re(total), where total = E[expr] of a real integrand expr whose cos and sin entered the
    reductions as (e^{iy} +- e^{-iy}) / 2 (the imaginary part vanishes: the expectation of a
    real integrand is real). One walk over the distinct sub-expressions splits each sum,
    product, integer power and exp(a + i b) = e^a (cos b + i sin b) into its real and
    imaginary parts; a sub-expression free of I is real (every symbol is, and its radicals
    are of variances and determinants, non-negative on the model's domain). None when I sits
    anywhere else (inside another function, a fractional power). sympy.expand_complex
    did this through SymPy's assumptions and a full expansion: two thirds of the derivation
    of cos(0.8 z + 0.1) against cos(z)."""
    zero, one = sp.Integer(0), sp.Integer(1)
    memo, has_i = {}, {}

    def complex_in(x):
        hit = has_i.get(x)
        if hit is None:
            hit = has_i[x] = x is sp.I or any(complex_in(a) for a in x.args)
        return hit

    def times(p, r):
        (a, b), (c, d) = p, r
        if b == 0:
            return a * c, a * d
        if d == 0:
            return a * c, b * c
        return a * c - b * d, a * d + b * c

    def parts(x):
        hit = memo.get(x)
        if hit is not None:
            return hit
        if not complex_in(x):
            out = (x, zero)
        elif x is sp.I:
            out = (zero, one)
        elif x.is_Add:
            got = [parts(a) for a in x.args]
            out = (sp.Add(*[a for a, _ in got]), sp.Add(*[b for _, b in got]))
        elif x.is_Mul:
            out = (one, zero)
            for a in x.args:
                out = times(out, parts(a))
        elif x.is_Pow and x.exp.is_Integer:
            base, out = parts(x.base), (one, zero)
            for _ in range(abs(int(x.exp))):
                out = times(out, base)
            if x.exp < 0:  # 1 / (a + i b) = (a - i b) / (a^2 + b^2)
                a, b = out
                norm = a ** 2 + b ** 2
                out = (a / norm, -b / norm)
        elif isinstance(x, sp.exp):
            a, b = parts(x.args[0])
            ea = sp.exp(a)
            out = (ea * sp.cos(b), ea * sp.sin(b)) if b != 0 else (ea, zero)
        else:
            raise _Refused
        memo[x] = out
        return out

    try:
        return parts(total)[0]
    except _Refused:
        return None


__all__ = ["complex_inside_function", "real_part"]
