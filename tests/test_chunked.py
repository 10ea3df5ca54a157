"""Generated modules evaluate calls on many states in blocks of _CHUNK states (the temporaries
of a formula then stay in cache): the blocks must give the values of one unblocked call, keep
the broadcast shape and the nested tuple structure, and leave small calls alone."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from ssi_symbolic.backends.files import load_module

GENERATED = Path(__file__).resolve().parent.parent / "generated"


def _committee_states(rng, n):
    """n realisable states of the K = 2 committee (overlaps of random vectors)."""
    W = rng.standard_normal((n, 2, 30)) / math.sqrt(30)
    M, Q = W[:, :, :2], np.einsum("nka,nha->nkh", W, W)
    return [M[:, 0, 0], M[:, 0, 1], M[:, 1, 0], M[:, 1, 1], Q[:, 0, 0], Q[:, 0, 1], Q[:, 1, 1]]


CASES = {
    "committee_erf_K2": lambda rng, n: _committee_states(rng, n),
    "tied_he2_pe": lambda rng, n: [rng.uniform(-0.5, 0.5, n), rng.uniform(-0.5, 0.5, n)],
}
PARAMS = {"tied_he2_pe": {"omega": 0.7}}


@pytest.mark.parametrize("name", list(CASES))
def test_blocks_equal_one_call(name):
    mod = load_module(GENERATED / f"{name}.py")
    n = 2 * mod._CHUNK + 1234
    states = CASES[name](np.random.default_rng(1), n)
    params = PARAMS.get(name, {})
    for fn in ("population_loss", "drift", "drift_jacobian"):
        f = getattr(mod, fn)
        assert hasattr(f, "__wrapped__"), fn
        args = {} if fn == "population_loss" else {"eta": 0.3}
        got = f(*states, **args, **params)
        ref = f.__wrapped__(*states, **args, **params)
        np.testing.assert_allclose(np.array(got, dtype=float), np.array(ref, dtype=float),
                                   rtol=1e-13, atol=1e-15, err_msg=fn)
        if fn == "drift_jacobian":
            assert len(got) == len(states) and all(len(row) == len(states) for row in got)
        if fn == "drift":
            assert all(np.shape(x) == (n,) for x in got)
    # broadcast shapes: a (k, 1) column against a (1, j) row, over 2 _CHUNK in all
    k = mod._CHUNK // 8
    cols = [np.asarray(s[:k]).reshape(k, 1) for s in states[:-1]]
    last = np.asarray(states[-1][:40]).reshape(1, 40)
    if name == "committee_erf_K2":  # q2_2 >= 1 keeps every state realisable
        last = 1.0 + np.abs(last)
    got = mod.drift(*cols, last, eta=0.2, **params)
    ref = mod.drift.__wrapped__(*cols, last, eta=0.2, **params)
    assert all(np.shape(x) == (k, 40) for x in got)
    np.testing.assert_allclose(np.array(got), np.array(ref), rtol=1e-13, atol=1e-15)


def test_small_calls_go_straight_through():
    """A one-state call (an ODE step) returns what the unwrapped function returns."""
    mod = load_module(GENERATED / "he2_L1.py")
    assert mod.drift(0.3, eta=0.1) == mod.drift.__wrapped__(0.3, eta=0.1)
    assert mod.population_loss(np.array(0.2)) == mod.population_loss.__wrapped__(np.array(0.2))
