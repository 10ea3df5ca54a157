"""The ring printer (backends/ring_printing.py): exact polynomials printed as NumPy source
without SymPy trees.

Checked against independent evaluations: the ring element evaluated exactly (rational points,
SymPy numbers to 30 digits), the SymPy printer's module of the same derivation, and central
differences of the module's own drift for its Jacobian."""
from __future__ import annotations

import random
import types

import numpy as np
import pytest
import sympy as sp

from ssi_symbolic.backends.exact import module_source
from ssi_symbolic.backends.ring_printing import RingPrinter
from ssi_symbolic.model.spec import make_spec
from ssi_symbolic.symbolic.derive import ETA, Deferred, derive


def _load(src: str, name: str):
    mod = types.ModuleType(name)
    exec(compile(src, name, "exec"), mod.__dict__)
    return mod


def _random_poly(ex, gens, consts, rng, terms=60, degree=5):
    """A random ring element in `gens` (ring generators) with rational coefficients times
    products of the constant generators `consts`."""
    p = ex.R.zero
    for _ in range(terms):
        t = ex.R(sp.QQ(rng.randint(-50, 50), rng.randint(1, 9)))
        for _ in range(rng.randint(0, degree)):
            t *= rng.choice(gens)
        for c in consts:
            t *= c ** rng.randint(0, 2)
        p += t
    return p


def _engine_with_constants():
    """An exact engine whose ring has the state, eta, a parameter, the radicals of 2 and 3,
    pi, and a parameter under a square root (sqrt(alpha))."""
    spec = make_spec("ring_print", 2, "z1**2 / sqrt(2) + sqrt(3) * z2 / pi + sqrt(alpha) * z1",
                     student="z1**2 / sqrt(2) + sqrt(3) * z2 / pi + sqrt(alpha) * z1",
                     parameters={"alpha": 0.7}, spherical=False, positional=[[1], [-1]])
    D = derive(spec, diffusion=False)
    assert D.ring is not None
    return D


def test_printed_polynomials_equal_their_exact_values():
    D = _engine_with_constants()
    ex = D.ring.engine
    alpha = sp.Symbol("alpha", real=True)
    variables = list(D.state) + [ETA, alpha]
    gens = [ex.gen[v] for v in variables if v in ex.gen]
    consts = [g for s, g in zip(ex.R.symbols, ex.R.gens) if s in ex.back]
    values = {s: ex.back[s] for s in ex.R.symbols if s in ex.back}
    assert any(v.has(sp.pi) for v in values.values())
    assert any(v.free_symbols for v in values.values())  # sqrt(alpha)
    rng = random.Random(3)
    polys = [_random_poly(ex, gens, consts, rng) for _ in range(6)]
    polys.append(polys[0] * polys[1])  # shares nothing term by term, but sub-polynomials
    polys.append(ex.R.zero)
    polys.append(ex.R(sp.QQ(-3, 7)))
    pr = RingPrinter(ex, variables)
    handles = [pr.add(p) for p in polys]
    pr.finish()
    names = [str(v) for v in variables]
    src = ["def f(" + ", ".join(names) + "):"]
    src += ["    " + ln for ln in pr.lines(handles)]
    src.append("    return (" + ", ".join(pr.code(h) for h in handles) + ",)")
    ns = {"numpy": np, "math": __import__("math")}
    exec("\n".join(src), ns)
    point = {v: sp.Rational(rng.randint(-9, 9), rng.randint(2, 11)) for v in variables}
    point[alpha] = sp.Rational(7, 10)
    got = ns["f"](*[np.array([float(point[v])]) for v in variables])
    syms = list(ex.R.symbols)
    for p, g in zip(polys, got):
        expr = p.as_expr(*syms).xreplace(values)  # constants restored, then the point
        exact = sp.N(expr.xreplace(point), 30)
        g = float(np.asarray(g).ravel()[0])
        assert abs(g - float(exact)) <= 1e-13 * max(1.0, abs(float(exact))), (p, g, exact)


SPECS = {
    "he2 L1 spherical": dict(L=1, teacher="z1**2 - 1"),
    "tied He2 with encoding, plain": dict(L=2, teacher="(z1**2 - 1) + (z2**2 - 1)",
                                          student="((z1 + z2)**2 / 2 - 1)",
                                          positional=[[1], [-1]], spherical=False),
    "untied He2, spherical": dict(L=2, teacher="(z1**2 - 1) + (z2**2 - 1)",
                                  weights="untied"),
    "parameter and radicals, noise": dict(
        L=2, teacher="sqrt(alpha) * z1 + z2**2 / sqrt(2)", student="z1 + z2**2 / sqrt(6)",
        parameters={"alpha": 0.5}, noise=0.1, spherical=False),
    "two directions": dict(L=1, teacher="z1_1**2 + z2_1", teacher_directions=2,
                           student_directions=2, spherical=False),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_ring_module_equals_the_sympy_module(name):
    kw = dict(SPECS[name])
    spec = make_spec(name.replace(" ", "_").replace(",", ""), kw.pop("L"), kw.pop("teacher"),
                     **kw)
    D = derive(spec)
    assert D.ring is not None
    A = _load(module_source(D, printer="sympy"), "a")
    B = _load(module_source(D, printer="ring"), "b")
    assert B.JACOBIAN == "symbolic"
    rng = np.random.default_rng(4)
    n = len(D.state)
    X = rng.uniform(-0.9, 0.9, size=(n, 40))
    params = {p: 0.5 for p in spec.parameters}
    for fn, kw in [("population_loss", {}), ("drift_eta1", {}), ("drift_eta2", {}),
                   ("drift", {"eta": 0.3}), ("covariance", {"eta": 0.3}),
                   ("ito_correction", {"eta": 0.3}), ("finite_d_correction", {"eta": 0.3}),
                   ("drift_jacobian", {"eta": 0.3})]:
        a = np.array(getattr(A, fn)(*X, **kw, **params), dtype=float)
        b = np.array(getattr(B, fn)(*X, **kw, **params), dtype=float)
        assert a.shape == b.shape, fn
        scale = max(1.0, float(np.max(np.abs(a))))
        assert np.max(np.abs(a - b)) <= 1e-12 * scale, fn
    # the ring Jacobian against central differences of the ring module's drift
    x0 = X[:, 0]
    J = np.array(B.drift_jacobian(*x0, eta=0.3, **params), dtype=float)
    h = 1e-6
    for j in range(n):
        xp, xm = x0.copy(), x0.copy()
        xp[j] += h
        xm[j] -= h
        col = (np.array(B.drift(*xp, eta=0.3, **params)) -
               np.array(B.drift(*xm, eta=0.3, **params))) / (2 * h)
        assert np.allclose(J[:, j], col, rtol=1e-6, atol=1e-8), j


def test_diffusion_outputs_are_converted_to_sympy_only_when_read():
    spec = make_spec("lazy_cov", 2, "z1**2 + z2**2 - 2", weights="untied")  # spherical
    D = derive(spec)
    for name in ("covariance", "ito_correction", "finite_d_correction"):
        assert isinstance(D.__dict__["_" + name], Deferred), name
    C = D.covariance  # converted now, and kept
    assert isinstance(C, sp.MatrixBase) and D.__dict__["_covariance"] is C
    ex = D.ring.engine
    n = len(D.state)
    for i in range(n):
        for j in range(i, n):
            assert sp.expand(C[i, j] - ex.to_sympy(D.ring.covariance[(i, j)])) == 0
    assert any(x != 0 for x in D.ito_correction)
    for got, ring in ((D.ito_correction, D.ring.ito_correction),
                      (D.finite_d_correction, D.ring.finite_d_correction)):
        assert len(got) == n
        assert all(sp.expand(a - ex.to_sympy(b)) == 0 for a, b in zip(got, ring))
