"""The linear algebra of Expectation's projections (MATH.md's Gaussians, conditioned on the
affine forms a link's functions read): independent rows of forms, the rows a quadratic
argument depends on, the residual covariance R = Sigma - W W^T read entry by entry, Gaussian
moments of the conditional law, and the shortcuts that decide which variables a set of forms
fixes (an evaluation at one point of the generators, the constant row span)."""
from __future__ import annotations

import sympy as sp
from sympy.polys.domains import QQ, ZZ
from sympy.polys.matrices import DomainMatrix


def _at_point(dom, elems):
    """The elements of a field of rational functions over ZZ (or its ground domain) as
    rationals at a fixed point of its generators (g_j = 1009 + 97 j), or None when a
    denominator vanishes there or the domain is another."""
    if not getattr(dom, "is_FractionField", False):
        return [QQ.convert(x, dom) for x in elems] if dom in (ZZ, QQ) else None
    R = dom.field.ring
    if R.domain != ZZ:
        return None
    point = [1009 + 97 * j for j in range(R.ngens)]

    def value(p):  # term by term in Python integers (PolyElement.evaluate is slower)
        out = 0
        for monomial, c in p.items():
            t = int(c)
            for v, e in zip(point, monomial):
                if e:
                    t *= v ** e
            out += t
        return out

    out = []
    for x in elems:
        den = value(x.denom)
        if den == 0:
            return None
        out.append(QQ(value(x.numer), den))
    return out


def _in_row_span(A, i) -> bool:
    """Whether the i-th unit vector is a combination of the rows of A (independent rows):
    decided over QQ after each row is divided by its first non-zero entry ((z1 + z2)/sqrt 2
    is the row (1, 1)); False when a row is then not rational."""
    k, n = A.shape
    rows = []
    for r in range(k):
        row = list(A.row(r))
        lead = next((a for a in row if a != 0), None)
        row = [a / lead for a in row] if lead is not None else row
        if not all(a.is_Rational for a in row):
            return False
        rows.append([QQ.convert(a) for a in row])
    rows.append([QQ.one if j == i else QQ.zero for j in range(n)])
    return DomainMatrix(rows, (k + 1, n), QQ).rank() == k


def _independent_rows(forms) -> sp.Matrix:
    """The matrix of the linearly independent forms among the rows `forms` (the pivots of
    the reduced row echelon form of their transpose, in their order)."""
    _, pivots = sp.Matrix(forms).T.rref()
    return sp.Matrix([forms[i] for i in pivots])


class _Residual:
    """The residual covariance R = Sigma - W W^T of a projection, each entry expanded when
    first read (R[i, j]); iterating gives every entry, row by row."""

    def __init__(self, S, W):
        self.S, self.W, self.shape, self._memo = S, W, S.shape, {}

    def __getitem__(self, ij):
        i, j = ij
        key = (min(i, j), max(i, j))
        hit = self._memo.get(key)
        if hit is None:
            W = self.W
            hit = self._memo[key] = sp.expand(
                self.S[i, j] - sp.Add(*[W[i, c] * W[j, c] for c in range(W.shape[1])]))
        return hit

    def __iter__(self):
        n = self.shape[0]
        return (self[i, j] for i in range(n) for j in range(n))


def _conditional_moment(alpha, mean, R, memo):
    """E[prod_i x_i^alpha_i] for x ~ N(mean, R) (mean any expressions), memoised in memo:
    E[x_i X^a] = mean_i E[X^a] + sum_j R_ij a_j E[X^(a - e_j)]."""
    hit = memo.get(alpha)
    if hit is None:
        i = next((i for i, a in enumerate(alpha) if a), None)
        if i is None:
            hit = sp.Integer(1)
        else:
            a1 = list(alpha)
            a1[i] -= 1
            hit = mean[i] * _conditional_moment(tuple(a1), mean, R, memo)
            for j, aj in enumerate(a1):
                if aj and R[i, j] != 0:
                    a2 = list(a1)
                    a2[j] -= 1
                    hit += R[i, j] * aj * _conditional_moment(tuple(a2), mean, R, memo)
            # the factors are expanded already: distributing the top level is enough (a deep
            # expand of every term, radicals included, cost ten times more)
            hit = sp.expand(hit, deep=False)
        memo[alpha] = hit
    return hit


def _dependence_rows(P, variables):
    """Rows spanning the directions a polynomial of degree <= 2 depends on: its linear part
    and the rows of its quadratic form."""
    n = len(variables)
    lin = [P.coeff_monomial(v) for v in variables]
    out = [tuple(lin)] if any(c != 0 for c in lin) else []
    if P.total_degree() == 2:
        for i in range(n):
            row = [P.coeff_monomial(variables[i] * variables[j]) if i != j else
                   2 * P.coeff_monomial(variables[i] ** 2) for j in range(n)]
            if any(c != 0 for c in row):
                out.append(tuple(row))
    return out


__all__ = ["_at_point", "_conditional_moment", "_dependence_rows", "_in_row_span",
           "_independent_rows", "_Residual"]
