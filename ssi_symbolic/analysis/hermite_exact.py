"""Exact Hermite coefficients of polynomial links (MATH.md section 5), and the preparation of a
link that the SIE, exact or numerical, starts from.

A link (SymPy expression, Matrix or link string) becomes its list of entries in the real token
symbols z1..zL, with the given parameter values substituted. For an entry polynomial in the
tokens, each monomial prod_l z_l^{n_l} is written in the Hermite basis with
z^n = sum_i n! / (2^i i! (n-2i)!) He_{n-2i}(z) (probabilists' Hermite polynomials) and the
coefficients are collected per multi-index. Parameters stay symbolic unless values are given; a
coefficient counts as non-zero when it is not identically zero as an expression.

Every coefficient is the Hermite coefficient of the definition, E[g(z) He_alpha(z)] with
z ~ N(0, I_L) and He_alpha = prod_l He_{alpha_l}(z_l) (= alpha! times the coefficient of He_alpha
in the expansion of g).
"""
from __future__ import annotations

import itertools
import math
import re
from functools import lru_cache

import sympy as sp

from ..model.spec import link_entries, parse_link, token_symbols

_TOKEN = re.compile(r"^z(\d+)$")


# ---------------------------------------------------------------------------------------------
# preparing a link

def _param_values(params) -> dict:
    """{name: sympy number} from a dict keyed by names or Symbols (None -> {})."""
    if not params:
        return {}
    return {str(k): sp.nsimplify(v) if isinstance(v, float) else sp.sympify(v)
            for k, v in params.items()}


def _entries(link, L: int, params=None) -> list:
    """The entries of a link (scalar, Matrix or string) as SymPy expressions in the real token
    symbols z1..zL, with the given parameter values substituted."""
    values = _param_values(params)
    if isinstance(link, str):
        link = parse_link(link, L, list(values), "link")
    if isinstance(link, (list, tuple)):
        link = sp.Matrix(link)
    entries = [sp.sympify(x) for x in link_entries(link)]
    zs = token_symbols(L)
    out = []
    for x in entries:
        subs = {}
        for s in x.free_symbols:
            name = str(s)
            mt = _TOKEN.match(name)
            if mt:
                k = int(mt.group(1))
                if not 1 <= k <= L:
                    raise ValueError(f"link uses token {name} but L = {L}")
                if s != zs[k - 1]:
                    subs[s] = zs[k - 1]
            elif name in values:
                subs[s] = values[name]
        out.append(x.xreplace(subs) if subs else x)
    return out


def _is_polynomial(entry, zs) -> bool:
    try:
        return bool(entry.is_polynomial(*zs))
    except Exception:  # pragma: no cover - SymPy corner cases
        return False


def _nonzero(c) -> bool:
    """Exact test: is the expression c not identically zero?"""
    c = sp.expand(c)
    if c == 0:
        return False
    z = c.is_zero
    if z is not None:
        return not z
    return sp.simplify(c) != 0


# ---------------------------------------------------------------------------------------------
# exact Hermite coefficients of polynomial links

@lru_cache(maxsize=None)
def monomial_to_hermite(n: int) -> tuple:
    """z^n = sum_j c_{n,j} He_j(z): the pairs (j, c_{n,j}), c_{n,n-2i} = n! / (2^i i! (n-2i)!)."""
    return tuple((n - 2 * i, sp.Rational(math.factorial(n),
                                         2 ** i * math.factorial(i) * math.factorial(n - 2 * i)))
                 for i in range(n // 2 + 1))


def _alpha_factorial(alpha) -> int:
    out = 1
    for a in alpha:
        out *= math.factorial(a)
    return out


def _exact_coefficients(entry, zs) -> dict:
    """All non-zero Hermite coefficients E[g He_alpha] of a polynomial entry: {alpha: expr}."""
    poly = sp.Poly(sp.expand(entry), *zs)
    acc = {}
    for monom, c in poly.terms():
        for combo in itertools.product(*[monomial_to_hermite(n) for n in monom]):
            alpha = tuple(j for j, _ in combo)
            w = c
            for _, cj in combo:
                w = w * cj
            acc[alpha] = acc.get(alpha, 0) + w
    out = {}
    for alpha, c in acc.items():
        c = sp.expand(c * _alpha_factorial(alpha))
        if _nonzero(c):
            out[alpha] = c
    return out


def hermite_coefficients(link, L: int, order: int, params=None) -> dict:
    """Exact Hermite coefficients E[g(z) He_alpha(z)] with |alpha| == order of a polynomial link.

    link: SymPy expression or Matrix in z1..zL (or a link string); params: optional
    {name: value} substituted first (parameters left out stay symbolic). Returns
    {alpha: coefficient} for the non-zero coefficients only; for a vector or matrix link the
    values are Matrices of the link's shape (alpha listed when any entry is non-zero).
    Raises ValueError for a link that is not polynomial in the tokens."""
    if order < 0:
        raise ValueError(f"order must be >= 0, got {order}")
    zs = token_symbols(L)
    if isinstance(link, str):
        link = parse_link(link, L, list(_param_values(params)), "link")
    if isinstance(link, (list, tuple)):
        link = sp.Matrix(link)
    entries = _entries(link, L, params)
    for x in entries:
        if not _is_polynomial(x, zs):
            raise ValueError(f"link entry {x} is not polynomial in z1..z{L}: use sie(..., "
                             f"method='numerical') for its coefficients")
    per = [{a: c for a, c in _exact_coefficients(x, zs).items() if sum(a) == order}
           for x in entries]
    if not isinstance(link, sp.MatrixBase):
        return per[0]
    alphas = sorted(set().union(*per))
    return {a: sp.Matrix(link.rows, link.cols, [d.get(a, sp.Integer(0)) for d in per])
            for a in alphas}


__all__ = ["hermite_coefficients", "monomial_to_hermite"]
