"""The exact engine: Gaussian expectations of polynomial statistics, token by token.

A statistic is held as a sum of products of per-token polynomial factors (never expanded in all
the tokens' variables at once); each factor's expectation comes from the Gaussian moment
recursion of its token (MATH.md sections 2 and 8, :class:`gaussian.TokenGaussian`), and the
products are contracted group by group. Constants (radicals of rationals, pi, parameters,
exp/log of constants) are generators of the polynomial ring. Exchangeable tokens (a tied
student) are reduced to one term per orbit and odd moments of zero-mean tokens are never formed.
"""
from __future__ import annotations

import sympy as sp
from sympy.polys.rings import PolyElement, ring as poly_ring

from .gaussian import NotPolynomial, TokenGaussian, permutation_generators

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
        # exchangeable tokens (see _orbit_reduce): a tied student's tokens with one row of C
        classes = {}
        if not gauss.untied:
            for l in range(gauss.L):
                classes.setdefault(tuple(gauss.C[l]) if gauss.C else (), []).append(l)
        self.classes = [c for c in classes.values() if len(c) > 1]
        self._token_vars = [set(gauss.token_variables(l)) for l in range(gauss.L)]
        self._move_cache, self._invariance = {}, {}
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

    def rename(self, p, where: dict):
        """p with the exponent of generator position a moved to position b for every a -> b of
        `where`, a permutation of some generator positions (renaming overlaps: the tokens of an
        untied student, the directions of a committee)."""
        if not where or not p:
            return p
        out = {}
        for mon, c in p.items():
            new = list(mon)
            for a, b in where.items():
                new[b] = mon[a]
            out[tuple(new)] = c
        return self.R.from_dict(out)

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
    def _invariant(self, expr, H) -> bool:
        """Whether expr is unchanged (structurally) by every permutation of the tokens H: checked
        on the transposition of H's first two tokens and the cycle through H, which generate
        the symmetric group of H."""
        key = (expr, tuple(H))
        hit = self._invariance.get(key)
        if hit is None:
            tv = self.g.token_variables
            hit = True
            for sigma in permutation_generators(H):
                sub = {}
                for l, l2 in sigma.items():
                    sub.update(zip(tv(l), tv(l2)))
                if expr.xreplace(sub) != expr:
                    hit = False
                    break
            self._invariance[key] = hit
        return hit

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
        for H in self.classes:
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
                if (a.is_Pow and a.exp.is_Integer and 1 < a.exp <= 4 and self.classes
                        and a.base.free_symbols & self.random):
                    args.extend([a.base] * int(a.exp))  # one copy can be orbit-reduced
                else:
                    args.append(a)
        parts = sorted(((self.to_spt(a), a) for a in args), key=lambda p: len(p[0]))
        big, _ = parts.pop()
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


__all__ = ["ExactEngine"]
