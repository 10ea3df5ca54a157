"""Expectations over the token Gaussians of MATH.md section 2.

Given the overlaps, the tokens are independent. Token l carries the jointly Gaussian vector

    (z*_l, z_l, zeta_l1, ..., zeta_lr)   with mean (0, mu_l, 0, ..., 0),  mu_l = sum_a C[l,a] e_a,

    Var z*_l = 1, Var z_l = q, Cov(z*_l, z_l) = m, Cov(zeta_la, z_l) = e_a,
    Cov(zeta_la, zeta_lb) = delta_ab, zeta independent of z*,

and label noise adds K independent standard Gaussians xi_k (one per output entry).

Polynomial statistics are integrated exactly (:class:`ExactEngine`): an expression is held as a
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
from sympy.polys.rings import PolyElement, ring as poly_ring

from ..model.spec import ModelSpec, link_entries, token_symbols


class NotPolynomial(Exception):
    """Raised internally when a statistic is not polynomial in the Gaussian variables."""


class GaussHermite(sp.Function):
    """E_{u ~ N(0, I_k)}[ integrand(u) ]: an expectation kept explicit, done by quadrature.

    args = (integrand, Tuple(u_1, ..., u_k)); the u are independent standard Gaussians.
    """

    @classmethod
    def eval(cls, integrand, us):
        if not (integrand.free_symbols & set(us)):
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
        return integrate_deltas(sp.diff(self.integrand, s), self.variables)

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
    if not integrand.has(sp.DiracDelta):
        return GaussHermite(integrand, sp.Tuple(*us))
    smooth, groups = sp.Integer(0), {}
    for term in sp.Add.make_args(sp.expand(integrand)):
        deltas = [f for f in sp.Mul.make_args(term) if isinstance(f, sp.DiracDelta)]
        if not deltas:
            smooth += term
            continue
        if len(deltas) > 1 or len(deltas[0].args) > 1:
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
        directions: the K* teacher fields, the K student fields, then the zetas)."""
        return self.teacher_fields(l) + self.student_fields(l) + self.zeta[l]

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
# Exact engine: sums of products of per-token polynomial factors
# ----------------------------------------------------------------------------------------

def _radical_parts(x):
    """For a power of a positive rational with a rational exponent (sqrt(6), 2**(1/3),
    (2/3)**(-1/2)): (rational factor, {prime: exponent}) with x = factor * prod p**exponent and
    every exponent in [0, 1); None for anything else."""
    if not (x.is_Pow and x.base.is_Rational and x.base > 0 and x.exp.is_Rational
            and not x.exp.is_Integer):
        return None
    factor, out = sp.Integer(1), {}
    for num, sign in ((x.base.p, 1), (x.base.q, -1)):
        for prime, k in sp.factorint(num).items():
            e = sign * k * x.exp
            whole = sp.floor(e)
            factor *= sp.Integer(prime) ** whole
            if e - whole:
                out[prime] = e - whole
    return factor, out


def _constant_atoms(exprs, random, keep):
    """Sub-expressions free of the random variables that are not polynomial in `keep`.

    They become extra generators of the polynomial ring (exp(a^2), pi, log(2), sqrt(a), ...).
    Radicals of rationals are not atoms of their own: each prime p under a radical gets one
    generator p**(1/N_p) (N_p the common denominator of its exponents), so that products of
    radicals (sqrt(2) sqrt(6) = 2 sqrt(3)) stay in the ring. Returns (atoms, primes) with
    primes = {p: N_p}."""
    atoms, primes = {}, {}

    def walk(x):
        if x.is_Rational or x in keep:
            return
        if not (x.free_symbols & random):
            parts = _radical_parts(x)
            if parts is not None:
                for prime, e in parts[1].items():
                    primes[prime] = int(sp.ilcm(primes.get(prime, 1), e.q))
                return
            if x.is_Add or x.is_Mul or (x.is_Pow and x.exp.is_Integer and x.exp >= 0):
                for a in x.args:
                    walk(a)
            else:
                atoms.setdefault(x, sp.Dummy(f"c{len(atoms)}"))
                if x.is_Pow and x.exp.is_Rational:  # sqrt(a): the base may hold radicals
                    walk(x.base)
            return
        for a in x.args:
            walk(a)

    for ex in exprs:
        walk(sp.sympify(ex))
    return atoms, primes


def _ring_to_expr(ex, p):
    """ExactEngine.to_sympy: p.as_expr(*back_symbols), built term by term in canonical order
    (Mul: the number first, then the factors sorted by Basic.compare; Add: the number first,
    then the terms sorted by Basic.compare, as Mul.flatten and Add.flatten order them)."""
    from functools import cmp_to_key
    if not p:
        return sp.Integer(0)
    syms, to_number = ex._back_symbols, ex.R.domain.to_sympy
    const_idx, var_idx = ex._const_idx, ex._var_idx
    powers, const_parts = ex._powers, ex._const_parts
    rows = []
    numbers = ex._numbers
    for monom, coeff in p.items():
        num = numbers.get(coeff)
        if num is None:
            num = numbers[coeff] = to_number(coeff)
        factors = []
        cmon = tuple(monom[i] for i in const_idx)
        if any(cmon):  # constants (radicals, pi, ...) multiplied out by SymPy, once each
            part = const_parts.get(cmon)
            if part is None:
                part = sp.Mul(*[syms[i] ** e for i, e in zip(const_idx, cmon) if e]
                              ).as_coeff_Mul()
                const_parts[cmon] = part
            num = num * part[0]
            rest = part[1]
            if rest is not sp.S.One:
                factors.extend(rest.args if rest.is_Mul else (rest,))
        for i in var_idx:
            e = monom[i]
            if e:
                f = powers.get((i, e))
                if f is None:
                    f = powers[(i, e)] = syms[i] ** e
                factors.append(f)
        if not num.is_Number:
            return p.as_expr(*syms)
        rows.append((num, factors))
    distinct = {f for _, fs in rows for f in fs}
    if any(not (f.is_Symbol or f.is_Pow or f.is_NumberSymbol) for f in distinct):
        return p.as_expr(*syms)  # other constant factors: let SymPy combine them
    base = {f: f.as_base_exp()[0] for f in distinct}
    for _, fs in rows:  # beta and sqrt(beta) in one term: Mul makes beta**(3/2)
        if len(fs) > 1 and len({base[f] for f in fs}) != len(fs):
            return p.as_expr(*syms)
    rank = {f: k for k, f in enumerate(sorted(distinct, key=cmp_to_key(sp.Basic.compare)))}
    constant, terms, seen = sp.Integer(0), [], set()
    for num, fs in rows:
        if num is sp.S.Zero:
            continue
        if not fs:
            constant = constant + num
            continue
        fs.sort(key=rank.__getitem__)
        key = tuple(fs)
        if key in seen:  # two monomials with one SymPy form: let Add collect them
            return p.as_expr(*syms)
        seen.add(key)
        if num is sp.S.One:
            terms.append(fs[0] if len(fs) == 1 else sp.Mul._from_args(fs, True))
        else:
            terms.append(sp.Mul._from_args([num] + fs, True))
    # Add's order, sp.Basic.compare, without comparing whole terms: objects of different
    # classes are ordered by their classes alone; two products by their number of arguments,
    # then argument by argument, so a rank of every distinct argument (and bare factor) does
    # it (Basic.compare reads _hashable_content, which is args for Mul)
    compare = cmp_to_key(sp.Basic.compare)
    reps = {}
    for t in terms:
        reps.setdefault(type(t), t)
    cls_rank = {c: k for k, c in enumerate(sorted(reps, key=lambda c: compare(reps[c])))}
    objs = {a for t in terms for a in (t.args if t.is_Mul else (t,))}
    arg_rank = {a: k for k, a in enumerate(sorted(objs, key=compare))}
    terms.sort(key=lambda t: (cls_rank[type(t)], len(t.args),
                              tuple(arg_rank[a] for a in t.args)) if t.is_Mul
               else (cls_rank[type(t)], arg_rank[t]))
    if constant != 0:
        terms.insert(0, constant)
    if not terms:
        return sp.Integer(0)
    return terms[0] if len(terms) == 1 else sp.Add._from_args(terms, True)


class ExactEngine:
    """Exact expectations of polynomial statistics, token by token.

    A statistic is held as a dict {factors: scale} in which `factors` has one polynomial per
    group (tokens 1..L, the noise, and a constant group for parameters and constants) and
    `scale` is rational; its value is sum scale * prod_g factor_g, and, the groups being
    independent, its expectation is sum scale * prod_g E_g[factor_g].
    """

    def __init__(self, gauss: TokenGaussian, exprs, extra_symbols=()):
        self.g = gauss
        rv = gauss.random_variables
        self.random = set(rv)
        overlaps = tuple(s for s in gauss.state if isinstance(s, sp.Symbol))
        syms = set()
        for ex in exprs:
            syms |= sp.sympify(ex).free_symbols
        params = tuple(sorted((syms - self.random - set(overlaps)) | set(extra_symbols),
                              key=str))
        self.atoms, primes = _constant_atoms(exprs, self.random, set(params))
        self.prime_gens = {p: (sp.Dummy(f"r{p}"), n) for p, n in sorted(primes.items())}
        gens = (rv + overlaps + params + tuple(self.atoms.values())
                + tuple(d for d, _ in self.prime_gens.values()))
        self.R, *gs = poly_ring(list(gens), sp.QQ)
        self.gen = dict(zip(gens, gs))
        self.back = {v: k for k, v in self.atoms.items()}
        self.back.update({d: sp.Integer(p) ** sp.Rational(1, n)
                          for p, (d, n) in self.prime_gens.items()})
        # radicals: c**n is known for c = p**(1/n) (a prime) and for c = b**(k/n) (b polynomial
        # in the parameters, k > 0); powers are reduced as they appear
        self.reducers = {gens.index(d): (n, sp.QQ(p)) for p, (d, n) in self.prime_gens.items()}
        for a, dummy in self.atoms.items():
            if a.is_Pow and a.exp.is_Rational and a.exp > 0 and not a.exp.is_Integer:
                try:
                    base = self._const_raw(a.base ** a.exp.p)
                except NotPolynomial:
                    continue
                self.reducers[gens.index(dummy)] = (int(a.exp.q), base)
        # groups: tokens, noise, constants
        self.n_groups = gauss.L + 2
        self.group_of = {}
        self.group_index = []
        for l in range(gauss.L):
            idx = [gens.index(v) for v in gauss.token_variables(l)]
            self.group_index.append(idx)
            for v in gauss.token_variables(l):
                self.group_of[v] = l
        self.group_index.append([gens.index(v) for v in gauss.xi])
        for v in gauss.xi:
            self.group_of[v] = gauss.L
        self.const_group = gauss.L + 1
        self.one = self.R.one
        self._fac = [[self.one] for _ in range(self.n_groups)]
        self._fid = [{self.one: 0} for _ in range(self.n_groups)]
        self._moments = {}
        self._expect_cache = {}
        self._mul_cache = {}
        self._spt_cache = {}
        self._parities, self._key_parities = {}, {}
        self._cov = []
        for l in range(gauss.L):
            cov = gauss.token_covariance(l)
            self._cov.append([[self._const(cov[i, j]) for j in range(cov.cols)]
                              for i in range(cov.rows)])
        self._means = [[self._const(mu) for mu in gauss.token_mean(l)] for l in range(gauss.L)]

    # --- conversion ------------------------------------------------------------------------
    def _const_raw(self, x):
        """A ring element for a polynomial in the parameters with rational coefficients (the
        value of a parameter radical's power; used before the reducers exist)."""
        try:
            return self.R.from_expr(sp.sympify(x))
        except (sp.PolynomialError, ValueError, TypeError, KeyError):
            raise NotPolynomial(x) from None

    def _const(self, x):
        """A ring element for an expression free of random variables."""
        x = sp.sympify(x)
        if x.is_Rational:
            return self.R(sp.QQ(int(x.p), int(x.q)))
        if x in self.gen:
            return self.gen[x]
        if x in self.atoms:
            return self.gen[self.atoms[x]]
        parts = _radical_parts(x)
        if parts is not None:
            out = self.R(sp.QQ(int(parts[0].p), int(parts[0].q)))
            for prime, e in parts[1].items():
                if prime not in self.prime_gens:
                    raise NotPolynomial(x)
                d, n = self.prime_gens[prime]
                out = out * self.gen[d] ** int(e * n)
            return self._reduce(out)
        if x.is_Add:
            return sum((self._const(a) for a in x.args), self.R.zero)
        if x.is_Mul:
            out = self.one
            for a in x.args:
                out = self._reduce(out * self._const(a))
            return out
        if x.is_Pow and x.exp.is_Integer and x.exp >= 0:
            return self._reduce(self._const(x.base) ** int(x.exp))
        raise NotPolynomial(x)

    def _reduce(self, p):
        """Replace c**n by its known value for every radical generator c (p**(1/n) -> p)."""
        if not self.reducers or not p:
            return p
        if not any(mon[i] >= n for mon in p.itermonoms() for i, (n, _) in self.reducers.items()):
            return p
        rational, rest = {}, self.R.zero  # terms reduced by rationals (primes' radicals) are
        zero = self.R.domain.zero           # collected in one dict, not added one by one
        for mon, coef in p.items():
            mon = list(mon)
            factor = None  # the product of the parameter radicals' powers met in this term
            for i, (n, value) in self.reducers.items():
                k = mon[i]
                if k >= n:
                    if isinstance(value, PolyElement):
                        factor = value ** (k // n) if factor is None else factor * value ** (k // n)
                    else:
                        coef = coef * value ** (k // n)
                    mon[i] = k % n
            mon = tuple(mon)
            if factor is None:
                rational[mon] = rational.get(mon, zero) + coef
            else:
                rest += factor * self.R({mon: coef})
        out = self.R.from_dict({m: c for m, c in rational.items() if c}) + rest
        return self._reduce(out)

    def _intern(self, group, poly):
        """(id, lc): the id of the monic polynomial poly / lc in `group`'s factor table."""
        lc = poly.LC
        if lc != 1:
            poly = poly.quo_ground(lc)
        table = self._fid[group]
        i = table.get(poly)
        if i is None:
            i = table[poly] = len(self._fac[group])
            self._fac[group].append(poly)
        return i, lc

    def _single(self, group, poly):
        if not poly:
            return {}
        i, lc = self._intern(group, poly)
        key = [0] * self.n_groups
        key[group] = i
        return {tuple(key): lc}

    def to_spt(self, expr):
        """Convert a SymPy expression polynomial in the random variables to factored form:
        a dict {factor ids (one per group): rational scale}."""
        expr = sp.sympify(expr)
        hit = self._spt_cache.get(expr)
        if hit is not None:
            return hit
        if not (expr.free_symbols & self.random):
            out = self._single(self.const_group, self._const(expr))
        elif expr.is_Symbol:
            out = self._single(self.group_of[expr], self.gen[expr])
        elif expr.is_Add:
            out = {}
            for a in expr.args:
                out = self.add(out, self.to_spt(a))
        elif expr.is_Mul:
            out = None
            for a in expr.args:
                s = self.to_spt(a)
                out = s if out is None else self.mul(out, s)
        elif expr.is_Pow and expr.exp.is_Integer and expr.exp >= 0:
            out = self.power(self.to_spt(expr.base), int(expr.exp))
        else:
            raise NotPolynomial(expr)
        self._spt_cache[expr] = out
        return out

    # --- algebra on factored forms ---------------------------------------------------------
    def _normalize(self, terms):
        """Drop zero terms and merge terms whose factors differ in one group only
        (their factors in that group are added)."""
        out = {k: v for k, v in terms.items() if v}
        for j in range(self.n_groups):
            if len(out) < 2:
                break
            buckets = {}
            for key, scale in out.items():
                buckets.setdefault(key[:j] + key[j + 1:], []).append((key[j], scale))
            if len(buckets) == len(out):
                continue
            merged = {}
            fac = self._fac[j]
            for rest, items in buckets.items():
                if len(items) == 1:
                    i, sc = items[0]
                else:
                    f = self.R.zero
                    for i, sc in items:
                        f += fac[i] * sc
                    if not f:
                        continue
                    i, sc = self._intern(j, f)
                key = rest[:j] + (i,) + rest[j:]
                merged[key] = merged.get(key, 0) + sc
            out = {k: v for k, v in merged.items() if v}
        return out

    def add(self, a, b):
        out = dict(a)
        for k, v in b.items():
            out[k] = out.get(k, 0) + v
        return self._normalize(out)

    def _mul_factor(self, j, i, k):
        """Id of the product of factors i and k of group j (monic times monic is monic)."""
        if i == 0:
            return k
        if k == 0:
            return i
        key = (j, i, k) if i <= k else (j, k, i)
        hit = self._mul_cache.get(key)
        if hit is None:
            f = self._fac[j][i] * self._fac[j][k]
            if j == self.const_group:
                f = self._reduce(f)
            hit, lc = self._intern(j, f)
            if lc != 1:  # a reduced sqrt power can leave a rational leading coefficient
                hit = (hit, lc)
            self._mul_cache[key] = hit
        return hit

    def _parity(self, key):
        """(odd, mixed) bit masks over the groups of a term: bit j of odd is set when the
        factor of group j has odd total degree in every monomial, bit j of mixed when its
        monomials' degrees have both parities or the group's Gaussian has a non-zero mean
        (then nothing is known). A zero-mean Gaussian vector's odd moments vanish, so a product
        of two terms has expectation zero when (odd_a ^ odd_b) & ~(mixed_a | mixed_b) != 0."""
        hit = self._key_parities.get(key)
        if hit is not None:
            return hit
        odd = mixed = 0
        for j, i in enumerate(key):
            if i:
                p = self._factor_parity(j, i)
                if p == 1:
                    odd |= 1 << j
                elif p is None:
                    mixed |= 1 << j
        hit = self._key_parities[key] = (odd, mixed)
        return hit

    def _factor_parity(self, j, i):
        """0 or 1: the parity of every monomial's degree in group j's variables; None when the
        monomials' parities differ or group j has a non-zero mean."""
        key = (j, i)
        hit = self._parities.get(key, -1)
        if hit != -1:
            return hit
        if j == self.const_group:
            out = 0
        elif j < self.g.L and any(self._means[j]):
            out = None
        else:
            idx = self.group_index[j]
            pars = {sum(mon[k] for k in idx) % 2 for mon in self._fac[j][i].itermonoms()}
            out = pars.pop() if len(pars) == 1 else None
        self._parities[key] = out
        return out

    def mul(self, a, b, merge=True, expect_only=False):
        """Product of two factored statistics; merge=False skips the one-group merging (cheaper
        when the product only feeds an expectation). expect_only=True (implies merge=False)
        also leaves out the products whose expectation vanishes by parity (`_parity`): the
        result has the product's expectation, not its value."""
        out = {}
        mf = self._mul_factor
        if len(a) < len(b):
            a, b = b, a
        # the groups in which b's term has a factor other than 1: only those need a product
        b_items = [(kb, sb, [j for j, i in enumerate(kb) if i]) for kb, sb in b.items()]
        get = out.get
        if expect_only:
            buckets = {}
            for kb, sb, nz in b_items:
                buckets.setdefault(self._parity(kb), []).append((kb, sb, nz))
            a_cache = {}
        for ka, sa in a.items():
            if expect_only:  # only b's terms whose product with ka can have a non-zero mean
                pa = self._parity(ka)
                b_items = a_cache.get(pa)
                if b_items is None:
                    odd_a, mixed_a = pa
                    b_items = a_cache[pa] = [
                        t for (odd_b, mixed_b), items in buckets.items()
                        if not (odd_a ^ odd_b) & ~(mixed_a | mixed_b) for t in items]
            for kb, sb, nz in b_items:
                scale = sa * sb
                key = list(ka)
                for j in nz:
                    r = mf(j, ka[j], kb[j])
                    if type(r) is tuple:
                        r, lc = r
                        scale = scale * lc
                    key[j] = r
                key = tuple(key)
                out[key] = get(key, 0) + scale
        return self._normalize(out) if merge and not expect_only else out

    def power(self, a, n):
        result, base = None, a
        while n:
            if n & 1:
                result = base if result is None else self.mul(result, base)
            n >>= 1
            if n:
                base = self.mul(base, base)
        return result if result is not None else self._single(self.const_group, self.one)

    # --- expectations ---------------------------------------------------------------------
    def _moment(self, group, alpha):
        """E[prod_i x_i^alpha_i] over one group's Gaussian vector, as a ring element."""
        if group == self.g.L:
            key = ("noise", alpha)
        elif self.g.untied:  # every token has its own overlaps
            key = (group, alpha)
        else:  # tokens with the same row of C share their moments
            key = (tuple(self.g.C[group]) if self.g.C else (), alpha)
        hit = self._moments.get(key)
        if hit is not None:
            return hit
        if not any(alpha):
            val = self.one
        elif group == self.g.L:  # independent standard noise: prod (k-1)!!
            val = self.one
            for k in alpha:
                if k % 2:
                    val = self.R.zero
                    break
                val = val * sp.QQ(int(sp.factorial2(k - 1)) if k else 1)
        else:
            i = next(i for i, k in enumerate(alpha) if k)
            a1 = list(alpha)
            a1[i] -= 1
            val = self._means[group][i] * self._moment(group, tuple(a1))
            for j, kj in enumerate(a1):
                if kj and self._cov[group][i][j]:
                    a2 = list(a1)
                    a2[j] -= 1
                    val += self._cov[group][i][j] * kj * self._moment(group, tuple(a2))
        self._moments[key] = val
        return val

    def _expect_factor(self, group, i):
        """E_group[factor i of group], a ring element in the overlaps and constants."""
        key = (group, i)
        hit = self._expect_cache.get(key)
        if hit is not None:
            return hit
        f = self._fac[group][i]
        if group == self.const_group:
            out = f
        else:
            idx = self.group_index[group]
            out = self.R.zero
            for mon, coef in f.items():
                alpha = tuple(mon[i] for i in idx)
                rest = list(mon)
                for i in idx:
                    rest[i] = 0
                mom = self._moment(group, alpha)
                if mom:
                    out += mom * self.R({tuple(rest): coef})
        self._expect_cache[key] = out
        return out

    def expect_spt(self, spt):
        """E of a factored statistic: sum_t scale_t prod_g E_g[factor_tg], contracted group by
        group so that shared prefixes of factor ids are multiplied once."""
        items = sorted(spt.items())

        last = self.n_groups - 1

        def contract(lo, hi, j):
            total = self.R.zero
            if j == last:  # leaves: E_last[i] times a rational
                acc = {}
                for key, sc in items[lo:hi]:
                    acc[key[j]] = acc.get(key[j], 0) + sc
                for i, sc in acc.items():
                    if sc:
                        total += self._expect_factor(j, i).mul_ground(sc)
                return total
            start = lo
            while start < hi:
                i = items[start][0][j]
                end = start + 1
                while end < hi and items[end][0][j] == i:
                    end += 1
                if i == 0:
                    total += contract(start, end, j + 1)
                else:
                    e = self._expect_factor(j, i)
                    if e:  # a factor of mean zero (odd moments) ends the whole branch
                        rest = contract(start, end, j + 1)
                        if rest:
                            total += e * rest
                start = end
            return total

        return self._reduce(contract(0, len(items), 0)) if items else self.R.zero

    def to_sympy(self, p):
        """A ring element back to a SymPy expression (constants restored: the generators that
        stand for constants are given their values while the expression is built).

        The result is the canonical expression p.as_expr() builds, assembled directly: each
        term's factors put in SymPy's canonical order by a rank computed once per distinct
        factor, instead of Mul and Add re-flattening and re-sorting every term (which took
        most of a large derivation's time)."""
        if not hasattr(self, "_back_symbols"):
            self._back_symbols = [self.back.get(g, g) for g in self.R.symbols]
            self._const_idx = [i for i, g in enumerate(self.R.symbols) if g in self.back]
            # generators other than constants: the random variables appear only before an
            # expectation, but to_sympy is also asked for statistics
            self._var_idx = [i for i, g in enumerate(self.R.symbols) if g not in self.back]
            self._powers, self._const_parts, self._numbers = {}, {}, {}
        # products of ring elements (Cov(G), the drift's constants) can hold c**n for a
        # radical generator c: reduced first, so that no two monomials share a SymPy form
        return _ring_to_expr(self, self._reduce(p))

    # --- exchangeable tokens -----------------------------------------------------------------
    def _exchangeable(self):
        """The classes of tokens whose Gaussian vectors have one law (a tied student: tokens with
        the same row of the positional encoding C), as lists of at least two tokens."""
        if getattr(self, "_classes", None) is None:
            classes = {}
            if not self.g.untied:
                for l in range(self.g.L):
                    classes.setdefault(tuple(self.g.C[l]) if self.g.C else (), []).append(l)
            self._classes = [c for c in classes.values() if len(c) > 1]
            self._token_vars = [set(self.g.token_variables(l)) for l in range(self.g.L)]
            self._move_cache = {}
        return self._classes

    def _invariant(self, expr, H) -> bool:
        """Whether expr is unchanged (structurally) by every permutation of the tokens H: checked
        on the transposition of H's first two tokens and the cycle through H, which generate
        the symmetric group of H."""
        tv = self.g.token_variables
        for sigma in ({H[0]: H[1], H[1]: H[0]}, {h: H[(k + 1) % len(H)] for k, h in enumerate(H)}):
            sub = {}
            for l, l2 in sigma.items():
                sub.update(zip(tv(l), tv(l2)))
            if expr.xreplace(sub) != expr:
                return False
        return True

    def _move(self, l, i, l2):
        """(id, lc): factor i of token l with token l's variables renamed to token l2's, as
        lc times factor id of token l2."""
        if i == 0 or l == l2:
            return i, 1
        key = (l, i, l2)
        hit = self._move_cache.get(key)
        if hit is None:
            src, dst = self.group_index[l], self.group_index[l2]
            terms = {}
            for mon, c in self._fac[l][i].items():
                m = list(mon)
                for a, b in zip(src, dst):
                    m[a], m[b] = 0, mon[a]
                terms[tuple(m)] = c
            hit = self._move_cache[key] = self._intern(l2, self.R.from_dict(terms))
        return hit

    def _orbit_reduce(self, spt, classes):
        """A factored statistic with the same expectation against anything invariant under the
        permutations of each token class in `classes`: every term is replaced by its image
        under the permutation that puts its factors on the class's first tokens in a fixed
        order (E[P sigma(q)] = E[P q] when P and the tokens' law are invariant under sigma), so
        the terms of one orbit merge into one."""
        out = {}
        move = self._move
        for key, scale in spt.items():
            key = list(key)
            for H in classes:
                h0 = H[0]
                sigs = []
                for l in H:
                    i = key[l]
                    if i:
                        j, lc = move(l, i, h0)
                        scale = scale * lc
                        sigs.append(j)
                        key[l] = 0
                sigs.sort()
                for l, j in zip(H, sigs):
                    key[l], lc = move(h0, j, l)
                    scale = scale * lc
            key = tuple(key)
            out[key] = out.get(key, 0) + scale
        return {k: v for k, v in out.items() if v}

    def _reducible(self, others):
        """The token classes under whose permutations the product of `others` (SymPy factors)
        is invariant: an exchangeable class minus the tokens of every factor that is not
        itself invariant under the class's permutations."""
        out = []
        for H in self._exchangeable():
            H = list(H)
            for a in others:
                toks = [l for l in H if a.free_symbols & self._token_vars[l]]
                if toks and len(H) > 1 and not (len(toks) == len(H) and self._invariant(a, H)):
                    H = [l for l in H if l not in toks]
            if len(H) > 1:
                out.append(H)
        return out

    def expect_ring(self, *factors):
        """Exact E[prod factors] as a ring element.

        The largest factor's terms are first reduced to one per orbit of the token permutations
        that leave the other factors and the tokens' law unchanged (exchangeable tokens of a tied
        student, `_orbit_reduce`). The product is then multiplied smallest factor first and its
        last product is not merged (expect_spt takes the sum term by term, so merging the
        largest factored form, 86000 terms for the untied L = 16 drift, only costs time)."""
        args = []
        for f in factors:
            for a in sp.Mul.make_args(sp.sympify(f)):
                if (a.is_Pow and a.exp.is_Integer and 1 < a.exp <= 4 and self._exchangeable()
                        and a.base.free_symbols & self.random):
                    args.extend([a.base] * int(a.exp))  # one copy can be orbit-reduced
                else:
                    args.append(a)
        parts = sorted(((self.to_spt(a), a) for a in args), key=lambda p: len(p[0]))
        big, big_expr = parts.pop()
        if len(big) > 64:
            classes = self._reducible([a for _, a in parts])
            if classes:
                big = self._orbit_reduce(big, classes)
        parts = sorted([p for p, _ in parts] + [big], key=len)
        out = parts[0]
        last = len(parts) - 1
        for k, part in enumerate(parts[1:], 1):
            out = self.mul(out, part, merge=k < last, expect_only=k == last)
        return self.expect_spt(out)

    def expect(self, expr):
        """Exact E[expr] for an expression polynomial in the random variables."""
        return self.to_sympy(self.expect_ring(expr))


# ----------------------------------------------------------------------------------------
# Mixed statistics: exact where polynomial, Gauss-Hermite nodes where not
# ----------------------------------------------------------------------------------------

def _nonpolynomial_symbols(expr) -> set:
    """Symbols that occur inside a non-polynomial sub-expression (a function, a division...)."""
    if expr.is_Atom:
        return set()
    if expr.is_Add or expr.is_Mul or (expr.is_Pow and expr.exp.is_Integer and expr.exp >= 0):
        out = set()
        for a in expr.args:
            out |= _nonpolynomial_symbols(a)
        return out
    return set(expr.free_symbols)


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
    sp.expand, the arguments of functions (quadrature integrands, arcsines) are left alone."""
    expr = sp.sympify(expr)
    if expr.is_Add:
        return sp.Add(*[distribute(a) for a in expr.args])
    if expr.is_Mul:
        terms = [sp.Integer(1)]
        for a in expr.args:
            parts = sp.Add.make_args(distribute(a))
            if len(parts) == 1:
                terms = [t * parts[0] for t in terms]
            else:
                terms = [t * p for t in terms for p in parts]
        return sp.Add(*terms)
    if expr.is_Pow and expr.exp.is_Integer and expr.exp > 1 and expr.base.is_Add:
        return distribute(sp.Mul(*([expr.base] * int(expr.exp)), evaluate=False))
    return expr


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


def has_quadrature(expr) -> bool:
    """True when an expression holds a GaussHermite node or another function evaluated by
    quadrature (closed_forms.NormalOrthant)."""
    return dag_any(expr, lambda x: isinstance(x, GaussHermite)
                   or getattr(type(x), "numeric_quadrature", False))


__all__ = ["dag_any", "distribute", "TokenGaussian", "ExactEngine", "GaussHermite", "NotPolynomial",
           "has_quadrature", "integrate_deltas"]
