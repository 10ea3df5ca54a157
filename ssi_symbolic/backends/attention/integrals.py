"""The integrals of the attention backend (see the package docstring): Hermite moments,
node rules, Chebyshev tables of the cross terms X_p(m, e) and of the O(eta^2) drift factor,
with their error estimates."""
from __future__ import annotations

import itertools
import math
import time

import numpy as np
import sympy as sp

from ...errors import SpecError
from ...model.spec import ModelSpec, link_entries, token_symbols
from ..quadrature import gauss_hermite
from ..runtime import _cheb_fit as cheb_coefficients, _lobatto as lobatto
from .routing import _check, _numeric, split_teacher, stable

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
