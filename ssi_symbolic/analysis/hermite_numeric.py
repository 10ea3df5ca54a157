"""Numerical Hermite coefficients E[g(z) He_alpha(z)] of non-polynomial links (MATH.md section 5),
each with an error estimate: the machinery behind the numerical SIE of hermite.py.

z ~ N(0, I_L), He_alpha = prod_l He_{alpha_l}(z_l) (probabilists' Hermite polynomials). An entry
is taken apart into additive terms (polynomial ones exact, hermite_exact.py), products of factors
on disjoint tokens (coefficients multiply) and leaves; a leaf that depends on its tokens only
through k linear forms (tanh(z1 + z2): k = 1) is integrated in k dimensions and projected onto
the tokens (E[f(v.z) He_alpha(z)] = E[f(u) He_|alpha|(u)] v^alpha for one form; the general
identity opens the numerical section below). One-dimensional leaves use composite Gauss-Legendre
split at the kinks (zeros of the arguments of Heaviside, sign, Abs, Max, Min, Piecewise
conditions), nodes doubled until two rules agree to ``quad_tol`` (default QUAD_TOL = 1e-10);
k-dimensional leaves tensor Gauss-Hermite, or Gauss-Legendre across the kinks when they all lie
along one direction. Every coefficient carries an error estimate (the difference of two rules
plus rounding). A term with kinks along several directions keeps tensor Gauss-Hermite (slow,
algebraic convergence): a heuristic estimate from three rules, and a note says so.

Only the orders asked for are formed (lazily, order by order); `numerical_coefficients` gives one
order of a scalar link, `_numeric_tree` the tree hermite.sie walks.
"""
from __future__ import annotations

import itertools
import math
from functools import lru_cache

import numpy as np
import sympy as sp
from sympy.core.relational import Relational

from ..backends.quadrature import gauss_hermite
from ..model.spec import token_symbols
from .hermite_exact import _alpha_factorial, _entries, _exact_coefficients, _is_polynomial

#: Points of one tensor Gauss-Hermite rule (n^s) held at once.
QUADRATURE_BUDGET = 2 ** 21
#: Most nodes per dimension (one-token groups).
MAX_NODES = 160


# ---------------------------------------------------------------------------------------------
# numerical Hermite coefficients
#
# A non-polynomial entry is taken apart into a tree whose nodes give their coefficients order by
# order (only the orders the SIE decision needs are formed):
#   * sums: additive terms grouped by the tokens they use; polynomial terms exact;
#   * products of factors on disjoint tokens: E[a(z_A) b(z_B) He_alpha] is the product of the
#     factors' coefficients on the two parts of alpha (independent tokens);
#   * leaves: a function f of s tokens that depends on them only through k <= s linear forms
#     (the maximal linear sub-expressions of f; V, k x s, orthonormal rows spanning them) is
#     integrated over u ~ N(0, I_k) and projected onto the tokens:
#         E[f(V z) He_alpha(z)] = alpha! [t^alpha] sum_{|beta| = |alpha|} c_beta (V t)^beta / beta!
#     with c_beta = E[f(u) He_beta(u)] (generating function exp(t.z - |t|^2/2) =
#     sum_alpha He_alpha(z) t^alpha / alpha!; z = V^T u + w with w independent of u = V z and
#     t.z - |t|^2/2 = (V t).u - |V t|^2/2 + (t.w - |P t|^2/2), P the projector orthogonal to V);
#     for k = 1 this is E[f(v.z) He_alpha(z)] = c_|alpha| v^alpha.
# One-dimensional leaves: composite Gauss-Legendre on [-U_MAX, U_MAX] (the Gaussian weight is
# below 1e-340 beyond) in panels of width PANEL_WIDTH, also cut at the kinks (the real zeros of
# the arguments of Heaviside, sign, Abs, Max, Min and of Piecewise conditions), so that the
# integrand is smooth on every panel; the nodes per panel are doubled until two successive rules
# agree to the tolerance on every coefficient, and the difference (plus a rounding bound) is the
# error estimate (the convergence is geometric, so it bounds the finer rule's error).
# Leaves of k >= 2 dimensions: tensor Gauss-Hermite, fine and coarse rules (error |fine - coarse|).
# Kinked ones whose kink arguments are all affine with parallel gradients d (Max(z1, z2),
# relu(z1 + z2) tanh(z1 - z2)) are rotated so that w1 = d . u: composite Gauss-Legendre in w1 as
# above times Gauss-Hermite in w2..wk, and the projection uses the rotated forms. Other kinked
# leaves keep tensor Gauss-Hermite, which converges only algebraically across a kink: a third,
# coarser rule is used, the estimate is twice the larger difference (heuristic), and the result
# says so in its note.

#: One-dimensional rule: the integrals are truncated to |u| <= U_MAX ...
U_MAX = 40.0
#: ... and cut into panels of this width (and at the kinks).
PANEL_WIDTH = 2.0
#: Gauss-Legendre nodes per panel of the first rule, and at most (doubling in between).
PANEL_NODES = 8
MAX_PANEL_NODES = 512
#: Default absolute tolerance of each numerical coefficient (the node count is chosen for it).
QUAD_TOL = 1e-10

_EPS = float(np.finfo(float).eps)
_KINKED = (sp.Heaviside, sp.sign, sp.Abs, sp.Max, sp.Min, sp.Piecewise)


def _hermite_table(x, kmax):
    """He_0..He_kmax at the points x: shape (kmax + 1, len(x))."""
    H = np.empty((kmax + 1, len(x)))
    H[0] = 1.0
    if kmax >= 1:
        H[1] = x
    for a in range(1, kmax):
        H[a + 1] = x * H[a] - a * H[a - 1]
    return H


def _nodes_for(s: int) -> int:
    return int(min(MAX_NODES, math.floor(QUADRATURE_BUDGET ** (1.0 / s) + 1e-9)))


def _tensor_coefficients(f, s: int, n: int, kmax: int):
    """E[f(u) He_a(u)] for all a in {0..kmax}^s (array of that shape) and E[f^2], by the tensor
    Gauss-Hermite rule with n nodes per dimension over s independent N(0, 1)."""
    (x,), w = gauss_hermite(1, n)
    grids = np.meshgrid(*([x] * s), indexing="ij")
    vals = np.broadcast_to(np.asarray(f(*grids), dtype=float), (n,) * s)
    if not np.all(np.isfinite(vals)):
        raise ValueError("the link is not finite at some Gauss-Hermite nodes")
    M = (_hermite_table(x, kmax) * w).T  # (n, kmax + 1)
    T, S2 = vals, vals * vals
    for _ in range(s):  # contract the leading axis, append the Hermite axis
        T = np.tensordot(T, M, axes=([0], [0]))
        S2 = np.tensordot(S2, w, axes=([0], [0]))
    return T, float(S2)


@lru_cache(maxsize=None)
def _indices(m: int, n: int) -> tuple:
    """The multi-indices of length m and order n."""
    out = []
    for c in itertools.combinations_with_replacement(range(m), n):
        a = [0] * m
        for i in c:
            a[i] += 1
        out.append(tuple(a))
    return tuple(out)


def _embed(a, pos, m):
    out = [0] * m
    for p, ai in zip(pos, a):
        out[p] = ai
    return tuple(out)


#: functions NumPy evaluates itself: expressions with only these need not import SciPy (~0.5 s)
_NUMPY_FUNCTIONS = (sp.exp, sp.log, sp.sin, sp.cos, sp.tan, sp.asin, sp.acos, sp.atan, sp.atan2,
                    sp.sinh, sp.cosh, sp.tanh, sp.asinh, sp.acosh, sp.atanh, sp.Abs, sp.sign,
                    sp.Max, sp.Min, sp.Heaviside, sp.Piecewise, sp.floor, sp.ceiling)


def _lambdify(args, expr):
    expr = sp.sympify(expr)
    plain = all(isinstance(f, _NUMPY_FUNCTIONS) for f in expr.atoms(sp.Function))
    return sp.lambdify(args, expr, modules=["numpy"] if plain else ["scipy", "numpy"])


def _kink_arguments(expr, syms) -> list:
    """Expressions whose zeros are the kinks (or jumps) of expr: the arguments of Heaviside,
    sign and Abs, the pairwise differences of Max / Min arguments, the two sides of Piecewise
    conditions (only those depending on syms)."""
    toks = set(syms)
    out = []
    for node in sp.preorder_traversal(expr):
        if not isinstance(node, _KINKED) or not (node.free_symbols & toks):
            continue
        if isinstance(node, (sp.Heaviside, sp.sign, sp.Abs)):
            out.append(node.args[0])
        elif isinstance(node, (sp.Max, sp.Min)):
            out.extend(a - b for a, b in itertools.combinations(node.args, 2))
        else:
            for _, cond in node.args:
                if isinstance(cond, sp.Basic):
                    out.extend(r.lhs - r.rhs for r in cond.atoms(Relational))
    return [a for a in out if a.free_symbols & toks]


def _kink_points(args, u) -> list:
    """The real zeros in (-U_MAX, U_MAX) of the expressions args in the one variable u (roots
    of polynomials; else sign changes on a grid of step 0.005, refined by bisection)."""
    pts = set()
    grid = None
    for a in args:
        if a.is_polynomial(u):
            coeffs = [float(c) for c in sp.Poly(a, u).all_coeffs()]
            if len(coeffs) < 2 or not any(coeffs[:-1]):
                continue
            for r in np.roots(coeffs):
                if abs(r.imag) <= 1e-9 * (1 + abs(r.real)):
                    pts.add(float(r.real))
            continue
        g = _lambdify([u], a)
        if grid is None:
            grid = np.linspace(-U_MAX, U_MAX, 16001)
        with np.errstate(all="ignore"):
            v = np.broadcast_to(np.asarray(g(grid), dtype=float), grid.shape)
        ok = np.isfinite(v)
        pts.update(float(x) for x in grid[ok & (v == 0)])
        for i in np.nonzero(ok[:-1] & ok[1:] & (v[:-1] * v[1:] < 0))[0]:
            lo, hi, slo = grid[i], grid[i + 1], np.sign(v[i])
            for _ in range(64):  # bisection to the last bit
                mid = 0.5 * (lo + hi)
                if mid in (lo, hi):
                    break
                sm = np.sign(float(g(mid)))
                if sm == 0:
                    lo = hi = mid
                    break
                lo, hi = (mid, hi) if sm == slo else (lo, mid)
            pts.add(float(0.5 * (lo + hi)))
    return sorted(p for p in pts if -U_MAX < p < U_MAX)


def _panel_nodes(edges, n: int):
    """Composite Gauss-Legendre nodes and weights (times the normal density) with n nodes on each
    panel [edges[i], edges[i + 1]]."""
    a, b = edges[:-1], edges[1:]
    x, w = np.polynomial.legendre.leggauss(n)
    X = (((b - a) / 2)[:, None] * x[None, :] + ((a + b) / 2)[:, None]).ravel()
    W = (((b - a) / 2)[:, None] * w[None, :]).ravel()
    W = W * np.exp(-0.5 * X * X) / math.sqrt(2 * math.pi)
    return X, W


def _panel_rule(F, k: int, kinks, kmax: int, tol: float):
    """E[F(w) He_beta(w)], w ~ N(0, I_k), beta in {0..kmax}^k (array of that shape): composite
    Gauss-Legendre in w1 on the panels of [-U_MAX, U_MAX] cut at the kinks (F is smooth on each
    panel in w1), the nodes per panel doubled until two successive rules agree within tol (or
    64 eps times the sum of the absolute terms) on every coefficient of order <= kmax; tensor
    Gauss-Hermite in w2..wk (fine rule, then a coarse one for their error).
    Returns (values, error estimates, E[F^2], info)."""
    edges = np.union1d(np.arange(-U_MAX, U_MAX + PANEL_WIDTH / 2, PANEL_WIDTH), kinks)
    edges = edges[np.concatenate([[True], np.diff(edges) > 1e-12 * U_MAX])]
    npan = len(edges) - 1
    if k > 1:
        ngh = int(min(MAX_NODES, (QUADRATURE_BUDGET / (32 * npan)) ** (1.0 / (k - 1))))
        max_panel = max(PANEL_NODES, min(MAX_PANEL_NODES,
                                         2 * QUADRATURE_BUDGET // (npan * ngh ** (k - 1))))
    else:
        ngh, max_panel = 0, MAX_PANEL_NODES
    keep = np.indices((kmax + 1,) * k).sum(axis=0) <= kmax

    def level(n, m):
        X, W = _panel_nodes(edges, n)
        axes = [X]
        Ms = [(_hermite_table(X, kmax) * W).T]
        ws = [W]
        if k > 1:
            (x,), w = gauss_hermite(1, m)
            axes += [x] * (k - 1)
            Ms += [(_hermite_table(x, kmax) * w).T] * (k - 1)
            ws += [w] * (k - 1)
        grids = np.meshgrid(*axes, indexing="ij")
        shape = tuple(len(t) for t in axes)
        with np.errstate(all="ignore"):
            vals = np.array(np.broadcast_to(np.asarray(F(*grids), dtype=float), shape))
        bad = ~np.isfinite(vals)
        if bad.any():
            if np.any(bad & (np.multiply.reduce(np.meshgrid(*ws, indexing="ij")) > 0)):
                raise ValueError("the link is not finite at some quadrature nodes")
            vals[bad] = 0.0
        T, S2, R = vals, vals * vals, np.abs(vals)
        for M, w in zip(Ms, ws):  # contract the leading axis, append the Hermite axis
            T = np.tensordot(T, M, axes=([0], [0]))
            R = np.tensordot(R, np.abs(M), axes=([0], [0]))
            S2 = np.tensordot(S2, w, axes=([0], [0]))
        return T, float(S2), 64 * _EPS * R, int(vals.size)

    n, prev, converged = PANEL_NODES, None, False
    while True:
        T, S2, rounding, size = level(n, ngh)
        if prev is not None:
            diff = np.abs(T - prev)
            if np.all((diff <= np.maximum(tol, rounding))[keep]):
                converged = True
                break
            if 2 * n > max_panel:
                break
        prev = T
        n *= 2
    info = {"rule": "gauss-legendre" if k == 1 else "gauss-legendre x gauss-hermite",
            "panels": int(npan), "nodes_per_panel": [n, n // 2], "converged": converged}
    if k == 1:
        info["nodes"] = [size, size // 2]
    else:
        coarse = max(2, int(round(0.7 * ngh)))
        diff = diff + np.abs(T - level(n, coarse)[0])
        info["nodes_per_dimension"] = [ngh, coarse]
        info["points"] = size
    return T, diff + rounding, S2, info


def _legendre_1d(F, kinks, kmax: int, tol: float):
    """The one-dimensional _panel_rule: (values, errors, E[F^2], info) for j = 0..kmax."""
    return _panel_rule(F, 1, kinks, kmax, tol)


def _kink_direction(args, us):
    """When every kink argument is affine in us with parallel gradients: (unit direction d,
    [(gradient . d, constant)] per argument); else None."""
    grads = []
    for a in args:
        if not a.is_polynomial(*us):
            return None
        P = sp.Poly(a, *us)
        if P.total_degree() > 1:
            return None
        g = np.array([float(P.coeff_monomial(u)) for u in us])
        grads.append((g, float(P.coeff_monomial(1))))
    G = np.array([g for g, _ in grads])
    _, sv, Vt = np.linalg.svd(G, full_matrices=False)
    if np.sum(sv > 1e-12 * sv[0]) != 1:
        return None
    d = Vt[0]
    return d, [(float(g @ d), c) for g, c in grads]


class _Node:
    """Hermite coefficients of a function of the tokens `support` (sorted indices into z1..zL):
    order(n) -> {alpha over support, |alpha| = n: (value, error estimate)}; m2 = E[f^2] or None
    when unknown."""
    support: tuple = ()
    m2 = None

    def order(self, n: int) -> dict:
        cache = self.__dict__.setdefault("_orders", {})
        if n not in cache:
            cache[n] = self._order(n)
        return cache[n]

    def mean(self) -> float:
        return self.order(0)[(0,) * len(self.support)][0]


class _PolyNode(_Node):
    """A polynomial in the tokens: exact coefficients (rounded to floats)."""

    def __init__(self, expr, support, zs):
        self.support = tuple(support)
        if not self.support:
            self.coefs = {(): float(expr)}
        else:
            self.coefs = {a: float(c) for a, c in
                          _exact_coefficients(expr, [zs[i] for i in self.support]).items()}
        self.m2 = sum(c * c / _alpha_factorial(a) for a, c in self.coefs.items())

    def _order(self, n):
        out = {a: (c, 4 * _EPS * abs(c)) for a, c in self.coefs.items() if sum(a) == n}
        if n == 0 and not out:
            out[(0,) * len(self.support)] = (0.0, 0.0)
        return out


class _SumNode(_Node):
    def __init__(self, children, support):
        self.children, self.support = children, tuple(support)
        self.pos = [[self.support.index(i) for i in ch.support] for ch in children]
        sups = [set(ch.support) for ch in children]
        disjoint = all(not (sups[i] & sups[j]) for i in range(len(sups))
                       for j in range(i + 1, len(sups)))
        if disjoint and all(ch.m2 is not None for ch in children):
            mu = [ch.mean() for ch in children]
            self.m2 = sum(ch.m2 for ch in children) + (sum(mu) ** 2 - sum(x * x for x in mu))

    def _order(self, n):
        acc = {}
        m = len(self.support)
        for ch, pos in zip(self.children, self.pos):
            for a, (v, e) in ch.order(n).items():
                key = _embed(a, pos, m)
                v0, e0 = acc.get(key, (0.0, 0.0))
                acc[key] = (v0 + v, e0 + e)
        if n == 0 and not acc:
            acc[(0,) * m] = (0.0, 0.0)
        return acc


class _ProductNode(_Node):
    """scale * A * B with A and B on disjoint tokens."""

    def __init__(self, A, B, scale=1.0):
        self.A, self.B, self.scale = A, B, float(scale)
        self.support = tuple(sorted(A.support + B.support))
        self.pa = [self.support.index(i) for i in A.support]
        self.pb = [self.support.index(i) for i in B.support]
        if A.m2 is not None and B.m2 is not None:
            self.m2 = self.scale ** 2 * A.m2 * B.m2

    def _order(self, n):
        out, m, c = {}, len(self.support), self.scale
        for n1 in range(n + 1):
            da, db = self.A.order(n1), self.B.order(n - n1)
            for a, (va, ea) in da.items():
                for b, (vb, eb) in db.items():
                    key = tuple(x + y for x, y in zip(_embed(a, self.pa, m), _embed(b, self.pb, m)))
                    v = c * va * vb
                    out[key] = (v, abs(c) * (abs(va) * eb + abs(vb) * ea + ea * eb)
                                + 2 * _EPS * abs(v))
        return out


def _linear_forms(expr, syms):
    """Coefficient vectors (over syms) of the maximal sub-expressions of expr that are linear in
    the tokens: expr is a function of these linear forms."""
    toks = set(syms)
    forms = []

    def visit(node):
        fs = node.free_symbols & toks
        if not fs:
            return
        if node in toks:
            forms.append([1.0 if z == node else 0.0 for z in syms])
            return
        if (node.is_Add or node.is_Mul) and node.is_polynomial(*fs):
            P = sp.Poly(node, *syms)
            if P.total_degree() <= 1:
                forms.append([float(P.coeff_monomial(z)) for z in syms])
                return
        for arg in node.args:
            visit(arg)

    visit(expr)
    return np.array(forms, dtype=float).reshape(-1, len(syms))


def _reduction(expr, syms):
    """(V, k): V (k x s) with orthonormal rows spanning the linear forms of expr, or None when
    they span all s tokens (k = s)."""
    A = _linear_forms(expr, syms)
    s = len(syms)
    if len(A) == 0:
        return None, s
    _, sv, Vt = np.linalg.svd(A, full_matrices=False)
    k = int(np.sum(sv > 1e-12 * sv[0]))
    if k >= s:
        return None, s
    V = Vt[:k]
    V[np.abs(V) < 4 * _EPS] = 0.0
    if k == 1 and V[0][np.nonzero(V[0])[0][0]] < 0:
        V = -V
    return V, k


def _linear_power(V, beta) -> dict:
    """{alpha: [t^alpha] prod_i (V_i . t)^beta_i}."""
    s = V.shape[1]
    poly = {(0,) * s: 1.0}
    for i, bi in enumerate(beta):
        row = [(l, V[i, l]) for l in range(s) if V[i, l] != 0.0]
        for _ in range(bi):
            new = {}
            for a, c in poly.items():
                for l, vl in row:
                    key = a[:l] + (a[l] + 1,) + a[l + 1:]
                    new[key] = new.get(key, 0.0) + c * vl
            poly = new
    return poly


class _Leaf(_Node):
    """A term integrated numerically in the k dimensions of its linear forms (see above)."""

    def __init__(self, expr, support, ctx):
        self.support = tuple(support)
        syms = [ctx.zs[i] for i in self.support]
        s = len(syms)
        V, k = _reduction(expr, syms) if s > 1 else (None, 1)
        self.V, self.k = V, k
        if V is None:
            us, fu = syms, expr
        else:
            us = [sp.Dummy(f"u{j + 1}", real=True) for j in range(k)]
            fu = expr.xreplace({z: sp.Add(*[sp.Float(V[j, l]) * us[j] for j in range(k)
                                             if V[j, l] != 0.0])
                                for l, z in enumerate(syms)})
        kinks = _kink_arguments(fu, us)
        kmax = ctx.kmax
        info = {"term": str(expr)[:200], "tokens": [str(z) for z in syms], "dimension": k}
        direction = _kink_direction(kinks, us) if kinks and k > 1 else None
        if k == 1 or direction is not None:
            if k == 1:
                pts = _kink_points(kinks, us[0])
                F = _lambdify(us, fu)
            else:
                # one kink direction d: rotate u to w = Q u with w1 = d . u, the kinks are
                # the hyperplanes w1 = const; Gauss-Legendre panels in w1, Gauss-Hermite in the
                # others, and the projection onto the tokens uses Q V
                d, lin = direction
                Q = np.linalg.svd(d[None, :])[2]
                if Q[0] @ d < 0:
                    Q[0] = -Q[0]
                ws = [sp.Dummy(f"w{j + 1}", real=True) for j in range(k)]
                fw = fu.xreplace({u: sp.Add(*[sp.Float(Q[i, j]) * ws[i] for i in range(k)
                                              if Q[i, j] != 0.0])
                                  for j, u in enumerate(us)})
                pts = sorted({-c / g for g, c in lin if abs(-c / g) < U_MAX})
                F = _lambdify(ws, fw)
                self.V = Q @ (V if V is not None else np.eye(s))
            T, E, S2, rule = _panel_rule(F, k, pts, kmax, ctx.quad_tol)
            self.base = {b: (float(T[b]), float(E[b]))
                         for n in range(kmax + 1) for b in _indices(k, n)}
            rule["kinks"] = pts
            if not rule["converged"]:
                ctx.notes.append(f"the Gauss-Legendre rule for {expr} did not reach the "
                                 f"tolerance {ctx.quad_tol:g} (error estimate "
                                 f"{float(np.max(E)):.2g})")
        else:
            if (kmax + 1) ** k > 2 * 10 ** 7 or _nodes_for(k) < 3:
                raise ValueError(f"numerical Hermite coefficients: a term couples {k} tokens "
                                 f"jointly, too many for a tensor Gauss-Hermite rule (at most 7 "
                                 f"or so)")
            f = _lambdify(us, fu)
            nf = _nodes_for(k)
            levels = [nf, max(2, int(round(0.7 * nf)))]
            if kinks:
                levels.append(max(2, int(round(0.5 * nf))))
            Tf, S2 = _tensor_coefficients(f, k, nf, kmax)
            diffs = [np.abs(Tf - _tensor_coefficients(f, k, n, kmax)[0]) for n in levels[1:]]
            E = diffs[0] if not kinks else 2 * np.maximum(*diffs)
            self.base = {}
            for n in range(kmax + 1):
                for beta in _indices(k, n):
                    scale = math.sqrt(max(S2, 0.0) * _alpha_factorial(beta))
                    self.base[beta] = (float(Tf[beta]), float(E[beta]) + 64 * _EPS * scale)
            rule = {"rule": "gauss-hermite", "nodes_per_dimension": levels}
            if kinks:
                rule["kinked"] = True
                ctx.notes.append(
                    f"{expr}: kinks in {k} joint dimensions (not along one direction), tensor "
                    f"Gauss-Hermite quadrature: it converges slowly across a kink, the error "
                    f"estimate (from three rules) is heuristic")
        if self.V is not None:
            info["linear_forms"] = [[float(x) for x in row] for row in self.V]
        self.m2 = S2
        info.update(rule)
        self.info = info
        ctx.rules.append(info)

    def _order(self, n):
        if self.V is None:
            return {b: self.base[b] for b in _indices(self.k, n)}
        s = len(self.support)
        if self.k == 1:
            c, e = self.base[(n,)]
            v = self.V[0]
            out = {}
            for a in _indices(s, n):
                p = 1.0
                for vl, al in zip(v, a):
                    if al:
                        p *= vl ** al
                out[a] = (c * p, e * abs(p) + 4 * (n + 1) * _EPS * abs(c * p))
            return out
        acc = {}
        for beta in _indices(self.k, n):
            cb, eb = self.base[beta]
            fb = _alpha_factorial(beta)
            for a, p in _linear_power(self.V, beta).items():
                w = _alpha_factorial(a) / fb * p
                v0, e0, r0 = acc.get(a, (0.0, 0.0, 0.0))
                acc[a] = (v0 + w * cb, e0 + abs(w) * eb, r0 + abs(w * cb))
        return {a: (v, e + 4 * (n + 1) * _EPS * r) for a, (v, e, r) in acc.items()}


class _Context:
    def __init__(self, zs, kmax, quad_tol):
        self.zs = list(zs)
        self.index = {z: i for i, z in enumerate(zs)}
        self.kmax, self.quad_tol = kmax, quad_tol
        self.rules, self.notes = [], []

    def support(self, expr) -> tuple:
        return tuple(sorted(self.index[s] for s in expr.free_symbols if s in self.index))

    def polynomial(self, expr) -> bool:
        return _is_polynomial(expr, [self.zs[i] for i in self.support(expr)])


def _components(factors, ctx):
    """Group factors into connected components of shared tokens: [(support, [factors])]."""
    comps = []
    for f in factors:
        sup = set(ctx.support(f))
        merged = [c for c in comps if c[0] & sup]
        for c in merged:
            comps.remove(c)
            sup |= c[0]
        comps.append((sup, [f] + [g for c in merged for g in c[1]]))
    return comps


def _dimension(expr, ctx) -> int:
    """The dimension a leaf for expr would integrate in (the largest over product factors)."""
    if expr.is_Mul:
        comps = _components([f for f in expr.args if ctx.support(f)], ctx)
        if len(comps) > 1:
            return max(_dimension(sp.Mul(*fs), ctx) for _, fs in comps)
    sup = ctx.support(expr)
    if len(sup) <= 1:
        return len(sup)
    return _reduction(expr, [ctx.zs[i] for i in sup])[1]


def _build(expr, ctx) -> _Node:
    sup = ctx.support(expr)
    if not sup or ctx.polynomial(expr):
        return _PolyNode(expr, sup, ctx.zs)
    if expr.is_Add:
        poly, groups = [], {}
        for t in sp.Add.make_args(expr):
            if ctx.polynomial(t):
                poly.append(t)
            else:
                groups.setdefault(ctx.support(t), []).append(t)
        children = []
        if poly:
            p = sp.Add(*poly)
            children.append(_PolyNode(p, ctx.support(p), ctx.zs))
        for gsup, terms in groups.items():
            if len(terms) == 1:
                children.append(_build(terms[0], ctx))
                continue
            merged = sp.Add(*terms)
            # one joint leaf, unless the terms apart need fewer dimensions
            dm = _dimension(merged, ctx) if len(gsup) > 1 else 1
            if dm > 1 and max(_dimension(t, ctx) for t in terms) < dm:
                children.extend(_build(t, ctx) for t in terms)
            else:
                children.append(_Leaf(merged, gsup, ctx))
        return children[0] if len(children) == 1 else _SumNode(children, sup)
    if expr.is_Mul:
        const = sp.Mul(*[f for f in expr.args if not ctx.support(f)])
        comps = _components([f for f in expr.args if ctx.support(f)], ctx)
        rest = sp.Mul(*comps[0][1])
        if len(comps) == 1 and const != 1 and rest.is_Add:  # c * (a sum)
            return _ProductNode(_PolyNode(const, (), ctx.zs), _build(rest, ctx))
        if len(comps) > 1:
            nodes = [_build(sp.Mul(*fs), ctx) for _, fs in comps]
            node = _ProductNode(nodes[0], nodes[1], float(const))
            for other in nodes[2:]:
                node = _ProductNode(node, other)
            return node
    return _Leaf(expr, sup, ctx)


def _numeric_tree(entry, zs, kmax: int, quad_tol: float = QUAD_TOL, seed: int = 0):
    """(root node, context, L2 norm) of one entry: the root gives the Hermite coefficients order
    by order, the context the rules used and notes. E[g^2] is exact from the tree when the terms
    are on disjoint tokens, else a Monte Carlo estimate (it only sets the tolerance's scale)."""
    ctx = _Context(zs, kmax, quad_tol)
    root = _build(sp.sympify(entry), ctx)
    second = root.m2
    if second is None:
        used = [zs[i] for i in root.support]
        f = _lambdify(used, entry)
        u = np.random.default_rng(seed).standard_normal((len(used), 2 ** 16))
        vals = np.broadcast_to(np.asarray(f(*u), dtype=float), (2 ** 16,))
        second = float(np.mean(vals * vals))
    return root, ctx, math.sqrt(max(second, 0.0))


def _full_order(root, n: int, L: int) -> dict:
    """{alpha over z1..zL: (value, error)} at order n."""
    return {_embed(a, root.support, L): ve for a, ve in root.order(n).items()}


def numerical_coefficients(link, L: int, order: int, params=None,
                           quad_tol: float = QUAD_TOL) -> dict:
    """Hermite coefficients E[g(z) He_alpha(z)], |alpha| == order, of a scalar link by the
    numerical method of sie() (exact for polynomial terms): {alpha: (value, error estimate)};
    a multi-index not listed has coefficient zero."""
    entries = _entries(link, L, params)
    if len(entries) != 1:
        raise ValueError("numerical_coefficients takes a scalar link")
    extra = sorted(str(s) for s in entries[0].free_symbols if s not in token_symbols(L))
    if extra:
        raise ValueError(f"numerical coefficients need values for the parameters {extra}")
    root, _, _ = _numeric_tree(entries[0], list(token_symbols(L)), max(order, 0), quad_tol)
    return _full_order(root, order, L)


__all__ = ["numerical_coefficients"]
