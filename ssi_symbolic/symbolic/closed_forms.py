"""Closed-form Gaussian expectations of the link families theorists use (issue 11).

For x ~ N(mu, Sigma) (any dimension, Sigma possibly singular) this module computes, exactly,

    E[ p(x) exp(Q(x)) prod_k Phi(a_k.x + b_k) prod_k H(c_k.x + d_k) prod_k delta(f_k.x + g_k) ]

with p a polynomial, Q a polynomial of degree <= 2 (complex linear part allowed: cos, sin), Phi
the standard normal CDF, H the Heaviside step and delta the Dirac delta. Every link of the
families erf, erfc, Phi, relu, leaky_relu, |x|, sign, Heaviside, Max/Min of affine forms,
hardtanh, gelu, exp of affine and quadratic forms, cos and sin, their products with polynomials
and their derivatives is first rewritten in these terms (erf(y) = 2 Phi(sqrt 2 y) - 1,
Max(a, b) = b + (a - b) H(a - b), |y| = y (2 H(y) - 1), cos y = (e^{iy} + e^{-iy}) / 2, ...).
The expectation is then reduced, one rule at a time, to orthant probabilities:

* delta(y), y = f.x + g ~ N(nu, s^2): E[delta(y) F] = exp(-nu^2 / 2 s^2) / sqrt(2 pi s^2)
  E[F | y = 0], the conditional law N(mu - Sigma f nu / s^2, Sigma - Sigma f f^T Sigma / s^2).
* exp(Q), Q = -x^T A x / 2 + B.x + c: completing the square (S the variables of Q),
  E[e^Q F] = det(I + A Sigma_SS)^(-1/2) exp(c + B.mu - mu^T A mu / 2 + b^T Sigma'_SS b / 2)
  E'[F] with b = B - A mu, Sigma' = Sigma - Sigma_:S (I + A Sigma_SS)^-1 A Sigma_S:, mu' = mu +
  Sigma' b. (The expectation exists when Sigma^-1 + A is positive definite; the conditions are
  collected in `conditions` for the caller to check.)
* Stein's lemma for the polynomial: E[x_i F] = mu_i E[F] + sum_j Sigma_ij E[d_j F], where
  d Phi(y) = a phi(y) (an exp of a quadratic form, absorbed as above) and d H(y) = c delta(y).
* With p = 1, Q = 0 and no delta left: E[prod_k Phi_{s_k}(y_k)] = P(s_k N_k <= y_k for all k)
  is the normal orthant probability of the vector nu / sqrt(diag T), T = Cov(y) + diag(s_k^2)
  (s = 1 for Phi, 0 for H): Phi(h) for one factor; for two, the bivariate normal CDF
  Phi_2(h1, h2; rho) (1/4 + arcsin(rho) / 2 pi at zero mean, the Saad-Solla arcsine and
  arc-cosine kernels); for three at zero mean 1/8 + (arcsin rho_12 + arcsin rho_13 +
  arcsin rho_23) / 4 pi.
* With ``orthant_quadrature`` (several directions: the committee's squared error to the fourth
  power holds four erf factors), an orthant probability of Phi factors only, of dimension 4, or
  3 with a mean shift, has no closed form: Plackett's identity reduces it to one dimension.
  With h = nu / sqrt(diag T), R the correlation matrix of T and R(t) = (1 - t) I + t R (positive
  definite for t in [0, 1]: T = A Sigma A^T + I is, whatever Sigma),
      P(Z <= h; R) = prod_i Phi(h_i) + int_0^1 sum_{i<j} R_ij phi_2(h_i, h_j; t R_ij)
                     P(Z_rest <= h_rest | Z_i = h_i, Z_j = h_j; R(t)) dt,
  the conditional probability a Phi (dimension 3) or a bivariate normal CDF (dimension 4: at
  zero mean 1/4 + arcsin(rho) / 2 pi). The result is the function NormalOrthant(h, R): the
  t-integral, smooth on [0, 1], is done numerically by the generated module's runtime helper
  _orthant (Gauss-Legendre in t, its error bound the module's n versus 2n estimate), so the
  formulas stay the size of the closed forms.
Anything else raises NoClosedForm (the caller uses quadrature).
"""
from __future__ import annotations

import sympy as sp
from sympy.polys.constructor import construct_domain
from sympy.polys.domains import QQ, ZZ
from sympy.polys.matrices import DomainMatrix

from .gaussian import dag_any, dag_free_symbols, multiply_terms
from .real_parts import complex_inside_function, real_part
from .thresholds import _merge_parallel_steps, _threshold_count, _zero_mean, terms_refused


#: most sub-problems the reduction of one term may reach before quadrature takes over (all
#: of them, memoised or not, so that whether a term closes does not depend on what was
#: computed before it)
MAX_REDUCTIONS = 80


class NoClosedForm(Exception):
    """The expectation is outside the families above (the caller falls back to quadrature)."""


class TooComplex(NoClosedForm):
    """The integrand is in the families above, but its closed form needs an orthant
    probability of more thresholds than have one (four, or three with a mean shift), or more
    than MAX_REDUCTIONS sub-problems for one term."""


class NormalCDF2(sp.Function):
    """Phi_2(h, k; rho) = P(X <= h, Y <= k) for standard normals X, Y of correlation rho."""

    nargs = 3

    def fdiff(self, argindex=1):
        h, k, rho = self.args
        s = sp.sqrt(1 - rho ** 2)
        if argindex == 1:
            return _phi(h) * _Phi((k - rho * h) / s)
        if argindex == 2:
            return _phi(k) * _Phi((h - rho * k) / s)
        return sp.exp(-(h ** 2 - 2 * rho * h * k + k ** 2) / (2 * s ** 2)) / (2 * sp.pi * s)

    def _latex(self, printer, exp=None):
        h, k, rho = (printer._print(a) for a in self.args)
        out = rf"\Phi_2\left({h}, {k}; {rho}\right)"
        return out if exp is None else rf"{out}^{{{exp}}}"

    def _sympystr(self, printer):
        return "Phi2({})".format(", ".join(printer._print(a) for a in self.args))


def _Phi(x):
    """Standard normal CDF as an erfc (accurate in both tails)."""
    return sp.erfc(-x / sp.sqrt(2)) / 2


def _phi(x):
    return sp.exp(-x ** 2 / 2) / sp.sqrt(2 * sp.pi)


# internal markers of the rewritten integrand
class _P(sp.Function):
    """Phi(y), the standard normal CDF (internal)."""
    nargs = 1


class _H(sp.Function):
    """Heaviside step H(y) (internal)."""
    nargs = 1


class _D(sp.Function):
    """Dirac delta(y) (internal)."""
    nargs = 1


def _max_terms(args, sign, random=frozenset()):
    """Max (sign = 1) or Min (sign = -1) of affine forms as sum_i a_i prod_{j != i} H(+-(a_i -
    a_j)) (ties have probability zero for non-degenerate forms). A difference free of the
    random variables is a number (ties broken by index) or a Heaviside of the parameters."""
    out = sp.Integer(0)
    for i, a in enumerate(args):
        t = a
        for j, b in enumerate(args):
            if j != i:
                # break ties by index so that a constant difference 0 is counted once
                diff = sign * (a - b)
                if diff.free_symbols & random:
                    t = t * _H(diff)
                elif diff.is_number:
                    t = t * sp.Integer(1 if (diff > 0 or (diff == 0 and i < j)) else 0)
                else:
                    t = t * sp.Heaviside(diff, sp.Rational(1, 2))
        out += t
    return out


def kinks_as_steps(expr, random: set):
    """Max, Min, Abs and sign of expressions of the random variables written with Heaviside
    steps (Max(a, b) = b + (a - b) H(a - b), |y| = y (2 H(y) - 1), sign y = 2 H(y) - 1), every
    other function left alone: the form in which quadrature splits its domain at the kinks.
    An expression without such a function is returned as it is (rebuilding the whole tree
    cost a fifth of the projections of a three-token tanh statistic)."""
    from .gaussian import dag_any
    kinks = (sp.Max, sp.Min, sp.Abs, sp.sign)
    if not dag_any(expr, lambda x: isinstance(x, kinks)):
        return expr

    def rw(x):
        if not (x.free_symbols & random) or x.is_Atom:
            return x
        args = [rw(a) for a in x.args]
        f = x.func
        if f is sp.Max or f is sp.Min:
            return _max_terms(args, 1 if f is sp.Max else -1, random).replace(
                lambda e: isinstance(e, _H), lambda e: sp.Heaviside(e.args[0], sp.Rational(1, 2)))
        if f is sp.Abs:
            return args[0] * (2 * sp.Heaviside(args[0], sp.Rational(1, 2)) - 1)
        if f is sp.sign:
            return 2 * sp.Heaviside(args[0], sp.Rational(1, 2)) - 1
        return x.func(*args)

    return rw(sp.sympify(expr))


#: the functions rewrite knows (Max and Min are not sp.Function instances): a family added to
#: rewrite's rw goes here too, or the first walk refuses it
#: (test_rewrite_refuses_the_same_links_with_or_without_its_first_walk)
_FAMILIES = (sp.exp, sp.erf, sp.erfc, sp.Heaviside, sp.sign, sp.Abs, sp.DiracDelta, sp.cos,
             sp.sin)


def rewrite(expr, random: set):
    """The integrand in the internal vocabulary (_P, _H, _D, exp, polynomials); NoClosedForm
    for any function outside the families of this module (found first by a walk over the
    distinct sub-expressions: tanh(z1) anywhere is refused without rebuilding the rest)."""
    free = {}  # dag_free_symbols' memo: x.free_symbols walked every subtree at every level
    if dag_any(expr, lambda x: isinstance(x, sp.Function) and not isinstance(x, _FAMILIES)
               and bool(dag_free_symbols(x, free) & random)):
        raise NoClosedForm(expr)

    def rw(x):
        if not (dag_free_symbols(x, free) & random):
            return x
        if x.is_Symbol:
            return x
        if x.is_Add or x.is_Mul:
            return x.func(*[rw(a) for a in x.args])
        if x.is_Pow:
            if x.exp.is_Integer and x.exp >= 0:
                return rw(x.base) ** x.exp
            if x.base is sp.E:
                return sp.exp(rw(x.exp))
            raise NoClosedForm(x)
        f = x.func  # every function handled below is in _FAMILIES
        if f is sp.exp:
            return sp.exp(rw(x.args[0]))
        if f is sp.erf:
            return 2 * _P(sp.sqrt(2) * rw(x.args[0])) - 1
        if f is sp.erfc:
            return 2 * _P(-sp.sqrt(2) * rw(x.args[0]))
        if f is sp.Heaviside:
            return _H(rw(x.args[0]))
        if f is sp.sign:
            return 2 * _H(rw(x.args[0])) - 1
        if f is sp.Abs:
            y = rw(x.args[0])
            return y * (2 * _H(y) - 1)
        if f is sp.Max:
            return _max_terms([rw(a) for a in x.args], 1, random)
        if f is sp.Min:
            return _max_terms([rw(a) for a in x.args], -1, random)
        if f is sp.DiracDelta:
            if len(x.args) > 1 and x.args[1] != 0:
                raise NoClosedForm(x)
            return _D(rw(x.args[0]))
        if f is sp.cos:
            y = rw(x.args[0])
            return (sp.exp(sp.I * y) + sp.exp(-sp.I * y)) / 2
        if f is sp.sin:
            y = rw(x.args[0])
            return (sp.exp(sp.I * y) - sp.exp(-sp.I * y)) / (2 * sp.I)
        raise NoClosedForm(x)

    return rw(sp.sympify(expr))


def _expanded_terms(expr, random) -> list:
    """The terms of the expansion of a rewritten integrand (sums and integer powers of sums of
    the variables and of the function atoms _P, _H, _D, exp), multiplied out as dictionaries
    {monomial in the variables and atoms: coefficient}: pairs (coefficient free of the
    variables, product of powers of variables and atoms), the terms of
    sp.Add.make_args(sp.expand(expr)) up to the form of the coefficients, several times
    faster (sp.expand re-flattens every partial product)."""
    atoms = {}
    # the coefficients (the subexpressions free of the variables: polynomials or rational
    # functions of the state and parameters) multiplied as elements of one field of rational
    # functions, each product reduced at once; as SymPy products they were expanded at the
    # end, most of the time of a product of statistics with encoding
    leaves = []
    free = {}  # dag_free_symbols' memo, for collect and walk

    def collect(x):
        if not (dag_free_symbols(x, free) & random):
            leaves.append(x)
        elif not x.is_Symbol and (x.is_Add or x.is_Mul or (
                x.is_Pow and x.exp.is_Integer and x.exp >= 0)):
            for a in x.args:
                collect(a)

    collect(expr)
    got = _field_of(leaves + [sp.Integer(1)]) if leaves else None
    if got is not None and _Fraction.applies(got[0]):
        # products and sums as unreduced fractions, reduced once per term at the end
        dom, elems, back = got
        to_field = dict(zip(leaves, (_Fraction.of(x) for x in elems)))
        one, zero = _Fraction.unit(dom, 1), _Fraction.unit(dom, 0)
        coefficient = to_field.__getitem__
        to_expr = lambda c: back(_fraction_expr(dom, c.element(dom)))
    elif got is not None:
        dom, elems, back = got
        to_field = dict(zip(leaves, elems))
        one, zero = dom.one, dom.zero
        coefficient = to_field.__getitem__
        to_expr = lambda c: back(_fraction_expr(dom, c))
    else:
        one, zero = sp.Integer(1), 0
        coefficient = lambda x: x
        to_expr = sp.expand

    def atom(x):  # a function atom with its argument expanded (as sp.expand would)
        hit = atoms.get(x)
        if hit is None:
            hit = atoms[x] = x.func(*[sp.expand(a) for a in x.args])
        return hit

    times = multiply_terms

    def walk(x):
        if not (dag_free_symbols(x, free) & random):
            return {frozenset(): coefficient(x)}
        if x.is_Symbol:
            return {frozenset({(x, 1)}): one}
        if x.is_Add:
            out = {}
            for a in x.args:
                for k, c in walk(a).items():
                    out[k] = out.get(k, zero) + c
            return out
        if x.is_Mul:
            out = {frozenset(): one}
            for a in x.args:
                out = times(out, walk(a))
            return out
        if x.is_Pow and x.exp.is_Integer and x.exp >= 0:
            base, out = walk(x.base), {frozenset(): one}
            for _ in range(int(x.exp)):
                out = times(out, base)
            return out
        return {frozenset({(atom(x), 1)}): one}

    terms = []
    for key, c in walk(expr).items():
        c = to_expr(c)
        if c != 0:
            terms.append((c, sp.Mul(*[a ** k for a, k in key])))
    return terms


class _Fraction:
    """num / den with num and den polynomials over QQ, multiplied and added without
    cancelling: an element of SymPy's field of rational functions cancels by a gcd at every
    product and sum (a third of the closed-form time of gelu((z1 + z2)/sqrt 2) against
    z1 + erfc(0.9 zs2)). A constant denominator is divided into the numerator; a polynomial
    one is cancelled when its degree exceeds MAX_DEGREE. element() is the reduced element of
    the field, the same whatever the order of the operations (a reduced fraction over ZZ with
    a positive leading denominator coefficient is unique)."""

    __slots__ = ("num", "den")
    MAX_DEGREE = 8

    def __init__(self, num, den):
        if den.is_ground:
            num, den = num.quo_ground(den.LC), den.ring.one
        elif max(map(sum, den.itermonoms())) > self.MAX_DEGREE:
            num, den = num.cancel(den)
        self.num, self.den = num, den

    @staticmethod
    def applies(dom) -> bool:
        """Whether dom is a field of rational functions over ZZ (not a ground domain, not
        the Gaussian integers of cos and sin)."""
        return getattr(dom, "is_FractionField", False) and dom.field.ring.domain == ZZ

    @classmethod
    def of(cls, x):
        """The fraction of an element of such a field."""
        R = x.field.ring
        RQ = R.clone(domain=QQ)
        return cls(x.numer.set_ring(RQ), x.denom.set_ring(RQ))

    @classmethod
    def unit(cls, dom, k):
        return cls.of(dom.field.one if k else dom.field.zero)

    def __mul__(self, other):
        return _Fraction(self.num * other.num, self.den * other.den)

    def __add__(self, other):
        if self.den == other.den:
            return _Fraction(self.num + other.num, self.den)
        return _Fraction(self.num * other.den + other.num * self.den, self.den * other.den)

    def element(self, dom):
        """The reduced element of dom's field."""
        R = dom.field.ring
        cn, num = self.num.clear_denoms()
        cd, den = self.den.clear_denoms()
        return dom.field.new(num.set_ring(R) * R.domain.convert(cd),
                             den.set_ring(R) * R.domain.convert(cn))


def _dot(a, v):
    """sum_i a_i v_i, skipping zero products: SymPy's 0 * x asks whether x is finite, which
    walks the whole of a large x."""
    return sp.Add(*[ai * vi for ai, vi in zip(a, v) if ai != 0 and vi != 0])


def _simplify_entry(x):
    """A covariance entry in a light normal form: expanded, and cancelled only when it has a
    non-numeric denominator."""
    x = sp.expand(x)
    if x.is_Add and any(not sp.fraction(t)[1].is_number for t in x.args):
        return sp.cancel(x)
    return x


_THRESHOLDS = (sp.erf, sp.erfc, sp.Heaviside, sp.sign, sp.Abs)


def _affine(y, xs):
    """(a, b) with y = a.x + b, or NoClosedForm."""
    try:
        P = sp.Poly(y, *xs)
    except sp.PolynomialError:
        raise NoClosedForm(y) from None
    if P.total_degree() > 1:
        raise NoClosedForm(y)
    a = tuple(P.coeff_monomial(x) for x in xs)
    b = P.coeff_monomial(1)
    return a, b


def _split_factors(term, random):
    """The factors of a product, with a power of a sum or product that mixes constants and
    exponentials of the variables split up: 1 / (c exp(y^2/2) - c' exp(y^2/2)), which
    sp.expand makes of (1 / (c - c')) exp(-y^2/2), gives 1 / (c - c') and exp(-y^2/2)."""
    out = []
    for f in sp.Mul.make_args(term):
        if (f.is_Pow and f.exp.is_Integer and f.exp < 0 and (f.base.is_Add or f.base.is_Mul)
                and f.base.free_symbols & random):
            base = sp.factor_terms(f.base)
            if base.is_Mul:
                parts = [g ** f.exp for g in base.args]
                out.extend(x for g in parts for x in sp.Mul.make_args(sp.powsimp(g)))
                continue
        out.append(f)
    return out


def _field_of(exprs):
    """(domain, elements, back) with the expressions as elements of one field of rational
    functions and back(expr) undoing the renaming; irrational constants (sqrt(2), pi) are
    generators of that field. None when the expressions are not rational functions."""
    exprs = [sp.sympify(e) for e in exprs]
    # an irrational algebraic number among the polynomial factors (sqrt(2), 1/sqrt(3)) is a
    # generator, which makes construct_domain give EX after its expansion of every
    # numerator and denominator (a third of the time of this function on a slow link):
    # straight to the renamed constants then
    algebraic = _algebraic_factor(exprs)
    dom, elems = (None, None) if algebraic else construct_domain(exprs, field=True)
    if algebraic or dom.is_EX or dom.is_EXRAW:
        consts = {a for e in exprs for a in e.atoms(sp.Pow, sp.Function)
                  if a.is_number and not a.is_Rational}
        if not consts:
            return None
        names = {c: sp.Dummy(f"c{i}") for i, c in enumerate(consts)}
        dom, elems = construct_domain([e.xreplace(names) for e in exprs], field=True)
        if dom.is_EX or dom.is_EXRAW:
            return None
        inverse = {v: c for c, v in names.items()}
        return dom, elems, lambda x: x.xreplace(inverse)
    return dom, elems, lambda x: x


def _algebraic_factor(exprs) -> bool:
    """Whether an irrational algebraic number (sqrt(2), 3**(1/3), 1 + sqrt(2)) occurs among
    the polynomial factors of the expressions (through sums, products and integer powers,
    not inside functions or fractional powers of non-numbers): construct_domain's
    generators then hold it, and it gives EX."""
    seen = set()

    def walk(x):
        if x in seen:
            return False
        seen.add(x)
        if x.is_Add or x.is_Mul:
            return any(walk(a) for a in x.args)
        if x.is_Pow and x.exp.is_Integer:
            return walk(x.base)
        return bool(x.is_number and not x.is_Rational and x.is_Pow and x.is_algebraic)

    return any(walk(e) for e in exprs)


def _as_fractions(exprs):
    """Each expression as one reduced fraction of expanded polynomials when they are rational
    functions of the state (sums of the fractions of nested completed squares otherwise grow
    term by term, and every exp and mean built from them with them), else expanded."""
    got = _field_of(exprs)
    if got is None:
        return [sp.expand(e) for e in exprs]
    dom, elems, back = got
    return [back(_fraction_expr(dom, x)) for x in elems]


def _completed_covariance(S, used, A):
    """(det(I + A S_SS), S - S_:S (I + A S_SS)^-1 A S_S:) of a completed square, its entries
    as reduced rational functions of the state. The algebra runs in the field of rational
    functions (every product reduced at once); in SymPy expressions the unreduced entries
    of nested completions grow to tens of thousands of operations before they cancel."""
    n, k = S.shape[0], len(used)
    got = _field_of(list(S) + list(A))
    if got is None:  # not rational functions: plain SymPy, cancelled at the end
        S_SS, S_allS = S.extract(used, used), S.extract(list(range(n)), used)
        Mk = sp.eye(k) + A * S_SS
        det = sp.expand(Mk.det())
        if det == 0:
            return det, None
        S2 = (S - S_allS * (Mk.adjugate() / det) * A * S_allS.T).applyfunc(_simplify_entry)
        return det, S2
    dom, elems, back = got
    dS = DomainMatrix([elems[i * n:(i + 1) * n] for i in range(n)], (n, n), dom)
    dA = DomainMatrix([elems[n * n + i * k:n * n + (i + 1) * k] for i in range(k)], (k, k),
                      dom)
    # fraction-free: S = N / delta and A = N_A / alpha over the polynomial ring, so that
    # I + A S_SS = Mn / (alpha delta) with Mn = alpha delta I + N_A N_SS and
    #   S' = [N det(Mn) - N_:S adj(Mn) N_A N_S:] / (delta det(Mn)),
    #   det(I + A S_SS) = det(Mn) / (alpha delta)^k,
    # every product a polynomial one; one gcd per entry at the end (in the field every
    # product of the matrix algebra took its own gcd)
    delta, N = dS.clear_denoms(convert=True)
    alpha, NA = dA.clear_denoms(convert=True)
    ring = N.domain
    delta, alpha = ring.convert(delta.element, delta.domain), ring.convert(alpha.element,
                                                                           alpha.domain)
    NA = NA.convert_to(ring)
    N_SS, N_allS = N.extract(used, used), N.extract(list(range(n)), used)
    Mn = DomainMatrix.eye(k, ring) * (alpha * delta) + NA * N_SS
    adj, det_n = Mn.adj_det()
    if not det_n:
        return sp.Integer(0), None
    num = N * det_n - N_allS * adj * NA * N_allS.transpose()
    den = dom.convert(delta * det_n, ring)
    to_expr = lambda x: back(_fraction_expr(dom, x))
    S2 = [to_expr(dom.convert(x, ring) / den) for row in num.to_list() for x in row]
    det = dom.convert(det_n, ring) / dom.convert((alpha * delta) ** k, ring)
    return to_expr(det), sp.Matrix(n, n, S2)


def _fraction_expr(dom, x):
    """A field element as numerator / denominator, both expanded polynomials."""
    if not hasattr(x, "numer"):  # an element of the ground domain (QQ, or QQ_I: cos, sin)
        return sp.expand(dom.to_sympy(x))
    num, den = x.numer.as_expr(), x.denom.as_expr()
    if den.is_number:  # a complex constant (cos, sin) is not distributed by Mul itself
        return sp.expand(num / den)
    return num / den


class GaussianClosedForm:
    """Closed-form E[integrand] over x ~ N(mean, cov) (see the module docstring).

    `conditions` collects the expressions that must be positive for the expectations computed
    so far to exist (det(I + A Sigma) of every completed square)."""

    def __init__(self, variables, mean, cov, orthant_quadrature: bool = False):
        self.xs = tuple(variables)
        self.orthant_quadrature = orthant_quadrature
        self.mean = tuple(sp.sympify(m) for m in mean)
        self.cov = sp.Matrix(cov)
        self.conditions = []
        self._memo = {}
        self._affine_memo = {}  # y -> (a, b) with y = a.x + b
        self._completed = {}  # (S, used, A) -> _completed_covariance(S, used, A)
        self._conditioned = {}  # (S, delta form) -> (S a, a^T S a, conditioned covariance)
        self._threshold_memos = ({}, {}, {})  # terms_refused's, for this engine's variables
        self._expanded = {}  # functions -> terms of their rewritten expansion (or the refusal)
        self._terms = {}  # E[monomial * atoms] of the expanded terms
        self._squares = {}  # (mu, S, Q) -> the completed square of exp(Q) under N(mu, S)
        self._reach = {}  # memo key -> the keys of its reduction (itself included)
        self._frames = [set()]  # keys reached by the sub-problems in progress
        self._seen = set()  # every key the current term has reached (see expect)

    # --- parsing -------------------------------------------------------------------------
    def expect(self, expr):
        """E[expr]; NoClosedForm when a factor is outside the families, or when the reduction
        of a term of its expansion reaches more than MAX_REDUCTIONS sub-problems (high
        polynomial degrees times several thresholds: the closed form would be huge and slow,
        quadrature is the better tool). The budget is per term, so that a sum given whole is
        as closable as its terms given one by one, and counts every sub-problem the term
        reaches, memoised or not, so that the outcome does not depend on what this engine
        computed before: the same expression always gets the same value or refusal."""
        random = set(self.xs)
        expr = sp.sympify(expr)
        # a product const * monomial * functions: the functions' rewritten expansion is shared
        # by every statistic with the same functions (a product of statistics has hundreds of
        # such terms, the expansion of the rewritten kinks was most of the time)
        const, mono, funcs = [], [], []
        for f in sp.Mul.make_args(expr):
            b, e = f.as_base_exp()
            if not (dag_free_symbols(f) & random):
                const.append(f)
            elif b in random and e.is_Integer and e > 0:
                mono.append(f)
            else:
                funcs.append(f)
        skeleton = sp.Mul(*funcs)
        hit = self._expanded.get(skeleton)
        if hit is None:
            if _threshold_count(skeleton, random) > self._most_thresholds:
                hit = TooComplex(f"more than {self._most_thresholds} thresholds")
            elif self._erf_terms_refused(skeleton, random):
                hit = TooComplex("a term of its expansion has too many thresholds")
            else:
                try:
                    hit = _expanded_terms(rewrite(skeleton, random), random)
                except NoClosedForm as err:
                    hit = err
            self._expanded[skeleton] = hit
        if isinstance(hit, NoClosedForm):
            raise hit
        mono = sp.Mul(*mono)
        keys = [rest * mono for _, rest in hit]
        # every term planned before any is solved: a term that cannot close (three
        # thresholds with a mean shift) stops the whole expectation before the reductions
        plans = {k: self._plan_term(k) for k in keys if k not in self._terms}
        parts = []
        for (c, _), key in zip(hit, keys):  # E[c rest mono] = c E[rest mono], memoised
            value = self._terms.get(key)
            if value is None:
                coef, plan = plans[key]
                self._frames, self._seen = [set()], set()  # per term (see the docstring)
                value = self._terms[key] = coef * self._solve_plan(plan)
            parts.append(c * value)
        total = sp.Mul(*const) * sp.Add(*parts)
        if total.has(sp.I):
            if complex_inside_function(total):
                # erf of a complex argument (a threshold times cos or sin): no real closed
                # form here (real_part would refuse it after its walk)
                raise NoClosedForm(expr)
            total = real_part(total)
            if total is None:  # i inside a fractional power
                raise NoClosedForm(expr)
        return total

    def _solve_plan(self, plan):
        return sp.Add(*[sign * self._solve(self.mean, self.cov, *args) for sign, args in plan])

    def _plan_term(self, term):
        """(coefficient, [(sign, arguments of _solve)]) of a product term, or NoClosedForm
        before any reduction when the term cannot close (too many thresholds)."""
        xs = self.xs
        coef, mono, Q = sp.Integer(1), [0] * len(xs), sp.Integer(0)
        phis, hs0, ds = [], [], []
        for f in _split_factors(term, set(xs)):
            base, k = (f.base, f.exp) if f.is_Pow else (f, sp.Integer(1))
            if not (f.free_symbols & set(xs)):
                coef *= f
            elif base.is_Symbol and base in xs and k.is_Integer and k > 0:
                mono[xs.index(base)] += int(k)
            elif isinstance(base, sp.exp) or base is sp.E:
                Q += k * (base.args[0] if isinstance(base, sp.exp) else 1)
            elif isinstance(f, sp.exp):
                Q += f.args[0]
            elif isinstance(base, _P) and k.is_Integer and k > 0:
                phis.extend([base.args[0]] * int(k))
            elif isinstance(base, _H) and k.is_Integer and k > 0:
                hs0.append(base.args[0])
            elif isinstance(base, _D) and k == 1:
                ds.append(base.args[0])
            else:
                raise NoClosedForm(f)
        phis = tuple(self._affine(y) for y in phis)
        hs = []
        for a, b in (self._affine(y) for y in hs0):  # H(c y) = H(y) for c > 0
            scale = abs(next(c for c in a if c != 0))
            form = (tuple(sp.expand(c / scale) for c in a), sp.expand(b / scale))
            if (tuple(-c for c in form[0]), -form[1]) in hs:
                return sp.Integer(0), []  # H(y) H(-y) = 0 almost surely
            if form not in hs:
                hs.append(form)
        ds = tuple(self._affine(y) for y in ds)
        plan = []
        for sign, hs1 in _merge_parallel_steps(hs):
            # the orthant probability at the end of every reduction keeps all thresholds:
            # more than three (or three with a mean shift) cannot close, stop at once (up to
            # four Phi factors with orthant_quadrature: Plackett's one-dimensional integral)
            n = len(phis) + len(hs1)
            closed = n < 3 or (n == 3 and all(_zero_mean(f, self.mean) for f in phis + hs1))
            if not closed and not (self.orthant_quadrature and not hs1 and n <= 4):
                raise TooComplex(f"{n} thresholds")
            plan.append((sign, (tuple(mono), sp.expand(Q), phis, hs1, ds)))
        return coef, plan

    def _erf_terms_refused(self, expr, random) -> bool:
        """Whether some term of the expansion of expr has more thresholds than an orthant
        probability with a closed form (thresholds.terms_refused), decided before the
        expansion."""
        def affine(y):
            try:
                return self._affine(y)
            except NoClosedForm:
                return None

        return terms_refused(expr, random, affine, self.mean, self.orthant_quadrature,
                             self._threshold_memos)

    @property
    def _most_thresholds(self) -> int:
        return 4 if self.orthant_quadrature else 3

    def _affine(self, y):
        hit = self._affine_memo.get(y)
        if hit is None:
            hit = self._affine_memo[y] = _affine(sp.expand(y), self.xs)
        return hit

    # --- the recursion -------------------------------------------------------------------
    def _solve(self, mu, S, mono, Q, phis, hs, ds):
        """The memoised reduction of one sub-problem. Each memo entry keeps the keys of its
        whole reduction (`_reach`), which a hit adds to the current term's `_seen`: the term
        is refused as soon as it has reached more than MAX_REDUCTIONS distinct sub-problems,
        which happens exactly when its whole reduction has more, memo or no memo."""
        key = (mu, tuple(S), mono, Q, phis, hs, ds)
        hit = self._memo.get(key)
        if hit is not None:
            reach = self._reach[key]
            self._frames[-1] |= reach
            self._seen |= reach
        else:
            self._seen.add(key)
            if len(self._seen) > MAX_REDUCTIONS:
                raise TooComplex("too many reductions")
            self._frames.append({key})
            hit = self._memo[key] = self._solve_uncached(mu, S, mono, Q, phis, hs, ds)
            reach = self._reach[key] = frozenset(self._frames.pop())
            self._frames[-1] |= reach
        if len(self._seen) > MAX_REDUCTIONS:
            raise TooComplex("too many reductions")
        return hit

    def _solve_uncached(self, mu, S, mono, Q, phis, hs, ds):
        n = len(self.xs)
        if ds:  # condition on the first delta's hyperplane
            (a, b), rest = ds[0], ds[1:]
            nu = sp.expand(_dot(a, mu) + b)
            # the conditioned covariance depends on S and the form only: once for all the
            # monomials, thresholds and means that reach it (701 of f1031's sub-problems)
            key = (tuple(S), a)
            hit = self._conditioned.get(key)
            if hit is None:
                av = sp.Matrix(a)
                Sa = S * av
                s2 = sp.expand((av.T * Sa)[0])
                S2 = None if s2 == 0 else (S - Sa * Sa.T / s2).applyfunc(_simplify_entry)
                hit = self._conditioned[key] = (Sa, s2, S2)
            Sa, s2, S2 = hit
            if s2 == 0:
                raise NoClosedForm("delta of a degenerate form")
            mu2 = tuple(sp.expand(mu[i] - Sa[i] * nu / s2) for i in range(n))
            factor = sp.exp(-nu ** 2 / (2 * s2)) / sp.sqrt(2 * sp.pi * s2)
            return factor * self._solve(mu2, S2, mono, Q, phis, hs, rest)
        if Q != 0:
            return self._complete_square(mu, S, mono, Q, phis, hs)
        i = next((i for i, k in enumerate(mono) if k), None)
        if i is not None:
            return self._stein(mu, S, mono, i, phis, hs)
        return self._orthant(mu, S, phis, hs)

    def _complete_square(self, mu, S, mono, Q, phis, hs):
        key = (mu, tuple(S), Q)  # shared by every monomial and threshold set
        hit = self._squares.get(key)
        if hit is None:
            hit = self._squares[key] = self._square(mu, S, Q)
        det, Z, mu2, S2 = hit
        self.conditions.append(det)
        return Z * self._solve(mu2, S2, mono, sp.Integer(0), phis, hs, ())

    def _square(self, mu, S, Q):
        """(det(I + A Sigma), exp(...) / sqrt(det), mean, covariance) of the Gaussian
        N(mu, S) tilted by exp(Q), Q quadratic in the variables: E[exp(Q) f(x)] =
        exp(...) / sqrt(det) E'[f(x)] under the returned mean and covariance."""
        xs, n = self.xs, len(self.xs)
        try:
            P = sp.Poly(Q, *xs)
        except sp.PolynomialError:
            raise NoClosedForm(sp.exp(Q)) from None
        if P.total_degree() > 2:
            raise NoClosedForm(sp.exp(Q))
        used = [i for i in range(n) if P.degree(xs[i]) > 0]
        k = len(used)
        A = sp.zeros(k, k)
        B = sp.zeros(k, 1)
        for r, i in enumerate(used):
            B[r] = P.coeff_monomial(xs[i])
            for c, j in enumerate(used):
                if i == j:
                    A[r, c] = -2 * P.coeff_monomial(xs[i] ** 2)
                else:
                    A[r, c] = -P.coeff_monomial(xs[i] * xs[j])
        c0 = P.coeff_monomial(1)
        key = (tuple(S), tuple(used), tuple(A))
        hit = self._completed.get(key)
        if hit is None:
            hit = self._completed[key] = _completed_covariance(S, used, A)
        det, S2 = hit
        if det == 0:
            raise NoClosedForm("singular completed square")
        # b = B - A mu_used, shift = S2[:, used] b, expo = c0 + B.mu - mu.A.mu / 2 + b.S2.b / 2
        # (products by _dot: a zero mean, zero b or zero entries multiply nothing)
        muS = [mu[i] for i in used]
        Amu = [_dot([A[r, c] for c in range(k)], muS) for r in range(k)]
        b = [B[r] - Amu[r] for r in range(k)]
        S2b = [_dot([S2[i, j] for j in used], b) for i in range(n)]
        expo = (c0 + _dot([B[r] for r in range(k)], muS) - _dot(muS, Amu) / 2
                + _dot(b, [S2b[i] for i in used]) / 2)
        *mu2, expo = _as_fractions([mu[i] + S2b[i] for i in range(n)] + [expo])
        return det, sp.exp(expo) / sp.sqrt(det), tuple(mu2), S2

    def _stein(self, mu, S, mono, i, phis, hs):
        n = len(self.xs)
        m1 = list(mono)
        m1[i] -= 1
        out = []
        if mu[i] != 0:
            out.append(mu[i] * self._solve(mu, S, tuple(m1), sp.Integer(0), phis, hs, ()))
        for j in range(n):  # derivative of the remaining monomial
            if m1[j] and S[i, j] != 0:
                m2 = list(m1)
                m2[j] -= 1
                out.append(S[i, j] * m1[j] * self._solve(mu, S, tuple(m2), sp.Integer(0),
                                                          phis, hs, ()))
        for k, (a, b) in enumerate(phis):  # d Phi(y) = a phi(y)
            w = sp.expand(sum(S[i, j] * a[j] for j in range(n)))
            if w == 0:
                continue
            y = sum(aj * x for aj, x in zip(a, self.xs)) + b
            rest = phis[:k] + phis[k + 1:]
            out.append(w / sp.sqrt(2 * sp.pi) * self._solve(
                mu, S, tuple(m1), sp.expand(-y ** 2 / 2), rest, hs, ()))
        for k, (a, b) in enumerate(hs):  # d H(y) = a delta(y)
            w = sp.expand(sum(S[i, j] * a[j] for j in range(n)))
            if w == 0:
                continue
            rest = hs[:k] + hs[k + 1:]
            out.append(w * self._solve(mu, S, tuple(m1), sp.Integer(0), phis, rest, ((a, b),)))
        return sp.Add(*out)

    def _orthant(self, mu, S, phis, hs):
        forms = [(a, b, 1) for a, b in phis] + [(a, b, 0) for a, b in hs]
        if not forms:
            return sp.Integer(1)
        nus = [sp.expand(_dot(a, mu) + b) for a, b, _ in forms]
        n = len(self.xs)
        Sa = [[_dot([S[r, c] for c in range(n)], a) for r in range(n)] for a, _, _ in forms]
        T = [[sp.expand(_dot(forms[i][0], Sa[j]) + (forms[i][2] if i == j else 0))
              for j in range(len(forms))] for i in range(len(forms))]
        if len(forms) == 1:
            if T[0][0] == 0:
                return sp.Heaviside(nus[0], sp.Rational(1, 2))
            return _Phi(nus[0] / sp.sqrt(T[0][0]))
        sure = [i for i in range(len(forms)) if T[i][i] == 0]
        if sure:  # a form of zero variance is its mean: H(nu) (H(0) = 1/2)
            out = sp.Integer(1)
            for i in sure:
                out *= sp.Heaviside(nus[i], sp.Rational(1, 2))
            keep = [i for i in range(len(forms)) if i not in sure]
            return out * self._orthant(
                mu, S, [forms[i][:2] for i in keep if forms[i][2]],
                [forms[i][:2] for i in keep if not forms[i][2]])
        rho = lambda i, j: T[i][j] / sp.sqrt(T[i][i] * T[j][j])
        zero_mean = all(nu == 0 for nu in nus)
        if len(forms) == 2:
            if zero_mean:
                return sp.Rational(1, 4) + sp.asin(rho(0, 1)) / (2 * sp.pi)
            return NormalCDF2(nus[0] / sp.sqrt(T[0][0]), nus[1] / sp.sqrt(T[1][1]), rho(0, 1))
        if len(forms) == 3 and zero_mean:
            return (sp.Rational(1, 8) + (sp.asin(rho(0, 1)) + sp.asin(rho(0, 2))
                                         + sp.asin(rho(1, 2))) / (4 * sp.pi))
        if self.orthant_quadrature and not hs and len(forms) <= 4:
            n = len(forms)
            h = [nus[i] / sp.sqrt(T[i][i]) for i in range(n)]
            return NormalOrthant(*h, *[rho(i, j) for i in range(n) for j in range(i + 1, n)])
        raise TooComplex(f"orthant probability of dimension {len(forms)}")


class NormalOrthant(sp.Function):
    """P(Z <= h) for Z ~ N(0, R), R a correlation matrix of dimension n = 3 or 4: args
    (h_1, .., h_n, R_12, R_13, .., R_(n-1)n). No closed form: generated modules evaluate it by
    Plackett's one-dimensional integral (runtime._orthant, see the module docstring), a
    quadrature with the module's error bound."""

    nargs = (6, 10)
    #: evaluated by quadrature (Derivation.output_methods, has_quadrature)
    numeric_quadrature = True

    @property
    def dimension(self) -> int:
        return 3 if len(self.args) == 6 else 4

    def _latex(self, printer, exp=None):
        n = self.dimension
        h = ", ".join(printer._print(a) for a in self.args[:n])
        r = ", ".join(printer._print(a) for a in self.args[n:])
        out = rf"\Phi_{n}\left({h}; {r}\right)"
        return out if exp is None else rf"{out}^{{{exp}}}"

    def _sympystr(self, printer):
        return "NormalOrthant({})".format(", ".join(printer._print(a) for a in self.args))


__all__ = ["GaussianClosedForm", "NoClosedForm", "TooComplex", "NormalCDF2", "NormalOrthant",
           "rewrite", "kinks_as_steps"]
