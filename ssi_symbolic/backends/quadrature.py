"""The one Gauss-Hermite rule of the Python side (the generated modules carry the same code,
embedded from :mod:`ssi_symbolic.backends.runtime`)."""
from __future__ import annotations

import numpy as np

from .runtime import _gh_grid, _gh_pruned


def gauss_hermite(dim: int, n: int, prune: float | None = None):
    """Tensor Gauss-Hermite rule for E over dim independent N(0, 1): (nodes (dim, P), weights
    (P,)) with E f(u) ~ sum_p w_p f(u_p). Probabilists' nodes x_i of hermegauss(n), weights
    w_i / sqrt(2 pi), tensor products over the dim coordinates; exact for polynomials of degree
    <= 2n - 1 in each variable. With prune, the nodes of weight <= prune x the largest are
    dropped (their total mass is below prune n^dim). Fresh arrays: callers may modify them."""
    if prune is None:
        u, w = _gh_grid(dim, n)
        return np.array(u), np.array(w)
    return _gh_pruned(dim, n, prune)


__all__ = ["gauss_hermite"]
