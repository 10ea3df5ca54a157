"""The runtime helpers that generated modules embed, as source text, in one place.

A generated module imports only numpy and scipy, so the few helpers it needs are copied into it
from here: broadcasting of outputs, the tensor Gauss-Hermite rule for E over N(0, I_k) and the
n-versus-2n quadrature error estimate. Every backend takes its helpers from this module.
"""

#: broadcasting helpers every generated module carries (it imports only numpy and scipy)
BROADCAST_HELPERS = '''
def _bc(*xs):
    """Broadcast the outputs to one common shape (constants become arrays): a tuple."""
    return tuple(numpy.broadcast_arrays(*[numpy.asarray(x, dtype=float) for x in xs]))


def _bc_nested(rows):
    flat = _bc(*[x for row in rows for x in row])
    n = len(rows[0])
    return tuple(tuple(flat[i * n:(i + 1) * n]) for i in range(len(rows)))
'''

GAUSS_HERMITE_HELPERS = '\n' + BROADCAST_HELPERS + '''

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


_GH_CHUNK = 2 ** 22  # quadrature points times states held in memory at once


def _gh_expect(integrand, k, n, *args):
    """E over k independent N(0, 1) of integrand(u, *args), by tensor Gauss-Hermite
    quadrature, broadcast over the arguments and chunked to bound memory."""
    u, w = _gh_grid(k, n)
    args = numpy.broadcast_arrays(*[numpy.asarray(a, dtype=float) for a in args])
    shape = args[0].shape
    flat = [a.reshape(1, -1) for a in args]
    size = flat[0].shape[1]
    out = numpy.empty(size)
    step = max(1, _GH_CHUNK // w.size)
    uu = tuple(x[:, None] for x in u)
    for s in range(0, size, step):
        part = [a[:, s:s + step] for a in flat]
        f = numpy.broadcast_to(integrand(uu, *part), (w.size, part[0].shape[1]))
        out[s:s + step] = w @ f
    return out.reshape(shape)


def quadrature_error(function, *args, **kwargs):
    """(value, error estimate) of a function of this module: the value with 2n nodes per
    dimension and its difference from the value with n = QUADRATURE_NODES."""
    global QUADRATURE_NODES
    n = QUADRATURE_NODES
    coarse = numpy.asarray(function(*args, **kwargs), dtype=float)
    QUADRATURE_NODES = 2 * n
    try:
        fine = numpy.asarray(function(*args, **kwargs), dtype=float)
    finally:
        QUADRATURE_NODES = n
    return fine, numpy.abs(fine - coarse)
'''


__all__ = ["BROADCAST_HELPERS", "GAUSS_HERMITE_HELPERS"]
