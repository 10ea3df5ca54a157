"""Independent references for tests/test_link_zoo.py (issue 11, "any link exactly").

Nothing here imports ``ssi_symbolic``: the links are parsed with plain SymPy into our OWN function
classes, differentiated with ``sympy.diff`` (the a.e. derivative at kinks, written out below) and
evaluated with NumPy / SciPy; expectations are nested adaptive Gauss-Kronrod quadratures
(``scipy.integrate.quad_vec``) of the integrands of MATH.md sections 3-4; the oracles are
transcriptions of published closed forms.

1. Vocabulary (the names a zoo link may use; meanings of the usual PyTorch / SciPy namesakes)

    sin cos exp log sqrt erf erfc tanh    SymPy's functions (derivatives by SymPy)
    sigmoid(x) = 1/(1 + exp(-x))          Zsigmoid, derivative s (1 - s)
    softplus(x) = log(1 + exp(x))         Zsoftplus, derivative sigmoid(x)
    Phi(x) = (1 + erf(x/sqrt 2))/2        ZPhi, derivative exp(-x^2/2)/sqrt(2 pi)
    gelu(x) = x Phi(x), silu(x) = x sigmoid(x)
    sign(x), Heaviside(x) (H(0) = 1/2)    Zsign, Zstep; a.e. derivative 0 (teachers only)
    Abs(x), abs(x)                        Zabs, a.e. derivative sign(x)
    Max(a, b, ...), Min(a, b, ...)        folded into binary Zmax / Zmin; d Max(a, b) =
                                          H(a - b) da + H(b - a) db (a.e.)
    relu(x) = Max(x, 0), leaky_relu(x, a = 0.01) = Max(x, a x) (0 <= a <= 1),
    hardtanh(x) = Min(Max(x, -1), 1)      (so d relu = H(x), d hardtanh = 1 on (-1, 1))
    He(k, x)                              probabilists' Hermite (sympy.hermite_prob), entrywise
    tsum(v), z, L, Matrix, pi, E          as in the README; floats are read as floats (their
                                          decimal values to 1e-16, far below every tolerance)

2. ``ZooLink``: the interface of tests.test_montecarlo.Link (values (N, K), gradient (N, K, L)),
   so that the Monte Carlo of test_montecarlo (``per_sample`` / ``estimate``) runs unchanged on
   zoo links.

3. ``gauss2``: E F(x, z) over x ~ N(0, 1), z = mu + m x + t, t ~ N(0, q - m^2) independent of x:
   outer integral over x by adaptive Gauss-Kronrod (scipy.integrate.quad_vec, breakpoints at the
   teacher's kinks), inner integral over z by composite Gauss-Legendre on panels cut at the
   student's kinks (vectorised; 20 against 12 nodes per panel for its error estimate). Kinks are
   found from the expression: every switch a - b of a Max / Min, every argument of Abs / sign /
   Heaviside, solved for its real roots. (A scalar adaptive inner rule, scipy's quad_vec at the
   same tolerance, gave the same numbers to 1e-16 but took 50x longer: 5-10 s per state.)
   ``reference_L1`` builds the MATH.md integrand of one token on it (loss, E G1, E G2, E[G G^T]),
   ``reference_product_L2`` the factorised two-token product links from one-token moments.

4. Oracles (closed forms from the literature, see each docstring).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce

import numpy as np
import scipy.special as ss
import sympy as sp
from scipy.integrate import quad_vec

# ----------------------------------------------------------------------------------------------
# 1. vocabulary
# ----------------------------------------------------------------------------------------------


class Zstep(sp.Function):
    """Heaviside step, H(0) = 1/2. Its a.e. derivative is 0 (a link with it is a teacher only)."""

    def fdiff(self, argindex=1):
        return sp.S.Zero


class Zsign(sp.Function):
    """sign(x) in {-1, 0, 1}; a.e. derivative 0."""

    def fdiff(self, argindex=1):
        return sp.S.Zero


class Zabs(sp.Function):
    """|x|; a.e. derivative sign(x)."""

    def fdiff(self, argindex=1):
        return Zsign(self.args[0])


class Zmax(sp.Function):
    """max(a, b); a.e. partial derivatives H(a - b), H(b - a)."""

    nargs = 2

    def fdiff(self, argindex=1):
        a, b = self.args
        return Zstep(a - b) if argindex == 1 else Zstep(b - a)


class Zmin(sp.Function):
    """min(a, b); a.e. partial derivatives H(b - a), H(a - b)."""

    nargs = 2

    def fdiff(self, argindex=1):
        a, b = self.args
        return Zstep(b - a) if argindex == 1 else Zstep(a - b)


class Zsigmoid(sp.Function):
    """1 / (1 + exp(-x)); derivative s (1 - s)."""

    def fdiff(self, argindex=1):
        s = Zsigmoid(self.args[0])
        return s * (1 - s)


class Zsoftplus(sp.Function):
    """log(1 + exp(x)); derivative sigmoid(x)."""

    def fdiff(self, argindex=1):
        return Zsigmoid(self.args[0])


class ZPhi(sp.Function):
    """Standard normal CDF; derivative the standard normal density."""

    def fdiff(self, argindex=1):
        x = self.args[0]
        return sp.exp(-x ** 2 / 2) / sp.sqrt(2 * sp.pi)


NONSMOOTH = (Zmax, Zmin, Zabs, Zsign, Zstep)

#: numerical meaning of our classes (and of erf, erfc) for sympy.lambdify
NUMERIC = [{
    "Zstep": lambda u: np.heaviside(u, 0.5),
    "Zsign": np.sign,
    "Zabs": np.abs,
    "Zmax": np.maximum,
    "Zmin": np.minimum,
    "Zsigmoid": ss.expit,
    "Zsoftplus": lambda u: np.logaddexp(0.0, u),
    "ZPhi": ss.ndtr,
    "erf": ss.erf,
    "erfc": ss.erfc,
}, "scipy", "numpy"]


def _entrywise(f):
    def g(*args):
        if args and isinstance(args[0], sp.MatrixBase):
            return args[0].applyfunc(lambda v: f(v, *args[1:]))
        return f(*args)
    return g


def _he(k, x):
    k = int(k)
    if isinstance(x, sp.MatrixBase):
        return x.applyfunc(lambda v: sp.expand(sp.hermite_prob(k, v)))
    return sp.expand(sp.hermite_prob(k, x))


def _tsum(v):
    return sp.Add(*v) if isinstance(v, sp.MatrixBase) else v


def _fold(cls):
    def f(*args):
        args = [sp.sympify(a) for a in args]
        return reduce(lambda a, b: cls(a, b), args)
    return f


def _leaky_relu(x, a=sp.Rational(1, 100)):
    return Zmax(x, sp.sympify(a) * x)


VOCABULARY = {
    "sin": _entrywise(sp.sin), "cos": _entrywise(sp.cos), "exp": _entrywise(sp.exp),
    "log": _entrywise(sp.log), "sqrt": sp.sqrt, "erf": _entrywise(sp.erf),
    "erfc": _entrywise(sp.erfc), "tanh": _entrywise(sp.tanh),
    "sigmoid": _entrywise(Zsigmoid), "softplus": _entrywise(Zsoftplus),
    "Phi": _entrywise(ZPhi),
    "gelu": _entrywise(lambda x: x * ZPhi(x)), "silu": _entrywise(lambda x: x * Zsigmoid(x)),
    "sign": _entrywise(Zsign), "Heaviside": _entrywise(Zstep),
    "Abs": _entrywise(Zabs), "abs": _entrywise(Zabs),
    "Max": _fold(Zmax), "Min": _fold(Zmin),
    "relu": _entrywise(lambda x: Zmax(x, 0)), "leaky_relu": _entrywise(_leaky_relu),
    "hardtanh": _entrywise(lambda x: Zmin(Zmax(x, -1), 1)),
    "He": _he, "tsum": _tsum, "Matrix": sp.Matrix, "pi": sp.pi, "E": sp.E,
}


def token_symbols(L):
    return sp.symbols(f"z1:{L + 1}", real=True)


def parse_link(text, L, values=None):
    """The entries of a link string as SymPy expressions in z1..zL (our own classes for the
    non-SymPy names), parameters replaced by `values`."""
    values = dict(values or {})
    zs = token_symbols(L)
    local = dict(VOCABULARY)
    local.update({f"z{l + 1}": zs[l] for l in range(L)})
    local["z"] = sp.Matrix(zs)
    local["L"] = sp.Integer(L)
    local.update({p: sp.Float(v) for p, v in values.items()})
    expr = sp.sympify(text, locals=local)
    entries = list(expr) if isinstance(expr, sp.MatrixBase) else [expr]
    return [sp.sympify(e) for e in entries]


class ZooLink:
    """A zoo link evaluated independently: entries g_k (N, K) and gradient dg_k/dz_l (N, K, L)
    of an (N, L) array; the interface of tests.test_montecarlo.Link."""

    def __init__(self, text, L, values=None):
        self.zs = token_symbols(L)
        self.exprs = parse_link(text, L, values)
        self.L, self.K = L, len(self.exprs)
        self._g = [sp.lambdify(self.zs, e, NUMERIC) for e in self.exprs]
        self._dg = None

    @property
    def dg(self):
        """[k][l] -> NumPy function of z1..zL: the a.e. derivative d g_k / d z_l (lazy, so a
        teacher with a step is never differentiated)."""
        if self._dg is None:
            self._dg = [[sp.lambdify(self.zs, sp.diff(e, z), NUMERIC) for z in self.zs]
                        for e in self.exprs]
        return self._dg

    def _call(self, f, Z):
        cols = [Z[:, l] for l in range(self.L)]
        return np.broadcast_to(np.asarray(f(*cols), dtype=float), (Z.shape[0],))

    def values(self, Z):
        return np.stack([self._call(f, Z) for f in self._g], axis=1)

    def gradient(self, Z):
        return np.stack([np.stack([self._call(f, Z) for f in row], axis=1) for row in self.dg],
                        axis=1)

    def scalar(self):
        """(g, g') as NumPy functions of one variable, broadcast to its shape (L = 1, scalar
        links)."""
        assert self.L == 1 and self.K == 1
        g, dg = self._g[0], self.dg[0][0]
        return (lambda x: np.asarray(g(x), dtype=float) + 0.0 * x), \
            (lambda x: np.asarray(dg(x), dtype=float) + 0.0 * x)


# ----------------------------------------------------------------------------------------------
# 2. kinks
# ----------------------------------------------------------------------------------------------

def _switches(expr):
    """Expressions whose zeros hold the kinks and jumps of expr."""
    out = []
    for node in sp.preorder_traversal(expr):
        if isinstance(node, (Zmax, Zmin)):
            out.append(node.args[0] - node.args[1])
        elif isinstance(node, (Zabs, Zsign, Zstep)):
            out.append(node.args[0])
    return out


def _branches(expr):
    """expr with its first non-smooth node replaced by each of its pieces, recursively: a list
    of smooth expressions whose roots contain the roots of expr (a superset is harmless)."""
    node = next((n for n in sp.preorder_traversal(expr) if isinstance(n, NONSMOOTH)), None)
    if node is None:
        return [expr]
    if isinstance(node, (Zmax, Zmin)):
        pieces = list(node.args)
    elif isinstance(node, Zabs):
        pieces = [node.args[0], -node.args[0]]
    else:
        pieces = [sp.Integer(-1), sp.Integer(0), sp.Rational(1, 2), sp.Integer(1)]
    out = []
    for p in pieces:
        out += _branches(expr.xreplace({node: p}))
    return out


def kink_points(exprs, var):
    """Sorted real points where one of the expressions (in the one variable var) has a kink or a
    jump (a superset). Switches must be polynomial in var (affine in the zoo)."""
    pts = set()
    for expr in exprs:
        for sw in _switches(expr):
            for br in _branches(sw):
                br = sp.expand(br)
                if not br.has(var):
                    continue
                coeffs = [complex(c) for c in sp.Poly(br, var).all_coeffs()]
                for r in np.roots(coeffs):
                    if abs(r.imag) < 1e-12:
                        pts.add(float(r.real))
    return sorted(pts)


# ----------------------------------------------------------------------------------------------
# 3. nested quadrature (adaptive outer, composite Gauss-Legendre inner)
# ----------------------------------------------------------------------------------------------

WIDTH = 12.0        # truncation in standard deviations: neglected Gaussian mass < 4e-33
EPSREL = 1e-13
EPSABS = 1e-15
SQ2PI = math.sqrt(2.0 * math.pi)
_GL = {n: np.polynomial.legendre.leggauss(n) for n in (12, 20)}


@dataclass
class Integral:
    value: np.ndarray
    error: float      # outer error estimate + largest inner error estimate


def _panels(lo, hi, breaks, width):
    """Breakpoints of [lo, hi]: the kinks inside, then every panel cut to at most `width`."""
    cuts = sorted({lo, hi} | {b for b in breaks if lo < b < hi})
    out = [cuts[0]]
    for a, b in zip(cuts[:-1], cuts[1:]):
        k = max(1, int(math.ceil((b - a) / width)))
        out += list(np.linspace(a, b, k + 1)[1:])
    return np.array(out)


def _composite(edges, n):
    """Nodes and weights of n-point Gauss-Legendre on every panel [edges[i], edges[i+1]]."""
    x, w = _GL[n]
    a, b = edges[:-1, None], edges[1:, None]
    return ((a + b) / 2 + (b - a) / 2 * x).ravel(), ((b - a) / 2 * w).ravel()


def gauss2(F, m, q, mu=0.0, x_points=(), z_points=(), epsrel=EPSREL, epsabs=EPSABS):
    """E F(x, z) (F returns an array (k, N) for a float x and an array z of N points) for
    x ~ N(0, 1), z = mu + m x + t with t ~ N(0, v), v = q - m^2, independent of x.

    Outer integral over x on [-WIDTH, WIDTH]: scipy.integrate.quad_vec (adaptive Gauss-Kronrod
    21, max-norm error control) with breakpoints at 0 and the x_points (the teacher's kinks:
    the inner integral is smooth in x, the student's kinks being at fixed z). Inner integral
    over z on [c - WIDTH sd, c + WIDTH sd], c = mu + m x: composite Gauss-Legendre, panels cut
    at the z_points (the student's kinks) and at most min(sd, 1) / 2 wide, so that each panel
    holds an analytic piece; value with 20 nodes per panel, error estimate its difference
    from 12 nodes per panel (vectorised: a scalar adaptive inner rule costs ~100x more)."""
    v = q - m * m
    assert v > 0
    sd = math.sqrt(v)
    width = 0.5 * min(sd, 1.0)
    inner_err = [0.0]

    def inner(x):
        c = mu + m * x
        edges = _panels(c - WIDTH * sd, c + WIDTH * sd, z_points, width)
        vals = []
        for n in (20, 12):
            z, w = _composite(edges, n)
            dens = np.exp(-0.5 * (z - c) ** 2 / v) / (SQ2PI * sd)
            vals.append(np.asarray(F(x, z), dtype=float) @ (w * dens))
        px = math.exp(-0.5 * x * x) / SQ2PI
        inner_err[0] = max(inner_err[0], float(np.max(np.abs(vals[0] - vals[1]))) * px)
        return px * vals[0]

    xs = sorted({p for p in x_points if -WIDTH < p < WIDTH} | {0.0})
    val, err = quad_vec(inner, -WIDTH, WIDTH, points=xs, epsrel=epsrel, epsabs=epsabs,
                        norm="max", limit=2000)
    return Integral(np.asarray(val, dtype=float), float(err) + 2 * WIDTH * inner_err[0])


def split_state(state, r, spherical):
    """(m, e (r,), q) from a state tuple in OVERLAPS order."""
    m = float(state[0])
    e = np.array([float(x) for x in state[1:1 + r]])
    q = 1.0 if spherical else float(state[1 + r])
    return m, e, q


@dataclass
class Reference:
    loss: float
    drift_eta1: np.ndarray
    drift_eta2: np.ndarray
    drift: np.ndarray
    covariance: np.ndarray
    error: float         # the quadrature's own error estimate (absolute)


def reference_L1(teacher, student, state, C=None, spherical=True, eta=0.1, values=None):
    """Loss, E G1, E G2, E G = eta E G1 + eta^2 E G2 and Cov(G) of one token (L = 1) straight
    from MATH.md sections 3-4, with r = 0 or 1 positional directions and no label noise.

    Variables: x = z*, t = z - mu - m x ~ N(0, v) independent of x (v = q - m^2), and zeta,
    which enters G affinely (A_e = dl (zeta + C)) and given (x, t) is Gaussian with mean
    c1 = e t / v and second moment c2 = c1^2 + 1 - e^2 / v (zeta is independent of z*,
    Cov(zeta, t) = e). So every quantity is E over (x, z) of a function of x, z and c1, c2:

        dl = -(g*(x) - g(z)) g'(z),  A_m = dl x,  A_e = dl (zeta + C),  A_q = dl z,  B = dl^2
        spherical: G1 = (-(A_m - m A_q), -(A_e - e A_q)),  G2 = (-m B / 2, -e B / 2)
        plain:     G1 = (-A_m, -A_e, -2 A_q),              G2 = (0, 0, B)
    """
    r = len(C[0]) if C else 0
    assert r <= 1
    m, e, q = split_state(state, r, spherical)
    e1 = float(e[0]) if r else 0.0
    c_pos = float(C[0][0]) if r else 0.0
    mu = c_pos * e1
    v = q - m * m
    T, S = ZooLink(teacher, 1, values), ZooLink(student, 1, values)
    tf, _ = T.scalar()
    sf, dsf = S.scalar()
    n = 1 + r + (0 if spherical else 1)
    iu = np.triu_indices(n)

    def F(x, z):
        res = tf(x) - sf(z)
        dl = -res * dsf(z)
        t = z - mu - m * x
        c1 = e1 * t / v
        c2 = c1 * c1 + 1.0 - e1 * e1 / v
        A_m, A_q, B = dl * x, dl * z, dl * dl
        zero = np.zeros_like(z)
        # G1_i = a_i + b_i zeta
        if spherical:
            a1 = [-(A_m - m * A_q)] + ([-(dl * c_pos - e1 * A_q)] if r else [])
            b1 = [zero] + ([-dl] if r else [])
            g2 = [-0.5 * m * B] + ([-0.5 * e1 * B] if r else [])
        else:
            a1 = [-A_m] + ([-dl * c_pos] if r else []) + [-2.0 * A_q]
            b1 = [zero] + ([-dl] if r else []) + [zero]
            g2 = [zero] * (1 + r) + [B]
        a1, b1, g2 = np.array(a1), np.array(b1), np.array(g2)       # (n, N)
        a = eta * a1 + eta ** 2 * g2
        b = eta * b1
        gg = (a[:, None] * a[None] + (a[:, None] * b[None] + b[:, None] * a[None]) * c1
              + b[:, None] * b[None] * c2)                           # (n, n, N)
        return np.concatenate([[0.5 * res * res], a1 + b1 * c1, g2, gg[iu]])

    x_pts = kink_points(T.exprs, T.zs[0])
    z_pts = kink_points(S.exprs, S.zs[0])
    I = gauss2(F, m, q, mu, x_pts, z_pts)
    val = I.value
    loss = float(val[0])
    g1 = val[1:1 + n]
    g2 = val[1 + n:1 + 2 * n]
    gg = np.zeros((n, n))
    gg[iu] = val[1 + 2 * n:]
    gg = gg + np.triu(gg, 1).T
    mean = eta * g1 + eta ** 2 * g2
    cov = gg - np.outer(mean, mean)
    return Reference(loss, g1, g2, mean, cov, I.error)


def one_token_moments(teacher_factor, student_factor, m, q=1.0, mu=0.0):
    """E over one token (x = z*, z) of the 13 products a two-token product link needs, with
    T = a(x), S = b(z), S' = b'(z):
    [T^2, T S, S^2, T S' x, S S' x, T S' z, S S' z, T^2 S'^2, T S S'^2, S^2 S'^2, T^2 S^2,
     T S^3, S^4]."""
    T, S = ZooLink(teacher_factor, 1), ZooLink(student_factor, 1)
    tf, _ = T.scalar()
    sf, dsf = S.scalar()

    def F(x, z):
        a, b, db = tf(x), sf(z), dsf(z)
        a = a + 0.0 * z
        return np.array([a * a, a * b, b * b, a * db * x, b * db * x, a * db * z, b * db * z,
                         a * a * db * db, a * b * db * db, b * b * db * db, a * a * b * b,
                         a * b ** 3, b ** 4])

    return gauss2(F, m, q, mu, kink_points(T.exprs, T.zs[0]), kink_points(S.exprs, S.zs[0]))


def reference_product_L2(teacher_factor, student_factor, m):
    """Loss, E G1 and E G2 for teacher a(z*_1) a(z*_2), student b(z_1) b(z_2), L = 2, spherical,
    no positional encoding: the tokens are i.i.d., so with res = T1 T2 - S1 S2 and
    dl_1 = -res S1' S2 every expectation is a product of one-token moments:

        R          = (E[T^2]^2 - 2 E[T S]^2 + E[S^2]^2) / 2
        E[dl_1 z*1] = -E[T S' x] E[T S] + E[S S' x] E[S^2]          (same with z for A_q)
        E[dl_1^2]  = E[T^2 S'^2] E[T^2 S^2] - 2 E[T S S'^2] E[T S^3] + E[S^2 S'^2] E[S^4]

    and A_m, A_q, B are twice the token-1 terms; G1 = -(A_m - m A_q), G2 = -m B / 2.
    Returns (loss, drift_eta1 (1,), drift_eta2 (1,), error)."""
    I = one_token_moments(teacher_factor, student_factor, m)
    (TT, TS, SS, TdSx, SdSx, TdSz, SdSz, TTdd, TSdd, SSdd, TTSS, TSSS, SSSS) = I.value
    loss = 0.5 * (TT ** 2 - 2 * TS ** 2 + SS ** 2)
    A_m = 2 * (-TdSx * TS + SdSx * SS)
    A_q = 2 * (-TdSz * TS + SdSz * SS)
    B = 2 * (TTdd * TTSS - 2 * TSdd * TSSS + SSdd * SSSS)
    return loss, np.array([-(A_m - m * A_q)]), np.array([-0.5 * m * B]), I.error * 10


# ----------------------------------------------------------------------------------------------
# 4. oracles from the literature
# ----------------------------------------------------------------------------------------------

def erf_pair_loss(m):
    """Teacher = student = erf(z/sqrt 2), L = 1, spherical: R = 1/3 - (2/pi) arcsin(m/2).

    Source: Saad and Solla, "On-line learning in soft committee machines", Phys. Rev. E 52,
    4225 (1995), I2(C) = E[g(u) g(v)] = (2/pi) arcsin(C12 / sqrt((1 + C11)(1 + C22))) for
    g(x) = erf(x/sqrt 2); R = I2(1)/2 + I2(1)/2 - I2(m) and arcsin(1/2) = pi/6."""
    return 1.0 / 3.0 - (2.0 / np.pi) * np.arcsin(np.asarray(m) / 2.0)


def relu_k1(m):
    """Arc-cosine kernel of degree 1 (Cho and Saul, "Kernel methods for deep learning", NIPS
    2009), normalised: E[relu(u) relu(v)] = (sqrt(1 - m^2) + (pi - arccos m) m) / (2 pi) for unit
    variances and correlation m."""
    m = np.asarray(m, dtype=float)
    return (np.sqrt(1 - m ** 2) + (np.pi - np.arccos(m)) * m) / (2 * np.pi)


def relu_k1_prime(m):
    """dk1/dm = (pi - arccos m) / (2 pi) = E[H(u) H(v)] (orthant probability 1/4 +
    arcsin(m)/(2 pi), Sheppard's formula)."""
    return (np.pi - np.arccos(np.asarray(m, dtype=float))) / (2 * np.pi)


def relu_pair_loss(m):
    """Teacher = student = relu, L = 1, spherical: R = E relu^2 - k1(m) = 1/2 - k1(m)."""
    return 0.5 - relu_k1(m)


def relu_pair_drift(m):
    """(drift_eta1, drift_eta2) of m for teacher = student = relu, L = 1, spherical (MATH.md 4:
    G = -eta (A_m - m A_q) - eta^2 (m/2) B, dl = (relu(z) - relu(z*)) H(z)).

    By hand, with Stein's lemma E[z* F(z*, z)] = E[d_{z*} F] + m E[d_z F] and E[z f(z)] =
    E[f'(z)]:
        E[relu(z) z*]          = m E[H(z)] = m / 2
        E[relu(z*) H(z) z*]    = E[H(z*) H(z)] + m E[relu(z*) delta(z)]
                               = k1'(m) + m sqrt(1 - m^2) / (2 pi)
                                 (E[relu(z*) | z = 0] = sqrt(1 - m^2) / sqrt(2 pi))
        E[dl z*] = m/2 - k1'(m) - m sqrt(1 - m^2) / (2 pi)
        E[dl z]  = E[relu(z)^2] - E[relu(z*) relu(z)] = 1/2 - k1(m)
    so E[G1] = -(E[dl z*] - m E[dl z]) = k1'(m) - m^2 k1'(m) = (1 - m^2) k1'(m), i.e. minus the
    projected gradient -(1 - m^2) dR/dm of R = 1/2 - k1(m). For the O(eta^2) part,
        E[B] = E[(relu(z) - relu(z*))^2 H(z)] = 1/2 - 2 k1(m) + E[z*^2 H(z*) H(z)],
        E[z*^2 H(z*) H(z)] = 1/4 + (arcsin m + m sqrt(1 - m^2)) / (2 pi)
                           = k1'(m) + m sqrt(1 - m^2) / (2 pi)
    (differentiate int_0^inf x^2 phi(x) Phi(a x) dx in a = m / sqrt(1 - m^2)), and
    E[G2] = -(m / 2) E[B]."""
    m = np.asarray(m, dtype=float)
    k1, k1p = relu_k1(m), relu_k1_prime(m)
    eta1 = (1 - m ** 2) * k1p
    EB = 0.5 - 2 * k1 + k1p + m * np.sqrt(1 - m ** 2) / (2 * np.pi)
    return eta1, -0.5 * m * EB


def saad_solla_I3(C):
    """I3(C) = E[g'(u) v g(w)] for g(x) = erf(x / sqrt 2), (u, v, w) ~ N(0, C) (indices 1, 2, 3):

        I3 = (2/pi) (1 / sqrt(Lambda3)) (C23 (1 + C11) - C12 C13) / (1 + C11),
        Lambda3 = (1 + C11)(1 + C33) - C13^2.

    Source: Saad and Solla, Phys. Rev. E 52, 4225 (1995), appendix; also Goldt et al.,
    NeurIPS 2019 ("Dynamics of SGD for two-layer neural networks in the teacher-student setup")."""
    C = np.asarray(C, dtype=float)
    lam3 = (1 + C[0, 0]) * (1 + C[2, 2]) - C[0, 2] ** 2
    return (2 / np.pi) / np.sqrt(lam3) * (C[1, 2] * (1 + C[0, 0]) - C[0, 1] * C[0, 2]) \
        / (1 + C[0, 0])


def saad_solla_I4(C):
    """I4(C) = E[g'(u) g'(v) g(w) g(y)] for g(x) = erf(x / sqrt 2), (u, v, w, y) ~ N(0, C):

        I4 = (4 / pi^2) (1 / sqrt(Lambda4)) arcsin(Lambda0 / sqrt(Lambda1 Lambda2)),
        Lambda4 = (1 + C11)(1 + C22) - C12^2,
        Lambda0 = Lambda4 C34 - C23 C24 (1 + C11) - C13 C14 (1 + C22) + C12 C13 C24 + C12 C14 C23,
        Lambda1 = Lambda4 (1 + C33) - C23^2 (1 + C11) - C13^2 (1 + C22) + 2 C12 C13 C23,
        Lambda2 = Lambda4 (1 + C44) - C24^2 (1 + C11) - C14^2 (1 + C22) + 2 C12 C14 C24.

    Source: Saad and Solla (1995), appendix; Goldt et al. (2019), appendix."""
    C = np.asarray(C, dtype=float)
    c = lambda i, j: C[i - 1, j - 1]  # noqa: E731  (1-based, as in the paper)
    lam4 = (1 + c(1, 1)) * (1 + c(2, 2)) - c(1, 2) ** 2
    lam0 = (lam4 * c(3, 4) - c(2, 3) * c(2, 4) * (1 + c(1, 1)) - c(1, 3) * c(1, 4) * (1 + c(2, 2))
            + c(1, 2) * c(1, 3) * c(2, 4) + c(1, 2) * c(1, 4) * c(2, 3))
    lam1 = (lam4 * (1 + c(3, 3)) - c(2, 3) ** 2 * (1 + c(1, 1)) - c(1, 3) ** 2 * (1 + c(2, 2))
            + 2 * c(1, 2) * c(1, 3) * c(2, 3))
    lam2 = (lam4 * (1 + c(4, 4)) - c(2, 4) ** 2 * (1 + c(1, 1)) - c(1, 4) ** 2 * (1 + c(2, 2))
            + 2 * c(1, 2) * c(1, 4) * c(2, 4))
    return 4 / np.pi ** 2 / np.sqrt(lam4) * np.arcsin(lam0 / np.sqrt(lam1 * lam2))


def _cov(m, roles):
    """Covariance matrix of the variables named in roles ('s' = z*, 'z' = z; unit variances,
    Cov(z*, z) = m)."""
    return np.array([[1.0 if a == b else m for b in roles] for a in roles])


def erf_pair_drift(m):
    """(drift_eta1, drift_eta2) of m for teacher = student = g = erf(z / sqrt 2), L = 1, spherical.
    dl = -(g(z*) - g(z)) g'(z), G = -eta (A_m - m A_q) - eta^2 (m/2) B (MATH.md 4):

        E[dl z*] = -I3(z, z*, z*) + I3(z, z*, z),  E[dl z] = -I3(z, z, z*) + I3(z, z, z)
        E[B]     = I4(z, z, z*, z*) - 2 I4(z, z, z*, z) + I4(z, z, z, z)

    with I3(u, v, w) = E[g'(u) v g(w)] and I4(u, v, w, y) = E[g'(u) g'(v) g(w) g(y)] of Saad and
    Solla (1995). (Worked out: E[G1] = (2/pi) (1 - m^2) / sqrt(4 - m^2) = -(1 - m^2) dR/dm.)"""
    def I3(*roles):
        return saad_solla_I3(_cov(m, roles))

    def I4(*roles):
        return saad_solla_I4(_cov(m, roles))

    dl_zs = -I3("z", "s", "s") + I3("z", "s", "z")
    dl_z = -I3("z", "z", "s") + I3("z", "z", "z")
    EB = I4("z", "z", "s", "s") - 2 * I4("z", "z", "s", "z") + I4("z", "z", "z", "z")
    return -(dl_zs - m * dl_z), -0.5 * m * EB
