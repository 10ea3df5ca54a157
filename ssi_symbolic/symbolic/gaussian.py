"""Expectations over the token Gaussians of MATH.md section 2.

Given the overlaps, the tokens are independent. Token l carries the jointly Gaussian vector

    (z*_l, z_l, zeta_l1, ..., zeta_lr)   with mean (0, mu_l, 0, ..., 0),  mu_l = sum_a C[l,a] e_a,

    Var z*_l = 1, Var z_l = q, Cov(z*_l, z_l) = m, Cov(zeta_la, z_l) = e_a,
    Cov(zeta_la, zeta_lb) = delta_ab, zeta independent of z*,

and label noise adds K independent standard Gaussians xi_k (one per output entry).

Polynomial statistics are integrated exactly (:class:`exact_engine.ExactEngine`): an expression is held as a
sum of products of per-token polynomial factors (never expanded in all 3L variables at once), and
each factor's expectation comes from the Gaussian moment recursion

    E[x_i X^alpha] = mu_i E[X^alpha] + sum_j Sigma_ij alpha_j E[X^(alpha - e_j)],

memoised monomial by monomial; constants (radicals of rationals, pi, parameters, exp/log of
constants) are generators of the polynomial ring. Statistics with a non-polynomial part go through
:class:`expectation.Expectation` (closed forms or an explicit :class:`GaussHermite` expectation,
which generated code evaluates by quadrature).
"""
from __future__ import annotations

from dataclasses import dataclass
import sympy as sp
from sympy.external.gmpy import MPQ

from ..model.spec import ModelSpec, link_entries, token_symbols


class NotPolynomial(Exception):
    """Raised internally when a statistic is not polynomial in the Gaussian variables."""


class GaussHermite(sp.Function):
    """E_{u ~ N(0, I_k)}[ integrand(u) ]: an expectation kept explicit, done by quadrature.

    args = (integrand, Tuple(u_1, ..., u_k)); the u are independent standard Gaussians.
    """

    @classmethod
    def eval(cls, integrand, us):
        if not (dag_free_symbols(integrand) & set(us)):
            return integrand  # nothing random left: the expectation is the integrand itself

    @property
    def integrand(self):
        return self.args[0]

    @property
    def variables(self):
        return tuple(self.args[1])

    def _eval_derivative(self, s):
        # a kink (Heaviside, Max) differentiates to a Dirac delta of a linear form in u,
        # integrated out exactly here (it would be invisible to fixed quadrature nodes)
        return integrate_deltas(dag_diff(self.integrand, s), self.variables)

    def _latex(self, printer, exp=None):
        us = ", ".join(printer._print(u) for u in self.variables)
        out = (r"\mathbb{E}_{" + us + r" \sim \mathcal{N}(0,1)}\left[" +
               printer._print(self.integrand) + r"\right]")
        return out if exp is None else rf"\left({out}\right)^{{{exp}}}"


def integrate_deltas(integrand, us):
    """E_u[integrand] over independent standard Gaussians u, with every term holding one
    DiracDelta(c . u + r) integrated out exactly: for the last u_j with c_j != 0,

        E[delta(c_j u_j + rest) g(u)] = E_{u without u_j}[ g(u_j*) phi(u_j*) / |c_j| ],
        u_j* = -rest / c_j, phi the standard normal density.

    The other terms stay one GaussHermite node. Raises ValueError for a delta of a non-linear
    form or a product of deltas."""
    us = tuple(us)
    if not holds_delta([integrand]):
        return GaussHermite(integrand, sp.Tuple(*us))
    groups = {}
    smooth, delta_terms = _delta_split(integrand)
    for term in delta_terms:
        deltas = [f for f in sp.Mul.make_args(term) if isinstance(f, sp.DiracDelta)]
        if len(deltas) != 1 or len(deltas[0].args) > 1:
            raise ValueError(f"cannot integrate {deltas} (a product or derivative of deltas)")
        groups[deltas[0].args[0]] = groups.get(deltas[0].args[0], sp.Integer(0)) + \
            term / deltas[0]
    out = GaussHermite(smooth, sp.Tuple(*us)) if smooth != 0 else sp.Integer(0)
    for arg, rest in groups.items():
        poly = sp.Poly(arg, *us)
        if poly.total_degree() != 1:
            raise ValueError(f"DiracDelta({arg}) is not of a linear form in {us}")
        # coefficients simplified: a projected integrand can hold a zero coefficient in an
        # unsimplified form, which must not be divided by
        coef = {u: sp.simplify(poly.coeff_monomial(u)) for u in us}
        j = [u for u in us if coef[u] != 0][-1]
        c = coef[j]
        ustar = -(poly.coeff_monomial(1) + sum(coef[u] * u for u in us if u != j)) / c
        val = (rest.xreplace({j: ustar}) * sp.exp(-ustar ** 2 / 2)
               / (sp.sqrt(2 * sp.pi) * sp.Abs(c)))
        others = tuple(u for u in us if u != j)
        out += GaussHermite(val, sp.Tuple(*others)) if others else val
    return out


def holds_delta(exprs) -> bool:
    """Whether some expression holds a DiracDelta, by one walk over their distinct
    sub-expressions (Basic.has walks shared sub-trees again: a fifth of the gelu case's
    drift Jacobian)."""
    return dag_any(sp.Tuple(*exprs), lambda x: isinstance(x, sp.DiracDelta))


def _delta_split(e):
    """(smooth part, [terms each a product holding DiracDelta factors]) with e = smooth +
    sum(terms), distributing only the sub-expressions that hold a delta (expanding the whole
    integrand of a kinked node cost a second)."""
    if not e.has(sp.DiracDelta):
        return e, []
    if isinstance(e, sp.DiracDelta):
        return sp.Integer(0), [e]
    if e.is_Add:
        smooth, terms = [], []
        for a in e.args:
            s, t = _delta_split(a)
            smooth.append(s)
            terms += t
        return sp.Add(*smooth), terms
    if e.is_Mul:
        hold = [a for a in e.args if a.has(sp.DiracDelta)]
        if len(hold) == 1:
            rest = sp.Mul(*[a for a in e.args if a is not hold[0]])
            s, t = _delta_split(hold[0])
            return rest * s, [rest * x for x in t]
    # a power of a sum with a delta, a product of two such factors ...: expanded
    terms = sp.Add.make_args(sp.expand(e))
    return (sp.Add(*[t for t in terms if not t.has(sp.DiracDelta)]),
            [t for t in terms if t.has(sp.DiracDelta)])


def permutation_generators(items) -> list[dict]:
    """The transposition of the first two items and the cycle through all of them, as maps
    item -> image: together they generate the symmetric group of `items` (at least two)."""
    n = len(items)
    return [{items[0]: items[1], items[1]: items[0]},
            {x: items[(k + 1) % n] for k, x in enumerate(items)}]


@dataclass(frozen=True)
class TokenGaussian:
    """The random variables and overlap symbols of a spec (MATH.md section 2; section 6 for an
    untied student, whose token l has its own overlap m_l and norm q_l)."""

    L: int
    r: int
    K: int
    C: tuple
    spherical: bool
    untied: bool = False
    #: several directions (MATH.md section 8): K* teacher and K student directions, teacher
    #: overlaps P (K* x K*; empty for the identity)
    teacher_directions: int = 1
    student_directions: int = 1
    P: tuple = ()

    @classmethod
    def of(cls, spec: ModelSpec) -> "TokenGaussian":
        return cls(spec.L, spec.r, len(link_entries(spec.teacher)), spec.C, spec.spherical,
                   spec.untied, spec.teacher_directions, spec.student_directions,
                   spec.teacher_overlaps if spec.multi else ())

    @property
    def multi(self) -> bool:
        """Several directions: fields z*{j}_{l}, z{k}_{l} and overlaps M, E, Q (section 8)."""
        return self.teacher_directions > 1 or self.student_directions > 1

    def teacher_fields(self, l: int) -> tuple:
        """The teacher fields of token l: (z*_l,), or z*_{1,l}..z*_{K*,l} (symbols zs{j}_{l})."""
        if not self.multi:
            return (self.zstar[l],)
        return tuple(sp.Symbol(f"zs{j + 1}_{l + 1}", real=True)
                     for j in range(self.teacher_directions))

    def student_fields(self, l: int) -> tuple:
        """The student fields of token l: (z_l,), or z_{1,l}..z_{K,l} (symbols z{k}_{l})."""
        if not self.multi:
            return (self.z[l],)
        return tuple(sp.Symbol(f"z{k + 1}_{l + 1}", real=True)
                     for k in range(self.student_directions))

    def overlap_matrices(self, l: int = 0):
        """(P, M, E, Q) of token l as nested lists: P[j][j'] teacher overlaps, M[k][j] =
        w_k . w*_j / d, E[k][a] = u_a . w_k / sqrt(d), Q[k][h] = w_k . w_h / d (Q[k][k] = 1
        on the sphere). One direction: [[1]], [[m]], [[e_1..e_r]], [[q]] (an untied student's
        m_l and q_l for token l)."""
        if not self.multi:
            return ([[sp.Integer(1)]], [[self.ms[l]]], [list(self.e) if self.r else []],
                    [[self.qs[l]]])
        K, Ks, r = self.student_directions, self.teacher_directions, self.r
        P = ([[sp.sympify(c) for c in row] for row in self.P] if self.P else
             [[sp.Integer(int(i == j)) for j in range(Ks)] for i in range(Ks)])
        M = [[sp.Symbol(f"m{k + 1}_{j + 1}", real=True) for j in range(Ks)] for k in range(K)]
        E = [[sp.Symbol(f"e{k + 1}_{a + 1}", real=True) for a in range(r)] for k in range(K)]

        def q(k, h):
            k, h = min(k, h), max(k, h)
            if k == h and self.spherical:
                return sp.Integer(1)
            return sp.Symbol(f"q{k + 1}_{h + 1}", **({"positive": True} if k == h
                                                      else {"real": True}))
        Q = [[q(k, h) for h in range(K)] for k in range(K)]
        return P, M, E, Q

    # --- symbols -------------------------------------------------------------------------
    @property
    def zstar(self):
        """Teacher projections z*_1..z*_L."""
        return tuple(sp.Symbol(f"zs{l + 1}", real=True) for l in range(self.L))

    @property
    def z(self):
        """Student projections z_1..z_L."""
        return token_symbols(self.L)

    @property
    def zeta(self):
        """zeta[l][a] = sqrt(d) u_a . x_l."""
        return tuple(tuple(sp.Symbol(f"zeta{l + 1}_{a + 1}", real=True) for a in range(self.r))
                     for l in range(self.L))

    @property
    def xi(self):
        """Label-noise standard Gaussians, one per output entry."""
        return tuple(sp.Symbol(f"xi{k + 1}", real=True) for k in range(self.K))

    @property
    def m(self):
        """The semantic overlap of a tied student."""
        return sp.Symbol("m", real=True)

    @property
    def e(self):
        """Positional overlaps e (r = 1) or e1..er."""
        if self.r == 1:
            return (sp.Symbol("e", real=True),)
        return tuple(sp.Symbol(f"e{a + 1}", real=True) for a in range(self.r))

    @property
    def q(self):
        """Squared norm q; the number 1 under spherical training (tied students)."""
        return sp.Integer(1) if self.spherical else sp.Symbol("q", positive=True)

    @property
    def ms(self):
        """Per-token semantic overlaps: (m1..mL) untied, (m, ..., m) tied."""
        if self.untied:
            return tuple(sp.Symbol(f"m{l + 1}", real=True) for l in range(self.L))
        return (self.m,) * self.L

    @property
    def qs(self):
        """Per-token squared norms: (q1..qL) untied, (q, ..., q) tied."""
        if self.untied:
            return tuple(sp.Symbol(f"q{l + 1}", positive=True) for l in range(self.L))
        return (self.q,) * self.L

    @property
    def state(self):
        """Overlap symbols in state order: m, e..., (q for plain SGD); untied: m1..mL, q1..qL;
        several directions: M row by row, E row by row, Q[k][h] for k <= h (k < h on the
        sphere), as in ModelSpec.overlap_names."""
        if self.untied:
            return self.ms + self.qs
        if self.multi:
            _, M, E, Q = self.overlap_matrices()
            K = self.student_directions
            return (tuple(x for row in M for x in row) + tuple(x for row in E for x in row)
                    + tuple(Q[k][h] for k in range(K) for h in range(k, K)
                            if not (self.spherical and h == k)))
        return (self.m,) + self.e + (() if self.spherical else (self.q,))

    def mu(self, l: int, k: int = 0):
        """Mean of the student field k of token l: mu_kl = sum_a C[l,a] E[k,a]."""
        if not self.r:
            return sp.Integer(0)
        E = self.overlap_matrices()[2][k] if self.multi else self.e
        return sp.Add(*[self.C[l][a] * E[a] for a in range(self.r)])

    def token_variables(self, l: int):
        """(z*_l, z_l, zeta_l1..zeta_lr): the Gaussian vector of token l (with several
        directions: the K* teacher fields, the K student fields, then the zetas), made once
        per token (the expectations ask for them tens of thousands of times)."""
        memo = self.__dict__.setdefault("_token_variables", {})  # not a field: frozen is fine
        hit = memo.get(l)
        if hit is None:
            hit = memo[l] = self.teacher_fields(l) + self.student_fields(l) + self.zeta[l]
        return hit

    def token_mean(self, l: int):
        Ks, K = self.teacher_directions, self.student_directions
        return ((sp.Integer(0),) * Ks + tuple(self.mu(l, k) for k in range(K))
                + (sp.Integer(0),) * self.r)

    def token_covariance(self, l: int = 0):
        """Covariance [[P, M^T, 0], [M, Q, E], [0, E^T, I]] of (z*_l, z_l, zeta_l1..) (MATH.md
        sections 2 and 8): the same for every token of a tied student."""
        P, M, E, Q = self.overlap_matrices(l)
        Ks, K, r = len(P), len(Q), self.r
        n = Ks + K + r
        S = sp.zeros(n, n)
        for i in range(Ks):
            for j in range(Ks):
                S[i, j] = P[i][j]
        for k in range(K):
            for j in range(Ks):
                S[Ks + k, j] = S[j, Ks + k] = M[k][j]
            for h in range(K):
                S[Ks + k, Ks + h] = Q[k][h]
            for a in range(r):
                S[Ks + k, Ks + K + a] = S[Ks + K + a, Ks + k] = E[k][a]
        for a in range(r):
            S[Ks + K + a, Ks + K + a] = 1
        return S

    @property
    def random_variables(self):
        out = []
        for l in range(self.L):
            out.extend(self.token_variables(l))
        return tuple(out) + self.xi


# ----------------------------------------------------------------------------------------
# Mixed statistics: exact where polynomial, Gauss-Hermite nodes where not
# ----------------------------------------------------------------------------------------

def nonpolynomial_parts(expr) -> set:
    """The outermost non-polynomial sub-expressions of expr (functions, negative or fractional
    powers: what is not reached through sums, products and non-negative integer powers),
    each distinct sub-expression visited once."""
    out, seen, stack = set(), set(), [expr]
    while stack:
        x = stack.pop()
        if x in seen or x.is_Atom:
            continue
        seen.add(x)
        if x.is_Add or x.is_Mul or (x.is_Pow and x.exp.is_Integer and x.exp >= 0):
            stack.extend(x.args)
        else:
            out.add(x)
    return out


def _nonpolynomial_symbols(expr) -> set:
    """Symbols that occur inside a non-polynomial sub-expression (a function, a division...)."""
    return set().union(*[x.free_symbols for x in nonpolynomial_parts(expr)])


def _wick(cov, alpha):
    """E[prod x_i^alpha_i] of a centred Gaussian with covariance `cov` (SymPy)."""
    memo = {}

    def rec(a):
        if a in memo:
            return memo[a]
        if not any(a):
            return sp.Integer(1)
        i = next(i for i, k in enumerate(a) if k)
        a1 = list(a)
        a1[i] -= 1
        val = sp.Integer(0)
        for j, kj in enumerate(a1):
            if kj and cov[i][j] != 0:
                a2 = list(a1)
                a2[j] -= 1
                val += cov[i][j] * kj * rec(tuple(a2))
        memo[a] = val
        return val

    return rec(tuple(alpha))


def _integrate_polynomial_part(expr, variables, cov):
    """E over centred Gaussians `variables` (covariance cov) of an expression polynomial in
    them, with coefficients that may be anything."""
    if not variables or not (expr.free_symbols & set(variables)):
        return expr
    poly = sp.Poly(sp.expand(expr, deep=False), *variables)
    out = sp.Integer(0)
    for alpha, coef in poly.terms():
        if any(alpha):
            w = _wick(cov, alpha)
            if w != 0:
                out += coef * w
        else:
            out += coef
    return out


def distribute(expr):
    """Products distributed over sums at the top level only (a sum of products): unlike
    sp.expand, the arguments of functions (quadrature integrands, arcsines) are left alone.
    The terms are collected as dictionaries of factors (product_terms) and each distinct
    product is built once (a SymPy Mul per term of the distribution was most of its cost),
    with its coefficient in the same Mul (c * Mul(...) flattened each term twice)."""
    return sp.Add(*[sp.Mul(c, *[b if e == 1 else sp.Pow(b, e) for b, e in key])
                    for key, c in product_terms(sp.sympify(expr)).items() if c != 0])


def multiply_terms(a, b) -> dict:
    """The product of two sums given as {frozenset of (base, exponent): coefficient}: the
    exponents of a base add (a base whose exponent cancels leaves the key), the
    coefficients of equal keys add."""
    out = {}
    for ka, ca in a.items():
        for kb, cb in b.items():
            if not ka or not kb:
                k = ka or kb
            else:
                d = dict(ka)
                for base, e in kb:  # no int 0 added to a SymPy exponent (sympified)
                    d[base] = d[base] + e if base in d else e
                k = frozenset((base, e) for base, e in d.items() if _nonzero(e))
            out[k] = out[k] + ca * cb if k in out else ca * cb
    return out


def _nonzero(e) -> bool:
    """e != 0 for an exponent (an int or a SymPy number), without sympifying the 0 when e
    is rational (a third of multiply_terms' time)."""
    if type(e) is int:
        return e != 0
    return e.p != 0 if e.is_Rational else e != 0


def product_terms(expr) -> dict:
    """expr distributed over its sums at the top level (see distribute), as a dictionary
    {frozenset of (base, exponent): numeric coefficient}: a term is the coefficient times
    the product of base**exponent. Integer powers of sums are multiplied out; any other
    factor (a function, a power with a non-integer or negative exponent) is a base with its
    numeric exponent, so that x x^2 and sqrt(y) sqrt(y) merge as in a Mul. Each distinct
    sub-expression is distributed once. Rational coefficients are multiplied and added as
    SymPy's ground-type rationals (gmpy2's mpq, a dependency; SymPy's Rational arithmetic
    was half the time of the distribution) and returned as SymPy numbers, the same ones; a
    Float or other number among them: all in SymPy arithmetic."""
    expr = sp.sympify(expr)
    try:
        out = _product_terms(expr, True)
    except _NotRational:
        return _product_terms(expr, False)
    return {k: sp.Rational(int(c.numerator), int(c.denominator)) for k, c in out.items()}


class _NotRational(Exception):
    """A number product_terms cannot keep as a ground-type rational."""


def _product_terms(expr, ground: bool) -> dict:
    """product_terms with coefficients as MPQ (ground) or SymPy numbers."""
    memo = {}
    one = frozenset()
    unit = MPQ(1) if ground else sp.Integer(1)

    def number(x):
        if not ground:
            return x
        if not x.is_Rational:
            raise _NotRational(x)
        return MPQ(x.p, x.q)

    def terms(x):
        got = memo.get(x)
        if got is not None:
            return got
        if x.is_Number:
            out = {one: number(x)}
        elif x.is_Add:
            out = {}
            for a in x.args:
                for k, c in terms(a).items():
                    out[k] = out[k] + c if k in out else c
        elif x.is_Mul:
            out = {one: unit}
            for a in x.args:
                out = multiply_terms(out, terms(a))
        elif x.is_Pow and x.exp.is_Integer and x.exp > 1 and x.base.is_Add:
            base = out = terms(x.base)
            for _ in range(int(x.exp) - 1):
                out = multiply_terms(out, base)
        elif x.is_Pow and x.exp.is_Number:
            out = {frozenset([(x.base, x.exp)]): unit}
        else:
            out = {frozenset([(x, sp.Integer(1))]): unit}
        memo[x] = out
        return out

    return terms(expr)


def dag_any(expr, pred) -> bool:
    """Whether some sub-expression satisfies pred, visiting each distinct sub-expression once
    (formulas share large sub-trees; a plain tree walk revisits them exponentially often)."""
    seen, stack = set(), [sp.sympify(expr)]
    while stack:
        x = stack.pop()
        if pred(x):
            return True
        for a in x.args:
            if id(a) not in seen:
                seen.add(id(a))
                stack.append(a)
    return False


def dag_map(expr, mapping=None, post=None, keep_order=False, memo=None, evaluate=True):
    """expr rebuilt bottom-up visiting each distinct sub-expression once: a sub-expression in
    `mapping` is replaced (not entered), every rebuilt one passed through `post`; with
    neither, expr.xreplace(mapping). Closed forms share large sub-trees, which xreplace and
    powsimp walk again at every occurrence. keep_order: sums and products are rebuilt from
    their new arguments in their order (Add._from_args), not flattened and sorted again.
    evaluate=False: the other sub-expressions rebuilt unevaluated (Pow(x, -1/2) with x
    replaced asks nothing about x's sign). memo: a dict kept by the caller between calls with
    the same mapping and post (the factors of a statistic that read the same forms share their
    functions, whose rebuilding, Max and Min simplifying their arguments, was repeated for
    every factor)."""
    mapping = mapping or {}
    memo = {} if memo is None else memo

    def walk(x):
        hit = mapping.get(x)
        if hit is not None:
            return hit
        if not x.args:
            return x
        hit = memo.get(x)
        if hit is None:
            args = [walk(a) for a in x.args]
            if all(a is b for a, b in zip(args, x.args)):
                hit = x
            elif keep_order and (x.is_Add or x.is_Mul):
                hit = x.func._from_args(args)
            elif not evaluate:
                try:
                    hit = x.func(*args, evaluate=False)
                except TypeError:  # a class without the option (ExprCondPair)
                    hit = x.func(*args)
            else:
                hit = x.func(*args)
            memo[x] = hit = post(hit) if post is not None else hit
        return hit

    return walk(expr)


def dag_free_symbols(expr, memo=None) -> frozenset:
    """expr.free_symbols, computing each distinct sub-expression's once (memo: a dict to
    share between calls). Basic.free_symbols walks shared sub-trees again at every
    occurrence, which costs seconds on closed forms."""
    memo = {} if memo is None else memo
    stack = [expr]
    while stack:
        x = stack[-1]
        if x in memo:
            stack.pop()
            continue
        if x.is_Symbol or type(x).free_symbols is not sp.Basic.free_symbols:
            memo[x] = frozenset(x.free_symbols)  # a symbol, or a class with bound variables
            stack.pop()
            continue
        todo = [a for a in x.args if a not in memo]
        if todo:
            stack.extend(todo)
            continue
        stack.pop()
        memo[x] = frozenset().union(*[memo[a] for a in x.args]) if x.args else frozenset()
    return memo[expr]


def dag_diff(expr, x, memo=None, free=None):
    """d expr / dx by the chain rule over the expression's DAG: each distinct sub-expression
    differentiated once, and sub-expressions free of x skipped (sp.diff builds the product
    rule's zero terms, and SymPy's 0 * y asks whether y is finite, a walk of all of y: most of
    the time of the derivative of a quadrature drift). Sums and products term by term, powers
    with a constant exponent by p b^(p-1) b', functions that define fdiff by the chain rule
    through it; anything else (quadrature nodes, Max, variable exponents) by sp.diff.
    memo: {sub-expression: derivative} for this x; free: a dag_free_symbols memo."""
    memo = {} if memo is None else memo
    free = {} if free is None else free

    def by_chain_rule(e):  # d(e) is built from the derivatives of e's arguments
        return (x in dag_free_symbols(e, free) and e != x and (
            e.is_Add or e.is_Mul or (e.is_Pow and x not in dag_free_symbols(e.exp, free))
            or (isinstance(e, sp.Function) and not isinstance(e, GaussHermite)
                and type(e).fdiff is not sp.Function.fdiff)))

    def d(e):
        hit = memo.get(e)
        if hit is not None:
            return hit
        if x not in dag_free_symbols(e, free):
            out = sp.Integer(0)
        elif e == x:
            out = sp.Integer(1)
        elif isinstance(e, GaussHermite):
            # its own derivative, without sp.diff's Derivative.__new__ around it (an
            # is_zero query and a replace walk over the whole derivative: half the time of
            # gelu's drift Jacobian)
            out = e._eval_derivative(x)
        elif not by_chain_rule(e):
            out = sp.diff(e, x)
        elif e.is_Add:
            out = sp.Add(*[t for t in (d(a) for a in e.args) if t != 0])
        elif e.is_Mul:
            args, parts = e.args, []
            for i, a in enumerate(args):
                da = d(a)
                if da != 0:
                    parts.append(sp.Mul(*args[:i], da, *args[i + 1:]))
            out = sp.Add(*parts)
        elif e.is_Pow:  # a constant exponent
            b, p = e.args
            out = p * b ** (p - 1) * d(b)
        else:  # a function with fdiff
            parts = []
            for i, a in enumerate(e.args):
                da = d(a)
                if da != 0:
                    parts.append(e.fdiff(i + 1) * da)
            out = sp.Add(*parts)
        memo[e] = out
        return out

    # arguments before the expressions built from them (no deep recursion on large sums);
    # sub-expressions free of x are not entered
    stack = [expr]
    while stack:
        e = stack[-1]
        if e in memo:
            stack.pop()
            continue
        todo = [a for a in e.args if a not in memo] if by_chain_rule(e) else []
        if todo:
            stack.extend(todo)
            continue
        stack.pop()
        d(e)
    return memo[expr]


def has_quadrature(expr) -> bool:
    """True when an expression holds a GaussHermite node or another function evaluated by
    quadrature (closed_forms.NormalOrthant)."""
    return dag_any(expr, lambda x: isinstance(x, GaussHermite)
                   or getattr(type(x), "numeric_quadrature", False))


def poly_terms(expr, variables):
    """{alpha: coefficient} of an expression polynomial in `variables` whose coefficients
    may be anything free of them (much faster than sp.Poly with function coefficients); None
    when a variable occurs otherwise. From the dictionary terms of product_terms: each
    distinct coefficient product is built once, never the full product of a term."""
    index = {v: i for i, v in enumerate(variables)}
    vs = set(variables)
    fs_memo = {}
    out = {}
    for key, c in product_terms(sp.sympify(expr)).items():
        if c == 0:
            continue
        mono, rest = [0] * len(variables), []
        for base, e in key:
            if base in index and e.is_Integer and e > 0:
                mono[index[base]] += int(e)
            elif dag_free_symbols(base, fs_memo) & vs or (
                    not e.is_Number and dag_free_symbols(e, fs_memo) & vs):
                return None
            else:
                rest.append(base if e == 1 else sp.Pow(base, e))
        out.setdefault(tuple(mono), []).append(c * sp.Mul(*rest))
    return {k: sp.Add(*v) for k, v in out.items()}


__all__ = ["dag_any", "distribute", "holds_delta", "multiply_terms", "product_terms",
           "poly_terms", "permutation_generators", "TokenGaussian", "GaussHermite",
           "NotPolynomial", "has_quadrature", "integrate_deltas", "dag_diff", "dag_free_symbols",
           "dag_map"]
