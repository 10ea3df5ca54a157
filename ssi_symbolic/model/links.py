"""The vocabulary of link expressions: the names a spec's ``link`` string may use.

A link is a SymPy expression in the token projections z1..zL (also the column vector z) and the
spec's parameters. Besides SymPy's arithmetic it may call:

    He(k, x)          probabilists' Hermite polynomial He_k(x) (He_2 = x^2 - 1), expanded;
                      entry by entry on a vector or matrix (He(2, z) = (He_2(z_1), ..))
    tsum(v)           sum of the entries of a vector or matrix (tsum(z) = z1 + .. + zL)
    L                 the sequence length, so that one link string serves every L
                      (e.g. "tsum(He(2, z)) / sqrt(2 * L)"; see ModelSpec.with_length)
    sqrt, exp, log, sin, cos, tanh, erf, erfc, pi, E   as in SymPy / NumPy / SciPy
    Phi(x)            standard normal CDF (1 + erf(x / sqrt 2)) / 2 (scipy.special.ndtr)
    sigmoid(x)        1 / (1 + exp(-x))                     (torch.sigmoid)
    relu(x)           max(x, 0)                             (torch.relu)
    leaky_relu(x, a)  max(x, a x), a = 0.01 by default      (torch's negative_slope, 0 <= a <= 1)
    Abs(x), abs(x)    |x|, written max(x, -x)
    sign(x)           -1, 0, 1                              (numpy.sign)
    Heaviside(x)      step 0 / 1 with Heaviside(0) = 1/2   (numpy.heaviside(x, 0.5))
    Max(...), Min(...) largest / smallest argument          (any number of arguments)
    hardtanh(x)       clip(x, -1, 1)                        (torch.nn.functional.hardtanh)
    softplus(x)       log(1 + exp(x))                       (torch's softplus, beta = 1)
    gelu(x)           x Phi(x)                              (exact GELU, approximate="none")
    silu(x)           x sigmoid(x)                          (torch's silu / swish)
    Matrix(...)       a matrix or vector of expressions
    outer(u, v)       u v^T
    trace(M)          sum of the diagonal
    softmax_rows(M)   row-wise softmax: exp(M_ij) / sum_k exp(M_ik)
"""
from __future__ import annotations

import sympy as sp


def He(k, x):
    """Probabilists' Hermite polynomial He_k(x), as an expanded polynomial in x."""
    k = sp.sympify(k)
    if not (k.is_Integer and k >= 0):
        raise ValueError(f"He(k, x) needs a non-negative integer degree k, got {k}")
    if isinstance(x, sp.MatrixBase):
        return x.applyfunc(lambda v: sp.expand(sp.hermite_prob(int(k), v)))
    return sp.expand(sp.hermite_prob(int(k), x))


def tsum(v):
    """Sum of the entries of a vector or matrix (a scalar is returned as is)."""
    return sp.Add(*v) if isinstance(v, sp.MatrixBase) else v


def sigmoid(x):
    """Logistic function 1 / (1 + exp(-x))."""
    return 1 / (1 + sp.exp(-x))


def relu(x):
    """Rectified linear unit max(x, 0)."""
    return sp.Max(x, 0)


def leaky_relu(x, a=sp.Rational(1, 100)):
    """max(x, a x) for a slope 0 <= a <= 1 (PyTorch's negative_slope, default 0.01)."""
    a = sp.sympify(a)
    if a.is_number and not (0 <= a <= 1):
        raise ValueError(f"leaky_relu(x, a) needs 0 <= a <= 1, got a = {a}")
    return sp.Max(x, a * x)


def Phi(x):
    """Standard normal CDF (1 + erf(x / sqrt 2)) / 2."""
    return (1 + sp.erf(x / sp.sqrt(2))) / 2


def hardtanh(x):
    """clip(x, -1, 1), written max(x, -1) - max(x, 1) + 1 (a sum of kinks)."""
    return sp.Max(x, -1) - sp.Max(x, 1) + 1


def softplus(x):
    """log(1 + exp(x)) (PyTorch's softplus with beta = 1)."""
    return sp.log(1 + sp.exp(x))


def gelu(x):
    """Exact GELU x Phi(x)."""
    return x * Phi(x)


def silu(x):
    """SiLU (swish) x sigmoid(x)."""
    return x * sigmoid(x)


def heaviside(x):
    """Step function with H(0) = 1/2 (numpy.heaviside(x, 0.5))."""
    return sp.Heaviside(x, sp.Rational(1, 2))


def absolute(x):
    """|x| as max(x, -x): its derivative is sign(x) (Heaviside(2x) - Heaviside(-2x)) even when
    SymPy cannot prove the argument real, and it prints as a vectorised maximum."""
    return sp.Max(x, -x)


def _as_matrix(v):
    return v if isinstance(v, sp.MatrixBase) else sp.Matrix([v])


def outer(u, v):
    """Outer product u v^T of two vectors (column or row)."""
    u, v = _as_matrix(u), _as_matrix(v)
    u = u if u.shape[1] == 1 else u.T
    v = v if v.shape[1] == 1 else v.T
    return u * v.T


def trace(M):
    """Trace of a square matrix: sum_i M_ii."""
    return sp.Matrix(M).trace()


def softmax_rows(M):
    """Row-wise softmax of a matrix: S_ij = exp(M_ij) / sum_k exp(M_ik)."""
    M = sp.Matrix(M)
    rows = []
    for i in range(M.rows):
        ex = [sp.exp(M[i, j]) for j in range(M.cols)]
        total = sp.Add(*ex)
        rows.append([x / total for x in ex])
    return sp.Matrix(rows)


VOCABULARY = {
    "He": He,
    "tsum": tsum,
    "sqrt": sp.sqrt,
    "exp": sp.exp,
    "log": sp.log,
    "erf": sp.erf,
    "erfc": sp.erfc,
    "Phi": Phi,
    "tanh": sp.tanh,
    "sin": sp.sin,
    "cos": sp.cos,
    "sign": sp.sign,
    "Heaviside": heaviside,
    "Max": sp.Max,
    "Min": sp.Min,
    "leaky_relu": leaky_relu,
    "hardtanh": hardtanh,
    "softplus": softplus,
    "gelu": gelu,
    "silu": silu,
    "Abs": absolute,
    "abs": absolute,
    "sigmoid": sigmoid,
    "relu": relu,
    "Matrix": sp.Matrix,
    "outer": outer,
    "trace": trace,
    "softmax_rows": softmax_rows,
    "pi": sp.pi,
    "E": sp.E,
    "Rational": sp.Rational,
}
