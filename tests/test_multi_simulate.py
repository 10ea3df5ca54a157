"""The simulators for several teacher and student directions (MATH.md sections 8 and 10).

1. Start: the overlaps at step 0 are the explicit `init` (both methods, plain and spherical,
   teacher overlaps P != I, positional encoding); the random start has the law of K independent
   uniform vectors on their spheres (sqrt(d) M has covariance P exactly), the same for both
   methods; invalid starts and arguments are refused with one StateError.
2. One step of the d-dimensional simulator against an independent computation: the mean of
   d (M_1 - M_0) and d (E_1 - E_0) over many seeds (plain SGD, where they equal G_M and G_E of
   MATH.md 8 exactly) against a Monte Carlo of G_M, G_E from the Gaussian law of the fields
   written here, with the links and their gradients by hand.
3. Spherical SGD keeps every |w_k|^2 = d; escape times per direction agree with the recorded
   trajectory; schedules, the early stop.
4. The reduced chain equals the full simulator in law: mean and covariance of d times the
   one-step increments within 5 standard errors at d = 200, K = K* = 2, L = 2, plain (with label
   noise) and spherical, with and without positional encoding; a chain with a wrong Wishart
   (twice the degrees of freedom) is rejected.
5. CLI: --init, per-direction escape times, errors.

Modules are generated into a temporary directory, never into generated/.
"""
from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from ssi_symbolic.backends.registry import links_module
from ssi_symbolic.cli import main
from ssi_symbolic.errors import StateError
from ssi_symbolic.model.spec import make_spec
from ssi_symbolic.numeric import reduced
from ssi_symbolic.numeric.sgd_step import MultiStudent, multi_start
from ssi_symbolic.numeric.simulate import _multi_book, _sgd_loop, simulate

from .test_reduced import law_z_scores

Z_MAX = 5.0
LINK = "z1_1*z2_2 + z2_1**2"
P_CORR = [[1, 0.3], [0.3, 1]]


def poly(pe=False, spherical=True, noise=0.0, P=None):
    """The K = K* = 2, L = 2 polynomial spec (student link = teacher link), optionally with the
    opposite-paired encoding, plain SGD, label noise and teacher overlaps P."""
    name = (f"mpoly{'_pe' if pe else ''}{'_sph' if spherical else '_plain'}"
            f"{'_noisy' if noise else ''}{'_P' if P else ''}")
    return make_spec(name, 2, LINK, student=LINK, positional=[[1], [-1]] if pe else None,
                     spherical=spherical, noise=noise, teacher_directions=2,
                     student_directions=2, teacher_overlaps=P)


def start(spec):
    """A valid explicit start of the polynomial specs (P = I or P_CORR)."""
    init = {"m1_1": 0.4, "m1_2": 0.1, "m2_1": -0.2, "m2_2": 0.3, "q1_2": 0.15}
    if spec.r:
        init |= {"e1_1": 0.2, "e2_1": -0.1}
    if not spec.spherical:
        init |= {"q1_1": 1.1, "q2_2": 0.9}
    return init


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("multi_generated")


def run(spec, out, **kw):
    kw.setdefault("progress", False)
    return simulate(spec, out_dir=out, **kw)


# ----------------------------------------------------------------------------------------------
# 1. start
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["full", "reduced"])
@pytest.mark.parametrize("spherical", [True, False])
def test_step_zero_is_init(method, spherical, out):
    spec = poly(pe=True, spherical=spherical, P=P_CORR)
    init = start(spec)
    res = run(spec, out, eta=0.2, d=60, steps=3, seeds=4, seed=1, init=init, method=method,
              record_every=1)
    assert res.directions == (2, 2) and res.init == init
    for name in spec.overlap_names:
        expected = init.get(name, 0.0)
        np.testing.assert_allclose(res.overlaps[name][:, 0], expected, rtol=0, atol=1e-12)
        assert np.all(res.overlaps[name][:, 1] != expected)            # and the step moved
    q_norm = (init.get("q1_1", 1.0) + init.get("q2_2", 1.0)) / 2
    np.testing.assert_allclose(res.overlaps["q_norm"][:, 0], q_norm, rtol=0, atol=1e-12)
    assert res.direction_escape_times.shape == (2, 4)
    js = json.loads(json.dumps(res.to_json()))
    assert js["directions"] == [2, 2] and js["init"] == init
    assert np.array(js["direction_escape_times"], dtype=float).shape == (2, 4)


def test_random_start_law(out):
    """sqrt(d) times the initial overlaps: the full simulator's (K independent uniform vectors
    on their spheres) and the reduced chain's have equal laws, and sqrt(d) M[k,.] has mean 0
    and covariance P, sqrt(d) E and sqrt(d) Q[1,2] variance 1 (exact for uniform vectors)."""
    spec = poly(pe=True, spherical=False, P=P_CORR)
    d, n = 40, 20000
    samples = []
    for method, seed in (("full", 3), ("reduced", 4)):
        res = run(spec, out, eta=0.1, d=d, steps=1, seeds=n, seed=seed, method=method,
                  record_every=1)
        samples.append(np.array([math.sqrt(d) * res.overlaps[x][:, 0]
                                 for x in spec.overlap_names if x not in ("q1_1", "q2_2")]))
        for x in ("q1_1", "q2_2"):
            np.testing.assert_allclose(res.overlaps[x][:, 0], 1.0, rtol=0, atol=1e-12)
    for z in law_z_scores(*samples).values():
        assert np.all(np.abs(z) <= Z_MAX), z
    full = samples[0]                       # rows m1_1 m1_2 m2_1 m2_2 e1_1 e2_1 q1_2
    se = 1.0 / math.sqrt(n)
    assert np.all(np.abs(full.mean(axis=1)) <= Z_MAX * 1.2 * se)
    cov = np.cov(full)
    expected = np.eye(7)
    expected[0, 1] = expected[1, 0] = expected[2, 3] = expected[3, 2] = 0.3
    assert np.all(np.abs(cov - expected) <= Z_MAX * 1.5 * se), cov.round(3)


def test_invalid_starts_are_refused(out):
    spec = poly(pe=True)
    cases = [
        (dict(init={"m1_1": 0.9, "m1_2": 0.6}), "not those of vectors"),
        (dict(init={"m3_1": 0.1}), "'m3_1' is not an overlap"),
        (dict(init={"q1_1": 2.0}), "spherical SGD keeps"),
        (dict(init={"m1_1": float("nan")}), "not a finite number"),
        (dict(init=[("m1_1", 0.1)]), "expected a dict"),
        (dict(m0=0.1), "init={name: value}"),
        (dict(e0=0.0), "init={name: value}"),
        (dict(batch=2), "mini-batches with several directions"),
        (dict(d=6), "K* + r + K + L"),
    ]
    for kw, msg in cases:
        kw = dict(eta=0.1, d=50, steps=2, seeds=2) | kw
        with pytest.raises(StateError, match=None) as exc:
            run(spec, out, **kw)
        assert msg in str(exc.value) and "\n" not in str(exc.value), (kw, str(exc.value))
    # q1_1 = 1 on the sphere is accepted; a plain student may start off its sphere
    assert multi_start(spec, {"q1_1": 1.0}) is not None
    assert multi_start(poly(spherical=False), {"q1_1": 2.0}) is not None
    with pytest.raises(StateError, match="single"):
        run(make_spec("lin_single", 1, "z1"), out, eta=0.1, d=20, steps=1, init={"m": 0.1})


# ----------------------------------------------------------------------------------------------
# 2. one step against an independent Monte Carlo of G_M, G_E (MATH.md 8)
# ----------------------------------------------------------------------------------------------

def _g_monte_carlo(init, P, C, eta, n, rng):
    """Samples of G_M (n, 2, 2) and G_E (n, 2, r) for the polynomial link, plain SGD, from the
    Gaussian of MATH.md 8: per token (z*_1, z*_2, z_1, z_2, zeta) with mean
    (0, 0, C[l] E[0], C[l] E[1], 0) and covariance [[P, M^T, 0], [M, Q, E], [0, E^T, I_r]]."""
    M = np.array([[init["m1_1"], init["m1_2"]], [init["m2_1"], init["m2_2"]]])
    r = C.shape[1]
    E = np.array([[init.get("e1_1", 0.0)], [init.get("e2_1", 0.0)]])[:, :r]
    Q = np.array([[init.get("q1_1", 1.0), init["q1_2"]], [init["q1_2"], init.get("q2_2", 1.0)]])
    cov = np.block([[P, M.T, np.zeros((2, r))], [M, Q, E], [np.zeros((r, 2)), E.T, np.eye(r)]])
    tokens = []
    for l in range(2):
        mean = np.concatenate([np.zeros(2), E @ C[l], np.zeros(r)])
        tokens.append(rng.multivariate_normal(mean, cov, size=n))   # (n, 4 + r)
    zs = np.stack([[t[:, j] for t in tokens] for j in range(2)])   # zs[j, l]: z*_{j,l}
    zw = np.stack([[t[:, 2 + k] for t in tokens] for k in range(2)])
    zeta = np.stack([[t[:, 4 + a] for t in tokens] for a in range(r)])   # zeta[a, l]
    link = lambda z: z[0, 0] * z[1, 1] + z[1, 0] ** 2           # noqa: E731
    res = link(zs) - link(zw)
    grad = np.stack([[zw[1, 1], np.zeros(n)], [2 * zw[1, 0], zw[0, 0]]])   # dg / dz_{k,l}
    dl = -res * grad                                               # (k, l, n)
    GM = -eta * np.einsum("kln,jln->nkj", dl, zs)
    GE = -eta * np.einsum("kln,aln->nka", dl, zeta + C.T[:, :, None])
    return GM, GE


def test_one_step_mean_matches_monte_carlo_of_G(out):
    """Plain SGD with P != I and a positional encoding, d = 200: the mean over 10000 seeds of
    d (M_1 - M_0) and d (E_1 - E_0) equals E[G_M], E[G_E] of MATH.md 8 (a Monte Carlo of
    400000 samples of the field law, the links by hand) within 5 standard errors, and the
    check is sharp (E[G_M] is many standard errors away from 0)."""
    spec = poly(pe=True, spherical=False, P=P_CORR)
    init, eta, d, n = start(spec), 0.3, 200, 10000
    inc = []
    for k in range(0, n, 5000):
        res = run(spec, out, eta=eta, d=d, steps=1, seeds=5000, seed=100 + k, init=init,
                  record_every=1)
        inc.append([d * (res.overlaps[x][:, 1] - res.overlaps[x][:, 0])
                    for x in ("m1_1", "m1_2", "m2_1", "m2_2", "e1_1", "e2_1")])
    full = np.concatenate(inc, axis=1)
    GM, GE = _g_monte_carlo(init, np.array(P_CORR, dtype=float),
                            np.array([[1.0], [-1.0]]), eta, 400_000, np.random.default_rng(7))
    mc = np.concatenate([GM.reshape(-1, 4), GE.reshape(-1, 2)], axis=1).T
    se = np.sqrt(full.var(axis=1) / full.shape[1] + mc.var(axis=1) / mc.shape[1])
    z = (full.mean(axis=1) - mc.mean(axis=1)) / se
    assert np.all(np.abs(z) <= Z_MAX), (z, full.mean(axis=1), mc.mean(axis=1))
    assert np.abs(mc.mean(axis=1) / se).max() > 10


# ----------------------------------------------------------------------------------------------
# 3. spherical norms, escape times, schedules, early stop
# ----------------------------------------------------------------------------------------------

def test_spherical_keeps_every_norm(out):
    """Three student directions, one teacher direction, spherical SGD at a large eta: after
    200 steps every |w_k|^2 = d (not only their mean), while the plain student's norms move."""
    sphere = make_spec("m3_norms", 2, "z1_1 * z1_2", student="z1_1 * z1_2 + z2_1**2 / 2 - z3_2",
                       teacher_directions=1, student_directions=3, positional=[[1], [-1]])
    mod = links_module(sphere, out)              # the links do not depend on the training
    for spherical in (True, False):
        spec = dataclasses.replace(sphere, spherical=spherical)
        S, d, eta = 3, 50, 0.5 if spherical else 0.05
        rng = np.random.Generator(np.random.SFC64(5))
        student = MultiStudent(spec, rng, S, d, None, eta, np.float64)
        book = _multi_book(spec, S, 200, d, 0.5, 1, False, None)
        _sgd_loop(spec, mod, {}, student, rng, book, 200, S, np.float64)
        norms = np.einsum("skd,skd->sk", student.w, student.w) / d
        if spherical:
            np.testing.assert_allclose(norms, 1.0, rtol=0, atol=1e-12)
            assert "q1_1" not in spec.overlap_names
        else:
            assert np.abs(norms - 1).max() > 1e-3
        res = book.result(eta=eta, seeds=S, theta=0.5)
        np.testing.assert_allclose(res.overlaps["q_norm"][:, -1], norms.mean(axis=1),
                                   rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["full", "reduced"])
def test_direction_escape_times_match_the_trajectory(method, out):
    """Recorded every step: direction k's escape time is the first t with max_j |M[k,j]| >=
    theta, the overall escape (= semantic) the first direction's, positional the first t with
    some |E[k,:]| >= theta; the early stop ends at the first step where every seed escaped."""
    spec = poly(pe=True)
    d, theta, steps = 30, 0.45, 250
    res = run(spec, out, eta=0.4, d=d, steps=steps, seeds=6, seed=2, theta=theta,
              record_every=1, method=method)
    M = np.stack([[res.overlaps[f"m{k}_{j}"] for j in (1, 2)] for k in (1, 2)])   # (K, K*, S, T)
    E = np.stack([res.overlaps[f"e{k}_1"] for k in (1, 2)])                         # (K, S, T)

    def first(hit):                                       # (..., T) -> step / d or NaN
        idx = np.where(hit.any(axis=-1), hit.argmax(axis=-1), -1)
        return np.where(idx >= 0, idx / d, np.nan)

    per_dir = first(np.abs(M).max(axis=1) >= theta)                                 # (K, S)
    np.testing.assert_array_equal(res.direction_escape_times, per_dir)
    assert np.isfinite(per_dir).sum() >= 3 and np.isnan(per_dir).sum() >= 1, per_dir
    overall = first((np.abs(M).max(axis=1) >= theta).any(axis=0))
    np.testing.assert_array_equal(res.escape_times["escape"], overall)
    np.testing.assert_array_equal(res.escape_times["semantic"], overall)
    np.testing.assert_array_equal(res.escape_times["positional"],
                                  first((np.abs(E) >= theta).any(axis=0)))
    with np.errstate(all="ignore"):
        np.testing.assert_array_equal(np.fmin.reduce(per_dir, axis=0), overall)
    # the same stream for longer, stopped when every seed has escaped
    stop = run(spec, out, eta=0.4, d=d, steps=20 * steps, seeds=6, seed=2, theta=theta,
               method=method, stop_when_escaped=True)
    esc = stop.escape_times["escape"]
    assert stop.stopped_early and np.all(np.isfinite(esc))
    assert stop.steps_run == round(esc.max() * d) == round(stop.t[-1] * d)
    done = np.isfinite(overall)
    np.testing.assert_array_equal(esc[done], overall[done])
    seen = np.isfinite(per_dir) & (per_dir <= stop.t[-1])   # reached before the stop
    np.testing.assert_array_equal(stop.direction_escape_times[seen], per_dir[seen])


@pytest.mark.parametrize("method", ["full", "reduced"])
def test_constant_half_schedule_is_half_eta_bit_for_bit(method, out):
    spec = poly(pe=True, spherical=False, noise=0.25)
    kw = dict(d=40, steps=60, seeds=3, seed=9, method=method, record_every=1)
    half = run(spec, out, eta=0.1, **kw)
    sched = run(spec, out, eta=0.2, schedule=lambda t: np.full(np.shape(t), 0.5), **kw)
    assert sched.scheduled
    for name in half.overlaps:
        np.testing.assert_array_equal(sched.overlaps[name], half.overlaps[name])
    again = run(spec, out, eta=0.1, **kw)                 # the seed fixes the run
    np.testing.assert_array_equal(again.overlaps["m1_1"], half.overlaps["m1_1"])


# ----------------------------------------------------------------------------------------------
# 4. the reduced chain equals the full simulator in law
# ----------------------------------------------------------------------------------------------

def increments(spec, out, method, d, n, seed, init, eta):
    """d (X_1 - X_0) of n independent single steps from `init`, (overlap names, n)."""
    per = n if method == "reduced" else 5000
    rows = []
    for k in range(0, n, per):
        res = run(spec, out, eta=eta, d=d, steps=1, seeds=min(per, n - k), seed=seed + k,
                  init=init, method=method, record_every=1)
        rows.append([d * (res.overlaps[x][:, 1] - res.overlaps[x][:, 0])
                     for x in spec.overlap_names])
    return np.concatenate(rows, axis=1)


@pytest.mark.parametrize("pe", [False, True], ids=["no_pe", "pe"])
@pytest.mark.parametrize("spherical", [False, True], ids=["plain", "spherical"])
def test_reduced_equals_full_in_law(pe, spherical, out, monkeypatch):
    spec = poly(pe=pe, spherical=spherical, noise=0.0 if spherical or pe else 0.25)
    init, d, n, eta = start(spec), 200, 10000, 0.3
    full = increments(spec, out, "full", d, n, 10, init, eta)
    red = increments(spec, out, "reduced", d, n, 20, init, eta)
    names = spec.overlap_names
    for what, z in law_z_scores(full, red).items():
        worst = np.unravel_index(np.argmax(np.abs(z)), z.shape)
        assert np.all(np.abs(z) <= Z_MAX), (
            f"{spec.name}: {what} of d*dX differ by z = {z[worst]:.2f} at "
            f"{[names[i] for i in worst]}; full {full.mean(axis=1)}, reduced {red.mean(axis=1)}")
    if pe and not spherical:                  # the test is sharp: a wrong Wishart is rejected
        init_chain = reduced.ReducedMulti.__init__

        def wrong(self, *args):
            init_chain(self, *args)
            self.df *= 2
        monkeypatch.setattr(reduced.ReducedMulti, "__init__", wrong)
        bad = increments(spec, out, "reduced", d, n, 20, init, eta)
        worst = max(np.abs(z).max() for z in law_z_scores(full, bad).values())
        print("wrong Wishart: worst z", worst)
        assert worst > Z_MAX


def test_reduced_cost_does_not_grow_with_d(out):
    """The chain runs at d = 10^12 (a d-vector per seed would need 8 TB) and stays in the
    unit ball on the sphere."""
    spec = poly(pe=True)
    res = run(spec, out, eta=0.2, d=10 ** 12, steps=200, seeds=5, seed=1, init=start(spec),
              method="reduced")
    for k in (1, 2):
        norm2 = sum(res.overlaps[f"m{k}_{j}"][:, -1] ** 2 for j in (1, 2)) \
            + res.overlaps[f"e{k}_1"][:, -1] ** 2
        assert np.all(norm2 <= 1 + 1e-12)
    np.testing.assert_allclose(res.overlaps["q_norm"], 1.0, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# 5. CLI
# ----------------------------------------------------------------------------------------------

SPEC_TOML = """
name = "mpoly_cli"
L = 2
[teacher]
link = "z1_1*z2_2 + z2_1**2"
directions = 2
[student]
link = "z1_1*z2_2 + z2_1**2"
directions = 2
positional = [[1.0], [-1.0]]
"""


def test_cli_simulate_multi(out, tmp_path, capsys):
    path = tmp_path / "mpoly_cli.toml"
    path.write_text(SPEC_TOML)
    base = ["simulate", str(path), "--eta", "0.4", "--d", "30", "--steps", "400", "--seeds",
            "3", "--threshold", "0.45", "--out", str(out)]
    assert main(base + ["--init", "m1_1=0.3", "--init", "q1_2=0.1", "--json"]) == 0
    js = json.loads(capsys.readouterr().out)
    assert js["init"] == {"m1_1": 0.3, "q1_2": 0.1} and js["directions"] == [2, 2]
    assert [row[0] for row in js["overlaps"]["m1_1"]] == pytest.approx([0.3] * 3, abs=1e-12)
    assert len(js["direction_escape_times"]) == 2
    assert main(base + ["--method", "reduced"]) == 0
    text = capsys.readouterr().out
    assert "w1         escape:" in text and "w2         escape:" in text
    for bad, msg in ((["--m0", "0.1"], "init"), (["--init", "m1_1=2"], "not those of vectors"),
                     (["--init", "m=0.1"], "not an overlap")):
        assert main(base + bad) == 2
        err = capsys.readouterr().err
        assert err.startswith("ssi: error:") and msg in err and err.count("\n") == 1, err
