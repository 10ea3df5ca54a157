"""The link zoo (issue 11, "any link exactly"): generated modules of many link families against
independent references.

Everything on the reference side is independent of the package (tests/_zoo_reference.py: our own
SymPy classes for the vocabulary with their a.e. derivatives, NumPy / SciPy numbers, nested
quadratures of the MATH.md integrands, published closed forms); the only project API used is
make_spec / generate / load_module, the generated module's public functions and the CLI.

    1. ZOO: 38 cases (teacher, student, L = 1..3, positional C or none, spherical or plain)
       covering Hermite polynomials with radicals, floats and pi, erf, Phi, erfc, relu,
       leaky_relu, Abs, sign and Heaviside (teachers), Max / Min of affine forms, hardtanh,
       exp of affine and quadratic forms, cos, sin, tanh, sigmoid, softplus, gelu, silu, sums
       over tokens, products across tokens, links of a linear combination of tokens.
       kind: "poly" (METHOD must be "exact"), "closed" (a closed-form family: METHOD must not be
       "quadrature") or "quad" (no closed form expected).
    2. test_zoo_*_mc: loss, drift_eta1, drift_eta2, drift, covariance and diffusion against the
       Monte Carlo of tests/test_montecarlo.py (its per_sample / estimate / check, run on our
       ZooLink), within 5 standard errors + the module's own quadrature error estimate.
    3. test_zoo_reference_L1: every L = 1 case of a "poly" or "closed" kind against the nested
       quadrature reference to 1e-10 relative (absolute floor 1e-12): loss, drift_eta1,
       drift_eta2, drift and Cov(G). test_reference_oracle_*: the reference itself against
       textbook closed forms (no package involved).
    4. test_oracle_*: erf and relu pairs against published closed forms to 1e-12.
    5. test_zoo_quadrature_error_bounds_*: for the "quad" cases at L = 1 (and the factorised
       products at L = 2), quadrature_error's estimate >= the actual error against the
       reference (and 1e-10 agreement when the module is not a quadrature module).
    6. test_refused_*: links that have no expectation, are undefined on half the line, have too
       high a degree, or are students whose derivative is a Dirac delta; test_bump_not_refused.
    7. test_cold_derivation_time: `python -m ssi_symbolic derive` of a few zoo specs, < 5 s wall.

The Monte Carlo and the references are computed once per case (functools caches); modules are
generated once per case into a temporary folder, and a generation error is remembered, so a
failing derivation costs its time once, not once per test.
"""
from __future__ import annotations

import functools
import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import sympy as sp
from scipy.special import erf, erfc

from ssi_symbolic.backends.files import load_module
from ssi_symbolic.backends.registry import generate
from ssi_symbolic.errors import SpecError
from ssi_symbolic.model.spec import make_spec

from . import test_montecarlo as tmc
from ._zoo_reference import (ZooLink, erf_pair_drift, erf_pair_loss, gauss2, parse_link,
                             reference_L1, reference_product_L2, relu_k1, relu_k1_prime,
                             relu_pair_drift, relu_pair_loss, saad_solla_I3, saad_solla_I4)

ROOT = Path(__file__).resolve().parent.parent
ETA = tmc.ETA
D_DIM = tmc.D_DIM
RTOL = 1e-10          # reference comparisons (closed forms and polynomials)
ATOL = 1e-12
ORACLE_TOL = 1e-12    # published closed forms


# ----------------------------------------------------------------------------------------------
# the zoo
# ----------------------------------------------------------------------------------------------

@dataclass
class ZooCase(tmc.Case):
    """A test_montecarlo Case plus the family kind and, for two-token products a(z1) a(z2) /
    b(z1) b(z2), the one-token factors (teacher, student) of the factorised reference."""

    n: int = 300_000
    kind: str = "closed"
    factors: tuple | None = None


PE1 = [[1.0], [-1.0]]                               # the authors' opposite-paired encoding
PE3 = [[0.5, -0.3], [0.2, 0.8], [-0.6, 0.1]]


def _zoo():
    rows = [
        # ---------------- L = 1 (all checked against the quadrature reference) ----------------
        dict(name="poly_floats_pi_L1_pe", L=1, kind="poly",
             teacher="0.5*z1 + pi/4*He(2, z1)/sqrt(2)",
             student="sqrt(6)/3*z1 + 0.25*He(2, z1)", C=[[0.6]]),
        dict(name="poly_cubic_radical_L1_plain", L=1, kind="poly",
             teacher="He(3, z1)/sqrt(6) + 2**(1/3)/2*z1", student="0.7*z1 - 0.1",
             spherical=False),
        dict(name="erf_pair_L1", L=1, teacher="erf(z1/sqrt(2))"),
        # Cov(G) of these two: smooth statistics without a closed form (shifted means, four Phi
        # factors), each one quadrature node whole (minutes term by term, seconds now)
        dict(name="erf_L1_pe_plain", L=1, teacher="erf(0.8*z1)", student="erf(z1) + 0.2*z1",
             C=[[0.5]], spherical=False),
        dict(name="phi_L1_pe", L=1, teacher="Phi(2*z1)", student="Phi(z1 - 0.3)", C=[[0.8]]),
        dict(name="erfc_L1_plain", L=1, teacher="erfc(z1)", student="erfc(0.7*z1 + 0.2)",
             spherical=False),
        dict(name="relu_pair_L1", L=1, teacher="relu(z1)"),
        dict(name="relu_L1_pe", L=1, teacher="relu(z1) - 1/sqrt(2*pi)", student="relu(z1)",
             C=[[0.7]]),
        dict(name="leaky_relu_L1_plain", L=1, teacher="leaky_relu(z1, 0.2)",
             student="leaky_relu(z1)", spherical=False),
        dict(name="abs_L1_pe", L=1, teacher="Abs(z1)", student="abs(z1) - 0.5", C=[[0.5]]),
        dict(name="sign_teacher_erf_L1", L=1, teacher="sign(z1)", student="erf(1.5*z1)"),
        dict(name="heaviside_teacher_phi_L1_pe", L=1, teacher="Heaviside(z1)",
             student="Phi(2*z1)", C=[[0.4]]),
        dict(name="max_min_affine_L1", L=1, teacher="Max(z1, 0.5*z1 + 0.3)",
             student="Min(z1, 1)"),
        dict(name="exp_affine_L1_plain", L=1, teacher="exp(0.3*z1)",
             student="0.5*z1 + exp(0.2*z1 - 0.1)", spherical=False),
        dict(name="exp_bump_L1_pe", L=1, teacher="exp(-z1**2/2)",
             student="1.2*exp(-(z1 - 0.5)**2/2)", C=[[0.5]]),
        dict(name="cos_L1_pe", L=1, teacher="cos(z1)", student="cos(0.8*z1 + 0.1)", C=[[0.6]]),
        dict(name="sin_L1_plain", L=1, teacher="sin(2*z1)", student="sin(z1) + 0.1*z1",
             spherical=False),
        dict(name="gelu_pair_L1_pe", L=1, teacher="gelu(z1)", C=[[0.5]]),
        dict(name="hardtanh_L1_pe", L=1, kind="quad", teacher="hardtanh(z1)",
             student="hardtanh(1.5*z1)", C=[[0.6]]),
        dict(name="tanh_L1_plain", L=1, kind="quad", teacher="tanh(2*z1)", student="tanh(z1)",
             spherical=False),
        dict(name="sigmoid_L1_pe", L=1, kind="quad", teacher="sigmoid(3*z1)",
             student="2*sigmoid(z1)", C=[[0.4]]),
        dict(name="relu_teacher_softplus_L1", L=1, kind="quad", teacher="relu(z1)",
             student="softplus(z1)"),
        dict(name="silu_L1_pe_plain", L=1, kind="quad", teacher="silu(z1)",
             student="silu(1.2*z1)", C=[[0.3]], spherical=False),
        # ---------------- L = 2 ----------------
        dict(name="poly_radicals_L2", L=2, kind="poly",
             teacher="He(2, z1)/sqrt(2) + He(3, z2)/sqrt(6)",
             student="0.7*z1 + sqrt(3)/3*z2 + 0.2"),
        dict(name="tsum_he2_teacher_erf_L2_pe", L=2, teacher="tsum(He(2, z))/sqrt(2*L)",
             student="(erf(z1) + erf(z2))/2", C=PE1),
        dict(name="tanh_product_L2", L=2, kind="quad", teacher="tanh(z1)*tanh(z2)",
             factors=("tanh(z1)", "tanh(z1)")),
        dict(name="sign_product_teacher_L2", L=2, teacher="sign(z1)*sign(z2)",
             student="erf(z1)*erf(z2)", factors=("sign(z1)", "erf(z1)")),
        dict(name="erf_times_token_L2_pe", L=2, teacher="erf(z1)*z2", C=PE1),
        dict(name="erf_lincomb_L2_pe", L=2, teacher="erf((z1 + z2)/sqrt(2))", C=PE1),
        dict(name="tanh_lincomb_relu_L2_plain", L=2, kind="quad", teacher="tanh(z1 + z2)",
             student="relu(z1 + z2)/2", spherical=False),
        dict(name="max_tokens_L2", L=2, teacher="Max(z1, z2)", student="z1 + z2"),
        dict(name="heaviside_diff_sigmoid_L2", L=2, kind="quad", teacher="Heaviside(z1 - z2)",
             student="sigmoid(z1 - z2)"),
        dict(name="softplus_sum_L2_noise_plain", L=2, kind="quad",
             teacher="softplus(z1) + softplus(z2)", student="z1 + z2 - 0.5",
             noise=0.1, spherical=False),
        dict(name="gelu_silu_diff_L2_pe", L=2, kind="quad", teacher="gelu(z1) - silu(z2)",
             student="z1 - z2", C=PE1),
        # a link of a combination of tokens (their tokens never factor) against one that
        # reads the tokens apart: each statistic in one piece (minutes term by term)
        dict(name="gelu_lincomb_erfc_L2_pe_plain", L=2, kind="quad",
             teacher="z1 + erfc(0.9*z2)", student="gelu((z1 + z2)/sqrt(2))",
             C=[[0.6], [0.9]], spherical=False),
        dict(name="abs_param_L2_plain", L=2, teacher="Abs(z1 + z2)/sqrt(2) + beta*z1",
             student="z1 + z2", params={"beta": 0.5}, values={"beta": -0.3},
             spherical=False),
        # ---------------- L = 3 ----------------
        dict(name="erf_lincomb_tanh_L3_pe2", L=3, kind="quad",
             teacher="erf((z1 + z2 + z3)/sqrt(3))",
             student="(tanh(z1) + tanh(z2) + tanh(z3))/sqrt(3)", C=PE3),
        dict(name="max3_relu_sum_L3_plain", L=3, teacher="Max(z1, z2, z3)",
             student="z1 + z2 + z3", spherical=False),
    ]
    return [ZooCase(seed=300 + i, **row) for i, row in enumerate(rows)]


ZOO = _zoo()
IDS = [c.name for c in ZOO]
BY_NAME = {c.name: c for c in ZOO}
L1 = [c for c in ZOO if c.L == 1]
L1_EXACT = [c for c in L1 if c.kind in ("poly", "closed")]
L1_QUAD = [c for c in L1 if c.kind == "quad"]
PRODUCTS = [c for c in ZOO if c.factors]


def _ids(cases):
    return [c.name for c in cases]


# ----------------------------------------------------------------------------------------------
# modules, Monte Carlo, references (each computed once)
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def zoo_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo_generated")


@contextlib.contextmanager
def _time_limit(seconds, what):
    """Fail (instead of hanging) when the block runs longer than `seconds` (SIGALRM)."""
    def handler(signum, frame):
        raise TimeoutError(f"{what} did not finish within {seconds} s")
    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


_MODULES: dict = {}
DERIVE_WITHIN = 120   # seconds per zoo module (the cold-derivation test asks for < 5 s)


def zoo_module(case, out_dir):
    """The generated module of a case (generated once, within DERIVE_WITHIN seconds; a
    generation error is re-raised for every later test of the case without deriving again)."""
    if case.name not in _MODULES:
        try:
            spec = make_spec(case.name, case.L, case.teacher, student=case.student,
                             positional=case.C, parameters=case.params, noise=case.noise,
                             spherical=case.spherical)
            with _time_limit(DERIVE_WITHIN, f"deriving {case.name}"):
                path, _ = generate(spec, out_dir=out_dir)
            _MODULES[case.name] = load_module(path)
        except Exception as exc:  # noqa: BLE001  (remembered, re-raised below)
            _MODULES[case.name] = exc
    got = _MODULES[case.name]
    if isinstance(got, Exception):
        raise got
    return got


@functools.lru_cache(maxsize=None)
def zoo_mc(name):
    """test_montecarlo's estimate (MATH.md per_sample) with the links evaluated by ZooLink."""
    case = BY_NAME[name]
    m, e, q, _ = tmc.random_state(case)
    with mock.patch.object(tmc, "Link", ZooLink):
        return tmc.estimate(case, m, e, q)


def zoo_state(case):
    return tmc.random_state(case)[3]


@functools.lru_cache(maxsize=None)
def zoo_reference(name):
    case = BY_NAME[name]
    assert case.L == 1 and not case.noise
    return reference_L1(case.teacher, case.student_text, zoo_state(case), C=case.C,
                        spherical=case.spherical, eta=ETA, values=case.values)


def _vec(x):
    return np.atleast_1d(np.asarray(x, dtype=float))


def assert_close(label, gen, ref, rtol=RTOL, atol=ATOL):
    """|gen - ref| <= rtol |ref| + atol entrywise, with a message listing every entry."""
    gen = np.asarray(gen, dtype=float)
    ref = np.asarray(ref, dtype=float)
    gen = gen.reshape(ref.shape)
    bad = np.abs(gen - ref) > rtol * np.abs(ref) + atol
    if bad.any():
        lines = [f"{label}: generated code disagrees with the reference (rtol {rtol}, atol {atol})"]
        for idx in np.ndindex(ref.shape):
            flag = "  <-- OUTSIDE" if bad[idx] else ""
            lines.append(f"  [{idx}] generated={gen[idx]:.15g} reference={ref[idx]:.15g} "
                         f"diff={gen[idx] - ref[idx]:.3g}{flag}")
        pytest.fail("\n".join(lines))


# ----------------------------------------------------------------------------------------------
# 1. the zoo itself, links and metadata
# ----------------------------------------------------------------------------------------------

def test_zoo_size_and_coverage():
    """At least 32 cases, L = 1, 2, 3, with and without encoding, spherical and plain, and every
    name of the vocabulary used at least once."""
    assert len(ZOO) >= 32
    assert {c.L for c in ZOO} == {1, 2, 3}
    assert any(c.C for c in ZOO) and any(not c.C for c in ZOO)
    assert any(c.spherical for c in ZOO) and any(not c.spherical for c in ZOO)
    text = " ".join(c.teacher + " " + c.student_text for c in ZOO)
    for word in ["He(", "sqrt(", "pi", "erf(", "Phi(", "erfc(", "relu(", "leaky_relu(", "Abs(",
                 "abs(", "sign(", "Heaviside(", "Max(", "Min(", "hardtanh(", "exp(", "cos(",
                 "sin(", "tanh(", "sigmoid(", "softplus(", "gelu(", "silu(", "tsum(", "**(1/3)"]:
        assert word in text, word
    assert len(set(IDS)) == len(IDS)


@pytest.mark.parametrize("case", PRODUCTS, ids=_ids(PRODUCTS))
def test_zoo_product_factors_are_the_links(case):
    """The factors given for the factorised reference multiply to the links."""
    zs = sp.symbols("z1:3", real=True)
    for text, factor in ((case.teacher, case.factors[0]), (case.student_text, case.factors[1])):
        (full,) = parse_link(text, 2)
        (f,) = parse_link(factor, 1)
        # parse_link uses the same symbols z1, z2 (real=True) for every L
        prod = f * f.xreplace({zs[0]: zs[1]})
        assert sp.simplify(full - prod) == 0, (text, factor)


@pytest.mark.parametrize("case", ZOO, ids=IDS)
def test_zoo_module_metadata(case, zoo_dir):
    """State names (m, e / e1..er, q for plain SGD) and METHOD: one of "exact", "closed form",
    "quadrature" (the least exact output); "exact" for polynomial links; for a closed-form
    family the population loss is never by quadrature (parts of Cov(G) may be: its eta^4 part
    holds four threshold factors, whose orthant probability has no closed form)."""
    mod = zoo_module(case, zoo_dir)
    es = ("e",) if case.r == 1 else tuple(f"e{a + 1}" for a in range(case.r))
    assert tuple(mod.OVERLAPS) == ("m",) + es + (() if case.spherical else ("q",))
    assert mod.METHOD in ("exact", "closed form", "quadrature")
    assert set(mod.OUTPUT_METHODS.values()) <= {"exact", "closed form", "quadrature"}
    if case.kind == "poly":
        assert mod.METHOD == "exact"
    if case.kind == "closed":
        assert mod.OUTPUT_METHODS["population_loss"] != "quadrature", \
            f"{case.name}: the loss of a closed-form family by quadrature"


@pytest.mark.parametrize("case", ZOO, ids=IDS)
def test_zoo_links_match_independent_evaluation(case, zoo_dir):
    """teacher_link, student_link and student_link_gradient equal ZooLink's values and a.e.
    derivatives at random points (away from kinks almost surely), so that the Monte Carlo
    simulates the model of the generated code."""
    mod = zoo_module(case, zoo_dir)
    Z = np.random.default_rng(7).standard_normal((64, case.L)) * 1.3
    cols = [Z[:, l] for l in range(case.L)]
    T = ZooLink(case.teacher, case.L, case.values)
    S = ZooLink(case.student_text, case.L, case.values)
    tv = np.asarray(mod.teacher_link(*cols, **case.values), dtype=float).reshape(T.K, -1).T
    sv = np.asarray(mod.student_link(*cols, **case.values), dtype=float).reshape(S.K, -1).T
    rows = mod.student_link_gradient(*cols, **case.values)
    grad = np.array([[np.broadcast_to(np.asarray(x, dtype=float), (Z.shape[0],)) for x in row]
                     for row in rows])
    np.testing.assert_allclose(tv, T.values(Z), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sv, S.values(Z), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.moveaxis(grad, 2, 0), S.gradient(Z), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# 2. Monte Carlo (test_montecarlo's machinery on ZooLink)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ZOO, ids=IDS)
def test_zoo_loss_mc(case, zoo_dir):
    """population_loss within 5 Monte Carlo standard errors (+ quadrature error estimate)."""
    mod = zoo_module(case, zoo_dir)
    state, v = zoo_state(case), case.values
    mc = zoo_mc(case.name)
    tmc.check(f"{case.name} population_loss at {state}", mod.population_loss(*state, **v),
              mc.loss, tmc.quad_err(mod, mod.population_loss, state, **v))


@pytest.mark.parametrize("case", ZOO, ids=IDS)
def test_zoo_drift_mc(case, zoo_dir):
    """drift_eta1 = E G1, drift_eta2 = E G2, drift(eta) = E G within 5 standard errors."""
    mod = zoo_module(case, zoo_dir)
    state, v = zoo_state(case), case.values
    mc = zoo_mc(case.name)
    tmc.check(f"{case.name} drift_eta1 at {state}", _vec(mod.drift_eta1(*state, **v)),
              mc.drift_eta1, tmc.quad_err(mod, mod.drift_eta1, state, **v))
    tmc.check(f"{case.name} drift_eta2 at {state}", _vec(mod.drift_eta2(*state, **v)),
              mc.drift_eta2, tmc.quad_err(mod, mod.drift_eta2, state, **v))
    tmc.check(f"{case.name} drift(eta={ETA}) at {state}", _vec(mod.drift(*state, eta=ETA, **v)),
              mc.drift, tmc.quad_err(mod, mod.drift, state, eta=ETA, **v))


@pytest.mark.parametrize("case", ZOO, ids=IDS)
def test_zoo_covariance_mc(case, zoo_dir):
    """covariance = Cov(G) within 5 batch standard errors, symmetric; diffusion = Cov(G)/d."""
    mod = zoo_module(case, zoo_dir)
    state, v = zoo_state(case), case.values
    mc = zoo_mc(case.name)
    n = len(mod.OVERLAPS)
    cov = np.asarray(mod.covariance(*state, eta=ETA, **v), dtype=float).reshape(n, n)
    qe = tmc.quad_err(mod, mod.covariance, state, eta=ETA, **v)
    tmc.check(f"{case.name} covariance(eta={ETA}) at {state}", cov, mc.covariance, qe)
    np.testing.assert_allclose(cov, cov.T, rtol=1e-12, atol=1e-15)
    diff = np.asarray(mod.diffusion(*state, eta=ETA, d=D_DIM, **v), dtype=float)
    assert diff.shape == (n, n)
    tmc.check(f"{case.name} diffusion(eta={ETA}, d={D_DIM}) at {state}", diff,
              (mc.covariance[0] / D_DIM, mc.covariance[1] / D_DIM), np.asarray(qe) / D_DIM)


@pytest.mark.parametrize("shift", [0.05, -0.05])
@pytest.mark.parametrize("name", ["relu_L1_pe", "tanh_lincomb_relu_L2_plain"])
def test_zoo_mc_detects_perturbed_state(name, shift, zoo_dir):
    """The tolerance is not vacuous: the drift at a state whose m is off by +-0.05 fails the
    Monte Carlo comparison in at least one entry, the true state passes."""
    case = BY_NAME[name]
    mod = zoo_module(case, zoo_dir)
    state, v = zoo_state(case), case.values
    mc = zoo_mc(case.name)

    def failures(st):
        return (tmc._failing_entries(_vec(mod.drift_eta1(*st, **v)), mc.drift_eta1)
                + tmc._failing_entries(_vec(mod.drift_eta2(*st, **v)), mc.drift_eta2))

    assert failures(state) == 0
    assert failures((state[0] + shift,) + tuple(state[1:])) >= 1


# ----------------------------------------------------------------------------------------------
# 3. L = 1 against the quadrature reference, and the reference against textbook forms
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", L1_EXACT, ids=_ids(L1_EXACT))
def test_zoo_reference_L1(case, zoo_dir):
    """Polynomial and closed-form families at L = 1 (with and without encoding, spherical and
    plain): loss, drift_eta1, drift_eta2, drift and Cov(G) equal the nested quadrature of the
    MATH.md integrand to 1e-10 relative (absolute floor 1e-12)."""
    mod = zoo_module(case, zoo_dir)
    state, v = zoo_state(case), case.values
    ref = zoo_reference(case.name)
    assert ref.error < 1e-11, f"reference not converged: {ref.error}"
    n = len(mod.OVERLAPS)

    def bound(piece, fn, **kw):
        """ATOL, plus the module's own error bound where this output is by quadrature."""
        if mod.OUTPUT_METHODS[piece] != "quadrature":
            return ATOL
        return ATOL + np.asarray(mod.quadrature_error(fn, *state, **kw, **v)[1], dtype=float)

    assert_close(f"{case.name} population_loss at {state}", mod.population_loss(*state, **v),
                 ref.loss, atol=bound("population_loss", mod.population_loss))
    assert_close(f"{case.name} drift_eta1 at {state}", _vec(mod.drift_eta1(*state, **v)),
                 ref.drift_eta1, atol=bound("drift_eta1", mod.drift_eta1))
    assert_close(f"{case.name} drift_eta2 at {state}", _vec(mod.drift_eta2(*state, **v)),
                 ref.drift_eta2, atol=bound("drift_eta2", mod.drift_eta2))
    assert_close(f"{case.name} drift at {state}", _vec(mod.drift(*state, eta=ETA, **v)),
                 ref.drift, atol=np.maximum(bound("drift_eta1", mod.drift, eta=ETA),
                                            bound("drift_eta2", mod.drift, eta=ETA)))
    cov = np.asarray(mod.covariance(*state, eta=ETA, **v), dtype=float).reshape(n, n)
    atol = np.asarray(bound("covariance", mod.covariance, eta=ETA), dtype=float)
    assert_close(f"{case.name} covariance at {state}", cov, ref.covariance,
                 atol=atol.reshape(n, n) if atol.size == n * n else atol)


_PHI = "(1 + erf(x/sqrt(2)))/2"


@pytest.mark.parametrize("m", [-0.8, -0.3, 0.1, 0.45, 0.9])
def test_reference_oracle_pairs(m):
    """The reference against the published erf and relu pair formulas (loss, E G1, E G2) and the
    worked-out erf drift (2/pi)(1 - m^2)/sqrt(4 - m^2): the reference and the oracles agree
    with each other before either is used on the package."""
    r = reference_L1("erf(z1/sqrt(2))", "erf(z1/sqrt(2))", (m,), eta=ETA)
    e1, e2 = erf_pair_drift(m)
    assert_close("erf loss", r.loss, erf_pair_loss(m), 1e-13, 1e-14)
    assert_close("erf drift_eta1", r.drift_eta1, [e1], 1e-13, 1e-14)
    assert_close("erf drift_eta2", r.drift_eta2, [e2], 1e-13, 1e-14)
    assert_close("erf drift_eta1 worked out", e1, 2 / np.pi * (1 - m * m) / np.sqrt(4 - m * m),
                 1e-14, 1e-15)
    r = reference_L1("relu(z1)", "relu(z1)", (m,), eta=ETA)
    e1, e2 = relu_pair_drift(m)
    assert_close("relu loss", r.loss, relu_pair_loss(m), 1e-13, 1e-14)
    assert_close("relu drift_eta1", r.drift_eta1, [e1], 1e-13, 1e-14)
    assert_close("relu drift_eta2", r.drift_eta2, [e2], 1e-13, 1e-14)


def test_reference_oracle_gaussian_integrals():
    """The reference's handling of the mean mu = C e, of q and of the conditional zeta against
    textbook Gaussian integrals, at a plain state with an encoding (m, e, q) = (0.4, 0.3, 1.2),
    C = 0.7, so z ~ N(mu, q) with mu = 0.21 and Cov(z*, z) = m:

      teacher exp(a x), student cos(b z + c):
        E e^{2 a x} = e^{2 a^2},  E cos^2(b z + c) = (1 + cos(2 b mu + 2 c) e^{-2 b^2 q}) / 2,
        E e^{a x} cos(b z + c) = e^{(a^2 - b^2 q)/2} cos(b mu + c + a b m)
      (R = half the first two minus the third);
      linear teacher and student z: dl = z - x, E[G1_e] = -E[dl (zeta + C)] = -(e + C mu)
      (Stein: E[dl zeta] = e E[d2l] = e), E[G1_q] = -2 E[dl z] = -2 (q + mu^2 - m),
      E[G2_q] = E[dl^2] = 1 - 2 m + q + mu^2;
      erf teacher and student: E[G1_e] = -(e E[d2l] + C E[dl]) with the a.e.-free second
      derivative d2l = g'(z)^2 - (g*(x) - g(z)) g''(z) integrated separately."""
    m, e, q, C = 0.4, 0.3, 1.2, 0.7
    mu = C * e
    a, b, c = 0.3, 0.8, 0.1
    r = reference_L1(f"exp({a}*z1)", f"cos({b}*z1 + {c})", (m, e, q), C=[[C]], spherical=False)
    R = (0.5 * np.exp(2 * a * a) + 0.25 * (1 + np.cos(2 * b * mu + 2 * c) * np.exp(-2 * b * b * q))
         - np.exp((a * a - b * b * q) / 2) * np.cos(b * mu + c + a * b * m))
    assert_close("exp/cos loss", r.loss, R, 1e-13, 1e-14)
    r = reference_L1("z1", "z1", (m, e, q), C=[[C]], spherical=False)
    assert_close("linear E G1", r.drift_eta1, [1 - m, -(e + C * mu), -2 * (q + mu * mu - m)],
                 1e-13, 1e-14)
    assert_close("linear E G2", r.drift_eta2, [0, 0, 1 - 2 * m + q + mu * mu], 1e-13, 1e-14)
    # erf: E G1_e by Stein against the conditional-zeta integrand of reference_L1
    r = reference_L1("erf(z1)", "erf(0.8*z1)", (m, e, q), C=[[C]], spherical=False)
    g = erf
    gs = lambda z: erf(0.8 * z)  # noqa: E731
    dgs = lambda z: 0.8 * 2 / np.sqrt(np.pi) * np.exp(-(0.8 * z) ** 2)  # noqa: E731
    d2gs = lambda z: -2 * (0.8 * z) * 0.8 * dgs(z)  # noqa: E731

    def F(x, z):
        res = g(x) - gs(z)
        return np.array([dgs(z) ** 2 - res * d2gs(z), -res * dgs(z)])

    Ed2l, Edl = gauss2(F, m, q, mu).value
    assert_close("erf E G1_e (Stein)", r.drift_eta1[1], -(e * Ed2l + C * Edl), 1e-12, 1e-14)


@pytest.mark.parametrize("name", ["relu_L1_pe", "leaky_relu_L1_plain", "tanh_product_L2"])
def test_reference_oracle_matches_montecarlo(name):
    """The quadrature references (one-token and factorised product) against the Monte Carlo of
    test_montecarlo on ZooLink, including Cov(G): they simulate the same model."""
    case = BY_NAME[name]
    mc = zoo_mc(name)
    if case.factors:
        loss, g1, g2, _ = reference_product_L2(*case.factors, zoo_state(case)[0])
        drift, cov = None, None
    else:
        ref = zoo_reference(name)
        loss, g1, g2, drift, cov = (ref.loss, ref.drift_eta1, ref.drift_eta2, ref.drift,
                                    ref.covariance)
    tmc.check(f"{name} reference loss", loss, mc.loss)
    tmc.check(f"{name} reference E G1", g1, mc.drift_eta1)
    tmc.check(f"{name} reference E G2", g2, mc.drift_eta2)
    if cov is not None:
        tmc.check(f"{name} reference E G", drift, mc.drift)
        tmc.check(f"{name} reference Cov(G)", cov, mc.covariance)


def test_reference_oracle_saad_solla_integrals():
    """I3 and I4 of Saad and Solla against two-variable quadratures where they reduce to them:
    I3(z, z*, z*) = E[g'(z) z* g(z*)] and I4(z, z, z*, z) = E[g'(z)^2 g(z*) g(z)]."""
    m = 0.35
    g = lambda x: erf(x / np.sqrt(2))  # noqa: E731
    dg = lambda x: np.sqrt(2 / np.pi) * np.exp(-x * x / 2)  # noqa: E731
    val = gauss2(lambda x, z: np.array([dg(z) * x * g(x), dg(z) ** 2 * g(x) * g(z)]),
                 m, 1.0).value
    C3 = np.array([[1, m, m], [m, 1, 1], [m, 1, 1]])
    C4 = np.array([[1, 1, m, 1], [1, 1, m, 1], [m, m, 1, m], [1, 1, m, 1]])
    assert_close("I3", saad_solla_I3(C3), val[0], 1e-13, 1e-14)
    assert_close("I4", saad_solla_I4(C4), val[1], 1e-13, 1e-14)


# ----------------------------------------------------------------------------------------------
# 4. published closed forms (oracles)
# ----------------------------------------------------------------------------------------------

ORACLE_M = np.array([-0.9, -0.5, -0.1, 0.2, 0.6, 0.95])


def test_oracle_erf_pair_loss(zoo_dir):
    """(a) erf(z/sqrt 2) teacher and student, L = 1, spherical, no encoding:
    R = 1/3 - (2/pi) arcsin(m/2) (Saad and Solla 1995, I2), at several m."""
    mod = zoo_module(BY_NAME["erf_pair_L1"], zoo_dir)
    for m in ORACLE_M:
        assert_close(f"erf pair loss at m={m}", mod.population_loss(m), erf_pair_loss(m),
                     ORACLE_TOL, ORACLE_TOL)


def test_oracle_relu_pair_loss(zoo_dir):
    """(b) relu teacher and student: R = 1/2 - (sqrt(1 - m^2) + m (pi - arccos m)) / (2 pi)
    (the degree-1 arc-cosine kernel, Cho and Saul 2009)."""
    mod = zoo_module(BY_NAME["relu_pair_L1"], zoo_dir)
    for m in ORACLE_M:
        want = 0.5 - (np.sqrt(1 - m * m) + m * (np.pi - np.arccos(m))) / (2 * np.pi)
        assert_close(f"relu pair loss at m={m}", mod.population_loss(m), want, ORACLE_TOL,
                     ORACLE_TOL)
        assert_close("relu_pair_loss helper", relu_pair_loss(m), want, 1e-15, 1e-15)


def test_oracle_relu_pair_drift(zoo_dir):
    """(c) relu pair, L = 1, spherical: E G1 = (1 - m^2) k1'(m) (the projected -dR/dm) and
    E G2 = -(m/2) (1/2 - 2 k1 + k1' + m sqrt(1 - m^2)/(2 pi)), derived by hand from the
    arc-cosine kernel with Stein's lemma (see _zoo_reference.relu_pair_drift), and drift(eta)
    = eta E G1 + eta^2 E G2."""
    mod = zoo_module(BY_NAME["relu_pair_L1"], zoo_dir)
    for m in ORACLE_M:
        e1, e2 = relu_pair_drift(m)
        assert_close("relu projected gradient", e1,
                     (1 - m * m) * (np.pi - np.arccos(m)) / (2 * np.pi), 1e-15, 1e-15)
        assert_close(f"relu drift_eta1 at m={m}", _vec(mod.drift_eta1(m)), [e1], ORACLE_TOL,
                     ORACLE_TOL)
        assert_close(f"relu drift_eta2 at m={m}", _vec(mod.drift_eta2(m)), [e2], ORACLE_TOL,
                     ORACLE_TOL)
        assert_close(f"relu drift at m={m}", _vec(mod.drift(m, eta=ETA)),
                     [ETA * e1 + ETA ** 2 * e2], ORACLE_TOL, ORACLE_TOL)
    assert relu_k1(1.0) == pytest.approx(0.5) and relu_k1_prime(0.0) == pytest.approx(0.25)


def test_oracle_erf_pair_drift(zoo_dir):
    """(d) erf(z/sqrt 2) pair, L = 1, spherical: E G1 and E G2 from Saad and Solla's I3 and I4
    (see _zoo_reference.erf_pair_drift), and drift(eta) = eta E G1 + eta^2 E G2."""
    mod = zoo_module(BY_NAME["erf_pair_L1"], zoo_dir)
    for m in ORACLE_M:
        e1, e2 = erf_pair_drift(m)
        assert_close(f"erf drift_eta1 at m={m}", _vec(mod.drift_eta1(m)), [e1], ORACLE_TOL,
                     ORACLE_TOL)
        assert_close(f"erf drift_eta2 at m={m}", _vec(mod.drift_eta2(m)), [e2], ORACLE_TOL,
                     ORACLE_TOL)
        assert_close(f"erf drift at m={m}", _vec(mod.drift(m, eta=ETA)),
                     [ETA * e1 + ETA ** 2 * e2], ORACLE_TOL, ORACLE_TOL)


# ----------------------------------------------------------------------------------------------
# 5. quadrature error estimates bound the actual error
# ----------------------------------------------------------------------------------------------

def _check_bound(label, mod, fn, state, ref, ref_err, **kw):
    """A quadrature module: quadrature_error's estimate >= |fn(state) - reference| (up to the
    reference's own error); an exact or closed-form module: 1e-10 agreement."""
    value = _vec(fn(*state, **kw))
    ref = _vec(ref)
    if mod.METHOD != "quadrature":
        assert_close(label, value, ref)
        return
    _, est = mod.quadrature_error(fn, *state, **kw)
    est = _vec(est)
    actual = np.abs(value - ref)
    slack = ref_err + 1e-14 * (1 + np.abs(ref))
    if np.any(est + slack < actual):
        pytest.fail(f"{label}: error estimate below the actual error: estimate {est}, actual "
                    f"{actual} (value {value}, reference {ref})")


def test_quadrature_error_bounds_mass_beyond_the_grid(tmp_path):
    """A student exp(1.2 z) puts most of Cov(G) (its eighth power: exp(9.6 z)) near z = 9.6,
    at the edge of the trapezoidal rules' [-10, 10]: quadrature_error must still bound the
    error. Reference written from MATH.md section 4 (L = 1, spherical, no encoding):
    G = -eta (dl z* - m dl z) - eta^2 m dl^2 / 2, dl = -(g*(z*) - g(z)) g'(z), z ~ N(0, 1),
    z* = m z + sqrt(1 - m^2) t, by composite Gauss-Legendre over z in [-14, 24] (19 panels)
    and Gauss-Legendre over t in [-14, 14], at two orders (they agree to 1e-14)."""
    spec = make_spec("exp_student_tail", 1, "silu(0.8*z1)", student="exp(1.2*z1)")
    path, _ = generate(spec, out_dir=tmp_path)
    mod = load_module(path)
    m, eta = -0.78, 0.1

    def reference(nz, nt):
        xz, wz = np.polynomial.legendre.leggauss(nz)
        edges = np.linspace(-14.0, 24.0, 20)
        z = np.concatenate([(a + b) / 2 + (b - a) / 2 * xz for a, b in zip(edges, edges[1:])])
        wzs = np.concatenate([(b - a) / 2 * wz for a, b in zip(edges, edges[1:])])
        xt, wt = np.polynomial.legendre.leggauss(nt)
        t, wts = 14.0 * xt, 14.0 * wt
        Z, zs = z[:, None], m * z[:, None] + np.sqrt(1 - m * m) * t[None, :]
        S = np.exp(1.2 * Z)
        dl = -(zs * 0.8 / (1 + np.exp(-0.8 * zs)) - S) * 1.2 * S
        G = -eta * (dl * zs - m * dl * Z) - eta ** 2 * m / 2 * dl * dl
        w = ((wzs * np.exp(-z * z / 2))[:, None] * (wts * np.exp(-t * t / 2))[None, :]
             / (2 * np.pi))
        EG = np.sum(w * G)
        return np.sum(w * G * G) - EG * EG

    ref, ref2 = reference(60, 120), reference(80, 160)
    assert abs(ref - ref2) <= 1e-13 * abs(ref)
    value, bound = (float(np.ravel(x)[0]) for x in mod.quadrature_error(mod.covariance, m,
                                                                        eta=eta))
    assert abs(value - ref) <= bound, (value, ref, bound)


def test_quadrature_error_bounds_mass_beyond_fourteen(tmp_path):
    """exp(1.5 z) as a plain SGD student at q = 1.4: the q-q entry of Cov(G) holds exp(12 z)
    with z of standard deviation 1.18, its mass near 14 in the rule's variable, beyond both
    [-10, 10] and [-14, 14]. The rules widen where their boundary holds mass (_TRAP_EDGE):
    the value agrees with the reference to 1e-10 and quadrature_error bounds its error. With
    the widening off (_TRAP_MAX_HALF_WIDTH = 10) the value misses most of the mass and
    quadrature_error must say so (its third rule, 3n nodes on [-20, 20]). Reference from
    MATH.md section 4 (plain: G = (-eta A_m, -2 eta A_q + eta^2 B)), composite Gauss-Legendre
    over z* and w in [-20, 30]^2, z = m z* + sqrt(q - m^2) w."""
    spec = make_spec("exp_student_far_tail", 1, "erfc(0.7*z1)", student="exp(1.5*z1)",
                     spherical=False)
    path, _ = generate(spec, out_dir=tmp_path)
    mod = load_module(path)
    m, q, eta = 0.5, 1.4, 0.1

    def reference(n):
        x, w = np.polynomial.legendre.leggauss(n)
        edges = np.linspace(-20.0, 30.0, 26)
        u = np.concatenate([(a + b) / 2 + (b - a) / 2 * x for a, b in zip(edges, edges[1:])])
        wu = np.concatenate([(b - a) / 2 * w for a, b in zip(edges, edges[1:])])
        zs, ww = u[:, None], u[None, :]
        z = m * zs + np.sqrt(q - m * m) * ww
        S = np.exp(1.5 * z)
        dl = -(erfc(0.7 * zs) - S) * 1.5 * S
        G = [-eta * dl * zs, -2 * eta * dl * z + eta ** 2 * dl * dl]
        wt = (wu * np.exp(-u * u / 2))[:, None] * (wu * np.exp(-u * u / 2))[None, :] / (2 * np.pi)
        EG = [np.sum(wt * g) for g in G]
        return np.array([[np.sum(wt * a * b) - ea * eb for b, eb in zip(G, EG)]
                         for a, ea in zip(G, EG)])

    ref, ref2 = reference(40), reference(60)
    assert np.all(np.abs(ref - ref2) <= 1e-10 * np.abs(ref))
    value, bound = (np.asarray(x, dtype=float).reshape(2, 2)
                    for x in mod.quadrature_error(mod.covariance, m, q, eta=eta))
    assert np.all(np.abs(value - ref) <= 1e-10 * np.abs(ref)), (value, ref)
    assert np.all(np.abs(value - ref) <= bound), (value, ref, bound)
    mod._TRAP_MAX_HALF_WIDTH = 10.0
    value, bound = (np.asarray(x, dtype=float).reshape(2, 2)
                    for x in mod.quadrature_error(mod.covariance, m, q, eta=eta))
    assert abs(value[1, 1] - ref[1, 1]) > 0.5 * abs(ref[1, 1])   # the rules miss the mass
    assert np.all(np.abs(value - ref) <= bound), (value, ref, bound)


@pytest.mark.parametrize("case", L1_QUAD, ids=_ids(L1_QUAD))
def test_zoo_quadrature_error_bounds_L1(case, zoo_dir):
    """For the L = 1 cases without a closed form (tanh, sigmoid, softplus, silu, hardtanh):
    quadrature_error on population_loss, drift_eta1, drift_eta2 and drift bounds the actual
    error against the reference."""
    mod = zoo_module(case, zoo_dir)
    state, v = zoo_state(case), case.values
    ref = zoo_reference(case.name)
    assert ref.error < 1e-11
    _check_bound(f"{case.name} population_loss", mod, mod.population_loss, state, ref.loss,
                 ref.error, **v)
    _check_bound(f"{case.name} drift_eta1", mod, mod.drift_eta1, state, ref.drift_eta1,
                 ref.error, **v)
    _check_bound(f"{case.name} drift_eta2", mod, mod.drift_eta2, state, ref.drift_eta2,
                 ref.error, **v)
    _check_bound(f"{case.name} drift", mod, mod.drift, state, ref.drift, ref.error, eta=ETA,
                 **v)


@functools.lru_cache(maxsize=None)
def product_reference(name):
    case = BY_NAME[name]
    return reference_product_L2(*case.factors, zoo_state(case)[0])


@pytest.mark.parametrize("case", PRODUCTS, ids=_ids(PRODUCTS))
def test_zoo_quadrature_error_bounds_products_L2(case, zoo_dir):
    """Products across two tokens, which factor into one-token integrals: loss, drift_eta1,
    drift_eta2 and drift against the factorised reference (error bound for a quadrature module,
    1e-10 otherwise)."""
    assert case.L == 2 and case.spherical and not case.C and not case.noise
    mod = zoo_module(case, zoo_dir)
    state = zoo_state(case)
    loss, g1, g2, err = product_reference(case.name)
    assert err < 1e-10
    _check_bound(f"{case.name} population_loss", mod, mod.population_loss, state, loss, err)
    _check_bound(f"{case.name} drift_eta1", mod, mod.drift_eta1, state, g1, err)
    _check_bound(f"{case.name} drift_eta2", mod, mod.drift_eta2, state, g2, err)
    _check_bound(f"{case.name} drift", mod, mod.drift, state, ETA * g1 + ETA ** 2 * g2, err,
                 eta=ETA)


# ----------------------------------------------------------------------------------------------
# 6. refusals
# ----------------------------------------------------------------------------------------------

#: name -> (teacher, student, key that must be named, link text that must be named)
REFUSED = {
    "reciprocal": ("1/z1", "z1", "teacher.link", "1/z1"),
    "reciprocal_student": ("z1", "1/z1", "student.link", "1/z1"),
    "exp_square": ("exp(z1**2)", "z1", "teacher.link", "exp(z1**2)"),
    "log": ("log(z1)", "z1", "teacher.link", "log(z1)"),
    "sqrt": ("sqrt(z1)", "z1", "teacher.link", "sqrt(z1)"),
    "degree_40": ("z1**40", "z1", "teacher.link", "z1**40"),
    "sign_student": ("z1", "sign(z1)", "student.link", "sign(z1)"),
    "heaviside_student": ("relu(z1)", "Heaviside(z1)", "student.link", "Heaviside(z1)"),
}


def _names_link(line, key, text):
    squeeze = lambda s: s.replace(" ", "")  # noqa: E731
    return key in line and squeeze(text) in squeeze(line)


def _toml(name, L, teacher, student=None, C=None, noise=0.0, spherical=True, params=None):
    lines = [f'name = "{name}"', f"L = {L}"]
    if params:
        lines += ["[parameters]"] + [f"{k} = {float(v)!r}" for k, v in params.items()]
    lines += ["[teacher]", f'link = "{teacher}"']
    if student is not None or C:
        lines.append("[student]")
        if student is not None:
            lines.append(f'link = "{student}"')
        if C:
            lines.append("positional = [" + ", ".join(
                "[" + ", ".join(repr(float(c)) for c in row) + "]" for row in C) + "]")
    lines += ["[loss]", f"noise = {float(noise)!r}", "[training]",
              f"spherical = {'true' if spherical else 'false'}"]
    return "\n".join(lines) + "\n"


def _cli(args, cwd, timeout=120):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("SSI_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "ssi_symbolic", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


REFUSE_WITHIN = 60    # seconds: a refusal is a check, not a derivation that fails late


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_make_spec_or_generate(name, tmp_path):
    """make_spec or generate raises SpecError naming the link (key and text) within
    REFUSE_WITHIN seconds; nothing is written."""
    teacher, student, key, text = REFUSED[name]
    out = tmp_path / "gen"
    with pytest.raises(SpecError) as info, _time_limit(REFUSE_WITHIN, f"refusing {name}"):
        spec = make_spec(f"refused_{name}", 1, teacher, student=student)
        generate(spec, out_dir=out)
    msg = str(info.value)
    assert len(msg.splitlines()) == 1, msg
    assert _names_link(msg, key, text), msg
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_cli(name, tmp_path):
    """`python -m ssi_symbolic derive SPEC.toml --out DIR`: exit code 2, exactly one stderr line
    starting `ssi: error:` naming the link, nothing on stdout, nothing written in DIR."""
    teacher, student, key, text = REFUSED[name]
    spec = tmp_path / f"refused_{name}.toml"
    spec.write_text(_toml(f"refused_{name}", 1, teacher, student))
    out = tmp_path / "gen"
    proc = _cli(["derive", str(spec), "--out", str(out)], tmp_path, timeout=REFUSE_WITHIN)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("ssi: error:"), lines[0]
    assert _names_link(lines[0], key, text), lines[0]
    assert proc.stdout == ""
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("teacher, student", [("exp(-z1**2/2)", "z1"),
                                              ("He(2, z1)/sqrt(2)", "1.2*exp(-z1**2/2)")])
def test_bump_not_refused(teacher, student, tmp_path):
    """A softmax-free Gaussian bump exp(-z1^2/2), as teacher or as student, is a closed form: the
    CLI derives it (exit 0, the module written) and the module is not a quadrature module."""
    spec = tmp_path / "bump.toml"
    spec.write_text(_toml("bump", 1, teacher, student))
    out = tmp_path / "gen"
    proc = _cli(["derive", str(spec), "--out", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stderr
    path = Path(proc.stdout.strip().splitlines()[-1])
    assert path.exists()
    mod = load_module(path)
    assert mod.METHOD in ("exact", "closed form")


# Cold derivation times are measured in bench/bench_links.py, never in timed tests.
