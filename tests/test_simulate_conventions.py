"""The simulator honours every convention a spec states (MATH.md 3, 4, 6, 7): one step function
per convention (ssi_symbolic.numeric.sgd_step) serves the tied, untied and attention students,
`simulate` and `analysis.attention.simulate_escape` alike.

1. The loss gradients of sgd_step against hand-written formulas (square, norm, zero residual).
2. One tied step of the simulator on the positional-semantic attention model with the norm loss
   (and the square loss) against an independent computation: the setup is rebuilt from the
   documented random stream, the gradient of ||y - y_hat||_F with respect to w is taken by
   central finite differences of the loss written here with explicit 2 x 2 softmaxes, then the
   update w - eta grad and the spherical rescaling.
3. Conventions the simulator does not implement are refused with one line naming the key.
4. Attention specs (matrix and trace links) run through `simulate`, from m = e = 0.
5. `simulate_escape` runs on `simulate`, with a loss override through a copy of the spec.
6. Acceptance (the issue): `ssi simulate` on the positional-semantic model, omega = 0.5 and 0.8,
   a = 1, d = 1000, eta = 0.05, from m = e = 0 to t = 300, 6 seeds: with the norm loss the
   mean |m| (omega = 0.5) or |e| (omega = 0.8) at t = 300 exceeds 0.05, with the squared loss it
   stays below 0.05.

Modules are generated into temporary directories (never into the repository's generated/).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
import time
import tomllib

import numpy as np
import pytest

from ssi_symbolic.backends.registry import links_module
from ssi_symbolic.errors import SpecError
from ssi_symbolic.model.spec import load_spec, spec_from_dict
from ssi_symbolic.numeric import sgd_step
from ssi_symbolic.numeric import simulate as simulate_module
from ssi_symbolic.numeric.simulate import initial_weights, make_frame, simulate

from .conftest import DERIVATIONS, ROOT, copy_generated

PS = DERIVATIONS / "positional_semantic.toml"
TRACE = DERIVATIONS / "softmax_trace_he2.toml"


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    return copy_generated(tmp_path_factory.mktemp("generated_conventions"))


def ps_spec(loss="square"):
    """The positional-semantic spec with the given loss kind, named positional_semantic_<loss>
    for the norm loss (its own module)."""
    data = tomllib.loads(PS.read_text())
    if loss != "square":
        data["name"] = f"positional_semantic_{loss}"
        data["loss"] = {"kind": loss}
    return spec_from_dict(data, source=f"positional_semantic ({loss} loss)")


# ----------------------------------------------------------------------------------------------
# 1. loss gradients
# ----------------------------------------------------------------------------------------------

def test_loss_gradients_match_hand_formulas():
    rng = np.random.default_rng(3)
    K, L, S = 4, 2, 7
    res, dg = rng.normal(size=(K, S)), rng.normal(size=(K, L, S))
    res[:, 2] = 0.0                                           # a zero residual
    square = np.array([[sum(res[k, s] * dg[k, l, s] for k in range(K)) for l in range(L)]
                       for s in range(S)])
    np.testing.assert_allclose(sgd_step.square_loss_gradient(res, dg), square, rtol=1e-14)
    norms = np.sqrt((res ** 2).sum(axis=0))
    norm = np.array([square[s] / norms[s] if norms[s] > 0 else np.zeros(L) for s in range(S)])
    got = sgd_step.norm_loss_gradient(res, dg)
    np.testing.assert_allclose(got, norm, rtol=1e-14)
    assert np.all(got[2] == 0.0)                              # subgradient 0 where r = 0
    # constant links: trailing axes of length 1 broadcast over the seeds
    np.testing.assert_allclose(sgd_step.square_loss_gradient(res[:, :1], dg),
                               np.einsum("k,kls->sl", res[:, 0], dg), rtol=1e-14)
    np.testing.assert_allclose(sgd_step.norm_loss_gradient(res, dg[:, :, :1]),
                               np.einsum("ks,kl->sl", res, dg[:, :, 0])
                               / np.where(norms > 0, norms, 1.0)[:, None]
                               * (norms > 0)[:, None], rtol=1e-14)


# ----------------------------------------------------------------------------------------------
# 2. one tied step against an independent computation
# ----------------------------------------------------------------------------------------------

def _softmax_rows(z):
    """softmax_rows(z z^T) for z of shape (2,): explicit 2 x 2 formula, flattened row by row."""
    A = np.outer(z, z)
    E = np.exp(A - A.max(axis=1, keepdims=True))
    return (E / E.sum(axis=1, keepdims=True)).ravel()


def _hand_loss(loss, wstar, u, C, G, w, omega, a):
    """l(w) of MATH.md 3 for one sample: x_l = g_l / sqrt(d), z*_l = x_l . w*,
    z_l = (x_l + C_l u / sqrt(d)) . w, teacher (1 - omega) softmax_rows(z* z*^T) + omega A."""
    d = w.size
    X = G / math.sqrt(d)
    zs = X @ wstar
    z = (X + np.outer(C, u) / math.sqrt(d)) @ w
    A = _softmax_rows(np.array([a, -a]))                      # softmax_rows(a^2 [[1,-1],[-1,1]])
    y = (1 - omega) * _softmax_rows(zs) + omega * A
    r = y - _softmax_rows(z)
    return 0.5 * r @ r if loss == "square" else math.sqrt(r @ r)


@pytest.mark.parametrize("loss", ["norm", "square"])
def test_one_tied_step_matches_math_section_4(loss, gen):
    """One simulator step from a known w with a fixed sample equals w - eta grad_w l followed
    by w <- sqrt(d) w / |w| (MATH.md 4), grad_w l by central differences of the loss above."""
    spec = ps_spec(loss)
    d, S, seed, eta, m0, e0 = 24, 3, 11, 0.7, 0.3, -0.2
    omega, a = 0.4, 0.8
    res = simulate(spec, eta, d, 1, seeds=S, seed=seed, m0=m0, e0=e0, record_every=1,
                   params={"omega": omega, "a": a}, progress=False, out_dir=gen)
    # the documented stream: frame, initial weights, then the draw G of step 1
    rng = np.random.Generator(np.random.SFC64(seed))
    wstar, U = make_frame(rng, S, d, 1)
    w0 = initial_weights(rng, wstar, U, m0, [e0])
    G = rng.standard_normal((2, S, d))
    C = np.array([1.0, -1.0])
    h = 1e-6
    for s in range(S):
        assert abs(w0[s] @ wstar[s] / d - m0) < 1e-14 and abs(U[s, 0] @ w0[s] / math.sqrt(d) - e0) < 1e-14
        def f(w):
            return _hand_loss(loss, wstar[s], U[s, 0], C, G[:, s], w, omega, a)
        grad = np.array([(f(w0[s] + h * e) - f(w0[s] - h * e)) / (2 * h) for e in np.eye(d)])
        w1 = w0[s] - eta * grad
        w1 *= math.sqrt(d) / np.linalg.norm(w1)
        m1, e1 = w1 @ wstar[s] / d, U[s, 0] @ w1 / math.sqrt(d)
        assert abs(res.overlaps["m"][s, 1] - m1) < 1e-8, (loss, s, res.overlaps["m"][s], m1)
        assert abs(res.overlaps["e"][s, 1] - e1) < 1e-8, (loss, s, res.overlaps["e"][s], e1)
        assert abs(res.overlaps["m"][s, 1] - m0) > 1e-4        # the step moved the overlaps
    assert np.allclose(res.overlaps["q_norm"], 1.0, atol=1e-13)


def test_norm_and_square_steps_differ(gen):
    """The loss kind of the spec is used: same stream, different increments."""
    kw = dict(eta=0.5, d=40, steps=1, seeds=4, seed=2, m0=0.3, e0=0.1, progress=False,
              out_dir=gen, record_every=1)
    sq, nm = simulate(ps_spec("square"), **kw), simulate(ps_spec("norm"), **kw)
    assert sq.overlaps["m"][:, 0].tolist() == nm.overlaps["m"][:, 0].tolist()
    assert np.all(np.abs(sq.overlaps["m"][:, 1] - nm.overlaps["m"][:, 1]) > 1e-6)


# ----------------------------------------------------------------------------------------------
# 3. refused conventions
# ----------------------------------------------------------------------------------------------

def test_unimplemented_conventions_are_refused(gen):
    spec = load_spec(DERIVATIONS / "linear.toml")
    bad = dataclasses.replace(spec, loss="huber")
    with pytest.raises(SpecError) as info:
        simulate(bad, 0.1, 50, 5, seeds=1, progress=False, out_dir=gen)
    msg = str(info.value)
    assert "loss.kind" in msg and "huber" in msg and "\n" not in msg
    with pytest.raises(SpecError) as info:
        sgd_step.check_conventions(dataclasses.replace(spec, spherical="yes"))
    assert "training.spherical" in str(info.value)


def test_spec_with_loss_copy():
    spec = ps_spec("square")
    assert sgd_step.spec_with_loss(spec, "square") is spec
    norm = sgd_step.spec_with_loss(spec, "norm")
    assert norm.loss == "norm" and norm.name == "positional_semantic_norm"
    assert norm.raw["loss"]["kind"] == "norm" and norm.raw["name"] == norm.name
    assert norm.hash() != spec.hash() and spec.loss == "square"
    with pytest.raises(SpecError, match="loss"):
        sgd_step.spec_with_loss(spec, "abs")


# ----------------------------------------------------------------------------------------------
# 4. attention specs through simulate
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path, loss", [(PS, "square"), (PS, "norm"), (TRACE, "square")])
def test_attention_specs_simulate_from_the_origin(path, loss, gen):
    spec = sgd_step.spec_with_loss(load_spec(path), loss)
    res = simulate(spec, 0.5, 200, 400, seeds=3, seed=1, m0=0.0, e0=0.0, progress=False,
                   out_dir=gen)
    assert np.all(np.abs(res.overlaps["m"][:, 0]) < 1e-14)     # orthogonal to w* and u
    assert np.all(np.abs(res.overlaps["e"][:, 0]) < 1e-14)
    assert np.all(np.isfinite(res.overlaps["m"])) and np.all(np.isfinite(res.overlaps["e"]))
    assert np.all(np.abs(res.overlaps["m"][:, -1]) > 0)     # the SGD moved off the origin
    np.testing.assert_allclose(res.overlaps["q_norm"], 1.0, atol=1e-12)
    assert set(res.to_json()) >= {"overlaps", "escape_times", "mean", "t"}


# ----------------------------------------------------------------------------------------------
# 5. simulate_escape on simulate
# ----------------------------------------------------------------------------------------------

def test_simulate_escape_runs_on_simulate(gen):
    from ssi_symbolic.analysis.attention import simulate_escape
    spec = ps_spec("square")
    p = {"omega": 0.1, "a": 1.0}
    kinds, times = simulate_escape(spec, p, eta=2.0, d=200, runs=3, max_steps=6000, seed=5,
                                   out_dir=gen)
    res = simulate_module.simulate_first_escape(spec, 2.0, 200, 6000, seeds=3, seed=5, m0=0.0,
                                                e0=0.0, params=p, out_dir=gen)
    assert kinds == list(res.escape_kinds) and len(times) == 3
    first = np.fmin(res.escape_times["semantic"], res.escape_times["positional"])
    assert times == [float(t) if np.isfinite(t) else None for t in first]
    assert res.steps_run == (round(np.nanmax(first) * 200) if None not in kinds else 6000)
    # the loss override runs a norm-loss copy (its own module next to the others)
    kinds_n, _ = simulate_escape(spec, p, eta=2.0, d=200, runs=2, max_steps=50, seed=5,
                                 loss="norm", out_dir=gen)
    assert (gen / "positional_semantic_norm.py").exists() and len(kinds_n) == 2
    assert simulate_escape(spec, p, 2.0, 200, 2, 50, seed=5, loss="square", out_dir=gen) \
        == simulate_escape(spec, p, 2.0, 200, 2, 50, seed=5, out_dir=gen)


# ----------------------------------------------------------------------------------------------
# 6. acceptance: the norm loss escapes at eta = 0.05, the squared loss does not
# ----------------------------------------------------------------------------------------------

ACCEPT_D, ACCEPT_STEPS, ACCEPT_SEEDS = 1000, 300_000, 6


def test_norm_loss_escapes_where_the_squared_loss_does_not(gen, tmp_path):
    """`ssi simulate ... --method reduced --json` (four CLI processes, run side by side),
    positional-semantic model, a = 1, d = 1000, eta = 0.05, m0 = e0 = 0, t = 300, 6 seeds: mean
    |m| (omega = 0.5) or mean |e| (omega = 0.8) at t = 300 is above 0.05 with the norm loss
    (||y - y_hat||_F) and below it with the squared loss. The exact reduced simulator has the
    law of the d-dimensional one (tests/test_reduced.py couples them for softmax attention)."""
    norm_toml = tmp_path / "positional_semantic_norm.toml"
    text = PS.read_text().replace('name = "positional_semantic"',
                                  'name = "positional_semantic_norm"')
    text = text.replace('kind = "square"', 'kind = "norm"')
    norm_toml.write_text(text)
    links_module(load_spec(norm_toml), gen)                    # generated once, before the runs
    links_module(load_spec(PS), gen)
    runs = {(loss, omega): path for loss, path in (("norm", norm_toml), ("square", PS))
            for omega in (0.5, 0.8)}
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    procs = {key: subprocess.Popen(
        [sys.executable, "-m", "ssi_symbolic", "simulate", str(path), "--eta", "0.05",
         "--d", str(ACCEPT_D), "--steps", str(ACCEPT_STEPS), "--seeds", str(ACCEPT_SEEDS),
         "--seed", "1", "--m0", "0", "--e0", "0", "--param", f"omega={key[1]}",
         "--param", "a=1", "--out", str(gen), "--method", "reduced", "--json"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for key, path in runs.items()}
    out = {}
    for key, proc in procs.items():
        stdout, stderr = proc.communicate()
        assert proc.returncode == 0, stderr
        out[key] = json.loads(stdout)
    wall = time.perf_counter() - t0
    summary = {}
    for (loss, omega), res in out.items():
        assert res["steps_run"] == ACCEPT_STEPS and res["t"][-1] == pytest.approx(300.0)
        name = "m" if omega == 0.5 else "e"
        summary[(loss, omega)] = float(np.mean(np.abs(np.array(res["overlaps"][name])[:, -1])))
    print(f"acceptance runs: {wall:.0f} s wall; mean |m| (omega 0.5) / |e| (omega 0.8) at t = 300:"
          f" {summary}")
    for omega in (0.5, 0.8):
        assert summary[("norm", omega)] > 0.05, summary
        assert summary[("square", omega)] < 0.05, summary
