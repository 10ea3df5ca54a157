"""The runtime helpers that generated modules embed, in one place, as real Python.

A generated module imports only numpy and scipy, so the few helpers it needs are copied into it.
They are defined here as ordinary functions (importable, testable) and their text is taken with
``inspect.getsource``: one copy that is both tested and embedded. The texts:

    BROADCAST_HELPERS       _bc, _bc_nested (broadcasting of outputs)
    GAUSS_HERMITE_HELPERS   the above, the tensor trapezoidal rule _trap_grid for E over
                            N(0, I_k), _gh_expect, _gh_expect_many (several integrands
                            on one grid) and the n-versus-2n quadrature_error (exact backend)
    CHUNK_HELPERS           _chunked: a call on many states evaluated in blocks of _CHUNK
                            states (exact backend)
    BVN_HELPERS             _bvn, the bivariate normal CDF by Owen's T (closed forms with
                            mean shifts)
    ORTHANT_HELPERS         _orthant, normal orthant probabilities of dimension 3 and 4 by
                            Plackett's one-dimensional integral (with _bvn), and _orthants,
                            many of them in one vectorised call
    ATTENTION_HELPERS       broadcasting, _gh_grid and its pruned form _gh_pruned, Chebyshev
                            helpers, the finite-difference Jacobian, the per-state increment
                            coefficients of spherical SGD and their (theta, e') tables
                            (attention backend)

The functions refer to module globals only where the embedding module defines them
(QUADRATURE_NODES in quadrature_error).
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path

import numpy

#: nodes per dimension of quadrature_error's coarse rule here; an embedding module sets its own
QUADRATURE_NODES = 8
#: |Q_n - Q| <= QUADRATURE_ERROR_FACTOR |Q_n - Q_2n| when |Q_2n - Q| <= |Q_n - Q| / 2 (2, the
#: rules converge geometrically); 4 when some kink could not be split (convergence like
#: n^-2: |Q_n - Q| ~ 4/3 |Q_n - Q_2n|)
QUADRATURE_ERROR_FACTOR = 2.0
#: {k: f}: a k-dimensional rule has round(f QUADRATURE_NODES) nodes per dimension (1 for a k
#: not listed); an embedding module whose rules of different dimensions need different
#: counts sets its own
QUADRATURE_NODE_FACTORS = {}


def _bc(*xs):
    """Broadcast the outputs to one common shape (constants become arrays): a tuple."""
    return tuple(numpy.broadcast_arrays(*[numpy.asarray(x, dtype=float) for x in xs]))


def _bc_nested(rows):
    flat = _bc(*[x for row in rows for x in row])
    n = len(rows[0])
    return tuple(tuple(flat[i * n:(i + 1) * n]) for i in range(len(rows)))


#: states evaluated at once by a _chunked function: every temporary array of a formula then
#: stays in the processor's cache (about 6x faster on 10^6 states than one call)
_CHUNK = 2 ** 14


def _chunked(f):
    """f evaluated in blocks of _CHUNK states when its broadcast arguments hold more: the
    same values (each state is computed independently), outputs of the broadcast shape, the
    nested tuple structure of f's result kept. (Small calls, as an ODE step's, go straight
    to f: only an argument of more than 2 _CHUNK entries starts the blocks.)"""
    def blocks(*args, **kw):
        if all(getattr(a, "size", 1) <= 2 * _CHUNK for a in args) and all(
                getattr(v, "size", 1) <= 2 * _CHUNK for v in kw.values()):
            return f(*args, **kw)
        arrays = [numpy.asarray(a, dtype=float) for a in args]
        named = {k: numpy.asarray(v, dtype=float) for k, v in kw.items()}
        shape = numpy.broadcast_shapes(*[a.shape for a in arrays],
                                       *[v.shape for v in named.values()])
        size = int(numpy.prod(shape))
        if size <= 2 * _CHUNK:
            return f(*args, **kw)
        flat = [numpy.broadcast_to(a, shape).reshape(-1) for a in arrays]
        flat_kw = {k: numpy.broadcast_to(v, shape).reshape(-1) for k, v in named.items()}
        starts = range(0, size, _CHUNK)
        parts = [f(*[a[i:i + _CHUNK] for a in flat],
                   **{k: v[i:i + _CHUNK] for k, v in flat_kw.items()}) for i in starts]

        def join(items):
            if isinstance(items[0], tuple):
                return tuple(join([p[k] for p in items]) for k in range(len(items[0])))
            return numpy.concatenate([
                numpy.broadcast_to(numpy.asarray(p, dtype=float), (min(_CHUNK, size - i),))
                for i, p in zip(starts, items)]).reshape(shape)
        return join(parts)
    blocks.__name__, blocks.__doc__, blocks.__wrapped__ = f.__name__, f.__doc__, f
    return blocks


_GRIDS = {}


def _gh_grid(k, n):
    """Tensor Gauss-Hermite rule for E over k independent N(0, 1): nodes (k, n^k), weights."""
    key = (k, n)
    if key not in _GRIDS:
        x, w = numpy.polynomial.hermite_e.hermegauss(n)
        w = w / numpy.sqrt(2.0 * numpy.pi)
        grids = numpy.meshgrid(*([x] * k), indexing="ij")
        weights = numpy.ones(())
        for _ in range(k):
            weights = numpy.multiply.outer(weights, w)
        _GRIDS[key] = (numpy.array([g.ravel() for g in grids]), weights.ravel())
    return _GRIDS[key]


# quadrature points times states held in memory at once: 2^18 keeps the integrands'
# temporaries (a few hundred kB) in the L2 cache (2^22: the L = 3 zoo case's three- and
# four-dimensional groups took 1.5-2x as long)
_GH_CHUNK = 2 ** 18  # quadrature points times states held in memory at once
_TRAP_HALF_WIDTH = 10.0  # |u| <= 10: the Gaussian weight beyond is below 1e-21
_TRAP_FINE_HALF_WIDTH = 14.0  # quadrature_error's 2n rule: also the mass of |u| in (10, 14]
_TRAP_EDGE = 1e-13  # boundary sum of w |f| (relative to max(1, |value|)) that widens a grid
_TRAP_MAX_HALF_WIDTH = 40.0  # the widest grid: [-40, 40]


def _trap_grid(k, n, half_width=None):
    """Tensor trapezoidal rule for E over k independent N(0, 1): n equispaced nodes on
    [-W, W] per dimension (W = _TRAP_HALF_WIDTH unless half_width is given) with weights
    h phi(u), kept on the ball |u| <= W. For an integrand analytic in the strip |Im u| < a it
    converges like exp(-2 pi a / h) (far faster than Gauss-Hermite for tanh, sigmoid or
    softplus, whose poles sit near the real axis). Every point of the cube [-W, W]^k outside
    the ball has Gaussian weight below exp(-W^2 / 2) times the centre's, as have the points
    the cube leaves out just beyond its faces (|u_i| > W): the same truncation in every
    direction, and 21 % (k = 2), 48 % (k = 3) or 69 % (k = 4) of the cube's points fewer.
    Nodes (k, points), weights, and the indices and boundary weights of the points on the
    boundary of the ball (a neighbour along some axis outside it)."""
    W = _TRAP_HALF_WIDTH if half_width is None else half_width
    key = ("trapezoid", k, n, W)
    if key not in _GRIDS:
        x = numpy.linspace(-W, W, n)
        w = (x[1] - x[0]) * numpy.exp(-x * x / 2) / numpy.sqrt(2.0 * numpy.pi)
        grids = numpy.meshgrid(*([x] * k), indexing="ij")
        weights = numpy.ones(())
        for _ in range(k):
            weights = numpy.multiply.outer(weights, w)
        r2 = sum(g * g for g in grids)
        inside = r2 <= W * W * (1.0 + 1e-12)
        padded = numpy.pad(inside, 1, constant_values=False)
        edge = numpy.zeros_like(inside)
        for axis in range(k):
            for step in (-1, 1):
                edge |= ~numpy.roll(padded, step, axis=axis)[(slice(1, -1),) * k]
        weights, r2 = weights[inside], r2[inside]
        at = numpy.flatnonzero(edge[inside])
        # a boundary point's weight carried out along its ray to the sphere |u| = W (the
        # weight of the cube's face centres): the boundary test then sees the integrand near
        # the rim with the weight the cube's faces gave it, not the larger weight of points
        # up to a spacing inside (which widened u1^4 tanh(u2) at 16 nodes, u1^8 at 32)
        _GRIDS[key] = (numpy.array([g[inside] for g in grids]), weights, at,
                       weights[at] * numpy.exp(-(W * W - r2[at]) / 2))
    return _GRIDS[key]


def _nodes(k):
    """Nodes per dimension of the module's k-dimensional rules: QUADRATURE_NODES times
    QUADRATURE_NODE_FACTORS.get(k, 1), rounded (so quadrature_error, which doubles
    QUADRATURE_NODES, doubles every rule's count)."""
    return max(2, int(round(QUADRATURE_NODES * QUADRATURE_NODE_FACTORS.get(k, 1))))


def _gh_expect(integrand, k, n, *args):
    """E over k independent N(0, 1) of integrand(u, *args): _gh_expect_many of the one
    integrand."""
    return _gh_expect_many(lambda u, *a: (integrand(u, *a),), k, 1, n, *args)[0]


def _gh_expect_many(integrand, k, count, n, *args, half_width=None):
    """The tuple of E over k independent N(0, 1) of the `count` entries of integrand(u, *args)
    (a tuple of arrays computed with their common subexpressions shared), by the tensor
    trapezoidal rule of _trap_grid with n nodes per dimension: one pass over the grid serves
    every entry. Broadcast over the arguments; blocks of states and of grid points keep every
    temporary of the integrand under _GH_CHUNK / count numbers (the integrand holds about as
    many temporaries as entries). The weighted sums by einsum, not BLAS: a BLAS product
    starts OpenBLAS's threads, which then spin on the second core between the calls (twice
    the CPU time for the same wall time, taken from a parallel sweep or a forked derivation).

    The grid widens where the weighted sum of |f| over its boundary points exceeds _TRAP_EDGE
    max(1, |value|) for some entry (an integrand growing like exp(a u) has its mass near
    u = a, beyond 10 for a student exp(1.5 z)'s Cov(G) at q > 1): those states are evaluated
    again on [-2W, 2W] with 2n - 1 nodes (the same spacing), up to _TRAP_MAX_HALF_WIDTH,
    unless the wider rule overflows where the narrower did not."""
    W = _TRAP_HALF_WIDTH if half_width is None else half_width
    u, w, edge_at, edge_w = _trap_grid(k, n, W)
    args = numpy.broadcast_arrays(*[numpy.asarray(a, dtype=float) for a in args])
    shape = args[0].shape
    flat = [a.reshape(-1, 1) for a in args]
    size = flat[0].shape[0]
    out = numpy.empty((count, size))
    wide = numpy.zeros(size, dtype=bool)
    budget = max(1, _GH_CHUNK // count)
    block = min(w.size, budget)             # grid points per evaluation
    step = max(1, budget // block)          # states per evaluation
    for s in range(0, size, step):
        # states down the first axis, points along the second (contiguous): with a few states
        # the other way round, numpy's inner loops ran over rows of two or three numbers
        part = [a[s:s + step] for a in flat]
        m = part[0].shape[0]
        acc, edge = numpy.zeros((2, count, m))
        for p in range(0, w.size, block):
            uu = tuple(x[None, p:p + block] for x in u)
            wp = w[p:p + block]
            lo, hi = numpy.searchsorted(edge_at, (p, p + wp.size))
            sel, ew = edge_at[lo:hi] - p, edge_w[lo:hi]   # the boundary points of the block
            for j, f in enumerate(integrand(uu, *part)):
                f = numpy.broadcast_to(f, (m, wp.size))
                acc[j] += numpy.einsum("p,mp->m", wp, f)
                if hi > lo:
                    edge[j] += numpy.einsum("p,mp->m", ew, numpy.abs(f[:, sel]))
        out[:, s:s + step] = acc
        with numpy.errstate(invalid="ignore"):
            wide[s:s + step] = (edge > _TRAP_EDGE * numpy.maximum(1.0, numpy.abs(acc))).any(
                axis=0)
    if wide.any() and 2 * W <= _TRAP_MAX_HALF_WIDTH:
        at = numpy.flatnonzero(wide)
        with numpy.errstate(over="ignore", invalid="ignore"):  # overflow: handled below
            again = _gh_expect_many(integrand, k, count, 2 * n - 1,
                                    *[a[at, 0] for a in flat], half_width=2 * W)
        for j in range(count):
            # a wider grid whose far nodes overflow (exp(a u) with a u > 709 where phi(u)
            # underflows to 0: inf * 0) is not taken
            ok = numpy.isfinite(again[j]) | ~numpy.isfinite(out[j, at])
            out[j, at] = numpy.where(ok, again[j], out[j, at])
    return tuple(o.reshape(shape) for o in out)


def _split_expect(integrand, k, n, breaks, *args):
    """E over k independent N(0, 1) of integrand(u, *args) when the integrand is smooth in u1
    between the break points `breaks` (kinks, one array per break, broadcast over the states):
    u1 runs over the pieces of [-10, 10] cut at the breaks, each with an n-node Gauss-Legendre
    rule (weight phi(u1) included), the other variables over the trapezoidal rule of
    _trap_grid. Geometric convergence despite the kinks."""
    args = numpy.broadcast_arrays(*[numpy.asarray(a, dtype=float) for a in args], *breaks)
    nb = len(breaks)
    shape = args[0].shape
    flat = [a.reshape(-1) for a in args]
    size = flat[0].shape[0]
    edges = numpy.sort(numpy.clip(numpy.array(flat[len(flat) - nb:]).reshape(nb, size),
                                  -_TRAP_HALF_WIDTH, _TRAP_HALF_WIDTH), axis=0)
    lo = numpy.vstack([numpy.full((1, size), -_TRAP_HALF_WIDTH), edges])
    hi = numpy.vstack([edges, numpy.full((1, size), _TRAP_HALF_WIDTH)])
    x, w = numpy.polynomial.legendre.leggauss(n)
    half, mid = (hi - lo) / 2, (hi + lo) / 2                      # (pieces, S)
    u1 = (mid[:, None, :] + half[:, None, :] * x[None, :, None]).reshape(-1, size)
    w1 = (half[:, None, :] * w[None, :, None]).reshape(-1, size)
    w1 = w1 * numpy.exp(-u1 * u1 / 2) / numpy.sqrt(2.0 * numpy.pi)
    if k > 1:
        rest, wr = _trap_grid(k - 1, n)[:2]
    else:
        rest, wr = numpy.zeros((0, 1)), numpy.ones(1)
    P1, Pr = u1.shape[0], wr.size
    out = numpy.empty(size)
    step = max(1, _GH_CHUNK // (P1 * Pr))
    for s in range(0, size, step):
        sl = slice(s, s + step)
        m = flat[0][sl].shape[0]
        # states down the first axis, points along the second (as in _gh_expect_many)
        uu = (numpy.repeat(u1[:, sl].T, Pr, axis=1),) + tuple(
            numpy.tile(r, P1)[None, :] for r in rest)
        part = [a[sl].reshape(-1, 1) for a in flat[:len(flat) - nb]]
        f = numpy.broadcast_to(integrand(uu, *part), (m, P1 * Pr))
        ww = numpy.repeat(w1[:, sl].T, Pr, axis=1) * numpy.tile(wr, P1)[None, :]
        out[sl] = numpy.sum(ww * f, axis=1)
    return out.reshape(shape)


def quadrature_error(function, *args, **kwargs):
    """(value, error bound) of a function of this module: the value with n = QUADRATURE_NODES
    nodes per dimension (times QUADRATURE_NODE_FACTORS[k] in the k-dimensional rules, where a
    module lists them), what the module returns, and QUADRATURE_ERROR_FACTOR |value(n) -
    value(2n)| plus a round-off floor of 1e-13 (1 + |value|). The 2n rule's trapezoidal
    axes also span the wider [-14, 14] (its ball |u| <= 14, _TRAP_FINE_HALF_WIDTH): an
    integrand growing like exp(a u) has its mass near u = a, and what the n rule's [-10, 10]
    misses is seen by the difference (exp(1.2 z) as a student: 5e-11 of its Cov(G) beyond
    10, five times what the difference on [-10, 10] alone reported). The difference alone is
    not a bound: |Q_n - Q| <= |Q_n - Q_2n| + |Q_2n - Q|. For the smooth integrands left to
    quadrature (kinks split) the rules converge geometrically, |Q_2n - Q| <= |Q_n - Q| / 2
    and the factor 2 bounds the error (a three-token Cov(G) whose 2n rule was still 3e-9
    off gave a difference 0.02 % below the error of the n rule); with a kink that could not
    be split (QUADRATURE_ERROR_FACTOR = 4) the error decays like n^-2, and then
    |Q_n - Q| ~ 4/3 |Q_n - Q_2n|. Where the two differ by 0.1 % or more (mass may lie beyond
    14 as well: a Cov(G) of exp(1.5 z) holds exp(12 z)), a third rule, 3n nodes on
    [-20, 20], gives the difference where it is larger."""
    n, width = QUADRATURE_NODES, _TRAP_HALF_WIDTH

    def at(nodes, half_width):
        global QUADRATURE_NODES, _TRAP_HALF_WIDTH
        QUADRATURE_NODES, _TRAP_HALF_WIDTH = nodes, half_width
        try:
            return numpy.asarray(function(*args, **kwargs), dtype=float)
        finally:
            QUADRATURE_NODES, _TRAP_HALF_WIDTH = n, width

    coarse = at(n, width)
    diff = numpy.abs(at(2 * n, _TRAP_FINE_HALF_WIDTH) - coarse)
    with numpy.errstate(invalid="ignore"):
        far = ~(diff <= 1e-3 * (1.0 + numpy.abs(coarse)))
    if far.any():
        # 0.1 % or more apart: mass may lie beyond 14 too (exp(12 z) peaks at 12); the
        # difference from 3n nodes on [-20, 20] is taken where it is larger
        diff = numpy.where(far, numpy.maximum(diff, numpy.abs(at(3 * n, 2.0 * width)
                                                               - coarse)), diff)
    return coarse, (QUADRATURE_ERROR_FACTOR * diff + 1e-13 * (1.0 + numpy.abs(coarse)))


def _bvn(h, k, rho):
    """Bivariate standard normal CDF Phi_2(h, k; rho) = P(X <= h, Y <= k), corr(X, Y) = rho,
    by Owen's T function (Owen 1956):

        Phi_2 = (Phi(h) + Phi(k)) / 2 - T(h, a_h) - T(k, a_k) - beta,
        a_h = (k - rho h) / (h sqrt(1 - rho^2)),  a_k = (h - rho k) / (k sqrt(1 - rho^2)),
        beta = 1/2 when h k < 0 or (h k = 0 and h + k < 0), else 0,

    with T(0, +-inf) = +-1/4 where h or k is 0, 1/4 + arcsin(rho) / 2 pi at h = k = 0, and the
    limits min(Phi(h), Phi(k)) at rho = 1, max(0, Phi(h) + Phi(k) - 1) at rho = -1."""
    import scipy.special as _sc
    h, k, rho = numpy.broadcast_arrays(*[numpy.asarray(x, dtype=float) for x in (h, k, rho)])
    rho = numpy.clip(rho, -1.0, 1.0)
    s = numpy.sqrt(numpy.maximum(1.0 - rho * rho, 0.0))
    ph, pk = _sc.ndtr(h), _sc.ndtr(k)
    with numpy.errstate(divide="ignore", invalid="ignore"):
        ah = (k - rho * h) / (h * s)
        ak = (h - rho * k) / (k * s)
    # h = 0 (k != 0): T(0, a_h) = sign(a_h)/4 with a_h -> sign(k) infinity
    th = numpy.where(h == 0, 0.25 * numpy.sign(k - rho * h),
                     _sc.owens_t(h, numpy.where(numpy.isfinite(ah), ah, 0.0)))
    tk = numpy.where(k == 0, 0.25 * numpy.sign(h - rho * k),
                     _sc.owens_t(k, numpy.where(numpy.isfinite(ak), ak, 0.0)))
    beta = numpy.where((h * k < 0) | ((h * k == 0) & (h + k < 0)), 0.5, 0.0)
    out = 0.5 * (ph + pk) - th - tk - beta
    out = numpy.where((h == 0) & (k == 0), 0.25 + numpy.arcsin(rho) / (2 * numpy.pi), out)
    out = numpy.where(s == 0, numpy.where(rho > 0, numpy.minimum(ph, pk),
                                          numpy.maximum(0.0, ph + pk - 1.0)), out)
    return out[()] if out.ndim == 0 else out


def _orthant(*args):
    """P(Z <= h) for Z ~ N(0, R), R a correlation matrix of dimension n = 3 or 4, args
    (h_1, .., h_n, R_12, R_13, .., R_(n-1)n) broadcast over states, by Plackett's identity
    (Plackett 1954) along R(t) = (1 - t) I + t R (positive definite for t in [0, 1]):

        P = prod_i Phi(h_i) + int_0^1 sum_{i<j} R_ij phi_2(h_i, h_j; t R_ij)
                                     P(Z_rest <= h_rest | Z_i = h_i, Z_j = h_j; R(t)) dt.

    Given Z_i = h_i and Z_j = h_j under R(t), with s = 1 - t^2 R_ij^2, a remaining Z_c has
    mean t ((R_ci - t R_ij R_cj) h_i + (R_cj - t R_ij R_ci) h_j) / s and

        s Cov(Z_a, Z_b) = t R_ab s - t^2 (R_ai R_bi + R_aj R_bj - t R_ij (R_ai R_bj + R_aj R_bi))

    (t R_aa read as 1): the conditional probability is a Phi (n = 3) or a bivariate normal CDF
    (n = 4, _bvn). At h = 0 (no positional shift) and n = 4 it is 1/4 + arcsin(rho_ab(t)) / 2 pi,
    whose constant part integrates in closed form:

        P = 1/16 + sum_{i<j} arcsin(R_ij) / 8 pi
              + sum_{i<j} R_ij / 4 pi^2 int_0^1 arcsin(rho_ab(t)) / sqrt(1 - t^2 R_ij^2) dt.

    The t-integrals by Gauss-Legendre with QUADRATURE_NODES points (quadrature_error's n versus
    2n is their error bound; the integrands are analytic on [0, 1], so a few points suffice),
    on arrays of shape (points,) + states."""
    import scipy.special as _sc
    args = numpy.broadcast_arrays(*[numpy.asarray(a, dtype=float) for a in args])
    n = 3 if len(args) == 6 else 4
    h = args[:n]
    R = {}
    k = n
    for i in range(n):
        for j in range(i + 1, n):
            R[i, j] = R[j, i] = args[k]
            k += 1
    key = ("legendre", QUADRATURE_NODES)
    if key not in _GRIDS:
        _GRIDS[key] = numpy.polynomial.legendre.leggauss(QUADRATURE_NODES)
    x, w = _GRIDS[key]
    t = ((x + 1.0) / 2.0).reshape((-1,) + (1,) * h[0].ndim)   # points along a new first axis
    wt, t2 = (w / 2.0).reshape(t.shape), t * t
    centred = n == 4 and not any(numpy.any(v != 0) for v in h)
    if centred:
        out = 1.0 / 16.0 + sum(numpy.arcsin(numpy.clip(R[i, j], -1.0, 1.0))
                               for i in range(4) for j in range(i + 1, 4)) / (8 * numpy.pi)
    else:
        out = numpy.ones_like(h[0])
        for v in h:
            out = out * _sc.ndtr(v)

    def scov(a, b, i, j, s):   # s Cov(Z_a, Z_b | Z_i, Z_j) under R(t)
        return (s if a == b else t * (R[a, b] * s)) - t2 * (
            (R[a, i] * R[b, i] + R[a, j] * R[b, j])
            - t * (R[i, j] * (R[a, i] * R[b, j] + R[a, j] * R[b, i])))

    for i in range(n):
        for j in range(i + 1, n):
            rest = [c for c in range(n) if c not in (i, j)]
            s = 1.0 - t2 * (R[i, j] * R[i, j])
            if centred:
                a, b = rest
                rho = scov(a, b, i, j, s) / numpy.sqrt(scov(a, a, i, j, s) * scov(b, b, i, j, s))
                out = out + R[i, j] / (4 * numpy.pi ** 2) * numpy.sum(
                    wt * numpy.arcsin(numpy.clip(rho, -1.0, 1.0)) / numpy.sqrt(s), axis=0)
                continue
            dens = (numpy.exp(-(h[i] ** 2 - 2 * t * R[i, j] * h[i] * h[j] + h[j] ** 2) / (2 * s))
                    / (2 * numpy.pi * numpy.sqrt(s)))
            sd = {c: numpy.sqrt(scov(c, c, i, j, s) * s) for c in rest}   # s sqrt(Var)
            z = {c: (h[c] * s - t * ((R[c, i] - t * R[i, j] * R[c, j]) * h[i]
                                     + (R[c, j] - t * R[i, j] * R[c, i]) * h[j])) / sd[c]
                 for c in rest}
            if n == 3:
                cond = _sc.ndtr(z[rest[0]])
            else:
                a, b = rest
                rho = scov(a, b, i, j, s) * s / (sd[a] * sd[b])
                cond = _bvn(z[a], z[b], numpy.clip(rho, -1.0, 1.0))
            out = out + R[i, j] * numpy.sum(wt * dens * cond, axis=0)
    out = numpy.asarray(out, dtype=float)
    return out[()] if out.ndim == 0 else out


def _orthants(*calls):
    """_orthant of several argument tuples of one dimension, stacked along a new first axis
    (states broadcast) so that one evaluation serves them all: a tuple with one value per call.
    Calls go in blocks of at most about 2^20 quadrature points times states."""
    k = len(calls[0])
    flat = numpy.broadcast_arrays(*[numpy.asarray(a, dtype=float) for c in calls for a in c])
    args = [numpy.stack(flat[i::k]) for i in range(k)]
    per = max(1, 2 ** 20 // (max(flat[0].size, 1) * QUADRATURE_NODES))
    out = numpy.concatenate([numpy.reshape(_orthant(*[a[i:i + per] for a in args]),
                                           (-1,) + flat[0].shape)
                             for i in range(0, len(calls), per)])
    return tuple(out)


# ----------------------------------------------------------------------------- attention
def _gh_pruned(k, n, prune):
    """The tensor rule of _gh_grid with the nodes whose weight is at most prune x the largest
    dropped (they change nothing at double precision): nodes (k, P), weights (P,)."""
    u, w = _gh_grid(k, n)
    keep = w > prune * w.max()
    return u[:, keep], w[keep]


def _cheb_basis(y, n):
    """T_0(y)..T_(n-1)(y) stacked on a new first axis (three-term recursion)."""
    out = [numpy.ones_like(y), y]
    for _ in range(2, n):
        out.append(2 * y * out[-1] - out[-2])
    return numpy.stack(out[:n])


def _chebval2(x, y, c):
    """sum_jk c_jk T_j(x) T_k(y), broadcast over x and y."""
    x, y = numpy.broadcast_arrays(numpy.asarray(x, dtype=float), numpy.asarray(y, dtype=float))
    tx = _cheb_basis(x, c.shape[0]).reshape(c.shape[0], -1)
    ty = _cheb_basis(y, c.shape[1]).reshape(c.shape[1], -1)
    return numpy.einsum("jn,jk,kn->n", tx, c, ty, optimize=True).reshape(x.shape)


def _lobatto(N):
    """Chebyshev-Lobatto points y_k = cos(pi k / N), k = 0..N."""
    return numpy.cos(numpy.pi * numpy.arange(N + 1) / N)


def _cheb_fit(values, axis=0):
    """Coefficients c_j of the interpolant sum_j c_j T_j(y) through values at the Lobatto
    points (DCT-I): c_j = (2/N) sum''_k f_k cos(pi j k / N), c_0 and c_N halved."""
    v = numpy.moveaxis(numpy.asarray(values, dtype=float), axis, 0)
    N = v.shape[0] - 1
    k = numpy.arange(N + 1)
    M = numpy.cos(numpy.pi * numpy.outer(k, k) / N) * (2.0 / N)
    M[:, 0] *= 0.5
    M[:, -1] *= 0.5
    c = numpy.tensordot(M, v, axes=(1, 0))
    c[0] *= 0.5
    c[-1] *= 0.5
    return numpy.moveaxis(c, 0, axis)


def _fd_jacobian(drift, state, h, kwargs):
    """Jacobian d drift_i / d x_j by central differences of step h: (drift(x + h e_j) -
    drift(x - h e_j)) / (2 h), error O(h^2) plus the drift's error / h; nested tuples."""
    x = [numpy.asarray(v, dtype=float) for v in state]
    n = len(x)
    cols = []
    for j in range(n):
        xp = list(x); xp[j] = x[j] + h
        xm = list(x); xm[j] = x[j] - h
        fp = drift(*xp, **kwargs)
        fm = drift(*xm, **kwargs)
        cols.append([(a - b) / (2 * h) for a, b in zip(fp, fm)])
    return _bc_nested(tuple(tuple(cols[j][i] for j in range(n)) for i in range(n)))


#: slices of the vector of _step_coefficients
_SC_MEAN1, _SC_MEAN2 = slice(0, 2), slice(2, 4)
_SC_COV = (slice(4, 7), slice(7, 10), slice(10, 13))       # eta^2, eta^3, eta^4; (mm, me, ee)
_SC_ITO = (slice(13, 15), slice(15, 17), slice(17, 19))    # eta^2, eta^3, eta^4; (m, e)
_SC_NORM = slice(19, 21)                                   # eta^2; (m, e)
_SC_SIZE = 21


def _step_coefficients(m, e, links, C, norm, n, params, prune=1e-15):
    """The eta-coefficients of one spherical SGD step at a state (m, e), q = 1, one positional
    direction with coefficients C_l (MATH.md 4), as a vector (_SC_* slices): E G1, E G2,
    the eta^2, eta^3, eta^4 parts of Cov(G), those of the rescaling (Ito) drift and the eta^2
    part of the token-norm drift, G = eta G1 + eta^2 G2 being d times the increment of (m, e).

    With s = sqrt(1 - m^2), e' = e / s, token l has z*_l, g_l i.i.d. N(0, 1) and
    z_l = m z*_l + s g_l + C_l e, zeta_l = e' g_l + sqrt(1 - e'^2) xi_l (xi_l independent).
    links = (teacher_link, student_link, student_link_gradient); dl_l = -k sum_k (T_k(z*) -
    S_k(z)) dS_k/dz_l with k = 1 (square loss) or 1 / |T - S| (norm loss, norm=True).
    A_m = sum dl z*, A_q = sum dl z, A_g = sum dl g, A_C = sum C dl, B = sum dl^2 and A_e =
    e' A_g + A_C (the mean of sum dl (zeta + C) given z*, g; its variance is (1 - e'^2) B). Then
    G1 = (-(A_m - m A_q), -(A_e - e A_q)), G2 = -(m, e) B / 2 and

        Cov(G) = eta^2 Cov(G1) + eta^3 (Cov(G1, G2) + Cov(G2, G1)) + eta^4 Cov(G2)
                 (+ eta^2 (1 - e'^2) E[B] in the (e, e) entry),
        Ito_X = E[-(1/2) (-eta A_X)(d dQ) + (3/8) X (d dQ)^2],  d dQ = -2 eta A_q + eta^2 B,
        norm_X = -(eta^2 X / 2) E[A_m^2 + A_g^2 - 2 B + 2 e' A_g A_C + A_C^2]

    (the token Gram excess of MATH.md 4 / symbolic.derive.statistics in whitened coordinates:
    its (z*, z) part is z*_l z*_l' + g_l g_l' - 2 delta_ll', its positional part
    C_l' zeta_l + C_l zeta_l' + C_l C_l'). Tensor Gauss-Hermite with n nodes per dimension over
    (z*, g), nodes of weight <= prune x the largest dropped."""
    L = len(C)
    u, w = _gh_pruned(2 * L, n, prune)
    s = numpy.sqrt(max(0.0, 1.0 - m * m))
    ep = min(1.0, max(-1.0, e / s)) if s > 1e-12 else 0.0
    zs, g = u[:L], u[L:]
    z = [m * zs[l] + s * g[l] + C[l] * e for l in range(L)]
    T = links[0](*zs, **params)
    S = links[1](*z)
    dS = links[2](*z)
    res = [a - b for a, b in zip(T, S)]
    scale = 1.0
    if norm:
        scale = 1.0 / numpy.maximum(numpy.sqrt(sum(r * r for r in res)), 1e-300)
    dl = [-scale * sum(res[k] * dS[k][l] for k in range(len(res))) for l in range(L)]
    Am = sum(dl[l] * zs[l] for l in range(L))
    Aq = sum(dl[l] * z[l] for l in range(L))
    Ag = sum(dl[l] * g[l] for l in range(L))
    AC = sum(C[l] * dl[l] for l in range(L))
    B = sum(x * x for x in dl)
    phi = numpy.array([numpy.ones_like(Am), Am, Aq, ep * Ag + AC, B, Ag, AC])
    M = (phi * w) @ phi.T                                   # E[phi phi^T]
    a1 = numpy.array([[0, -1, m, 0, 0, 0, 0], [0, 0, e, -1, 0, 0, 0]], dtype=float)
    a2 = numpy.array([[0, 0, 0, 0, -m / 2, 0, 0], [0, 0, 0, 0, -e / 2, 0, 0]], dtype=float)
    mu1, mu2 = a1 @ M[:, 0], a2 @ M[:, 0]
    c2 = a1 @ M @ a1.T - numpy.outer(mu1, mu1)
    c2[1, 1] += (1.0 - ep * ep) * M[0, 4]
    c3 = a1 @ M @ a2.T - numpy.outer(mu1, mu2)
    c3 = c3 + c3.T
    c4 = a2 @ M @ a2.T - numpy.outer(mu2, mu2)
    X = numpy.array([m, e])
    EA_q = numpy.array([M[1, 2], M[3, 2]])                  # E[A_X A_q]
    EA_B = numpy.array([M[1, 4], M[3, 4]])                  # E[A_X B]
    EK = M[1, 1] + M[5, 5] - 2 * M[0, 4] + 2 * ep * M[5, 6] + M[6, 6]
    up = numpy.triu_indices(2)
    return numpy.concatenate([mu1, mu2, c2[up], c3[up], c4[up],
                              -EA_q + 1.5 * X * M[2, 2], 0.5 * EA_B - 1.5 * X * M[2, 4],
                              0.375 * X * M[4, 4], -0.5 * X * EK])


def _sc_pieces(c, eta):
    """From _step_coefficients vectors c (_SC_SIZE, ...): Cov(G) ((mm, me), (em, ee)), the Ito
    drift and the whole O(1/d) drift (Ito + token norm), each times d, at learning rate eta."""
    cov = sum(eta ** (k + 2) * c[sl] for k, sl in enumerate(_SC_COV))
    ito = sum(eta ** (k + 2) * c[sl] for k, sl in enumerate(_SC_ITO))
    fdc = ito + eta ** 2 * c[_SC_NORM]
    return ((cov[0], cov[1]), (cov[1], cov[2])), (ito[0], ito[1]), (fdc[0], fdc[1])


def _polar(m, e):
    """Table coordinates of states (m, e) of the unit disk: x = 2 theta / pi - 1 with m =
    cos theta, and y = e' = e / sin theta (0 at m = +-1), both in [-1, 1]; inside = m^2 + e^2
    <= 1 + 1e-12."""
    m, e = numpy.broadcast_arrays(numpy.asarray(m, dtype=float), numpy.asarray(e, dtype=float))
    inside = m * m + e * e <= 1 + 1e-12
    mc = numpy.clip(m, -1.0, 1.0)
    s = numpy.sqrt(1.0 - mc * mc)
    y = numpy.where(s > 1e-12, e / numpy.where(s > 1e-12, s, 1.0), 0.0)
    return 2 * numpy.arccos(mc) / numpy.pi - 1, numpy.clip(y, -1.0, 1.0), inside


def _polar_table(coefficients, degree, checks, refine):
    """Chebyshev table of the vector function coefficients(m, e) (the _step_coefficients of one
    parameter set, analytic in (theta, e')) over the disk in the coordinates of _polar, from its
    values at the Lobatto nodes of degree (Nx, Ny), and its error estimate per component:
    2 x max over the check states of (|table - direct| + |direct - refine|), refine being the
    same function with more quadrature nodes, plus the sum of |c_jk| over the last two rows and
    columns of the coefficients (the size of the truncated series where the interpolant is not
    checked). Returns (coefficients (Nx+1, Ny+1, K), error (K,))."""
    Nx, Ny = degree
    xs, ys = _lobatto(Nx), _lobatto(Ny)
    th = numpy.pi * (xs + 1) / 2
    vals = numpy.array([[coefficients(numpy.cos(t), y * numpy.sin(t)) for y in ys] for t in th])
    table = _cheb_fit(_cheb_fit(vals, 0), 1)
    err = 0.0
    for m, e in checks:
        direct = coefficients(m, e)
        x, y, _ = _polar(m, e)
        approx = numpy.array([_chebval2(x, y, table[:, :, k]) for k in range(table.shape[2])])
        err = numpy.maximum(err, numpy.abs(approx - direct) + numpy.abs(direct - refine(m, e)))
    tail = (numpy.abs(table[-2:]).sum(axis=(0, 1)) + numpy.abs(table[:, -2:]).sum(axis=(0, 1)))
    return table, 2 * err + tail


def _polar_eval(table, m, e):
    """The tabulated vector at states (m, e): array (K,) + broadcast shape, NaN outside the
    unit disk."""
    x, y, inside = _polar(m, e)
    tx = _cheb_basis(x, table.shape[0]).reshape(table.shape[0], -1)
    ty = _cheb_basis(y, table.shape[1]).reshape(table.shape[1], -1)
    out = numpy.einsum("jn,jkc,kn->cn", tx, table, ty, optimize=True).reshape((-1,) + x.shape)
    return numpy.where(inside, out, numpy.nan)


def _per_state(fn, size, m, e, params):
    """fn(m, e, params) -> vector (size,) evaluated state by state over the broadcast of the
    states (m, e) and the parameter values: array (size,) + broadcast shape, NaN outside the
    unit disk m^2 + e^2 <= 1 + 1e-12."""
    arrs = numpy.broadcast_arrays(*[numpy.asarray(x, dtype=float) for x in
                                    (m, e, *params.values())])
    out = numpy.full((size,) + arrs[0].shape, numpy.nan)
    for idx in numpy.ndindex(arrs[0].shape):
        mm, ee = arrs[0][idx], arrs[1][idx]
        if mm * mm + ee * ee > 1 + 1e-12:
            continue
        pv = {k: a[idx] for k, a in zip(params, arrs[2:])}
        out[(slice(None),) + idx] = fn(mm, ee, pv)
    return out


def _tabulated(table_of, m, e, params):
    """(values, error estimates) of a tabulated vector function at states (m, e): table_of(**p)
    -> (Chebyshev table, error vector) of one parameter set p (see _polar_table), looked up once
    per distinct parameter set of the broadcast; arrays (K,) + broadcast shape."""
    arrs = numpy.broadcast_arrays(*[numpy.asarray(x, dtype=float) for x in
                                    (m, e, *params.values())])
    shape = arrs[0].shape
    if arrs[0].size == 0:
        return numpy.empty((_SC_SIZE,) + shape), numpy.empty((_SC_SIZE,) + shape)
    keys = numpy.array([a.ravel() for a in arrs[2:]]).T.reshape(arrs[0].size, len(params))
    val = err = None
    for key in numpy.unique(keys, axis=0):
        sel = numpy.all(keys == key, axis=1)
        table, error = table_of(**dict(zip(params, key.tolist())))
        v = _polar_eval(table, arrs[0].ravel()[sel], arrs[1].ravel()[sel])
        if val is None:
            val = numpy.full((v.shape[0], sel.size), numpy.nan)
            err = numpy.full((v.shape[0], sel.size), numpy.nan)
        val[:, sel] = v
        err[:, sel] = numpy.where(numpy.isnan(v), numpy.nan, error[:, None])
    return val.reshape((-1,) + shape), err.reshape((-1,) + shape)


# ----------------------------------------------------------------------------- embedding
@functools.lru_cache(maxsize=None)
def _sources() -> tuple:
    """(lines of this file, {top-level function name: its source text}), read once. The text
    of a function is what inspect.getsource gives (decorators to the end of its last
    statement), from one parse of the file instead of a tokenisation per function."""
    text = Path(__file__).read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    spans = {}
    for node in ast.parse(text).body:
        if isinstance(node, ast.FunctionDef):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            spans[node.name] = "".join(lines[first - 1:node.end_lineno])
    return lines, spans


def _assignment(name: str) -> str:
    """The source line of a module-level assignment of this file (with its comment)."""
    for line in _sources()[0]:
        if line.startswith(f"{name} = "):
            return line.rstrip("\n") + "\n"
    raise KeyError(name)


def embed(*items) -> str:
    """The source text of functions (as inspect.getsource gives it) and module-level
    assignments (by name) of this file, in order, separated by two blank lines."""
    parts = [_sources()[1][x.__name__] if callable(x) else _assignment(x) for x in items]
    return "\n\n".join(parts)


def _broadcast_helpers():
    return "\n" + embed(_bc, _bc_nested)


#: the helper sets generated modules embed, built on first use (module __getattr__): a
#: process that generates nothing (a simulation, `ssi sie`) does not read this file's text
_HELPER_SETS = {
    # broadcasting helpers every generated module carries (it imports only numpy and scipy)
    "BROADCAST_HELPERS": _broadcast_helpers,
    # evaluation in blocks of states (the exact backend's state functions)
    "CHUNK_HELPERS": lambda: embed("_CHUNK", _chunked),
    "GAUSS_HERMITE_HELPERS": lambda: "\n" + _broadcast_helpers() + "\n\n" + embed(
        "_GRIDS", "_GH_CHUNK", "_TRAP_HALF_WIDTH", "_TRAP_FINE_HALF_WIDTH", "_TRAP_EDGE",
        "_TRAP_MAX_HALF_WIDTH", _trap_grid,
        _gh_expect, _gh_expect_many, _split_expect, quadrature_error),
    # node counts per rule dimension (modules with tensor quadrature nodes)
    "NODE_COUNT_HELPERS": lambda: embed(_nodes),
    # the bivariate normal CDF of the closed forms (embedded only where a formula uses it)
    "BVN_HELPERS": lambda: embed(_bvn),
    "ORTHANT_HELPERS": lambda: embed(_orthant, _orthants),
    "ATTENTION_HELPERS": lambda: _broadcast_helpers() + "\n\n" + embed(
        "_GRIDS", _gh_grid, _gh_pruned, _cheb_basis, _chebval2, _lobatto, _cheb_fit,
        _fd_jacobian, "_SC_MEAN1, _SC_MEAN2", "_SC_COV", "_SC_ITO", "_SC_NORM", "_SC_SIZE",
        _step_coefficients, _sc_pieces, _polar, _polar_table, _polar_eval, _per_state,
        _tabulated),
}


def __getattr__(name):
    make = _HELPER_SETS.get(name)
    if make is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = globals()[name] = make()
    return value


__all__ = list(_HELPER_SETS) + ["embed"]
