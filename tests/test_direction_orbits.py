"""Exchangeable directions (symbolic/directions.py): the products of base statistics and the
Cov(G) entries computed once per orbit of the direction permutations and renamed for the
others equal the same derivation without orbits, polynomial by polynomial."""
from __future__ import annotations

import pytest
import sympy as sp

from ssi_symbolic.model.spec import make_spec
from ssi_symbolic.symbolic import derive as derive_mod
from ssi_symbolic.symbolic.directions import DirectionPermutations

CASES = {
    "He2 committee K = K* = 2, plain": dict(
        L=1, teacher="He(2, z1_1)/sqrt(2) + He(2, z2_1)/sqrt(2)", teacher_directions=2,
        student_directions=2, spherical=False),
    "He2 committee K = K* = 2, spherical": dict(
        L=1, teacher="He(2, z1_1)/sqrt(2) + He(2, z2_1)/sqrt(2)", teacher_directions=2,
        student_directions=2),
    "K = 2 student, K* = 2 teacher, encoding": dict(
        L=1, teacher="z1_1*z2_1", student="z1_1**2 + z2_1**2",
        teacher_directions=2, student_directions=2, spherical=False, positional=[[1]]),
    "K = 3 student, K* = 1 teacher": dict(
        L=1, teacher="z1_1**2", student="z1_1**2 + z2_1**2 + z3_1**2",
        teacher_directions=1, student_directions=3, spherical=False),
    "K = K* = 2, two tokens": dict(
        L=2, teacher="z1_1*z2_2 + z2_1*z1_2", student="z1_1*z1_2 + z2_1*z2_2",
        teacher_directions=2, student_directions=2, spherical=False),
    "K* = 3 with equicorrelated P, spherical": dict(
        L=1, teacher="z1_1**2 + z2_1**2 + z3_1**2", student="z1_1*z2_1", teacher_directions=3,
        student_directions=2, teacher_overlaps=[[1, 0.5, 0.5], [0.5, 1, 0.5], [0.5, 0.5, 1]]),
}


class _Off:
    """DirectionPermutations replaced by the trivial group."""

    def __init__(self, *args, **kwargs):
        self.trivial = True


def _derive_both(kw, monkeypatch):
    kw = dict(kw)
    spec = make_spec("orbits", kw.pop("L"), kw.pop("teacher"), **kw)
    fast = derive_mod.derive(spec)
    with monkeypatch.context() as m:
        m.setattr(derive_mod, "DirectionPermutations", _Off)
        slow = derive_mod.derive(spec)
    return spec, fast, slow


@pytest.mark.parametrize("name", list(CASES))
def test_orbits_give_the_same_derivation(name, monkeypatch):
    spec, fast, slow = _derive_both(CASES[name], monkeypatch)
    assert sp.expand(fast.covariance - slow.covariance) == sp.zeros(*fast.covariance.shape)
    for a, b in zip(fast.finite_d_correction + fast.ito_correction + fast.drift_eta1
                    + fast.drift_eta2 + (fast.population_loss,),
                    slow.finite_d_correction + slow.ito_correction + slow.drift_eta1
                    + slow.drift_eta2 + (slow.population_loss,)):
        assert sp.expand(a - b) == 0


def test_orbit_counts_and_refusals():
    """The group is what the links allow: both sides for a committee, the student side only
    for a staircase teacher, none when P breaks the teacher's symmetry and the student has
    one direction."""
    def group(**kw):
        spec = make_spec("g", kw.pop("L", 1), kw.pop("teacher"), spherical=False, **kw)
        from ssi_symbolic.symbolic.expectation import Expectation
        from ssi_symbolic.symbolic.gaussian import TokenGaussian
        gauss = TokenGaussian.of(spec)
        st = derive_mod.statistics(spec, gauss, norm=False)
        ex = Expectation(gauss, [st.loss] + st.base, extra_symbols=(derive_mod.ETA,)).exact
        return DirectionPermutations(spec, gauss, ex, gauss.state)

    committee = group(teacher="z1_1**2 + z2_1**2 + z3_1**2", teacher_directions=3,
                      student_directions=3)
    assert len(committee.group) == 6 * 6 - 1
    stair = group(teacher="z1_1 + z1_1*z2_1", student="z1_1**2 + z2_1**2",
                  teacher_directions=2, student_directions=2)
    assert len(stair.group) == 1   # the student's swap only
    tilted = group(teacher="z1_1**2 + z2_1**2 + z3_1**2", teacher_directions=3,
                   student_directions=1, student="z1_1**2",
                   teacher_overlaps=[[1, 0.5, 0], [0.5, 1, 0], [0, 0, 1]])
    assert tilted.trivial


# (the K = K* = 2 erf committee's Cov(G), derived with orbits of S2 x S2, is checked against
# Monte Carlo in test_multi_derive.py; here the 3-cycles, which a wrong permutation breaks)
CLOSED_FORM_CASES = {
    "K = 3 exp student, K* = 1 linear teacher (3-cycles)": dict(
        L=1, teacher="z1_1", student="exp(z1_1/4) + exp(z2_1/4) + exp(z3_1/4)",
        teacher_directions=1, student_directions=3, spherical=False),
}


@pytest.mark.parametrize("name", list(CLOSED_FORM_CASES))
def test_orbits_of_closed_forms_give_the_same_values(name, monkeypatch):
    """The closed-form path (non-polynomial links: SymPy expressions renamed by xreplace):
    Cov(G) equal, at a random valid state to 25 digits, to the derivation without orbits."""
    import numpy as np
    spec, fast, slow = _derive_both(CLOSED_FORM_CASES[name], monkeypatch)
    K, Ks = spec.student_directions, spec.teacher_directions
    rng = np.random.default_rng(3)
    W = rng.normal(size=(K, Ks + 3)) / 2           # actual vectors: a realisable state
    Wt = np.eye(Ks, Ks + 3)
    M, Q = W @ Wt.T, W @ W.T
    value = {}
    for s in fast.state:
        kind, a, b = str(s)[0], *(int(x) - 1 for x in str(s)[1:].split("_"))
        value[s] = sp.Float((M if kind == "m" else Q)[a, b], 30)
    value[derive_mod.ETA] = sp.Float(0.5, 30)
    n = len(fast.state)
    for i in range(n):
        for j in range(i, n):
            a = sp.N(fast.covariance[i, j].xreplace(value), 30)
            b = sp.N(slow.covariance[i, j].xreplace(value), 30)
            assert abs(a - b) <= sp.Float("1e-25") * (1 + abs(b)), (i, j, a, b)
