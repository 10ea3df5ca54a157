"""Untied students whose links are polynomials in token sums: exact expectations through
summed cumulants, at a cost that does not grow with L (MATH.md sections 4 and 6).

For an untied student (token l has its own overlaps m_l, q_l) with token-symmetric polynomial
links, both links are polynomials in the power sums sum_l z*_l^a and sum_l z_l^b (a symmetric
polynomial is one in the power sums). Every statistic the derivation needs (the loss, the
increments G_i and their products, the spherical rescaling, the token-norm terms) is then a
polynomial in token sums

    Y_k = sum_l m_l^c q_l^e z*_l^a z_l^b        (k = (c, e, a, b))

and in the variables t_i = (z*_i, z_i) of the one or two tokens i it singles out. The tokens
being independent, the cumulant generating function of (Y, t) is

    log E exp(s.Y + r.t) = sum_l C_l(s) + sum_i [C_i(s, r_i) - C_i(s, 0)],
    C_l(s, r) = log E exp(s.phi_l + r.t_l),  phi_l = (m_l^c q_l^e z*_l^a z_l^b)_k,

so E[F(Y) t_i^g ...] = E_Y[ (sum_b Q_i^g[b] d^b/dY^b) ... F(Y) ] with
Q_i^g(s) = E[t_i^g e^{s.phi_i}] / E[e^{s.phi_i}] (a power series in s whose coefficients are
polynomials in m_i, q_i), and the remaining E_Y[Y^alpha] = M_alpha are the moments of the sum
over all tokens, given by the summed cumulants K_beta = sum_l kappa_beta(m_l, q_l) through the
recursion M_alpha = sum_{beta <= alpha - e_j} C(alpha - e_j, beta) K_{beta + e_j}
M_{alpha - e_j - beta}. The outputs are polynomials in the singled-out tokens' overlaps, eta and
the generators M_alpha (linear in them, products of two for E[G_i] E[G_j]); the generated code
computes K (a sum over the tokens) and then M (the recursion) once per call.

Only one token's (or one pair of tokens') statistics are computed; the others follow by renaming
the overlaps (the links are token-symmetric).
"""
from __future__ import annotations

import itertools
import math
from collections import Counter

import sympy as sp
from sympy.polys.rings import ring as poly_ring

from .exact_engine import ExactEngine
from .gaussian import NotPolynomial, TokenGaussian
from ..model.spec import ModelSpec, link_entries

#: the smallest L for which derive() takes this path (smaller L: token by token)
MIN_L = 2
#: work limit (inner products of the series and the cumulant recursion, moments kept): past
#: it the token-by-token path is used (links of high degree in many token sums)
BUDGET = 2_000_000
#: the most moments M_alpha (generators of the outputs' ring) the form may need
MAX_MOMENTS = 1000


class TooLarge(Exception):
    """The token-sum form of a spec would cost more than BUDGET."""


def _power_sum_form(expr, variables, Y):
    """expr, a polynomial in `variables` (one per token) symmetric under their permutations,
    as a polynomial in power sums Y(k) = sum_l variables_l^k (Y maps k to a symbol), or None
    when expr is not such a polynomial. Greedy: the monomial with the most variables of its
    orbit's shape lambda = (k_1 >= k_2 >= ...) has coefficient prod_j mult_j! in
    prod_i Y(k_i), whose other terms have fewer variables."""
    try:
        poly = sp.Poly(sp.expand(expr), *variables)
    except sp.PolynomialError:
        return None
    if any(not c.is_number and c.free_symbols & set(variables) for c in poly.coeffs()):
        return None
    terms = {m: c for m, c in poly.terms()}
    n = len(variables)
    for perm in ([1, 0] + list(range(2, n)), list(range(1, n)) + [0]) if n > 1 else ():
        for mon, c in terms.items():  # symmetric: invariant under both generators
            if sp.expand(terms.get(tuple(mon[i] for i in perm), 0) - c) != 0:
                return None
    out = sp.Integer(0)
    psum_cache = {}

    def psum(k):
        if k not in psum_cache:
            psum_cache[k] = sp.Poly(sp.Add(*[v ** k for v in variables]), *variables)
        return psum_cache[k]
    while terms:
        mon = max(terms, key=lambda m: (sum(1 for e in m if e), m))
        a = terms[mon]
        parts = sorted((e for e in mon if e), reverse=True)
        if not parts:
            out += a
            del terms[mon]
            continue
        c = math.prod(math.factorial(n) for n in Counter(parts).values())
        coef = a / c
        prod = sp.Poly(1, *variables)
        for k in parts:
            prod = prod * psum(k)
        for m2, c2 in prod.terms():
            v = sp.expand(terms.get(m2, 0) - coef * c2)
            if v == 0:
                terms.pop(m2, None)
            else:
                terms[m2] = v
        if mon in terms:  # not symmetric
            return None
        out += coef * sp.Mul(*[Y(k) for k in parts])
    return out


class _Token:
    """Series of one generic token (overlaps m, q) in the small ring QQ[m, q]: moments of
    phi = (m^c q^e z*^a z^b)_k and Q^g[beta], the coefficients of
    E[t^g e^{s.phi}] / E[e^{s.phi}] (t = (z*, z))."""

    def __init__(self, keys):
        self.keys = keys
        self.R, self.m, self.q = poly_ring("m,q", sp.QQ)
        self._mom = {}
        self._Q = {}
        self._D = {}
        self._kappa = {}
        self.work = 0

    def _spend(self, n):
        self.work += n
        if self.work > BUDGET:
            raise TooLarge()

    def moment(self, a, b):
        """E[z*^a z^b] for Var z* = 1, Cov = m, Var z = q."""
        key = (a, b)
        hit = self._mom.get(key)
        if hit is None:
            if a < 0 or b < 0:
                hit = self.R.zero
            elif a == 0 and b == 0:
                hit = self.R.one
            elif a > 0:
                hit = (a - 1) * self.moment(a - 2, b) + b * self.m * self.moment(a - 1, b - 1)
            else:
                hit = (b - 1) * self.q * self.moment(0, b - 2)
            self._mom[key] = hit
        return hit

    def phi_moment(self, beta, g=(0, 0)):
        """E[t^g prod_k phi_k^beta_k]."""
        c = e = 0
        a, b = g
        for k, n in zip(self.keys, beta):
            if n:
                c += k[0] * n
                e += k[1] * n
                a += k[2] * n
                b += k[3] * n
        mom = self.moment(a, b)
        return mom * self.m ** c * self.q ** e if mom else mom

    @staticmethod
    def _fact(beta):
        return math.prod(math.factorial(n) for n in beta)

    def D(self, beta):
        hit = self._D.get(beta)
        if hit is None:
            hit = self._D[beta] = self.phi_moment(beta) * sp.QQ(1, self._fact(beta))
        return hit

    def Q(self, g, beta):
        """Coefficient of s^beta in E[t^g e^{s.phi}] / E[e^{s.phi}] (series division)."""
        key = (g, beta)
        hit = self._Q.get(key)
        if hit is None:
            hit = self.phi_moment(beta, g) * sp.QQ(1, self._fact(beta))
            self._spend(math.prod(n + 1 for n in beta))
            for b2 in itertools.product(*[range(n + 1) for n in beta]):
                if any(b2):
                    d = self.D(b2)
                    if d:
                        rest = self.Q(g, tuple(x - y for x, y in zip(beta, b2)))
                        if rest:
                            hit = hit - d * rest
            self._Q[key] = hit
        return hit

    def kappa(self, beta):
        """The joint cumulant kappa_beta of phi (one token), from its moments:
        mu_beta = sum_{b <= beta - e_j} C(beta - e_j, b) kappa_{b + e_j} mu_{beta - e_j - b}."""
        hit = self._kappa.get(beta)
        if hit is None:
            j = next(i for i, n in enumerate(beta) if n)
            red = list(beta)
            red[j] -= 1
            hit = self.phi_moment(beta)
            self._spend(math.prod(n + 1 for n in red))
            for b in itertools.product(*[range(n + 1) for n in red]):
                if b == tuple(red):
                    continue
                up = list(b)
                up[j] += 1
                rest = tuple(x - y for x, y in zip(red, b))
                hit = hit - _binom(red, b) * self.kappa(tuple(up)) * self.phi_moment(rest)
            self._kappa[beta] = hit
        return hit


def _lift(p, R, im, iq):
    """A polynomial of the generic token's ring QQ[m, q] as an element of ring R, with m and q
    at the generator positions im, iq (one token's overlaps m_l, q_l)."""
    n = len(R.gens)
    terms = {}
    for (a, b), c in p.items():
        mon = [0] * n
        mon[im], mon[iq] = a, b
        terms[tuple(mon)] = c
    return R.from_dict(terms) if terms else R.zero


def _binom(n, k):
    return math.prod(math.comb(a, b) for a, b in zip(n, k))


def _falling(a, b):
    return math.prod(math.perm(x, y) for x, y in zip(a, b))


class SumForm:
    """The token-sum form of an untied spec: links as polynomials in token sums, the
    statistics of tokens 1 and 2, and their exact expectations (see the module docstring)."""

    def __init__(self, spec: ModelSpec, gauss: TokenGaussian, T, S):
        self.spec, self.g, self.L = spec, gauss, spec.L
        self.T, self.S = T, S
        self.keys = []        # (c, e, a, b) of every token sum met, in order
        self.Ysym = {}        # key -> symbol
        self.zs, self.z = gauss.zstar, gauss.z
        self.m, self.q = gauss.ms, gauss.qs

    # --- token sums ----------------------------------------------------------------------
    def Y(self, key):
        s = self.Ysym.get(key)
        if s is None:
            s = self.Ysym[key] = sp.Symbol("_Y_%d_%d_%d_%d" % key)
            self.keys.append(key)
        return s

    def phi(self, key, l):
        c, e, a, b = key
        return self.m[l] ** c * self.q[l] ** e * self.zs[l] ** a * self.z[l] ** b

    def lsum(self, expr, l=0):
        """sum over the tokens of expr, a statistic of token l (its variables and overlaps)
        and of token sums: each monomial in (m_l, q_l, z*_l, z_l) becomes its token sum."""
        v = (self.m[l], self.q[l], self.zs[l], self.z[l])
        poly = sp.Poly(sp.expand(expr), *v)
        out = []
        for mon, coef in poly.terms():
            out.append(coef * (sp.Integer(self.L) if not any(mon) else self.Y(mon)))
        return sp.Add(*out)

    def d(self, expr, var, l):
        """d expr / d var for var = z*_l or z_l, through the token sums too."""
        out = sp.diff(expr, var)
        for key, s in list(self.Ysym.items()):
            if expr.has(s):
                out += sp.diff(expr, s) * sp.diff(self.phi(key, l), var)
        return out

    # --- statistics (MATH.md 4 and 6) ------------------------------------------------------
    def statistics(self, diffusion):
        L, eta = self.L, self.eta
        res = self.T - self.S
        self.loss = res ** 2 / 2
        dl = [-res * self.d(self.S, self.z[l], l) for l in range(min(L, 2))]
        A_m = [dl[l] * self.zs[l] for l in range(len(dl))]
        A_q = [dl[l] * self.z[l] for l in range(len(dl))]
        B = [dl[l] ** 2 for l in range(len(dl))]
        sph = self.spec.spherical
        self.gq = self.lsum(-2 * eta / L * A_q[0] + eta ** 2 / L * B[0]) if sph else None
        self.plain = {("m", l): -eta * A_m[l] for l in range(len(dl))}
        self.plain.update({("q", l): -2 * eta * A_q[l] + eta ** 2 * B[l]
                           for l in range(len(dl))})
        self.power = {"m": sp.Rational(1, 2), "q": sp.Integer(1)}
        self.G = {}
        for (kind, l), p in self.plain.items():
            X = self.m[l] if kind == "m" else self.q[l]
            self.G[(kind, l)] = p - self.power[kind] * X * self.gq if sph else p
        if diffusion:
            f = B[0]
            zs, z = self.zs[0], self.z[0]
            dzs, dz = self.d(f, zs, 0), self.d(f, z, 0)
            self.K0 = (self.d(dzs, zs, 0) + 2 * self.m[0] * self.d(dzs, z, 0)
                       + self.q[0] * self.d(dz, z, 0))
            self.Ksum = self.lsum(self.K0)

    # --- expectations -------------------------------------------------------------------
    def engine(self, exprs):
        """The exact engine of the statistics (ring A: token sums as generators)."""
        ex = ExactEngine(self.g, exprs, extra_symbols=(self.eta,) + tuple(self.Ysym.values()))
        ex.random |= set(self.Ysym.values())
        gens = list(ex.R.gens)
        self.A = ex
        self.ypos = [gens.index(ex.gen[self.Ysym[k]]) for k in self.keys]
        self.tpos = [(gens.index(ex.gen[self.zs[l]]), gens.index(ex.gen[self.z[l]]))
                     for l in range(min(self.L, 2))]
        self.mqpos = [(gens.index(ex.gen[self.m[l]]), gens.index(ex.gen[self.q[l]]))
                      for l in range(min(self.L, 2))]
        self.token = _Token(self.keys)
        self._Qa = {}
        return ex

    def _Q_in_A(self, g, beta, l):
        key = (g, beta, l)
        hit = self._Qa.get(key)
        if hit is None:
            hit = self._Qa[key] = _lift(self.token.Q(g, beta), self.A.R, *self.mqpos[l])
        return hit

    def expect(self, expr):
        """E[expr] as an element of ring A that is a polynomial in the token sums Y standing
        for their all-token moments (apply `moments` to read Y^alpha as M_alpha): the
        singled-out tokens' variables are integrated out by the operators of the module
        docstring."""
        A = self.A
        p = A._reduce(A._const(sp.sympify(expr)))
        for l in range(len(self.tpos)):
            p = self._integrate_token(p, l)
        return p

    def _integrate_token(self, p, l):
        R = self.A.R
        izs, iz = self.tpos[l]
        ypos = self.ypos
        acc = {}
        zero_q = set()
        for mon, c in p.items():
            g = (mon[izs], mon[iz])
            alpha = tuple(mon[i] for i in ypos)
            base = list(mon)
            base[izs] = base[iz] = 0
            self.token._spend(math.prod(n + 1 for n in alpha) // 8)
            for beta in itertools.product(*[range(n + 1) for n in alpha]):
                if (g, beta) in zero_q:
                    continue
                if g == (0, 0) and any(beta):
                    continue
                if not self.token.Q(g, beta):
                    zero_q.add((g, beta))
                    continue
                new = list(base)
                for i, a, b in zip(ypos, alpha, beta):
                    new[i] = a - b
                new = tuple(new)
                d = acc.setdefault((g, beta), {})
                d[new] = d.get(new, 0) + c * _falling(alpha, beta)
        out = R.zero
        for (g, beta), terms in acc.items():
            part = R.from_dict({k: v for k, v in terms.items() if v})
            if part:
                out += self._Q_in_A(g, beta, l) * part if (g != (0, 0)) else part
        return out


def sum_form(spec: ModelSpec, gauss: TokenGaussian):
    """The SumForm of an untied spec whose links are polynomials in token sums, or None
    (several directions or outputs, label noise, mini-batches, a loss other than the square,
    parameters in the links, L < MIN_L, links that are not token-symmetric polynomials)."""
    if (not spec.untied or spec.multi or spec.noise or spec.batch != 1 or spec.L < MIN_L
            or spec.loss != "square"):
        return None
    T = link_entries(spec.teacher)
    S = link_entries(spec.student)
    if len(T) != 1 or len(S) != 1:
        return None
    form = SumForm(spec, gauss, None, None)
    L = spec.L
    teacher_vars = spec.variables("teacher")
    if len(teacher_vars) != L:
        return None
    T = sp.sympify(T[0]).xreplace(dict(zip(teacher_vars, gauss.zstar)))
    S = sp.sympify(S[0])
    if (T.free_symbols - set(gauss.zstar) - set(map(sp.Symbol, spec.parameters))
            or S.free_symbols - set(gauss.z) - set(map(sp.Symbol, spec.parameters))):
        return None
    if T.free_symbols & set(map(sp.Symbol, spec.parameters)) or \
            S.free_symbols & set(map(sp.Symbol, spec.parameters)):
        return None  # parameters: the engine's token path handles them
    Tt = _power_sum_form(T, gauss.zstar, lambda k: form.Y((0, 0, k, 0)))
    St = _power_sum_form(S, gauss.z, lambda k: form.Y((0, 0, 0, k)))
    if Tt is None or St is None:
        return None
    form.T, form.S = Tt, St
    return form


def sum_expectations(spec: ModelSpec, diffusion: bool, eta):
    """(form, B, out) for an untied student with links polynomial in token sums, or None when
    the spec is not of that kind or its form would be too large (the token-by-token path then).
    out holds ring B elements (derive.derive_token_sums assembles the Derivation): "loss",
    "m", "q" (E[G] of token 1), (a, b, 0) = E[G_a(1) G_b(1)], (a, b, 1) = E[G_a(1) G_b(2)],
    "gq2" = E[dQ^2], ("gqx", a) = E[(d dX_a) dQ] (spherical), "K0" = E[K_1], "Ksum" =
    E[sum_l K_l]; eta is the learning-rate symbol."""
    gauss = TokenGaussian.of(spec)
    form = sum_form(spec, gauss)
    if form is None:
        return None
    form.eta = eta
    try:
        form.statistics(diffusion)
        G = form.G
        stats = [form.loss] + list(G.values())
        if diffusion:
            stats += [form.K0, form.Ksum]
        if form.gq is not None:
            stats.append(form.gq)
        form.stats = stats
        form.engine(stats)
        E = form.expect
        raw = {"loss": E(form.loss), "m": E(G[("m", 0)]), "q": E(G[("q", 0)])}
        kinds = ("m", "q")
        if diffusion:
            for a in kinds:
                for b in kinds:
                    if (a, b) != ("q", "m"):
                        raw[(a, b, 0)] = E(G[(a, 0)] * G[(b, 0)])
                    raw[(a, b, 1)] = E(G[(a, 0)] * G[(b, 1)])
            if form.gq is not None:
                raw["gq2"] = E(form.gq ** 2)
                for a in kinds:
                    raw[("gqx", a)] = E(form.plain[(a, 0)] * form.gq)
            raw["K0"] = E(form.K0)
            raw["Ksum"] = E(form.Ksum)
        B = _MomentRing(form, list(raw.values()))
        out = {k: B.moments(v) for k, v in raw.items()}
        if diffusion:  # the products E[G_i] E[G_j] of the covariance (len(gens) exponents)
            form.token._spend((len(out["m"]) + len(out["q"])) ** 2 * len(B.ex.R.gens) // 100)
    except (NotPolynomial, TooLarge):
        return None
    return form, B, out


class _MomentRing:
    """Ring B of the outputs: the generators M_alpha (all-token moments of the token sums) and
    K_beta (summed cumulants) replace the token sums of ring A. `ex` is an ExactEngine whose
    `aux` holds the definitions the printer writes (K as a sum over the tokens, M by the
    cumulant recursion) and whose to_sympy substitutes them."""

    def __init__(self, form: SumForm, results):
        self.form = form
        A = form.A
        alphas = set()
        for p in results:
            for mon in p.itermonoms():
                alpha = tuple(mon[i] for i in form.ypos)
                if any(alpha):
                    alphas.add(alpha)
        # every M_alpha' with alpha' <= some needed alpha enters the recursion
        closure = set()
        for a in alphas:
            form.token._spend(math.prod(n + 1 for n in a))
            for b in itertools.product(*[range(n + 1) for n in a]):
                if any(b):
                    closure.add(b)
        if len(closure) > MAX_MOMENTS:
            raise TooLarge()
        self.alphas = sorted(closure, key=lambda a: (sum(a), a))
        tok = form.token
        self.kappas = {}
        for b in self.alphas:
            k = tok.kappa(b)
            if k:
                self.kappas[b] = k
        self.Msym = {a: sp.Symbol("_M_" + "_".join(map(str, a))) for a in self.alphas}
        self.Ksym = {b: sp.Symbol("_K_" + "_".join(map(str, b))) for b in self.kappas}
        # the statistics' constants become the same generators as in ring A (the token sums
        # are generators of B too, never used: random variables to the printer)
        ex = ExactEngine(form.g, form.stats,
                         extra_symbols=(form.eta,) + tuple(self.Msym.values())
                         + tuple(self.Ksym.values()) + tuple(form.Ysym.values()))
        ex.random |= set(form.Ysym.values())
        self.ex = ex
        # map ring A's generators to ring B's
        bgens = list(ex.R.gens)
        inv_back = {v: s for s, v in ex.back.items()}
        self.amap = []
        ypos = set(form.ypos)
        for i, s in enumerate(A.R.symbols):
            if i in ypos:
                self.amap.append(None)
                continue
            if s in ex.gen:
                self.amap.append(bgens.index(ex.gen[s]))
                continue
            v = A.back.get(s)
            t = inv_back.get(v)
            if t is None or t not in ex.gen:
                raise NotPolynomial(s)
            self.amap.append(bgens.index(ex.gen[t]))
        self.mpos = {a: bgens.index(ex.gen[s]) for a, s in self.Msym.items()}
        # definitions
        L = form.L
        mk, qk = form.g.ms, form.g.qs
        aux = {}
        for b, kap in self.kappas.items():
            aux[self.Ksym[b]] = sp.Add(*[
                sp.Integer(int(c.numerator)) / int(c.denominator) * mk[l] ** i * qk[l] ** j
                for l in range(L) for (i, j), c in kap.items()])
        for a in self.alphas:
            aux[self.Msym[a]] = self._recursion(a, lambda x: self.Msym.get(x), sp.Integer(1),
                                                lambda b: self.Ksym.get(b), sp.Integer(0))
        ex.aux = aux
        ex.to_sympy = self._to_sympy
        self._values, self._dk = {}, {}

    def _recursion(self, a, M, one, K, zero):
        """M_a = sum_{b <= a - e_j} C(a - e_j, b) K_{b + e_j} M_{a - e_j - b} (j the first
        index with a_j > 0), with M(0) = one and K(b) None for a vanishing cumulant."""
        j = next(i for i, n in enumerate(a) if n)
        red = list(a)
        red[j] -= 1
        red = tuple(red)
        out = zero
        for b in itertools.product(*[range(n + 1) for n in red]):
            up = list(b)
            up[j] += 1
            k = K(tuple(up))
            if k is None:
                continue
            rest = tuple(x - y for x, y in zip(red, b))
            mm = one if not any(rest) else M(rest)
            out = out + _binom(red, b) * k * mm
        return out

    def moments(self, p):
        """Ring A element (polynomial in the token sums) -> ring B element with Y^alpha read as
        M_alpha."""
        R = self.ex.R
        n = len(R.gens)
        amap, ypos = self.amap, self.form.ypos
        out = {}
        for mon, c in p.items():
            new = [0] * n
            for i, e in enumerate(mon):
                if e and amap[i] is not None:
                    new[amap[i]] += e
            alpha = tuple(mon[i] for i in ypos)
            if any(alpha):
                new[self.mpos[alpha]] += 1
            new = tuple(new)
            out[new] = out.get(new, 0) + c
        return self.ex._reduce(R.from_dict({k: v for k, v in out.items() if v}))

    def value(self, s):
        """The SymPy value of M_alpha or K_beta in the overlaps."""
        hit = self._values.get(s)
        if hit is None:
            defn = self.ex.aux[s]
            hit = defn.xreplace({t: self.value(t) for t in defn.free_symbols
                                 if t in self.ex.aux})
            self._values[s] = hit
        return hit

    def _to_sympy(self, p):
        expr = ExactEngine.to_sympy(self.ex, p)
        syms = expr.free_symbols & set(self.ex.aux)
        return expr.xreplace({s: self.value(s) for s in syms}) if syms else expr

    # --- the drift's Jacobian -------------------------------------------------------------
    def jacobian_parts(self, f, state):
        """The derivatives of a ring B element f (a drift: linear in the M_alpha) by the chain
        rule through the summed cumulants: f read as a polynomial in the K_beta (each M by the
        recursion, expanded), df/dx = direct[x] + sum_beta g[beta] dk[(beta, x)] with direct[x]
        its explicit derivative in the state variable x (index into `state`), g[beta] =
        df/dK_beta and dk[(beta, x)] = dK_beta/dx = d kappa_beta / dx (m_l, q_l) for x = m_l or
        q_l. Returns (direct, g, dk)."""
        ex = self.ex
        R = ex.R
        mu = self.__dict__.setdefault("_mu", {})
        kgen = {b: ex.gen[s] for b, s in self.Ksym.items()}

        def mu_of(a):
            hit = mu.get(a)
            if hit is None:
                hit = mu[a] = self._recursion(a, mu_of, R.one, kgen.get, R.zero)
            return hit
        mpos_inv = {pos: a for a, pos in self.mpos.items()}
        groups = {}
        for mon, c in f.items():
            held = [pos for pos in mpos_inv if mon[pos]]
            if len(held) > 1 or (held and mon[held[0]] != 1):
                raise ValueError("the drift is not linear in the moments M")
            new = list(mon)
            if held:
                new[held[0]] = 0
            groups.setdefault(held[0] if held else None, {})[tuple(new)] = c
        fK = R.zero
        for pos, terms in groups.items():
            part = R.from_dict(terms)
            fK += part if pos is None else part * mu_of(mpos_inv[pos])
        fK = ex._reduce(fK)
        g = {b: fK.diff(kg) for b, kg in kgen.items()}
        g = {b: v for b, v in g.items() if v}
        tok = self.form.token
        mk, qk = self.form.g.ms, self.form.g.qs
        direct, dk = [], {}
        for x, sym in enumerate(state):
            direct.append(fK.diff(ex.gen[sym]))
            l, var = (mk.index(sym), tok.m) if sym in mk else (qk.index(sym), tok.q)
            for b in g:
                key = (b, l, var)
                hit = self._dk.get(key)
                if hit is None:
                    gens = list(R.gens)
                    hit = self._dk[key] = _lift(self.kappas[b].diff(var), R,
                                                gens.index(ex.gen[mk[l]]),
                                                gens.index(ex.gen[qk[l]]))
                if hit:
                    dk[(b, x)] = hit
        return direct, g, dk


__all__ = ["sum_expectations", "sum_form", "SumForm", "TooLarge", "MIN_L", "BUDGET"]
