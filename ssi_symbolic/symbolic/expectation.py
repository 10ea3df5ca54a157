"""Expectations of any statistic over the token Gaussians (MATH.md sections 2 and 8): the
dispatcher between the exact moment engine, the closed forms and quadrature.

:class:`Expectation` splits a statistic term by term: polynomial terms go to the exact engine
(:class:`exact_engine.ExactEngine`); a product over tokens that share no factor factors into
per-token expectations; each remaining factor is tried in closed form
(:mod:`closed_forms`: erf/Phi, kinks, exponentials) over the joint Gaussian of its variables,
and what is left becomes a :class:`gaussian.GaussHermite` node over the fewest standard
Gaussians: the independent affine forms its functions read, whitened by Cholesky, with the
polynomial part integrated by conditional moments (:meth:`Expectation._projected_node`), the
kinks put on the first variable (:func:`kink_breaks` gives the break points the generated code
splits at), and the dimensions only erf, erfc and exponentials read integrated in closed form
(:mod:`conditioning`). A one-token statistic is first tried whole in closed form; when that
fails because the closed form would need too many thresholds or reductions
(closed_forms.TooComplex) and the statistic is smooth, it is one node whole
(:meth:`Expectation._whole_smooth_quadrature`).
"""
from __future__ import annotations

import importlib
from collections import Counter

import sympy as sp
from sympy.polys.matrices import DomainMatrix
from sympy.polys.domains import QQ

from .conditioning import STEPS, closed_dimensions, closed_last
from .exact_engine import ExactEngine
from .projection import (_at_point, _conditional_moment, _dependence_rows, _in_row_span, _ldl,
                         _independent_rows, _pivots, _Reduction, _Residual)
from .gaussian import (GaussHermite, NotPolynomial, TokenGaussian, _integrate_polynomial_part,
                       dag_any, dag_free_symbols, dag_map,
                       distribute, has_quadrature, nonpolynomial_parts)
from .gaussian import poly_terms as _poly_terms


class Expectation:
    """E[expr] over the Gaussian of a spec: exact for polynomials, closed forms for the link
    families of :mod:`closed_forms`, quadrature otherwise.

    Use :meth:`expect`; :attr:`kinds` collects what each call needed ("exact", "closed form",
    "quadrature") and :attr:`conditions` the expressions that must be positive for the
    closed-form expectations to exist (completed squares of exponentials)."""

    def __init__(self, gauss: TokenGaussian, exprs, extra_symbols=()):
        self.g = gauss
        self.exact = ExactEngine(gauss, exprs, extra_symbols)
        self.outside = tuple(extra_symbols)  # symbols kept out of quadrature integrands
        self.kinds = set()
        self.conditions = []
        self._closed = {}
        self._closed_cache = {}
        self._projections = {}
        self._full_projections = {}  # forms over all random variables -> their projection
        self._fixed_variables = {}  # forms over all token variables -> where R_ii = 0
        self._all_variables = None
        self._factor_cache = {}
        self._closed_or_exact = {}  # factor -> (E[factor], kind) or (None, None)
        self._cond_moments = {}
        self._at_u = {}  # projection key -> (u, x at u, tidied arguments, E[x | u])
        self._replaced = {}  # (what, projection key[, arguments]) -> dag_map's memo
        self._tidy = {}
        self._rows = {}
        self._independent = {}  # form lists -> their independent forms (_projected_node)
        self._spans = {}  # rows of forms -> the independent ones (see _reduced)
        self._reductions = {}  # forms over all token variables -> their _Reduction
        self._tokens = {}
        self._random = None  # the random variables, as a set
        self._too_complex = {}  # factor -> whether its closed form failed as TooComplex
        self._free = {}  # dag_free_symbols' memo (sub-expression -> its free symbols)
        self._given = {}  # conditioning's memos (canonical closed functions, their values)

    @property
    def used_quadrature(self) -> bool:
        return "quadrature" in self.kinds

    def expect(self, expr):
        """E[expr]; a SymPy expression in the overlaps, parameters and GaussHermite nodes."""
        try:
            out = self.exact.expect(expr)
            self.kinds.add("exact")
            return out
        except NotPolynomial:
            return self._expect_mixed(sp.sympify(expr))

    def expect_many(self, exprs) -> list:
        """[E[x] for x in exprs], shared with a forked child on the second core when there is
        one (background.two_ends: this process takes them from the front, the child from the
        back). Every expectation is a function of its expression alone (the closed forms'
        budget counts every sub-problem a term reaches, memoised or not), so the values, and
        the module made from them, are the same whichever process computed which; the child
        sends its values, existence conditions and kinds back unevaluated
        (symbolic.transfer). Whatever the child did not deliver is computed here. The values
        are returned rebuilt by transfer.unpack, the child's and this process's alike, so
        that the module's text does not depend on the split either."""
        exprs = [sp.sympify(x) for x in exprs]
        # E is linear: c x and c' x (c, c' free of the random variables) are one expectation
        # E[x] (the token-norm terms of the three overlaps of the L = 3 case: one 10 kB
        # statistic times m, e1 and e2, 1.4 s of 10 computed again); an expression whose
        # random part occurs once is taken whole
        random = set(self.g.random_variables)
        split = [x.as_independent(*random, as_Add=False) if x.is_Mul else (sp.Integer(1), x)
                 for x in exprs]
        count = Counter(r for _, r in split)
        if all(count[r] == 1 for _, r in split):
            return self._expect_each(exprs)
        unique = list(dict.fromkeys(r if count[r] > 1 else x for x, (_, r) in zip(exprs, split)))
        values = dict(zip(unique, self._expect_each(unique)))
        return [c * values[r] if count[r] > 1 else values[x]
                for x, (c, r) in zip(exprs, split)]

    def _expect_each(self, exprs) -> list:
        """[E[x] for x in exprs] (expect_many without the shared random parts)."""
        from ..background import two_ends
        from . import transfer
        out = {}

        def front(indices):
            for i in indices:
                out[i] = self.expect(exprs[i])
            # this process's values rebuilt as the child's are (transfer.unpack), whichever
            # process computed which, here while the child may still be working: an
            # expression rebuilt unevaluated and its natively built twin are structurally
            # identical (same srepr) but steered the module's cse apart (the L = 3 zoo
            # module: three different texts for one-process, shared and shared-and-forked
            # derivations)
            mine = sorted(out)
            out.update(zip(mine, transfer.unpack(transfer.pack([out[i] for i in mine]))))
            if "quadrature" in self.kinds:
                # the module's node child, forked from this process, compiles and evaluates
                # the quadrature functions: SciPy loaded here, while the child may still be
                # working, is not loaded there (0.1-0.5 s of the node choice)
                importlib.import_module("scipy.special")

        def back(indices):
            n0, kinds0 = len(self.conditions), set(self.kinds)
            done = {i: self.expect(exprs[i]) for i in indices}
            conds = self.conditions[n0:]
            flat = list(done.values()) + [x for pair in conds for x in pair]
            return (list(done), len(conds), sorted(self.kinds - kinds0),
                    transfer.pack(flat))

        got = two_ends(len(exprs), front, back)
        mine = sorted(out)
        if got is not None:
            idx, nc, kinds, data = got
            flat = transfer.unpack(data, known=[out[i] for i in mine])
            out.update(zip(idx, flat[:len(idx)]))
            rest = flat[len(idx):]
            self.conditions.extend((rest[2 * k], rest[2 * k + 1]) for k in range(nc))
            self.kinds.update(kinds)
        missing = [i for i in range(len(exprs)) if i not in out]
        if missing:  # a child that failed or died: its share is done here, and rebuilt
            values = [self.expect(exprs[i]) for i in missing]
            out.update(zip(missing, transfer.unpack(transfer.pack(values),
                                                    known=[out[i] for i in sorted(out)])))
        return [out[i] for i in range(len(exprs))]

    def _token_of(self, v):
        """The token whose variables hold v, or None (memoised: token_variables builds lists)."""
        if v not in self._tokens:
            g = self.g
            self._tokens[v] = next((l for l in range(g.L) if v in g.token_variables(l)), None)
        return self._tokens[v]

    def _factors_by_token(self, term):
        """The factors of a product grouped so that groups share no token: a list of
        (sub-product, tokens); the groups are independent, their expectations multiply."""
        if self._random is None:
            self._random = frozenset(self.g.random_variables)
        const = []
        groups = []  # [set of tokens, factors]
        for f in sp.Mul.make_args(term):
            free = dag_free_symbols(f, self._free)
            if not (free & self._random):
                const.append(f)
                continue
            toks = {self._token_of(v) for v in free} - {None}
            merged = [gr for gr in groups if gr[0] & toks]
            rest = [gr for gr in groups if not gr[0] & toks]
            tok, factors = set(toks), [f]
            for gr in merged:
                tok |= gr[0]
                factors = gr[1] + factors
            groups = rest + [[tok, factors]]
        return sp.Mul(*const), [(sp.Mul(*fs), tuple(sorted(tok))) for tok, fs in groups]

    def _gaussian_of(self, variables):
        """Mean and covariance of a tuple of token variables (independent across tokens)."""
        g = self.g
        mean, cov = [], sp.zeros(len(variables), len(variables))
        where = [(self._token_of(v), g.token_variables(self._token_of(v)).index(v))
                 for v in variables]
        covs = {}
        for i, (l, a) in enumerate(where):
            mean.append(g.token_mean(l)[a])
            for j, (l2, b) in enumerate(where):
                if l == l2:
                    if l not in covs:
                        covs[l] = g.token_covariance(l)
                    cov[i, j] = covs[l][a, b]
        return tuple(mean), cov

    def _closed_form(self, factor):
        """Closed-form E[factor] (one token group), or None."""
        from .closed_forms import NoClosedForm, TooComplex, rewrite
        hit = self._closed_cache.get(factor)
        if hit is not None or factor in self._closed_cache:
            return hit
        free = factor.free_symbols
        variables = tuple(v for v in self.g.random_variables if v in free)
        try:  # a function outside the families (tanh, sigmoid): refused before any algebra
            rewrite(factor, set(variables))
        except NoClosedForm:
            self._too_complex[factor] = False
            self._closed_cache[factor] = None
            return None
        full = self._engine(variables, variables)
        if full._erf_terms_refused(factor, set(variables)):
            # too many thresholds in some term (gelu's Cov(G): erf; products of relu and Phi
            # statistics: steps too): refused before the reduction below (conditional
            # moments of the whole statistic: seconds) is built for nothing; the thresholds
            # and their means are the same over the reduced forms
            self._too_complex[factor] = True
            self._closed_cache[factor] = None
            return None
        # several directions: conditioning on the forms divides by det(their covariance),
        # which vanishes where a student direction meets a teacher direction (the specialised
        # fixed point of a committee); the full-dimensional closed form has no such division
        reduced = None if self.g.multi else self._reduced(factor, variables)
        if reduced is not None:  # over the k < n forms the functions read
            body, ys, mean, cov = reduced
            key = (ys, tuple(mean), tuple(cov))
        else:
            body, ys, key, mean, cov = factor, variables, variables, None, None
        engine = self._engine(key, ys, mean, cov)
        n0 = len(engine.conditions)
        try:
            out = engine.expect(body)
        except NoClosedForm as err:
            out = None
            self._too_complex[factor] = isinstance(err, TooComplex)
        else:
            self.conditions.extend((c, factor) for c in engine.conditions[n0:])
            if has_quadrature(out):  # an orthant probability done by Plackett's integral
                self.kinds.add("quadrature")
        self._closed_cache[factor] = out
        return out

    def _engine(self, key, ys, mean=None, cov=None):
        """The closed-form engine of the Gaussian ys ~ N(mean, cov) (by default the token
        variables' own, _gaussian_of) under `key`, made once. Several directions: orthant
        probabilities of four Phi factors (the committee's fourth power of the error) by
        Plackett's one-dimensional integral."""
        from .closed_forms import GaussianClosedForm
        engine = self._closed.get(key)
        if engine is None:
            if mean is None:
                mean, cov = self._gaussian_of(ys)
            engine = self._closed[key] = GaussianClosedForm(ys, mean, cov,
                                                            orthant_quadrature=self.g.multi)
        return engine

    def _reduced(self, factor, variables):
        """The factor as a function of the k < n linear forms Y = A x its functions read, with
        its polynomial part replaced by the conditional moments E[p(x) | Y] (x | Y Gaussian,
        mean mu + Sigma A^T K^-1 (Y - A mu), covariance Sigma - Sigma A^T K^-1 A Sigma,
        K = A Sigma A^T): (integrand in y, y symbols, mean A mu, covariance K), or None when
        there is no reduction. A function argument may be any polynomial whose dependence on x
        lies in the forms' span (exp(-(z1 + z2)^2 / 2) reads the one form z1 + z2)."""
        random = set(variables)
        rows, fargs = [], []

        def walk(x):
            if not (x.free_symbols & random) or x.is_Symbol:
                return True
            if x.is_Add or x.is_Mul or (x.is_Pow and x.exp.is_Integer and x.exp >= 0):
                return all(walk(a) for a in x.args)
            if x.is_Pow and x.base is not sp.E:
                return False
            for a in x.args:
                if not (a.free_symbols & random):
                    continue
                got = self._rows_of(a, variables)
                if got is None or got is False:
                    return False
                fargs.append(a)
                rows.extend(got)
            return True

        if not walk(factor) or not rows:
            return None
        # the independent rows (of the same few forms, memoised)
        span = self._spans.get(tuple(rows))
        if span is None:
            M = _independent_rows(rows)
            span = self._spans[tuple(rows)] = tuple(tuple(M.row(i)) for i in range(M.rows))
        if len(span) >= len(variables):
            return None
        key = ("reduce", variables, span)
        if key not in self._projections:
            got = self._full_rows(variables, span)
            if got is None:  # not token variables only: on their own
                base = _Reduction(variables, span, self._gaussian_of(variables))
                at = range(len(variables))
            else:
                allv, at, rows = got
                base = self._reductions.get(rows)
                if base is None:
                    base = self._reductions[rows] = _Reduction(allv, rows,
                                                               self._gaussian_of(allv))
            self._projections[key] = base.restricted(at, variables)
        ys, ymean, K, cond, R, inner, memo = self._projections[key]
        rule_key = ("reduce", key, frozenset(fargs))  # the same rule, the same arguments
        if rule_key not in self._replaced:
            self._replaced[rule_key] = ({a: a.xreplace(inner) for a in fargs}, {})
        rule, memo = self._replaced[rule_key]
        body = dag_map(factor, rule, memo=memo)
        terms = _poly_terms(body, variables)
        if terms is None:
            return None


        integrand = sp.Add(*[c * _conditional_moment(alpha, cond, R, memo)
                             for alpha, c in terms.items()])
        return integrand, ys, ymean, K

    def _expect_mixed(self, expr):
        g = self.g
        # 1. label noise: independent standard Gaussians, polynomial in the integrand
        expr = _integrate_polynomial_part(expr, g.xi, [[int(i == j) for j in range(g.K)]
                                                        for i in range(g.K)])
        random = {v for l in range(g.L) for v in g.token_variables(l)}
        whole = self._whole_closed_form(expr, random)
        if whole is not None:
            return whole
        smooth = self._whole_smooth_quadrature(expr)
        if smooth is not None:
            return smooth
        # 2. split into terms: polynomial ones exactly, the rest factor by factor
        poly_terms, rest_terms = [], []
        for term in sp.Add.make_args(distribute(sp.expand(expr, deep=False))):
            if not (term.free_symbols & random):
                poly_terms.append(term)
                continue
            if _not_polynomial(term, random):
                rest_terms.append(term)
                continue
            try:
                self.exact.to_spt(term)
                poly_terms.append(term)
            except NotPolynomial:
                rest_terms.append(term)
        poly_part = sp.Add(*poly_terms)
        # polynomial terms: constant factors (possibly new non-polynomial constants made by
        # the expansion, like 1/(1 + exp(a^2))) stay outside the exact engine's ring
        rv = set(g.random_variables)
        by_monomial = {}
        for term in sp.Add.make_args(poly_part):
            const, dep = term.as_independent(*rv, as_Add=False)
            by_monomial[dep] = by_monomial.get(dep, sp.Integer(0)) + const
        out = []  # summed once at the end (a growing Add re-flattens at every +=)
        for dep, const in by_monomial.items():
            out.append(const * (self.exact.expect(dep) if dep.free_symbols & rv else dep))
        if by_monomial:
            self.kinds.add("exact")
        # 3. non-polynomial terms: a product over independent token groups; each group's
        # expectation in closed form where one exists, else a Gauss-Hermite node
        pending = {}  # one-group terms left to quadrature, per (function arguments, eta part)
        for term in rest_terms:
            const, groups = self._factors_by_token(term)
            live = [f for f, _ in groups if f.free_symbols & random]
            if len(live) == 1 and self._closed_form_or_exact(self._canonical(live[0]))[0] is None:
                c_out = (const.as_independent(*self.outside, as_Add=False)[1]
                         if self.outside else sp.Integer(1))
                f0 = self._canonical(live[0])
                key = (_function_arguments(f0, random), c_out)
                rest = sp.Mul(*[f for f, _ in groups if f is not live[0]])
                pending.setdefault(key, []).append(const / c_out * rest * f0)
                continue
            value = [const]  # multiplied once (a zero factor first: 0 * x asks if x is finite)
            for factor, _ in groups:
                value.append(self._expect_factor(factor) if factor.free_symbols & random
                             else factor)
                if value[-1] == 0:
                    break
            else:
                out.append(sp.Mul(*value))
        for (_, c_out), integrand in pending.items():
            out.append(c_out * self._quadrature_expect(sp.Add(*integrand)))
        return _merge_nodes(sp.Add(*out), self.outside)

    def _whole_closed_form(self, expr, random):
        """E[expr] in closed form in one piece when expr is not polynomial and reads the
        variables of one token only (L = 1), or when one of its functions reads several
        tokens (gelu((z1 + z2)/sqrt 2): no term of its expansion factors over the tokens
        those couple). The closed-form engine expands the product itself, once, and memoises
        its terms, instead of one engine call per term of the distributed product
        (hardtanh's Cov(G): 481 calls; gelu((z1 + z2)/sqrt 2) against z1 + erfc(0.9 zs2)
        with an encoding: 1582 calls, 140 s). None when some term has no closed form (then
        term by term: the terms that close do, the rest go to quadrature)."""
        free = expr.free_symbols & random
        if not free or (len({self._token_of(v) for v in free}) != 1
                        and not self._couples_tokens(expr, random)):
            return None
        try:
            self.exact.to_spt(expr)
            return None  # polynomial: the exact engine
        except NotPolynomial:
            pass
        out = self._closed_form(self._canonical(expr))
        if out is not None:
            self.kinds.add("closed form")
        return out

    def _couples_tokens(self, expr, random) -> bool:
        """Whether a non-polynomial function of expr reads the variables of several tokens."""
        return any(len({self._token_of(v) for v in a.free_symbols & random}) > 1
                   for a in _function_arguments(expr, random))

    def _whole_smooth_quadrature(self, expr):
        """E[expr] of a one-token statistic (one direction), or of one whose functions couple
        tokens, whose whole closed form failed as TooComplex, by one quadrature node when it
        is smooth (no step, kink or delta); None otherwise. Such a statistic (gelu's Cov(G):
        powers of Phi(z) + z phi(z) with four and more Phi factors) has no closed form, and
        its output is a quadrature output in any case; term by term it was hundreds of
        closed-form terms beside the quadrature nodes of the rest, most of the derivation
        time (gelu: 5.5 s of 7 in-process; gelu((z1 + z2)/sqrt 2) against z1 + erfc(0.9 zs2):
        230 s) and thousands of lines of module. One node over the statistic's Gaussian
        forms, with the polynomial part integrated exactly, gives the same numbers to the
        module's tolerance. Kinks stay term by term: their closed forms are exact where
        quadrature converges slowly."""
        if self.g.multi:  # committees: four Phi factors close (Plackett), a node would be 2K-d
            return None
        f0 = self._canonical(expr)
        if not self._too_complex.get(f0) or f0.has(*STEPS):
            return None
        rest, c_out = (f0.as_independent(*self.outside, as_Add=False) if self.outside
                       else (f0, sp.Integer(1)))
        if rest.free_symbols & set(self.outside):
            return None
        return c_out * self._quadrature_expect(rest)

    def _canonical(self, factor):
        """A one-token factor of a tied student renamed to the first token with the same row
        of C (same Gaussian): E[tanh(zs2)^2] is E[tanh(zs1)^2]. Other factors as they are."""
        g = self.g
        if g.untied:
            return factor
        toks = {self._token_of(v) for v in factor.free_symbols} - {None}
        if len(toks) != 1:
            return factor
        l = toks.pop()
        row = tuple(g.C[l]) if g.C else ()
        l0 = next(k for k in range(g.L) if (tuple(g.C[k]) if g.C else ()) == row)
        if l0 == l:
            return factor
        return factor.xreplace(dict(zip(g.token_variables(l), g.token_variables(l0))))

    def _expect_factor(self, factor):
        """E[factor] of one independent token group: exact, closed form or a quadrature node
        (cached on the canonical form of the factor)."""
        factor = self._canonical(factor)
        hit = self._factor_cache.get(factor)
        if hit is None:
            hit, kind = self._closed_form_or_exact(factor)
            if hit is None:
                hit = self._quadrature_expect(factor)
            else:
                self.kinds.add(kind)
            self._factor_cache[factor] = hit
        return hit

    def _closed_form_or_exact(self, factor):
        """(E[factor], "exact" or "closed form"), or (None, None) when neither applies;
        memoised (the L = 3 case asks 6244 times, of 3963 distinct factors that the exact
        engine refuses each time)."""
        hit = self._closed_or_exact.get(factor)
        if hit is None:
            try:
                hit = self.exact.expect(factor), "exact"
            except NotPolynomial:
                out = self._closed_form(factor)
                hit = out, (None if out is None else "closed form")
            self._closed_or_exact[factor] = hit
        return hit

    def _quadrature_expect(self, factor):
        """E[factor] by a Gauss-Hermite node over the fewest standard Gaussians (the
        polynomial parts integrated exactly): over the independent affine forms the
        non-polynomial functions read (:meth:`_projected_node`), else token by token."""
        self.kinds.add("quadrature")
        random = set(self.g.random_variables)
        node = self._projected_node(factor)
        if node is None:
            node = self._quadrature_node(factor, factor.free_symbols & random)
        exact, us, rest = node
        return exact + (GaussHermite(rest, sp.Tuple(*us)) if us else 0)

    def _projection(self, variables, forms, residual=True):
        """(mu, W, R, k) of :meth:`_projected_node` for affine forms (rows) of the variables,
        or None when they give no reduction or their covariance is degenerate (R None
        without `residual`)."""
        A = _independent_rows(forms)
        k = A.shape[0]
        mean, S = self._gaussian_of(variables)
        mu = sp.Matrix(mean)
        K = (A * S * A.T).applyfunc(sp.expand)
        got = _ldl(K)
        if got is None:
            return None
        U, d = got
        # x = mu + W u + r with W = S A^T L^-T and L = U D^(1/2): W^T = D^(-1/2) U^-1 (A S), a
        # triangular solve (a general symbolic inverse is far slower with several
        # directions) whose entries are rational functions of the state, cancelled; the
        # radicals are the one 1/sqrt(d_j) of each column. SymPy's Cholesky factor nested
        # fractions and radicals three deep over three forms, which the closed dimensions
        # carried into their coefficients: leaky_relu(z1 - z2) + z1/2 against sigmoid(0.8 z1)
        # Phi(0.8 z2) had a module 12 % larger, and code generation asking SymPy for the signs
        # of those radicals at every rebuilding
        B = U.lower_triangular_solve(A * S).applyfunc(sp.cancel)
        W = sp.Matrix(len(variables), k, lambda i, j: sp.expand(B[j, i] / sp.sqrt(d[j])))
        R = (S - sp.Matrix(len(variables), len(variables), lambda i, h: sp.Add(
            *[B[j, i] * B[j, h] / d[j] for j in range(k)]))).applyfunc(sp.cancel) \
            if residual else None
        return mu, W, R, k

    def _restricted_projection(self, variables, forms):
        """:meth:`_projection` for the variables of one term, read off the projection of all
        the random variables on the same forms: a row of W = Sigma A^T L^-T is its variable's
        covariances with the forms' variables times A^T L^-T, the same expressions whichever
        other variables are projected with it, so every term that reads the same forms shares
        one Cholesky factorisation and triangular solve (a statistic of three tokens with
        encoding has hundreds of terms, their variable sets a few dozen). R, of which the
        conditional moments read a few entries, is computed entry by entry when read."""
        got = self._full_rows(variables, forms)
        if got is None:  # not token variables only: on their own
            return self._projection(variables, forms)
        allv, at, rows = got
        if rows not in self._full_projections:
            self._full_projections[rows] = self._projection(allv, rows, residual=False)
        got = self._full_projections[rows]
        if got is None:
            return None
        mu, W, _, k = got
        _, S = self._gaussian_of(variables)
        W = W.extract(at, list(range(k)))
        return sp.Matrix([mu[i] for i in at]), W, _Residual(S, W), k

    def _full_rows(self, variables, forms):
        """(all token variables, the positions of `variables` among them, the forms as rows
        over all of them), or None when some variable is not a token variable."""
        allv = self._all_variables
        if allv is None:
            g = self.g
            allv = self._all_variables = tuple(v for l in range(g.L)
                                               for v in g.token_variables(l))
        if not set(variables) <= set(allv):
            return None
        at = [allv.index(v) for v in variables]
        rows = []
        for row in forms:
            full = [0] * len(allv)
            for i, c in zip(at, row):
                full[i] = c
            rows.append(tuple(full))
        return allv, at, tuple(rows)

    def _forms_fix_everything(self, variables, forms, R) -> bool:
        """Whether the residual covariance R = Sigma - Sigma A^T K^-1 A Sigma of a projection
        vanishes identically (the forms Y = A x determine every variable). Decided exactly in
        the field of rational functions of the state (fraction-free over the polynomial ring:
        K adj(K) = det(K) I, so R = 0 iff det(K) Sigma = Sigma A^T adj(K) A Sigma), where a
        cancel of every entry of R (with its Cholesky radicals) took seconds for a dozen
        variables; by that cancel when the entries are not rational functions.

        For token variables, once per set of forms over all of them: R is a covariance, so
        its block on some variables vanishes iff its diagonal entries there do, and the
        variables whose R_ii vanishes are found once for every term reading those forms."""
        got = self._full_rows(variables, forms)
        if got is not None:
            allv, at, rows = got
            if rows not in self._fixed_variables:
                self._fixed_variables[rows] = self._vanishing_diagonal(allv, rows)
            fixed = self._fixed_variables[rows]
            if fixed is not None:
                return all(i in fixed for i in at)
        zero = self._vanishing_diagonal(variables, forms, whole=True)
        if zero is None:
            return all(x == 0 or sp.cancel(x) == 0 for x in R)
        return zero

    def _vanishing_diagonal(self, variables, forms, whole=False):
        """The positions i where R_ii = 0 identically (whole: whether R = 0), in the field of
        rational functions of the state; None when the entries are not rational functions."""
        from .closed_forms import _field_of
        _, S = self._gaussian_of(variables)
        A = _independent_rows(forms)
        n, k = S.shape[0], A.shape[0]
        got = _field_of(list(S) + list(A))
        if got is None:
            return None
        dom, elems, _ = got

        def residual(dom, elems):  # det(K) R, fraction-free
            dS = DomainMatrix([elems[i * n:(i + 1) * n] for i in range(n)], (n, n), dom)
            dA = DomainMatrix([elems[n * n + i * n:n * n + (i + 1) * n] for i in range(k)],
                              (k, n), dom)
            AS = dA * dS
            adj, det = (AS * dA.transpose()).adj_det()
            return dS * det - AS.transpose() * adj * AS

        # an entry that is not zero at one point of the generators is not zero identically:
        # only the entries that vanish there (the variables the forms fix) need the exact
        # computation in the field, several times slower (76 sets of forms of the L = 3 case)
        at = _at_point(dom, elems)
        candidates = range(n)
        if at is not None:
            Dp = residual(QQ, at)
            if whole and not Dp.is_zero_matrix:
                return False
            candidates = [i for i in range(n) if Dp[i, i].element == QQ.zero]
            # a variable that is a combination of constant forms is fixed whatever Sigma
            fixed = [i for i in candidates if _in_row_span(A, i)]
            if len(fixed) == len(candidates):
                return len(fixed) == n if whole else frozenset(fixed)
        D = residual(dom, elems)
        if whole:
            return D.is_zero_matrix
        zero = dom.zero
        return frozenset(i for i in candidates if D[i, i].element == zero)

    def _projected_node(self, factor):
        """Quadrature in as many dimensions as the integrand has independent affine forms
        inside its non-polynomial functions (tanh(z1 + z2) and tanh(zs1 + zs2): two, not four).

        With x ~ N(mu, Sigma) the factor's variables and Y = A x those forms (independent rows,
        K = A Sigma A^T = L L^T by Cholesky): x = mu + Sigma A^T L^-T u + r, u ~ N(0, I_k)
        and r ~ N(0, Sigma - Sigma A^T K^-1 A Sigma) independent of u. The polynomial part in r
        (and in any u outside the functions) is integrated exactly. Returns (exact part,
        quadrature variables, integrand) or None when a function reads a non-affine form."""
        from .closed_forms import kinks_as_steps
        free = factor.free_symbols
        variables = tuple(v for v in self.g.random_variables if v in free)
        factor = kinks_as_steps(factor, set(variables))
        forms, args, kinks = [], {}, []
        vs, fs = set(variables), self._free  # free symbols by a memoised DAG walk

        def walk(x):
            if not (dag_free_symbols(x, fs) & vs):
                return True
            if x.is_Symbol:
                return True
            if x.is_Add or x.is_Mul or (x.is_Pow and x.exp.is_Integer and x.exp >= 0):
                return all(walk(a) for a in x.args)
            if x.is_Pow:  # 1 / (1 + exp(-z)), sqrt(1 + z^2): the base holds the forms
                if x.base.is_Add or x.base.is_Mul:
                    return all(walk(a) for a in x.base.args) and walk(x.exp)
                return collect(x.base) and walk(x.exp)
            if isinstance(x, sp.Heaviside):
                n0 = len(forms)
                ok = collect(x.args[0])
                kinks.extend(forms[n0:])
                return ok
            return all(collect(a) for a in x.args)

        def collect(arg):
            if not (dag_free_symbols(arg, fs) & vs):
                return True
            if isinstance(arg, sp.Function) or (arg.is_Pow and not arg.exp.is_Integer):
                return walk(arg)
            rows = self._rows_of(arg, variables)
            if rows is None:
                return walk(arg)
            if rows is False:
                return False
            forms.extend(rows)
            args[arg] = rows
            return True

        if not walk(factor) or not forms:
            return None
        # kink forms first: the first quadrature variable then carries the first kink, and
        # every kink parallel to it splits the u1 axis at a point (see kink_breaks)
        forms = kinks + [f for f in forms if f not in kinks]
        # the forms only closed functions read last: their u are read by nothing else
        # (L lower triangular) and are integrated in closed form (closed_dimensions)
        forms = closed_last(forms, lambda a: self._rows_of(a, variables), factor, variables)
        # the independent forms only: the projection depends on nothing else, and the terms
        # of a statistic read the same few forms in many repetitions and multiples
        # (tanh(z1)^2 erf(s) exp(-s^2): z1 twice, s and -2 s/3) and orders of first
        # appearance: 76 distinct form lists of the L = 3 case are 37 projections
        forms = tuple(dict.fromkeys(forms))
        if forms not in self._independent:
            self._independent[forms] = tuple(forms[i] for i in _pivots(forms))
        forms = self._independent[forms]
        key = (variables, forms)
        got = self._projection_of(variables, forms)
        if got is None:
            return None
        mu, W, R, k, fixed = got
        # what depends on the projection alone, once per projection (the terms of the
        # statistics of the L = 3 case reach 100 projections 556 times)
        at_key = self._at_u.get(key)
        if at_key is None:
            us = tuple(sp.Symbol(f"u{i + 1}", real=True) for i in range(k))
            at_u = {v: mu[i] + sum(W[i, j] * us[j] for j in range(k))
                    for i, v in enumerate(variables)}
            at_key = self._at_u[key] = (us, at_u, {}, [])
        us, at_u, tidied, cond_mean = at_key
        # the function arguments first: they depend on x only through A x = A (mu + W u)
        # (A r = 0), so x -> mu + W u there; then the polynomial occurrences of x
        for arg in args:
            if arg not in tidied:
                tidied[arg] = self._tidy_affine(arg.xreplace(at_u), us)
        inner = {arg: tidied[arg] for arg in args}
        # the same rules for every factor with the same projection and arguments
        inner_memo = self._replaced.setdefault(("inner", key, frozenset(args)), {})
        # E[p(x) | u] with x | u ~ N(mu + W u, R), monomial by monomial unless R = 0
        if fixed:
            # x = mu + W u exactly (the forms determine every variable): E[p(x) | u] is p at
            # that point, the factor as it is, not expanded into monomials (a whole statistic
            # of gelu expands to thousands of terms that its product form evaluates in tens)
            integrand = dag_map(dag_map(factor, inner, memo=inner_memo), at_u,
                                memo=self._replaced.setdefault(("at u", key), {}))
        else:
            terms = _poly_terms(dag_map(factor, inner, memo=inner_memo), variables)
            if terms is None:
                return None
            if not cond_mean:
                cond_mean.extend(sp.expand(mu[i] + sum(W[i, j] * us[j] for j in range(k)))
                                 for i in range(len(variables)))
            memo = self._cond_moments.setdefault(key, {})
            integrand = sp.Add(*[c * _conditional_moment(alpha, cond_mean, R, memo)
                                 for alpha, c in terms.items()])
        split = closed_dimensions(self, integrand, us)
        if split is None:
            return _node_tail(integrand, us)
        exact, us_done, done = _node_tail(split[0], us)  # the closed u integrated
        if us_done:
            exact += GaussHermite(done, sp.Tuple(*us_done))
        more, us, rest = _node_tail(split[1], us)  # the terms that keep them
        return exact + more, us, rest

    def _projection_of(self, variables, forms):
        """(mu, W, R, k, whether the forms fix every variable) of the projection of the
        variables on independent forms (_restricted_projection), memoised; None when the
        forms' covariance is degenerate."""
        key = (variables, forms)
        if key not in self._projections:
            got = self._restricted_projection(variables, forms)
            self._projections[key] = None if got is None else (
                *got, self._forms_fix_everything(variables, forms, got[2]))
        return self._projections[key]

    def _rows_of(self, arg, variables):
        """_dependence_rows of a function argument polynomial in the variables, memoised:
        None when it is not a polynomial, False when its degree exceeds 2."""
        key = (arg, variables)
        if key not in self._rows:
            try:
                P = sp.Poly(arg, *variables)
            except sp.PolynomialError:
                self._rows[key] = None
            else:
                self._rows[key] = (False if P.total_degree() > 2
                                   else _dependence_rows(P, variables))
        return self._rows[key]

    def _tidy_affine(self, expr, us):
        """_tidy_affine(expr, us), memoised (its simplify calls cost ~10 ms each, and the same
        function arguments come back in every product of statistics)."""
        key = (expr, us)
        hit = self._tidy.get(key)
        if hit is None:
            hit = self._tidy[key] = _tidy_affine(expr, us)
        return hit

    def _quadrature_node(self, integrand, used):
        """Whiten token by token with the fewest standard Gaussians u and integrate exactly
        everything that enters polynomially. Returns (the exact part, the quadrature
        variables, the integrand left for quadrature).

        Token l with both z*_l and z_l: z*_l = u_la, z_l = mu_l + m u_la + s u_lb with
        s = sqrt(q - m^2), and zeta_la = (e_a / s) u_lb + eps_la, eps_l ~ N(0, I - e e^T / s^2)
        (the regression of zeta on (z*_l, z_l)). With z_l alone: z_l = mu_l + sqrt(q) u_lb and
        zeta_la = (e_a / sqrt(q)) u_lb + eps_la, eps_l ~ N(0, I - e e^T / q). With z*_l alone or
        neither, zeta_l ~ N(0, I) is independent of the rest. The eps enter polynomially and are
        integrated exactly.
        """
        g = self.g
        if g.multi:
            from ..errors import SpecError
            raise SpecError(f"E[{sp.sstr(integrand)[:120]}]: quadrature over the fields of "
                            f"several directions needs the link's functions to read affine "
                            f"forms of the fields")
        sub, us, eps_cov = {}, [], []
        for l in range(g.L):
            has_t, has_s = g.zstar[l] in used, g.z[l] in used
            zetas = [a for a in range(g.r) if g.zeta[l][a] in used]
            scale = None
            if has_t:
                u1 = sp.Symbol(f"u{l + 1}a", real=True)
                sub[g.zstar[l]] = u1
                us.append(u1)
            if has_s:
                u2 = sp.Symbol(f"u{l + 1}b", real=True)
                m, q = g.ms[l], g.qs[l]
                scale = sp.sqrt(q - m ** 2) if has_t else sp.sqrt(q)
                sub[g.z[l]] = g.mu(l) + (m * sub[g.zstar[l]] if has_t else 0) + scale * u2
                us.append(u2)
            for a in zetas:
                ep = sp.Dummy(f"eps{l + 1}_{a + 1}")
                sub[g.zeta[l][a]] = ep if scale is None else ep + g.e[a] / scale * u2
                eps_cov.append((l, a, ep, scale))
        integrand = integrand.xreplace(sub)
        if eps_cov:
            n = len(eps_cov)
            cov = [[sp.Integer(0)] * n for _ in range(n)]
            for i, (l, a, _, scale) in enumerate(eps_cov):
                for j, (l2, b, _, _) in enumerate(eps_cov):
                    if l == l2:
                        cov[i][j] = int(a == b) - (g.e[a] * g.e[b] / scale ** 2
                                                   if scale is not None else 0)
            integrand = _integrate_polynomial_part(integrand, [x[2] for x in eps_cov], cov)
        # a u that enters only polynomially (outside every non-polynomial function) is
        # integrated exactly by its moments; quadrature runs over the others only
        return _node_tail(integrand, tuple(us))


def _node_tail(integrand, us):
    """(exact part, quadrature variables, integrand) of a node's integrand over the
    standard Gaussians us: those that enter only polynomially (outside every function) are
    integrated exactly by their moments, and the terms free of the rest are the exact part."""
    memo = {}  # the free symbols by a DAG walk: a closed-form integrand shares large sub-trees
    inside = set().union(*[dag_free_symbols(x, memo) for x in nonpolynomial_parts(integrand)])
    poly_us = [u for u in us if u not in inside and u in dag_free_symbols(integrand, memo)]
    if poly_us:
        integrand = _integrate_polynomial_part(
            integrand, poly_us, [[int(i == j) for j in range(len(poly_us))]
                                 for i in range(len(poly_us))])
    us = tuple(u for u in us if u in inside)
    exact, rest = _split_free(integrand, set(us))
    return exact, us, rest


def _function_arguments(expr, random) -> frozenset:
    """The arguments that read the variables `random` of the outermost non-polynomial
    sub-expressions of expr (a function's arguments, a negative or fractional power's base and
    exponent): tanh(z1)^2 zs1 and tanh(z1) zeta1 both give {z1}. Terms with the same arguments
    have the same quadrature forms: summed, they are projected once, over the union of their
    variables."""
    return frozenset(a for x in nonpolynomial_parts(expr) for a in x.args
                     if a.free_symbols & random)


def _split_free(expr, us) -> tuple:
    """(a, b) with expr = a + b, a free of the symbols us: sums split and products multiplied
    out only as far as needed to find a, so b keeps its factored form (distributing the
    conditional moments over the functions multiplied the quadrature integrands' size by ten).
    A product's free part is the product of its factors' free parts. Each distinct
    sub-expression is split once (the statistics share large sub-trees)."""
    memo, done = {}, {}
    dep = lambda x: bool(dag_free_symbols(x, memo) & us)

    def split(x):
        hit = done.get(x)
        if hit is None:
            hit = done[x] = split_once(x)
        return hit

    def split_once(x):
        if not dep(x):
            return x, sp.Integer(0)
        if x.is_Add:
            parts = [split(a) for a in x.args]
            return sp.Add(*[a for a, _ in parts]), sp.Add(*[b for _, b in parts])
        if x.is_Mul or (x.is_Pow and x.exp.is_Integer and x.exp > 1 and x.base.is_Add):
            factors = x.args if x.is_Mul else [x.base] * int(x.exp)
            free = []
            for f in factors:
                a = split(f)[0] if dep(f) else f
                if a == 0:
                    return sp.Integer(0), x
                free.append(a)
            free = sp.Mul(*free)
            return free, x - free
        return sp.Integer(0), x

    return split(expr)


def _not_polynomial(term, random) -> bool:
    """Whether some non-polynomial part of the term (nonpolynomial_parts: tanh(z1),
    exp(-zs1^2), z1^(1/2), wherever sums, products and non-negative integer powers lead)
    reads the random variables: the exact engine refuses every such term (and constants
    outside its ring too), but only after converting its polynomial factors (0.7 s of the
    L = 3 case)."""
    return any(p.free_symbols & random for p in nonpolynomial_parts(term))


def _merge_nodes(expr, outside=()):
    """Terms c * GaussHermite(f, u) over the same variables u become one node
    GaussHermite(sum c f, u) (c free of u): one quadrature per set of variables. The part of c
    in the `outside` symbols (eta) stays a factor of the node."""
    nodes, out = {}, []
    for term in sp.Add.make_args(expr):
        gh = [f for f in sp.Mul.make_args(term) if isinstance(f, GaussHermite)]
        if len(gh) != 1:
            out.append(term)
            continue
        node = gh[0]
        c = term / node
        if c.free_symbols & set(node.variables):
            out.append(term)
            continue
        c, c_out = c.as_independent(*outside, as_Add=False) if outside else (c, sp.Integer(1))
        nodes.setdefault((node.variables, c_out), []).append(c * node.integrand)
    for (us, c_out), fs in nodes.items():
        out.append(c_out * GaussHermite(sp.Add(*fs), sp.Tuple(*us)))
    return sp.Add(*out)


def _tidy_affine(expr, us):
    """An expression affine in us with each coefficient simplified (a zero coefficient must
    look like zero: kink_breaks and the delta integration test for it); other expressions
    expanded."""
    expr = sp.expand(expr)
    # the coefficients read off the terms (a Poly over the expression domain cost ~5 ms per
    # call with radicals in the coefficients)
    terms = _poly_terms(expr, us)
    if terms is None or any(sum(alpha) > 1 for alpha in terms):
        return expr  # not polynomial in us, or of degree 2 or more
    zero = sp.Integer(0)
    unit = [tuple(int(i == j) for j in range(len(us))) for i in range(len(us))]
    return (_tidy_coefficient(terms.get((0,) * len(us), zero))
            + sum(_tidy_coefficient(terms.get(a, zero)) * u for a, u in zip(unit, us)))


def _tidy_coefficient(c):
    """c (expanded) in a form where zero looks like zero: a product as it is (it is zero only
    if a factor is, and SymPy evaluates that); a sum over a common denominator with its
    common factors pulled out (factor_terms(together(c)), ~1 ms) when that leaves a product
    whose sums are free of radicals (zero only if one of them is, which SymPy's canonical
    polynomial form shows); else sp.simplify (~10 ms, it proves radical identities such as
    sqrt(q) sqrt(1 - m^2/q) - sqrt(q - m^2) = 0)."""
    if not c.is_Add:
        return c
    r = sp.factor_terms(sp.together(c))
    if r.is_Add:
        return sp.simplify(c)
    for f in sp.Mul.make_args(r):
        base = f.base if f.is_Pow else f
        if base.is_Add and any(p.is_Pow and not p.exp.is_Integer
                               for p in sp.preorder_traversal(base)):
            return sp.simplify(c)
    return r


def kink_breaks(node):
    """The kinks of a quadrature node's integrand as break points of its first variable:
    () without Heaviside factors; a tuple of expressions t_j (the integrand is smooth in u1 on
    each interval between them) when every Heaviside(nu + c . u) has c = (c1, 0, ..., 0); None
    when some kink is not along u1 (the rule then converges only like n^-2)."""
    us = node.variables
    steps = set()  # by a walk over distinct sub-expressions (atoms() walks the whole tree)

    def collect(x):
        if isinstance(x, sp.Heaviside):
            steps.add(x)
        return False

    dag_any(node.integrand, collect)
    if not steps:
        return ()
    out = []
    for h in steps:
        try:
            P = sp.Poly(h.args[0], *us)
        except sp.PolynomialError:
            return None
        if P.total_degree() != 1 or any(P.coeff_monomial(u) != 0 for u in us[1:]):
            return None
        c1 = P.coeff_monomial(us[0])
        out.append(sp.simplify(-P.coeff_monomial(1) / c1))
    return tuple(sorted(set(out), key=sp.default_sort_key))


__all__ = ["Expectation", "kink_breaks"]
