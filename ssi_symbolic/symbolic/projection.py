"""The linear algebra of Expectation's projections (MATH.md's Gaussians, conditioned on the
affine forms a link's functions read): the factorisation K = U D U^T of the forms'
covariance in rational functions (_ldl), independent rows of forms, the rows a quadratic
argument depends on, the residual covariance R = Sigma - W W^T read entry by entry, Gaussian
moments of the conditional law, the conditioning of closed forms on their forms
(_Reduction), and the shortcuts that decide which variables a set of forms fixes (an
evaluation at one point of the generators, the constant row span)."""
from __future__ import annotations

import sympy as sp
from sympy.polys.domains import QQ, ZZ


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


def _rational_rows(rows):
    """The rows, each divided by its first non-zero entry, over QQ ((z1 + z2)/sqrt 2 is the
    row (1, 1)); None when some row is then not rational. Dividing a row by a non-zero
    number changes neither its span nor whether it depends on the others."""
    out = []
    for row in rows:
        row = [sp.sympify(a) for a in row]
        lead = next((a for a in row if a != 0), None)
        row = [a / lead for a in row] if lead is not None else row
        if not all(a.is_Rational for a in row):
            return None
        out.append([QQ(a.p, a.q) for a in row])
    return out


def _echelon_insert(basis, row) -> bool:
    """Reduce a rational row by the echelon rows `basis` ({pivot column: row with 1 there});
    when something is left, add it to the basis and return True (the row was independent)."""
    row = list(row)
    for col, b in basis.items():
        c = row[col]
        if c:
            row = [x - c * y for x, y in zip(row, b)]
    col = next((j for j, x in enumerate(row) if x), None)
    if col is None:
        return False
    lead = row[col]
    basis[col] = [x / lead for x in row]
    return True


def _in_row_span(A, i) -> bool:
    """Whether the i-th unit vector is a combination of the rows of A (independent rows):
    decided over QQ (_rational_rows); False when a row is not rational."""
    k, n = A.shape
    rows = _rational_rows(A.row(r) for r in range(k))
    if rows is None:
        return False
    basis = {}
    for row in rows:
        _echelon_insert(basis, row)
    return not _echelon_insert(basis, [QQ.one if j == i else QQ.zero for j in range(n)])


def _independent_rows(forms) -> sp.Matrix:
    """The matrix of the linearly independent forms among the rows `forms` (the pivots of
    the reduced row echelon form of their transpose, in their order: each row that is not a
    combination of the rows before it); see :func:`_pivots`."""
    return sp.Matrix([forms[i] for i in _pivots(forms)])


def _pivots(forms) -> list:
    """The positions of the rows of `forms` that are not combinations of the rows before
    them. Over QQ when the rows are rational up to a factor each (_rational_rows;
    (z1 + z2 + z3)/sqrt 3 is the row (1, 1, 1)): SymPy's rref of rows with radicals took
    10 ms each, a tenth of the L = 3 case's projections; else by that rref."""
    first = {}  # a repeated row depends on its first occurrence
    for i, row in enumerate(forms):
        first.setdefault(tuple(row), i)
    distinct = sorted(first.values())
    scaled = _rational_rows([forms[i] for i in distinct]) if distinct else None
    if scaled is None:
        return list(sp.Matrix(forms).T.rref()[1])
    basis = {}
    return [i for i, row in zip(distinct, scaled) if _echelon_insert(basis, row)]


def _ldl(K):
    """(U, [d_1, ..., d_k]) with K = U diag(d) U^T and U unit lower triangular, every entry a
    cancelled rational function of the entries of K (no square roots: the Cholesky factor is
    U diag(sqrt(d))); None when some d_j vanishes identically (dependent forms)."""
    k = K.shape[0]
    U, d = sp.eye(k), []
    for j in range(k):
        d.append(sp.cancel(K[j, j] - sp.Add(*[U[j, i] ** 2 * d[i] for i in range(j)])))
        if d[j] == 0:
            return None
        for r in range(j + 1, k):
            U[r, j] = sp.cancel((K[r, j] - sp.Add(*[U[r, i] * U[j, i] * d[i]
                                                     for i in range(j)])) / d[j])
    return U, d


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


def _cancel(x):
    """sp.cancel(x). For a sum whose terms all have integer denominators that is its
    expansion: that case (half of the projections' entries) skips cancel's polynomial gcds.
    (A denominator such as pi or sqrt(2) + sqrt(3) goes to cancel, which puts the sum over it.)"""
    e = sp.expand(x)
    if all(sp.fraction(t)[1].is_Integer for t in sp.Add.make_args(e)):
        return e
    return sp.cancel(x)


class _Reduction:
    """The Gaussian x ~ N(mu, Sigma) of `variables` conditioned on k independent forms
    Y = A x (the rows of A), K = A Sigma A^T: E[x | Y] = mu + G (Y - A mu) with
    G = Sigma A^T K^-1, Cov(x | Y) = R = Sigma - G A Sigma, and x = A^T (A A^T)^-1 Y inside
    functions of the forms. Row i of G, entry R_ij and the rows of A^T (A A^T)^-1 read only
    the covariances of x_i, x_j with the forms, whichever other variables are conditioned
    with them: made once over all token variables for each set of forms and read off for the
    variables of each factor (:meth:`restricted`), entry by entry when first read (the
    rational-function cancels of G and R were a fifth of a slow link's derivation, repeated
    for every subset of variables reading the same forms)."""

    def __init__(self, variables, rows, gaussian):
        mean, S = gaussian
        A = sp.Matrix(rows)
        k = A.shape[0]
        self.mu, self.S, self.A = sp.Matrix(mean), S, A
        self.K = (A * S * A.T).applyfunc(sp.expand)
        # a few forms (k < n): the adjugate over the determinant (Matrix.inv's elimination
        # with its zero tests took ~60 ms per 2 x 2 symbolic matrix)
        self.Kinv = (self.K.adjugate() / self.K.det()).applyfunc(_cancel)
        self.ys = tuple(sp.Symbol(f"y{i + 1}", real=True) for i in range(k))
        self.ymean = A * self.mu
        self.ymean_expanded = tuple(sp.expand(x) for x in self.ymean)
        self.right = A.T * (A * A.T).inv()                 # x = right y inside functions
        self._G, self._GA, self._R, self._cond, self._inner = {}, {}, {}, {}, {}

    def G(self, i):
        hit = self._G.get(i)
        if hit is None:
            hit = self._G[i] = (self.S[i, :] * self.A.T * self.Kinv).applyfunc(_cancel)
        return hit

    def R(self, i, j):
        hit = self._R.get((i, j))
        if hit is None:
            GA = self._GA.get(i)
            if GA is None:
                GA = self._GA[i] = self.G(i) * self.A
            hit = self._R[(i, j)] = _cancel(self.S[i, j] - (GA * self.S[:, j])[0])
        return hit

    def cond(self, i):
        hit = self._cond.get(i)
        if hit is None:
            hit = self._cond[i] = sp.expand(
                self.mu[i] + (self.G(i) * (sp.Matrix(self.ys) - self.ymean))[0])
        return hit

    def inner(self, i):
        hit = self._inner.get(i)
        if hit is None:
            hit = self._inner[i] = sp.expand((self.right[i, :] * sp.Matrix(self.ys))[0])
        return hit

    def restricted(self, at, variables):
        """(ys, mean of Y, K, E[x | Y], Cov(x | Y) entry by entry, x inside functions, an
        empty memo of conditional moments) for `variables`, at positions `at` here."""
        at = list(at)
        return (self.ys, self.ymean_expanded, self.K,
                [self.cond(i) for i in at], _RestrictedResidual(self, at),
                {v: self.inner(i) for v, i in zip(variables, at)}, {})


class _RestrictedResidual:
    """R[a, b] = Cov(x_at[a], x_at[b] | Y) of a :class:`_Reduction`."""

    def __init__(self, base, at):
        self.base, self.at = base, at

    def __getitem__(self, ab):
        a, b = ab
        return self.base.R(self.at[a], self.at[b])


__all__ = ["_at_point", "_conditional_moment", "_dependence_rows", "_in_row_span",
           "_independent_rows", "_pivots", "_Reduction", "_Residual", "_cancel"]
