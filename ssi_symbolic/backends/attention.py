"""Quadrature backend for softmax attention models (issue 4, MATH.md section 7).

The generic symbolic path cannot integrate softmax links (it hangs); specs whose student link
contains ``exp`` (softmax_rows, trace of a softmax, ...) or whose loss is the non-squared norm
are routed here by :func:`ssi_symbolic.backends.registry.backend_for`.

Method (spherical SGD, q = 1, one positional direction e with coefficients C_l). Given the state,
the token pairs are independent and z_l = m z*_l + sqrt(1 - m^2) g_l + C_l e with z*, g i.i.d.
N(0, 1). The teacher is split by SymPy into T = sum_p c_p(theta) f_p(z*) + b(theta) (c_p, b
depend on the parameters only, each f_p lives in one output entry i(p) and has no parameter);
the student S(z) may not depend on parameters. With the squared loss

    R(m, e) = 1/2 E|T|^2 - E[T . S] + 1/2 E|S|^2 + K Delta / 2
            = 1/2 [sum_pq c_p c_q G_pq + 2 sum_p c_p b_i(p) M_p + |b|^2]       (teacher only)
              - sum_p c_p X_p(m, e) - sum_i b_i Sbar_i(e) + 1/2 P(e) + K Delta / 2

with G_pq = E[f_p f_q] (same entry), M_p = E f_p (L-dim integrals), Sbar_i(e) = E S_i(g + C e),
P(e) = E|S(g + C e)|^2 (L-dim, functions of e only) and the cross terms X_p(m, e) =
E[f_p(z*) S_i(p)(z)] (2L-dim). A polynomial f_p is expanded in Hermite polynomials, and by
Mehler's formula X_p = sum_k fhat_pk m^|k| sigma_ik(e) with sigma_ik(e) = E[S_i(g + C e) He_k(g)]
(L-dim). A non-polynomial f_p (the softmax teacher, L = 2) needs the 4-dim integral: it is
tabulated once at Chebyshev-Lobatto nodes in (m, e) (in y = 2 x^2 - 1 when X_p is numerically even
in x, which halves the degree) by pruned tensor Gauss-Hermite quadrature, and interpolated.
Every parameter value then costs only a few array operations: a whole phase diagram reuses the
same tables.

The Hessian at the origin comes from Hermite moments at e = 0 (Stein's lemma, no finite
differences): d/de E F(g + C e) = sum_l C_l E[F He_{e_l}(g)] and d/de sigma_ik = sum_l C_l
sigma_{i, k + e_l}, so

    R_mm = -sum_p c_p 2 sum_{|k|=2} fhat_pk sigma_ik(0)
    R_me = -sum_p c_p sum_{|k|=1} fhat_pk sum_l C_l sigma_{i,k+e_l}(0)
    R_ee = 1/2 sum_ll' C_l C_l' Pi_{e_l+e_l'} - sum_i (b_i + sum_{p in i} c_p M_p)
           sum_ll' C_l C_l' sigma_{i, e_l+e_l'}(0),            Pi_k = E[|S(g)|^2 He_k(g)]

with fhat_pk = E[f_p He_k] / k!, all L-dim integrals evaluated to ~1e-10.

The norm loss R = E ||T - S||_F does not split: its generated module integrates the 2L-dim
expectation directly at each state (pruned tensor Gauss-Hermite, slower).

Diffusion and O(1/d) drift (MATH.md 4; both losses): the per-state statistics of one spherical
SGD step, runtime._step_coefficients, give E G1, E G2, the eta^2..eta^4 parts of Cov(G), of the
rescaling (Ito) drift E[-(1/2)(d dX)(d dQ) + (3/8) X (d dQ)^2] and of the token-norm drift
-(eta^2 X / 2) E[token Gram excess] (the finite-d term of symbolic.derive.statistics, written in
whitened coordinates so that no derivative of the link is needed), by 2L-dim tensor Gauss-Hermite
over (z*, g). A square-loss module tabulates them per parameter set on first use as a Chebyshev
series in (theta, e'), m = cos theta, e = e' sin theta (analytic on the closed disk), with an error
estimate checked against direct quadrature (runtime._polar_table), so that the SDE evaluates
covariance and finite_d_correction at every step and path cheaply; a norm-loss module integrates
them at each state.
"""
from __future__ import annotations

import hashlib
import itertools
import math
import time
from pathlib import Path

import numpy as np
import sympy as sp

from ..errors import SpecError
from ..model.spec import ModelSpec, link_entries, token_symbols
from .exact import tool_salt
from .files import HASH_PREFIX, module_path, read_hash, write_atomic
from .printing import cse, function_source, pycode, tuple_source
from .quadrature import gauss_hermite
from .runtime import ATTENTION_HELPERS, _cheb_fit as cheb_coefficients, _lobatto as lobatto

BACKEND_VERSION = "1"
#: Chebyshev-Lobatto degrees of the (m, e) table (in y = 2x^2 - 1 for even directions)
TABLE_DEGREE = (12, 8)
#: Gauss-Hermite nodes per dimension of the L-dim integrals (student parts, constants, Hessian)
LOW_NODES = 160
#: degrees of the tables of the O(eta^2) drift term E sum_l dl_l^2
DRIFT_DEGREE = (8, 6)
#: Chebyshev degree in e of the one-dimensional functions of e
E_DEGREE = 40
#: tensor-product weights below PRUNE times the largest are dropped (they change nothing)
PRUNE = 1e-15
NORM_NODES = 24  # nodes per dimension of every quadrature of a norm-loss module
#: the pieces of the module contract this backend does not write, per loss kind, with the reason
UNAVAILABLE = {"square": {}, "norm": {}}
#: Gauss-Hermite nodes per dimension of the direct quadrature of the step statistics over the
#: 2L variables (z*, g) (covariance_direct, step_coefficients)
COVARIANCE_NODES = 24
#: nodes per dimension of the values of the step table (its check uses 3/2 of them) and its
#: Chebyshev degrees in (theta, e'), m = cos theta, e = e' sin theta
STEP_TABLE_NODES = 32
STEP_TABLE_DEGREE = (16, 10)
#: what FINITE_D_CORRECTION says in every attention module
FINITE_D_NOTE = "complete"


# ----------------------------------------------------------------------------- routing
def _has_exp(expr) -> bool:
    return any(sp.sympify(x).has(sp.exp) for x in link_entries(expr))


def _has_softmax_exp(expr, L: int) -> bool:
    """True when some exp in the link has an argument of degree >= 2 in the tokens (the
    attention scores z_i z_j of a softmax), as opposed to a sigmoid or tanh of a linear form,
    which the generic quadrature path handles."""
    zs = token_symbols(L)
    for x in link_entries(expr):
        for e in sp.sympify(x).atoms(sp.exp):
            try:
                if sp.Poly(e.args[0], *zs).total_degree() >= 2:
                    return True
            except sp.PolynomialError:
                return True
    return False


def handles(spec: ModelSpec) -> bool:
    """True for the specs this backend writes: a student link with a softmax (an exp of
    attention scores z_i z_j) or the non-squared norm loss."""
    return spec.loss == "norm" or _has_softmax_exp(spec.student, spec.L)


def _check(spec: ModelSpec) -> None:
    where = spec.where
    if not _has_exp(spec.student) and not _has_exp(spec.teacher):
        raise SpecError(f"{where('loss.kind')}: the norm loss is supported only for softmax "
                        f"attention specs (links with exp/softmax_rows)")
    if not spec.spherical:
        raise SpecError(f"{where('training.spherical')}: the attention backend needs spherical "
                        f"SGD (q = 1)")
    if spec.r != 1:
        raise SpecError(f"{where('student.positional')}: the attention backend needs exactly one "
                        f"positional direction (r = 1), got r = {spec.r}")
    params = {sp.Symbol(p, real=True) for p in spec.parameters}
    for s in link_entries(spec.student):
        bad = sorted(str(x) for x in sp.sympify(s).free_symbols & params)
        if bad:
            raise SpecError(f"{where('student.link')}: the attention backend needs a "
                            f"parameter-free student, found '{bad[0]}'")


# ----------------------------------------------------------------------------- SymPy helpers
def stable(expr):
    """Rewrite softmax entries exp(x) / sum_k exp(y_k) as 1 / sum_k exp(y_k - x): the same
    function, one exponential fewer and no overflow of the numerator."""
    expr = sp.sympify(expr)

    def is_exp_sum(f):
        return (f.is_Pow and f.exp == -1 and f.base.is_Add
                and all(isinstance(t, sp.exp) for t in f.base.args))

    def rule(e):
        nums = [f for f in e.args if isinstance(f, sp.exp)]
        dens = [f for f in e.args if is_exp_sum(f)]
        if len(nums) != 1 or len(dens) != 1:
            return e
        x = nums[0].args[0]
        rest = sp.Mul(*[f for f in e.args if f is not nums[0] and f is not dens[0]])
        return rest / sp.Add(*[sp.exp(sp.expand(t.args[0] - x)) for t in dens[0].base.args])

    return expr.replace(lambda e: e.is_Mul, rule)


def split_teacher(spec: ModelSpec):
    """T_i = sum_p c_p f_p + b_i: returns (pieces, b) with pieces a list of (i, c_p, f_p) (c_p
    parameters only, f_p tokens only) and b the list of parameter-only parts per entry."""
    zs = set(token_symbols(spec.L))
    pieces, b = [], []
    for i, t in enumerate(link_entries(spec.teacher)):
        t = sp.expand(sp.sympify(t), deep=False, power_exp=False, log=False, multinomial=False)
        const = sp.Integer(0)
        groups = {}
        for term in sp.Add.make_args(t):
            coef, zpart = term.as_independent(*zs, as_Add=False)
            if zpart == 1:
                const += coef
            else:
                groups[zpart] = groups.get(zpart, 0) + coef
        # merge z-parts with the same coefficient (e.g. the polynomial terms of one link)
        by_coef = {}
        for zpart, coef in groups.items():
            coef = sp.simplify(coef)
            by_coef[coef] = by_coef.get(coef, 0) + zpart
        for coef, f in by_coef.items():
            pieces.append((i, coef, f))
        b.append(const)
    return pieces, b


def _numeric(exprs, L):
    """A NumPy function (z1..zL) -> list of arrays for SymPy expressions in the tokens.

    An entry that equals 1 minus (or minus) an earlier entry (the rows of a 2-column softmax
    and their derivatives; checked at 256 random points to 1e-13) is computed from it, saving
    its exponentials."""
    exprs = [stable(x) for x in exprs]
    probe = _numeric_plain(exprs, L)(*np.random.default_rng(7).normal(0, 2, size=(L, 256)))
    comp = {}
    for j in range(len(exprs)):
        for i in range(j):
            if i in comp:
                continue
            if np.all(np.abs(probe[i] + probe[j] - 1) < 1e-13):
                comp[j] = (i, 1.0)
                break
            if np.all(np.abs(probe[i] + probe[j]) < 1e-13):
                comp[j] = (i, 0.0)
                break
    base = [j for j in range(len(exprs)) if j not in comp]
    fn = _numeric_plain([exprs[j] for j in base], L)

    def call(*z):
        vals = dict(zip(base, fn(*z)))
        return [vals[j] if j in vals else comp[j][1] - vals[comp[j][0]]
                for j in range(len(exprs))]
    return call


def _numeric_plain(exprs, L):
    fn = sp.lambdify(token_symbols(L), list(exprs), modules="numpy", cse=True)

    def call(*z):
        with np.errstate(over="ignore"):
            out = fn(*z)
        shape = np.broadcast(*z).shape
        return [np.broadcast_to(np.asarray(o, dtype=float), shape) for o in out]
    return call


# ----------------------------------------------------------------------------- quadrature
def hermite_e(k: int, x):
    """Probabilists' Hermite polynomial He_k(x) by the three-term recursion."""
    h0, h1 = np.ones_like(x), x
    if k == 0:
        return h0
    for j in range(1, k):
        h0, h1 = h1, x * h1 - j * h0
    return h1


def multi_indices(L: int, order: int):
    """All multi-indices k in N^L with |k| <= order."""
    return [k for k in itertools.product(range(order + 1), repeat=L) if sum(k) <= order]


def _he_multi(k, u):
    out = np.ones(u.shape[1])
    for l, kl in enumerate(k):
        if kl:
            out = out * hermite_e(kl, u[l])
    return out


def node_rule(m: float, extra: int = 0) -> tuple[int, int]:
    """Gauss-Hermite nodes per dimension (for z*, for g) of the 2L-dim cross integrals at
    overlap m, z = m z* + sqrt(1 - m^2) g + C e: the steep softmax integrand moves from g to z*
    as m grows (chosen from convergence runs against 80-100 node references: errors ~1e-9)."""
    m = abs(m)
    if m >= 0.999999:
        base = (160, 1)
    elif m >= 0.94:
        base = (72, 20)
    elif m >= 0.45:
        base = (64, 32)
    elif m >= 0.2:
        base = (56, 40)
    else:
        base = (40, 72)
    return base[0] + extra, (base[1] + extra if base[1] > 1 else 1)


# ----------------------------------------------------------------------------- Chebyshev
def to_y(x, even: bool):
    """The Chebyshev variable: y = 2x^2 - 1 for an even function of x, else y = x."""
    x = np.asarray(x, dtype=float)
    return 2 * x * x - 1 if even else x


def from_y(y, even: bool):
    y = np.asarray(y, dtype=float)
    return np.sqrt(np.clip((1 + y) / 2, 0, 1)) if even else y


# ----------------------------------------------------------------------------- integrals
class Integrals:
    """The numerical tables of one spec (teacher split, student parts, cross terms, Hessian
    moments), with error estimates; see the module docstring for the formulas."""

    def __init__(self, spec: ModelSpec, degree=TABLE_DEGREE, low_nodes=LOW_NODES, e_degree=E_DEGREE,
                 drift: bool = True):
        _check(spec)
        t0 = time.perf_counter()
        self.spec = spec
        L = self.L = spec.L
        self.C = np.array([float(row[0]) for row in spec.C])
        self.pieces, self.b = split_teacher(spec)
        self.K = len(link_entries(spec.student))
        self.S = _numeric(link_entries(spec.student), L)
        self.F = _numeric([f for _, _, f in self.pieces], L)
        self.poly = [sp.sympify(f).is_polynomial(*token_symbols(L)) for _, _, f in self.pieces]
        self.degree = degree
        self.low_nodes, self.e_degree = low_nodes, e_degree
        u, w = gauss_hermite(L, low_nodes, PRUNE)
        self.u, self.w = u, w
        # teacher-only constants
        Fu = self.F(*u)
        npc = len(self.pieces)
        self.G = np.zeros((npc, npc))
        for p in range(npc):
            for q in range(npc):
                if self.pieces[p][0] == self.pieces[q][0]:
                    self.G[p, q] = w @ (Fu[p] * Fu[q])
        self.M = np.array([w @ f for f in Fu])
        # Hermite coefficients fhat_pk = E[f_p He_k] / k! (|k| <= 2 for every piece; up to the
        # degree for polynomial pieces, exact by Gauss-Hermite)
        self.fhat = []
        for p, (_, _, f) in enumerate(self.pieces):
            order = 2
            if self.poly[p]:
                order = max(2, int(sp.Poly(f, *token_symbols(L)).total_degree()))
            coeffs = {}
            for k in multi_indices(L, order):
                v = w @ (Fu[p] * _he_multi(k, u)) / math.prod(math.factorial(x) for x in k)
                if abs(v) > 1e-13:
                    coeffs[k] = v
            self.fhat.append(coeffs)
        # student parts as Chebyshev series in e (general parity), Hermite moments needed
        self.sigma_keys = sorted({k for p in range(npc) for k in self.fhat[p]
                                  if self.poly[p]} | set(multi_indices(L, 2)))
        self.e_nodes = lobatto(e_degree)
        sb, P, sig = [], [], {k: [] for k in self.sigma_keys}
        hk = {k: _he_multi(k, u) for k in self.sigma_keys}
        for e in self.e_nodes:
            Sv = self.S(*(u + self.C[:, None] * e))
            sb.append([w @ s for s in Sv])
            P.append(w @ sum(s * s for s in Sv))
            for k in self.sigma_keys:
                sig[k].append([w @ (s * hk[k]) for s in Sv])
        self.sbar_c = cheb_coefficients(np.array(sb), 0)          # (deg+1, K)
        self.P_c = cheb_coefficients(np.array(P), 0)
        self.sigma_c = {k: cheb_coefficients(np.array(v), 0) for k, v in sig.items()}
        # Hessian moments at e = 0
        S0 = self.S(*u)
        self.sigma0 = {k: np.array([w @ (s * _he_multi(k, u)) for s in S0])
                       for k in multi_indices(L, 2)}
        Pw = sum(s * s for s in S0)
        self.Pi0 = {k: w @ (Pw * _he_multi(k, u)) for k in multi_indices(L, 2)}
        self.e_tail = float(max(np.abs(self.sbar_c[-3:]).max(), np.abs(self.P_c[-3:]).max()))
        self.low_check = self._low_order_check()
        self.time_low = time.perf_counter() - t0
        # cross-term tables for the non-polynomial pieces
        t1 = time.perf_counter()
        self.tables = {}
        self.table_info = {}
        nonpoly = [p for p in range(npc) if not self.poly[p]]
        if nonpoly:
            if L != 2:
                raise SpecError(f"{spec.where('teacher.link')}: a non-polynomial teacher is "
                                f"supported for L = 2 only (a 2L-dim table), got L = {L}")
            self._build_tables(nonpoly)
        self.time_tables = time.perf_counter() - t1
        t2 = time.perf_counter()
        self.drift_tables = None
        if drift:
            self._build_drift_tables()
        self.time_drift = time.perf_counter() - t2

    # -- L-dim check: the same student integrals with 3/4 of the nodes
    def _low_order_check(self) -> float:
        u, w = gauss_hermite(self.L, (3 * self.low_nodes) // 4, PRUNE)
        diff = 0.0
        for e in (0.0, 0.5, 1.0):
            a = self.S(*(u + self.C[:, None] * e))
            b = self.S(*(self.u + self.C[:, None] * e))
            for s1, s2 in zip(a, b):
                diff = max(diff, abs(w @ s1 - self.w @ s2), abs(w @ (s1 * s1) - self.w @ (s2 * s2)))
        return diff

    def cross_direct(self, pieces, m, e, n=None):
        """E[f_p(z*) S_i(p)(z)] at one state (m, e) by pruned tensor Gauss-Hermite over
        (z*, g), z = m z* + sqrt(1 - m^2) g + C e: a list over pieces. n = (nodes per dimension
        for z*, for g), default `node_rule(m)`; an int n means (n, n)."""
        if n is None:
            n = node_rule(m)
        ns, ng = (n, n) if isinstance(n, int) else n
        s = math.sqrt(max(0.0, 1 - m * m))
        if s == 0.0:
            ng = 1
        zs, ws = gauss_hermite(self.L, ns, PRUNE)
        gs, wg = gauss_hermite(self.L, ng, PRUNE)
        Fz = self.F(*zs)
        z = [m * zs[l][:, None] + s * gs[l][None, :] + self.C[l] * e for l in range(self.L)]
        Sv = self.S(*z)
        h = {}
        out = []
        for p in pieces:
            i = self.pieces[p][0]
            if i not in h:
                h[i] = Sv[i] @ wg
            out.append(float(ws @ (Fz[p] * h[i])))
        return out

    def _parity(self, pieces):
        """Per piece: (even in m, even in e), tested at one state with symmetric nodes."""
        res = []
        base = self.cross_direct(pieces, 0.61, 0.37, 16)
        fm = self.cross_direct(pieces, -0.61, 0.37, 16)
        fe = self.cross_direct(pieces, 0.61, -0.37, 16)
        for j in range(len(pieces)):
            tol = 1e-11 * max(1.0, abs(base[j]))
            res.append((abs(base[j] - fm[j]) < tol, abs(base[j] - fe[j]) < tol))
        return res

    def _build_tables(self, pieces):
        Nm, Ne = self.degree
        par = self._parity(pieces)
        even_m = all(p[0] for p in par)
        even_e = all(p[1] for p in par)
        if not even_m:
            Nm *= 2
        if not even_e:
            Ne *= 2
        ym, ye = lobatto(Nm), lobatto(Ne)
        xm, xe = from_y(ym, even_m), from_y(ye, even_e)
        vals = np.zeros((len(pieces), Nm + 1, Ne + 1))
        for a, m in enumerate(xm):
            for b_, e in enumerate(xe):
                vals[:, a, b_] = self.cross_direct(pieces, m, e)
        # quadrature error of the node values: against 16 more nodes per dimension at the states
        # where the integrand is hardest (m near 1, e large)
        quad_err = 0.0
        for m, e in [(0.999, 0.04), (0.6, 0.8), (0.1, 1.0)]:
            lo = self.cross_direct(pieces, m, e)
            hi = self.cross_direct(pieces, m, e, node_rule(m, 16))
            quad_err = max(quad_err, max(abs(x - y) for x, y in zip(lo, hi)))
        coeffs = cheb_coefficients(cheb_coefficients(vals, 1), 2)
        tail = float(max(np.abs(coeffs[:, -1, :]).sum(axis=-1).max(),
                         np.abs(coeffs[:, :, -1]).sum(axis=-1).max()))
        # off-node check of the interpolant against direct quadrature
        rng = np.random.default_rng(12345)
        pts = [(0.97, 0.2), (0.3, 0.9), (0.55, 0.55), (0.05, 0.05), (0.8, 0.45), (0.999, 0.02)]
        pts += [tuple(x) for x in rng.uniform(0, 0.7, size=(2, 2))]
        interp_err = 0.0
        for m, e in pts:
            direct = self.cross_direct(pieces, m, e)
            for j, p in enumerate(pieces):
                val = np.polynomial.chebyshev.chebval2d(to_y(m, even_m), to_y(e, even_e),
                                                        coeffs[j])
                interp_err = max(interp_err, abs(float(val) - direct[j]))
        for j, p in enumerate(pieces):
            self.tables[p] = coeffs[j]
        self.table_info = {"even_m": even_m, "even_e": even_e, "degree_m": Nm, "degree_e": Ne,
                           "nodes": "node_rule(m): (z*, g) per dimension, 40-160",
                           "check": "node_rule(m) + 16 at 3 states",
                           "quadrature_error": quad_err, "chebyshev_tail": tail,
                           "interpolation_check": interp_err}

    # -- the O(eta^2) drift: B = E sum_l dl_l^2 as a quadratic form in v = (c_p, b_k, 1)
    def gram_direct(self, m, e, n):
        """G_ab(m, e) = sum_l E[phi_a,l phi_b,l] with dl_l = -sum_a v_a phi_a,l, v = (c_p, b_k,
        1): phi_p,l = f_p(z*) d_l S_i(p)(z), phi_k,l = d_l S_k(z), phi_1,l = -sum_k S_k d_l S_k,
        by pruned tensor Gauss-Hermite with n = (nodes for z*, nodes for g)."""
        L, K, npc = self.L, self.K, len(self.pieces)
        ns, ng = n
        s = math.sqrt(max(0.0, 1 - m * m))
        if s == 0.0:
            ng = 1
        zs, ws = gauss_hermite(L, ns, PRUNE)
        gs, wg = gauss_hermite(L, ng, PRUNE)
        Fz = self.F(*zs)
        z = [m * zs[l][:, None] + s * gs[l][None, :] + self.C[l] * e for l in range(L)]
        Sv = self.S(*z)
        dS = self.dS(*z)
        H = np.zeros((K + 1, K + 1, len(ws)))
        for l in range(L):
            comps = [dS[l * K + k] for k in range(K)]
            comps.append(-sum(Sv[k] * comps[k] for k in range(K)))
            for a in range(K + 1):
                for b in range(a, K + 1):
                    H[a, b] += (comps[a] * comps[b]) @ wg
        for a in range(K + 1):
            for b in range(a):
                H[a, b] = H[b, a]
        na = npc + K + 1
        ent = [self.pieces[p][0] for p in range(npc)] + list(range(K)) + [K]
        fac = [Fz[p] for p in range(npc)] + [None] * (K + 1)
        G = np.zeros((na, na))
        for a in range(na):
            for b in range(a, na):
                f = ws * H[ent[a], ent[b]]
                if fac[a] is not None:
                    f = f * fac[a]
                if fac[b] is not None:
                    f = f * fac[b]
                G[a, b] = G[b, a] = f.sum()
        return G

    def _build_drift_tables(self):
        spec, L = self.spec, self.L
        zsym = token_symbols(L)
        self.dS = _numeric([sp.diff(stable(sk), zsym[l]) for l in range(L)
                            for sk in link_entries(spec.student)], L)
        Nm, Ne = DRIFT_DEGREE
        rule = lambda m: tuple(max(12, int(0.6 * x)) if x > 1 else 1   # noqa: E731
                               for x in node_rule(m))
        g0 = self.gram_direct(0.61, 0.37, (16, 16))
        tol = 1e-11 * max(1.0, np.abs(g0).max())
        ti = {"even_m": bool(np.abs(g0 - self.gram_direct(-0.61, 0.37, (16, 16))).max() < tol),
              "even_e": bool(np.abs(g0 - self.gram_direct(0.61, -0.37, (16, 16))).max() < tol)}
        xm = from_y(lobatto(Nm), True) if ti["even_m"] else lobatto(2 * Nm)
        xe = from_y(lobatto(Ne), True) if ti["even_e"] else lobatto(2 * Ne)
        vals = np.array([[self.gram_direct(m, e, rule(m)) for e in xe] for m in xm])
        coeffs = cheb_coefficients(cheb_coefficients(vals, 0), 1)     # (Nm+1, Ne+1, na, na)
        check = []
        for m, e in [(0.55, 0.55), (0.93, 0.2), (0.2, 0.9)]:
            direct = self.gram_direct(m, e, rule(m))
            vm = np.polynomial.chebyshev.chebvander(to_y(m, ti["even_m"]), len(xm) - 1)
            ve = np.polynomial.chebyshev.chebvander(to_y(e, ti["even_e"]), len(xe) - 1)
            val = np.einsum("j,k,jkab->ab", vm.ravel(), ve.ravel(), coeffs)
            check.append(float(np.abs(val - direct).max()))
        self.drift_tables = np.moveaxis(coeffs, (2, 3), (0, 1))          # (na, na, Nm+1, Ne+1)
        self.drift_info = {"degree_m": len(xm) - 1, "degree_e": len(xe) - 1, **ti,
                           "nodes": "0.6 x node_rule(m)",
                           "interpolation_check": max(check)}

    # -- error estimate of R for unit-size coefficients
    def error_estimate(self) -> float:
        """A bound-like estimate of |R_table - R| at coefficients of size <= 1: the quadrature
        difference between two node counts plus the interpolation error, per table, times the
        number of pieces, plus the L-dim integrals' errors."""
        ti = self.table_info
        tab = (max(ti["quadrature_error"], 1e-16) + max(ti["chebyshev_tail"],
                                                         ti["interpolation_check"])
               if ti else 0.0)
        return float(len(self.pieces) * tab + 2 * self.K * (self.low_check + self.e_tail))


# ----------------------------------------------------------------------------- code writing
def _arr(a) -> str:
    return "numpy.array(" + repr(np.asarray(a, dtype=float).tolist()) + ")"


def backend_salt() -> str:
    here = Path(__file__).resolve()
    h = hashlib.sha256(here.read_bytes()).hexdigest()[:16]
    return f"{tool_salt()} attention {BACKEND_VERSION} {h}"


def _constants(spec: ModelSpec, h: str) -> list:
    """The constants every attention module defines after its imports (NAME .. SPEC_HASH),
    as source lines; h is the spec's hash."""
    return [
        f"NAME = {spec.name!r}",
        f"L = {spec.L}",
        "R = 1",
        "OVERLAPS = ('m', 'e')",
        f"PARAMETERS = {tuple(spec.parameters)!r}",
        f"DEFAULTS = {{{', '.join(f'{k!r}: {float(v)!r}' for k, v in spec.parameters.items())}}}",
        "SPHERICAL = True",
        f"LOSS = {spec.loss!r}",
        f"NOISE = {float(spec.noise)!r}",
        "METHOD = 'quadrature'",
        "BACKEND = 'attention'",
        f"UNAVAILABLE = {UNAVAILABLE[spec.loss]!r}",
        f"FINITE_D_CORRECTION = {FINITE_D_NOTE!r}",
        f"SPEC_HASH = {h!r}",
    ]


def module_source(spec: ModelSpec, I: Integrals | None = None) -> str:
    """The generated module of an attention spec (imports numpy and scipy only)."""
    if spec.loss == "norm":
        _check(spec)
        return _norm_module_source(spec)
    I = I or Integrals(spec)
    names = list(spec.parameters)
    pa = [f"{p}={float(v)!r}" for p, v in spec.parameters.items()]
    pcall = ", ".join(f"{p}={p}" for p in names)
    h = spec.hash(backend_salt())
    src = Path(spec.source).name if spec.source else "(Python spec)"
    npc = len(I.pieces)
    L = spec.L
    lines = [
        f'"""Generated by ssi-symbolic (attention backend) from {src}: do not edit; regenerate '
        f"with `ssi derive`.",
        "",
        f"Model {spec.name}: L = {L}, r = 1, output shape {spec.shape or 'scalar'}, loss "
        f"{spec.loss} (1/2 ||y - y_hat||^2, label noise {spec.noise}), spherical online SGD.",
        f"Teacher link: {sp.sstr(spec.teacher)}",
        f"Student link: {sp.sstr(spec.student)}",
        f"Positional coefficients C: {[[str(c) for c in row] for row in spec.C]}",
        "",
        "R(m, e) = teacher constant - sum_p c_p X_p(m, e) - sum_i b_i Sbar_i(e) + P(e)/2 + K Delta/2",
        "(ssi_symbolic/attention.py): X_p = E[f_p(z*) S_i(z)] from a Chebyshev table in (m, e)",
        "built by tensor Gauss-Hermite quadrature (non-polynomial f_p) or from Mehler's formula",
        "(polynomial f_p); Sbar_i(e) = E S_i, P(e) = E|S|^2 as Chebyshev series in e.",
        "Teacher pieces (entry, coefficient c_p, f_p): "
        + "; ".join(f"({i}, {sp.sstr(c)}, {sp.sstr(f)[:80]})" for i, c, f in I.pieces),
        f"Constant part b: {[sp.sstr(x) for x in I.b]}",
        f"Tables: {I.table_info}",
        f"Estimated max error of population_loss (unit coefficients): {I.error_estimate():.2e}",
        "Cov(G), ito_correction and finite_d_correction (MATH.md 4): a Chebyshev table in",
        "(theta, e') of the step statistics per parameter set, built on first use by direct",
        "quadrature (step_table; its error estimate: quadrature_error).",
        '"""',
        f"{HASH_PREFIX}{h}",
        f"# tool: {backend_salt()}",
        "import numpy",
        "import scipy.special",
        "",
        "_cheb = numpy.polynomial.chebyshev",
        "",
        *_constants(spec, h),
        f"QUADRATURE_NODES = {I.low_nodes}  # L-dim integrals; tables: TABLE_INFO",
        f"TABLE_INFO = {I.table_info!r}",
        f"LOSS_ERROR_ESTIMATE = {I.error_estimate()!r}",
        "HESSIAN = 'hermite-moments'",
        f"C = {I.C.tolist()!r}",
        f"K = {I.K}",
        "",
        f"_G = {_arr(I.G)}",
        f"_M = {_arr(I.M)}",
        f"_SBAR = {_arr(I.sbar_c)}",
        f"_P = {_arr(I.P_c)}",
        f"PIECE_ENTRY = {[i for i, _, _ in I.pieces]!r}",
        f"COVARIANCE_NODES = {COVARIANCE_NODES}",
        f"STEP_TABLE_NODES = {STEP_TABLE_NODES}",
        f"STEP_TABLE_DEGREE = {STEP_TABLE_DEGREE!r}",
        f"STEP_TABLE_CHECKS = {STEP_TABLE_CHECKS!r}",
        "_STEP_TABLES = {}",
    ]
    tab_lines, cross_terms = [], []
    for p in range(npc):
        if p in I.tables:
            tab_lines.append(f"_TABLE_{p} = {_arr(I.tables[p])}")
            em, ee = I.table_info["even_m"], I.table_info["even_e"]
            ym = "2 * m * m - 1" if em else "m"
            ye = "2 * e * e - 1" if ee else "e"
            cross_terms.append(f"_chebval2(({ym}), ({ye}), _TABLE_{p})")
        else:
            i = I.pieces[p][0]
            terms = []
            for k, v in sorted(I.fhat[p].items()):
                kk = "_".join(map(str, k))
                tab_lines.append(f"_SIGMA_{p}_{kk} = {_arr(I.sigma_c[k][:, i])}")
                terms.append(f"{float(v)!r} * m ** {sum(k)} * _cheb.chebval(e, _SIGMA_{p}_{kk})")
            cross_terms.append("(" + " + ".join(terms or ["0.0"]) + ")")
    lines += tab_lines
    # derivatives of the cross terms in m and in e
    dm_terms, de_terms = [], []
    for p in range(npc):
        if p in I.tables:
            em, ee = I.table_info["even_m"], I.table_info["even_e"]
            ym = "2 * m * m - 1" if em else "m"
            ye = "2 * e * e - 1" if ee else "e"
            lines.append(f"_TABLE_{p}_DM = _cheb.chebder(_TABLE_{p}, axis=0)")
            lines.append(f"_TABLE_{p}_DE = _cheb.chebder(_TABLE_{p}, axis=1)")
            dm_terms.append(f"{'4 * m * ' if em else ''}_chebval2(({ym}), ({ye}), _TABLE_{p}_DM)")
            de_terms.append(f"{'4 * e * ' if ee else ''}_chebval2(({ym}), ({ye}), _TABLE_{p}_DE)")
        else:
            tm, te = [], []
            for k, v in sorted(I.fhat[p].items()):
                kk = "_".join(map(str, k))
                deg = sum(k)
                if deg:
                    tm.append(f"{float(v) * deg!r} * m ** {deg - 1} * "
                              f"_cheb.chebval(e, _SIGMA_{p}_{kk})")
                te.append(f"{float(v)!r} * m ** {deg} * "
                          f"_cheb.chebval(e, _cheb.chebder(_SIGMA_{p}_{kk}))")
            dm_terms.append("(" + " + ".join(tm or ["0.0 * m"]) + ")")
            de_terms.append("(" + " + ".join(te or ["0.0 * e"]) + ")")
    drift_ok = I.drift_tables is not None
    if drift_ok:
        lines.append(f"_GRAM = {_arr(I.drift_tables)}  # (a, b, j, k): Chebyshev coefficients of "
                     f"G_ab, v = (c_p, b_k, 1)")
        lines.append(f"DRIFT_INFO = {I.drift_info!r}")
    # parameter coefficients
    coef = [pycode(stable(c)) for _, c, _ in I.pieces]
    bsrc = [pycode(stable(x)) for x in I.b]
    body_params = [f"_c = [{', '.join(f'numpy.asarray({c}, dtype=float)' for c in coef)}]",
                   f"_b = [{', '.join(f'numpy.asarray({x}, dtype=float)' for x in bsrc)}]"]
    # Hessian moments
    sig0 = {k: v.tolist() for k, v in I.sigma0.items()}
    Pi0 = {k: float(v) for k, v in I.Pi0.items()}
    Cv = I.C
    hmm, hme = [], []
    for p in range(npc):
        i = I.pieces[p][0]
        mm = 2 * sum(v * sig0[k][i] for k, v in I.fhat[p].items() if sum(k) == 2)
        me = sum(v * sum(Cv[l] * sig0[tuple(kk + (1 if j == l else 0) for j, kk in
                                             enumerate(k))][i] for l in range(L))
                 for k, v in I.fhat[p].items() if sum(k) == 1)
        hmm.append(float(mm))
        hme.append(float(me))

    def e2(k_of):
        out = 0.0
        for l in range(L):
            for l2 in range(L):
                k = [0] * L
                k[l] += 1
                k[l2] += 1
                out += Cv[l] * Cv[l2] * k_of(tuple(k))
        return out
    dsbar = [float(e2(lambda k, i=i: sig0[k][i])) for i in range(I.K)]
    dP = float(e2(lambda k: Pi0[k]))
    m1 = [float(sum(v * sig0[k][I.pieces[p][0]] for k, v in I.fhat[p].items() if sum(k) == 1))
          for p in range(npc)]
    de_sbar = [float(sum(Cv[l] * sig0[tuple(1 if j == l else 0 for j in range(L))][i]
                         for l in range(L))) for i in range(I.K)]
    de_P = float(sum(Cv[l] * Pi0[tuple(1 if j == l else 0 for j in range(L))] for l in range(L)))
    lines += [
        f"_H_MM = {hmm!r}  # d2 X_p / dm2 at the origin",
        f"_H_ME = {hme!r}  # d2 X_p / dm de at the origin",
        f"_D2_SBAR = {dsbar!r}  # d2 Sbar_i / de2 at e = 0",
        f"_D2_P = {dP!r}  # d2 P / de2 at e = 0",
        f"_D1_M = {m1!r}  # d X_p / dm at the origin",
        f"_D1_SBAR = {de_sbar!r}  # d Sbar_i / de at e = 0",
        f"_D1_P = {de_P!r}",
    ]
    header = "\n".join(lines)
    clip = ["m = numpy.clip(numpy.asarray(m, dtype=float), -1.0, 1.0)",
            "e = numpy.clip(numpy.asarray(e, dtype=float), -1.0, 1.0)"]
    params = "_c, _b = teacher_coefficients(" + pcall + ")"
    fns = [
        function_source("teacher_coefficients", pa,
                        "Teacher coefficients c_p and constant parts b_i at the parameter values.",
                        body_params, "_c, _b"),
        function_source(
            "teacher_constant", pa,
            "1/2 E|T|^2 + K Delta / 2 = 1/2 [sum_pq c_p c_q G_pq + 2 sum_p c_p b_i(p) M_p + "
            "|b|^2]\n    + K Delta / 2 (depends on the parameters only).",
            [params,
             "out = 0.5 * K * NOISE + 0.5 * sum(x * x for x in _b)",
             "for p in range(len(_c)):",
             "    out = out + _c[p] * _b[PIECE_ENTRY[p]] * _M[p]",
             "    for q in range(len(_c)):",
             "        out = out + 0.5 * _c[p] * _c[q] * _G[p, q]"],
            "numpy.asarray(out, dtype=float)"),
        function_source(
            "student_mean", ["e"],
            "Sbar_i(e) = E S_i(g + C e), g ~ N(0, I): a tuple over output entries.",
            clip[1:], "tuple(_cheb.chebval(e, _SBAR[:, i]) for i in range(K))"),
        function_source(
            "student_square", ["e"],
            "P(e) = E |S(g + C e)|^2 (squared Frobenius norm of the student output).",
            clip[1:], "_cheb.chebval(e, _P)"),
        function_source(
            "cross_terms", ["m", "e"],
            "X_p(m, e) = E[f_p(z*) S_i(p)(z)] for every teacher piece p (a tuple).",
            clip, tuple_source(cross_terms)),
        function_source(
            "population_loss", ["m", "e"] + pa,
            "Population loss R(m, e) = E[1/2 ||y - y_hat||_F^2] (teacher constant - cross "
            "terms -\n    b . Sbar(e) + P(e)/2); NaN where |m| > 1 or |e| > 1 (outside the "
            "tables).",
            ["m, e = numpy.asarray(m, dtype=float), numpy.asarray(e, dtype=float)",
             params,
             "X = cross_terms(m, e)",
             "sb = student_mean(e)",
             f"out = teacher_constant({pcall}) + 0.5 * student_square(e)",
             "for p in range(len(_c)):",
             "    out = out - _c[p] * X[p]",
             "for i in range(K):",
             "    out = out - _b[i] * sb[i]",
             "inside = (numpy.abs(m) <= 1 + 1e-12) & (numpy.abs(e) <= 1 + 1e-12)"],
            "numpy.where(inside, out, numpy.nan)"),
        function_source(
            "gradient_origin", pa,
            "(dR/dm, dR/de) at (m, e) = (0, 0) from first Hermite moments (Stein's lemma).",
            [params,
             "gm = -sum(_c[p] * _D1_M[p] for p in range(len(_c)))",
             "ge = 0.5 * _D1_P - sum(_b[i] * _D1_SBAR[i] for i in range(K))",
             "ge = ge - sum(_c[p] * _M[p] * _D1_SBAR[PIECE_ENTRY[p]] for p in range(len(_c)))"],
            "_bc(gm, ge)"),
        function_source(
            "hessian_origin", pa,
            "Hessian of R in (m, e) at the origin, ((R_mm, R_me), (R_me, R_ee)), from Hermite\n"
            "    moments at e = 0 (no finite differences):\n"
            "    R_mm = -sum_p c_p 2 sum_(|k|=2) fhat_pk sigma_ik(0),\n"
            "    R_me = -sum_p c_p sum_(|k|=1) fhat_pk sum_l C_l sigma_(i, k+e_l)(0),\n"
            "    R_ee = P''(0)/2 - sum_i (b_i + sum_(p in i) c_p M_p) Sbar_i''(0).",
            [params,
             "hmm = -sum(_c[p] * _H_MM[p] for p in range(len(_c)))",
             "hme = -sum(_c[p] * _H_ME[p] for p in range(len(_c)))",
             "hee = 0.5 * _D2_P - sum(_b[i] * _D2_SBAR[i] for i in range(K))",
             "hee = hee - sum(_c[p] * _M[p] * _D2_SBAR[PIECE_ENTRY[p]] for p in range(len(_c)))"],
            "_bc_nested(((hmm, hme), (hme, hee)))"),
        function_source(
            "loss_gradient", ["m", "e"] + pa,
            "(dR/dm, dR/de) at q = 1 (derivatives of the Chebyshev tables and series).",
            clip + [params,
                    f"dXm = {tuple_source(dm_terms)}",
                    f"dXe = {tuple_source(de_terms)}",
                    "gm = -sum(_c[p] * dXm[p] for p in range(len(_c)))",
                    "ge = 0.5 * _cheb.chebval(e, _cheb.chebder(_P))",
                    "for i in range(K):",
                    "    ge = ge - _b[i] * _cheb.chebval(e, _cheb.chebder(_SBAR[:, i]))",
                    "ge = ge - sum(_c[p] * dXe[p] for p in range(len(_c)))"],
            "_bc(gm, ge)")]
    if drift_ok:
        fns += _drift_source(pa, pcall, I.drift_info)
        fns.append(_jacobian_source(pa, pcall, "1e-6"))
    fns.append(function_source(
        "quadrature_error", ["function", "*args", "**kwargs"],
        "(value, error estimate): for covariance, diffusion, ito_correction and "
        "finite_d_correction the table's estimate (_step_error); for step_coefficients and "
        "covariance_direct (n as a keyword, default COVARIANCE_NODES) the value with 3n/2 "
        "nodes and its difference from the value with n; for the other functions "
        "LOSS_ERROR_ESTIMATE (from two node counts and an off-node interpolation check when "
        "the module was derived).",
        ["if function in (step_coefficients, covariance_direct):",
         "    n = kwargs.pop('n', None) or COVARIANCE_NODES",
         "    coarse = numpy.asarray(function(*args, n=n, **kwargs), dtype=float)",
         "    fine = numpy.asarray(function(*args, n=(3 * n) // 2, **kwargs), dtype=float)",
         "    return fine, numpy.abs(fine - coarse)",
         "v = numpy.asarray(function(*args, **kwargs), dtype=float)",
         "if function in (covariance, diffusion, ito_correction, finite_d_correction):",
         "    return v, _step_error(function, args, kwargs)"],
        "v, numpy.full(v.shape, LOSS_ERROR_ESTIMATE)"))
    fns.append(_link_source(spec, pa))
    fns.append(_step_source(spec, pa, tabulated=True))
    return header + "\n\n" + ATTENTION_HELPERS + "\n\n" + "\n\n".join(fns)


def _ym(info):
    return "2 * m * m - 1" if info.get("even_m", False) else "m"


def _ye(info):
    return "2 * e * e - 1" if info.get("even_e", False) else "e"


def _jacobian_source(pa, pcall, h: str) -> str:
    """Source of the generated drift_jacobian: central differences of the module's drift with
    default step h (runtime._fd_jacobian)."""
    return function_source(
        "drift_jacobian", ["m", "e", "eta", f"h={h}"] + pa,
        "Jacobian d drift_i / d x_j over (m, e) by central differences of step h.",
        [], f"_fd_jacobian(drift, (m, e), h, dict(eta=eta, {pcall}))")


def _drift_source(pa, pcall, info) -> list:
    """loss_dl_square, drift_eta1, drift_eta2 and drift of a square-loss module (from the
    Gram table _GRAM of the O(eta^2) term and loss_gradient)."""
    return [
        function_source(
            "loss_dl_square", ["m", "e"] + pa,
            "B(m, e) = E sum_l dl_l^2 = v^T G(m, e) v with v = (c_p, b_k, 1) (see attention.py).",
            ["m = numpy.clip(numpy.asarray(m, dtype=float), -1.0, 1.0)",
             "e = numpy.clip(numpy.asarray(e, dtype=float), -1.0, 1.0)",
             f"_c, _b = teacher_coefficients({pcall})",
             "v = list(_c) + list(_b) + [1.0]",
             "m, e = numpy.broadcast_arrays(m, e)",
             f"tx = _cheb_basis(({_ym(info)}), _GRAM.shape[2]).reshape(_GRAM.shape[2], -1)",
             f"ty = _cheb_basis(({_ye(info)}), _GRAM.shape[3]).reshape(_GRAM.shape[3], -1)",
             'G = numpy.einsum("jn,abjk,kn->abn", tx, _GRAM, ty, optimize=True)',
             "G = G.reshape(G.shape[:2] + m.shape)",
             "out = 0.0",
             "for a in range(len(v)):",
             "    for b in range(len(v)):",
             "        out = out + v[a] * v[b] * G[a, b]"],
            "numpy.asarray(out, dtype=float)"),
        function_source(
            "drift_eta1", ["m", "e"] + pa,
            "O(eta) drift coefficients of spherical SGD (MATH.md 4): the projected gradient "
            "flow\n    -(I - x x^T) grad R at x = (m, e), q = 1 (the d/dq terms cancel under the "
            "projection).",
            [f"gm, ge = loss_gradient(m, e, {pcall})", "r = m * gm + e * ge"],
            "_bc(-(gm - m * r), -(ge - e * r))"),
        function_source(
            "drift_eta2", ["m", "e"] + pa,
            "O(eta^2) drift coefficients: -(x / 2) E sum_l dl_l^2 for x = m, e.",
            [f"B = loss_dl_square(m, e, {pcall})"], "_bc(-0.5 * m * B, -0.5 * e * B)"),
        function_source(
            "drift", ["m", "e", "eta"] + pa,
            "Drift d(m, e)/dt = eta drift_eta1 + eta^2 drift_eta2 (spherical online SGD).",
            [f"a1 = drift_eta1(m, e, {pcall})", f"a2 = drift_eta2(m, e, {pcall})"],
            "_bc(*[eta * x + eta ** 2 * y for x, y in zip(a1, a2)])")]


def _link_source(spec, pa) -> str:
    """teacher_link, student_link and student_link_gradient of the module, each after one
    common-subexpression elimination over its entries (overflow of an exponential in a softmax
    is harmless: the stable form divides by it)."""
    zs = [str(z) for z in token_symbols(spec.L)]
    zsym = token_symbols(spec.L)
    guard = 'with numpy.errstate(over="ignore"):'
    student = [stable(x) for x in link_entries(spec.student)]
    gradient = [stable(sp.diff(sk, zl)) for sk in student for zl in zsym]
    out = []
    for name, exprs, doc in [
            ("teacher_link", [stable(x) for x in link_entries(spec.teacher)],
             "Teacher link g*(z) entries (flattened row by row)."),
            ("student_link", student, "Student link g(z) entries (flattened row by row)."),
            ("student_link_gradient", gradient,
             "dg_k/dz_l of the student link, as K tuples of L entries.")]:
        repl, red = cse(exprs)
        body = [guard] + [f"    {x} = {pycode(v)}" for x, v in repl]
        if name == "student_link_gradient":
            L = spec.L
            rows = [tuple_source([pycode(red[k * L + l]) for l in range(L)])
                    for k in range(len(student))]
            body.append(f"    out = _bc_nested({tuple_source(rows)})")
        else:
            body.append(f"    out = _bc({', '.join(pycode(x) for x in red)})")
        out.append(function_source(name, zs + pa, doc, body, "out"))
    return "\n\n".join(out)


#: states where a table of step coefficients is checked against direct quadrature: the origin
#: region, the inside of the disk and its boundary near m = +-1 and e = +-1, where the softmax
#: makes the tensor Gauss-Hermite rule over (z*, g) converge slowest
STEP_TABLE_CHECKS = ((0.02, 0.01), (0.1, 0.05), (0.45, -0.3), (0.9, 0.1), (-0.2, 0.8),
                     (0.97, -0.2), (0.999, 0.0), (-0.995, 0.05), (0.05, 0.995))


def _step_source(spec, pa, tabulated: bool) -> str:
    """The O(1/d) and diffusion pieces of a module (MATH.md 4, runtime._step_coefficients):
    step_coefficients (direct quadrature at each state), covariance_direct, and covariance,
    diffusion, ito_correction, finite_d_correction from _coefficients, which is a Chebyshev
    table in (theta, e') built on first use per parameter set (tabulated=True) or the direct
    quadrature (False)."""
    names = list(spec.parameters)
    pcall = ", ".join(f"{p}={p}" for p in names)
    links = "(teacher_link, student_link, student_link_gradient)"
    fns = [function_source(
        "step_coefficients", ["m", "e", "n=None"] + pa,
        "The eta-coefficients of one spherical SGD step at each state (runtime "
        "_step_coefficients: E G1, E G2, Cov(G), Ito and token-norm drifts), by tensor "
        "Gauss-Hermite with n (default COVARIANCE_NODES) nodes per dimension over (z*, g): "
        "array (_SC_SIZE,) + broadcast shape, NaN outside the unit disk.",
        ["n = COVARIANCE_NODES if n is None else n",
         f"fn = lambda mm, ee, pv: _step_coefficients(mm, ee, {links}, C, LOSS == 'norm', n, "
         f"pv)"],
        f"_per_state(fn, _SC_SIZE, m, e, dict({pcall}))"),
        function_source(
        "covariance_direct", ["m", "e", "eta", "n=None"] + pa,
        "Cov(G) over (m, e) by direct quadrature at each state (step_coefficients with n "
        "nodes): ((mm, me), (em, ee)).",
        [f"c = step_coefficients(m, e, n, {pcall})"], "_bc_nested(_sc_pieces(c, eta)[0])")]
    if tabulated:
        key = tuple_source([f"float({p})" for p in names])
        fns.append(function_source(
            "step_table", pa,
            "(Chebyshev table, error estimate per component) of step_coefficients over the "
            "unit disk in (theta, e') (runtime _polar_table: degrees STEP_TABLE_DEGREE, values "
            "with STEP_TABLE_NODES nodes, error estimate from STEP_TABLE_CHECKS against direct "
            "quadrature with those nodes and 3/2 of them, plus the Chebyshev tail), built on "
            "first use per parameter set (about a minute) and kept for the session.",
            [f"key = {key}",
             "if key not in _STEP_TABLES:",
             f"    f = lambda mm, ee: step_coefficients(mm, ee, STEP_TABLE_NODES, {pcall})",
             f"    g = lambda mm, ee: step_coefficients(mm, ee, (3 * STEP_TABLE_NODES) // 2, "
             f"{pcall})",
             "    _STEP_TABLES[key] = _polar_table(f, STEP_TABLE_DEGREE, STEP_TABLE_CHECKS, g)"],
            "_STEP_TABLES[key]"))
        fns.append(function_source(
            "_coefficients", ["m", "e"] + pa,
            "(step coefficients, error estimates) at states (m, e) from step_table.",
            [], f"_tabulated(step_table, m, e, dict({pcall}))"))
    else:
        fns.append(function_source(
            "_coefficients", ["m", "e"] + pa,
            "(step coefficients, None) at states (m, e) by direct quadrature with "
            "QUADRATURE_NODES (quadrature_error re-evaluates with 3/2 of them).",
            [], f"step_coefficients(m, e, QUADRATURE_NODES, {pcall}), None"))
    how = ("from step_table" if tabulated else "by direct quadrature at each state")
    fns += [function_source(
        "covariance", ["m", "e", "eta"] + pa,
        f"Cov(G) over (m, e) (MATH.md 4; D = Cov(G) / d), {how}: ((mm, me), (em, ee)); "
        f"error estimate: quadrature_error(covariance, ...).",
        [f"c, _ = _coefficients(m, e, {pcall})"], "_bc_nested(_sc_pieces(c, eta)[0])"),
        function_source(
        "diffusion", ["m", "e", "eta", "d"] + pa,
        "Diffusion matrix D = Cov(G) / d over (m, e), shape (2, 2) + broadcast shape.",
        [], f"numpy.array(covariance(m, e, eta, {pcall})) / d"),
        function_source(
        "ito_correction", ["m", "e", "eta"] + pa,
        f"d times the O(1/d) drift of the spherical rescaling, E[-(1/2)(d dX)(d dQ) + "
        f"(3/8) X (d dQ)^2] (runtime _step_coefficients), {how}.",
        [f"c, _ = _coefficients(m, e, {pcall})"], "_bc(*_sc_pieces(c, eta)[1])"),
        function_source(
        "finite_d_correction", ["m", "e", "eta"] + pa,
        f"d times the whole O(1/d) drift (the SDE drift is drift + this / d): the rescaling "
        f"term plus the token-norm term -(eta^2 X / 2) E[token Gram excess], {how}.",
        [f"c, _ = _coefficients(m, e, {pcall})"], "_bc(*_sc_pieces(c, eta)[2])")]
    if not tabulated:
        return "\n\n".join(fns)
    fns.append(function_source(
        "_step_error", ["function", "args", "kwargs"],
        "Error estimate of covariance, diffusion, ito_correction or finite_d_correction "
        "called with (args, kwargs): the same combination of the coefficients' error "
        "estimates with |eta|^k (triangle inequality), divided by d for the diffusion.",
        ["names = ('m', 'e', 'eta') + (('d',) if function is diffusion else ()) + PARAMETERS",
         "bound = dict(DEFAULTS, **dict(zip(names, args)), **kwargs)",
         "params = {k: v for k, v in bound.items() if k not in ('m', 'e', 'eta', 'd')}",
         "_, err = _coefficients(bound['m'], bound['e'], **params)",
         "pieces = _sc_pieces(err, numpy.abs(bound['eta']))",
         "if function is diffusion:",
         "    return numpy.array(pieces[0]) / bound['d']",
         "k = {covariance: 0, ito_correction: 1, finite_d_correction: 2}[function]"],
        "numpy.array(pieces[k])"))
    return "\n\n".join(fns)


def _norm_module_source(spec: ModelSpec) -> str:
    """Module of a norm-loss attention spec: R = E ||T(z*) - S(z)||_F by pruned tensor
    Gauss-Hermite over the 2L Gaussian variables at each state."""
    names = list(spec.parameters)
    pa = [f"{p}={float(v)!r}" for p, v in spec.parameters.items()]
    h = spec.hash(backend_salt())
    src = Path(spec.source).name if spec.source else "(Python spec)"
    L = spec.L
    head = "\n".join([
        f'"""Generated by ssi-symbolic (attention backend) from {src}: do not edit; regenerate '
        f"with `ssi derive`.",
        "",
        f"Model {spec.name}: L = {L}, r = 1, loss norm (||y - y_hat||_F, not squared), "
        f"spherical online SGD.",
        f"Teacher link: {sp.sstr(spec.teacher)}",
        f"Student link: {sp.sstr(spec.student)}",
        "R(m, e) = E ||T(z*) - S(z)||_F, z = m z* + sqrt(1 - m^2) g + C e, by pruned tensor",
        "Gauss-Hermite quadrature over (z*, g) with QUADRATURE_NODES per dimension at each state",
        "(the norm is not smooth where T = S: read quadrature_error). Drift, covariance and the",
        "O(1/d) drift: the same quadrature of the step statistics at each state.",
        '"""',
        f"{HASH_PREFIX}{h}",
        f"# tool: {backend_salt()}",
        "import numpy",
        "import scipy.special",
        "",
        *_constants(spec, h),
        f"QUADRATURE_NODES = {NORM_NODES}",
        "COVARIANCE_NODES = QUADRATURE_NODES  # one rule for loss, drift and covariance",
        f"C = {[float(row[0]) for row in spec.C]!r}",
    ])
    pcall = ", ".join(f"{p}={p}" for p in names)
    args = ", ".join(["m", "e"] + names)
    fns = [function_source(
        "population_loss", ["m", "e"] + pa + ["n=None"],
        "R(m, e) = E ||T(z*) - S(z)||_F (norm loss) by tensor Gauss-Hermite over (z*, g), one "
        "state at a time (vectorised over the nodes); NaN outside |m|, |e| <= 1.",
        ["n = QUADRATURE_NODES if n is None else n",
         f"u, w = _gh_pruned({2 * L}, n, 1e-16)",
         f"zst, g = u[:{L}], u[{L}:]",
         "m, e, *ps = numpy.broadcast_arrays(*[numpy.asarray(x, dtype=float)",
         f"                                     for x in ({args},)])",
         "out = numpy.full(m.shape, numpy.nan)",
         "for idx in numpy.ndindex(m.shape):",
         "    mm, ee = m[idx], e[idx]",
         "    if abs(mm) > 1 + 1e-12 or abs(ee) > 1 + 1e-12:",
         "        continue",
         "    kw = {k: p[idx] for k, p in zip(PARAMETERS, ps)}",
         "    s = numpy.sqrt(max(0.0, 1 - mm * mm))",
         f"    z = [mm * zst[l] + s * g[l] + C[l] * ee for l in range({L})]",
         "    T = teacher_link(*zst, **kw)",
         "    S = student_link(*z)",
         "    out[idx] = w @ numpy.sqrt(sum((a - b) ** 2 for a, b in zip(T, S)) + 0.0)"],
        "out"),
        function_source(
        "quadrature_error", ["function", "*args", "**kwargs"],
        "(value with 3n/2 nodes, its difference from the value with n nodes).",
        ["global QUADRATURE_NODES",
         "n = QUADRATURE_NODES",
         "coarse = numpy.asarray(function(*args, **kwargs), dtype=float)",
         "QUADRATURE_NODES = (3 * n) // 2",
         "try:",
         "    fine = numpy.asarray(function(*args, **kwargs), dtype=float)",
         "finally:",
         "    QUADRATURE_NODES = n"],
        "fine, numpy.abs(fine - coarse)"),
        _link_source(spec, pa),
        _step_source(spec, pa, tabulated=False)]
    for name, doc, ret in [
            ("drift_eta1", "O(eta) drift coefficients E[G1]", "_bc(c[0], c[1])"),
            ("drift_eta2", "O(eta^2) drift coefficients E[G2]", "_bc(c[2], c[3])"),
            ("drift", "Drift eta E[G1] + eta^2 E[G2]",
             "_bc(eta * c[0] + eta ** 2 * c[2], eta * c[1] + eta ** 2 * c[3])")]:
        fns.append(function_source(
            name, ["m", "e"] + (["eta"] if name == "drift" else []) + pa,
            f"{doc} (norm loss: direct quadrature at each state, step_coefficients).",
            [f"c = step_coefficients(m, e, QUADRATURE_NODES, {pcall})"], ret))
    fns.append(_jacobian_source(pa, pcall, "1e-5"))
    return head + "\n\n" + ATTENTION_HELPERS + "\n\n" + "\n\n".join(fns)


# ----------------------------------------------------------------------------- generate
def salt(diffusion: bool = True) -> str:
    """The salt of this backend's spec hash (its modules always carry the covariance)."""
    return backend_salt()


def generate(spec: ModelSpec, out_dir="generated", force: bool = False, diffusion: bool = True):
    """Write <out_dir>/<name>.py for an attention spec unless its hash is current. Its
    covariance is a direct quadrature at each state (no derivation cost), so a drift-only
    request (diffusion=False) gets the full module.

    Returns (path, written), like the exact backend's generate."""
    _check(spec)
    path = module_path(spec, out_dir)
    if not force and read_hash(path) == spec.hash(backend_salt()):
        return path, False
    write_atomic(path, module_source(spec))
    return path, True
