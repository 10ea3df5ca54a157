"""The exact reduced simulator (MATH.md section 10, ssi_symbolic.numeric.reduced) against the
d-dimensional simulator, and mini-batches and learning-rate schedules in both (section 9).

1. Coupling: one step of the chain, fed the coordinates of the full simulator's own draws
   (g*, zeta, h and chi = |sum_il dl_il o_il|^2 / |dl|^2 from the rest o of the tokens), lands on
   the full simulator's overlaps to round-off: one token, tied with positional encoding, plain
   with label noise and a batch of 3, softmax attention with a batch of 2, untied with and
   without batch.
2. Equal in law, one step: mean and covariance of d times the one-step increments of the two
   simulators from the same state agree within 5 standard errors (the covariance's from the
   fourth moments), at d = 200 and 2000, for a tied student with positional encoding, an untied
   student and a batch of 4 (plain SGD, positional encoding, label noise).
3. Escape times at d = 1000: two-sample Kolmogorov-Smirnov test, 300 full against 600 reduced
   seeds (and the test has power: a 30 % smaller eta is rejected).
4. d = 10^5: the mean of 100 reduced seeds follows the ODE; no d-sized memory (d = 10^12 runs).
5. Schedules: a constant factor 1/2 is eta / 2 bit for bit (both methods); eta0 / (1 + t / t0)
   follows the ODE integrated with the same eta(t); the spec's [training] schedule and batch
   are used, an explicit argument wins.
6. Random stream, CLI, refusals.

Modules: the shipped ones copied into a temporary directory (conftest.gen), the specs built here
generated there too; nothing is written into generated/.
"""
from __future__ import annotations

import json
import math
import tracemalloc

import numpy as np
import pytest
from scipy.integrate import solve_ivp
from scipy.stats import ks_2samp

from ssi_symbolic.backends.registry import links_module
from ssi_symbolic.cli import main
from ssi_symbolic.errors import SpecError, StateError
from ssi_symbolic.model.spec import load_spec, make_spec
from ssi_symbolic.numeric import reduced
from ssi_symbolic.numeric.sgd_step import initial_weights, loss_gradient, make_frame, residual
from ssi_symbolic.numeric.simulate import simulate

from .conftest import DERIVATIONS

Z_MAX = 5.0


def shipped(name):
    return load_spec(DERIVATIONS / f"{name}.toml")


def untied_spec():
    return make_spec("untied_red", 2, "z1*z2 + He(2, z1)/2",
                     student="He(2, (z1 + z2)/sqrt(2))/sqrt(2)", weights="untied")


def plain_pe_noisy():
    """Plain SGD, positional encoding, label noise."""
    return make_spec("plain_pe_noisy", 2, "z1 + z2/2", positional=[[1.0], [-0.5]], noise=0.25,
                     spherical=False)


def run(spec, gen, **kw):
    kw.setdefault("progress", False)
    return simulate(spec, out_dir=gen, **kw)


# ----------------------------------------------------------------------------------------------
# 1. coupling: the chain's step on the full simulator's draws
# ----------------------------------------------------------------------------------------------

def _coordinates(G, basis):
    """Coordinates of the draws G (..., S, d) on the orthonormal rows basis (S, k, d) and the
    rest o = G - projections."""
    coords = np.einsum("...sd,skd->k...s", G, basis)
    rest = G - np.einsum("k...s,skd->...sd", coords, basis)
    return coords, rest


def _mdl(spec, mod, zs, zw, noise_xi):
    """-dl (b S, L) from the fields (L, b S), through the shared residual and loss gradient;
    noise_xi(K) draws the label noise (None: no noise)."""
    y = np.asarray(mod.teacher_link(*zs), dtype=float)
    K = y.shape[0]
    y_hat = np.asarray(mod.student_link(*zw), dtype=float)
    res = residual(y, y_hat, K, math.sqrt(float(spec.noise)),
                   None if noise_xi is None else noise_xi(K))
    dg = np.asarray(mod.student_link_gradient(*zw), dtype=float).reshape(K, spec.L, -1)
    return loss_gradient(spec)(res, dg)                      # (b S, L), column i S + s


COUPLING = [
    pytest.param(lambda: shipped("he2_L1"), 1, 0.7, id="one_token"),
    pytest.param(lambda: shipped("tied_he2_pe"), 1, 0.7, id="tied_pe"),
    pytest.param(plain_pe_noisy, 3, 0.9, id="plain_pe_noisy_b3"),
    pytest.param(lambda: shipped("positional_semantic"), 2, 2.0, id="softmax_attention_b2"),
    pytest.param(untied_spec, 1, 0.7, id="untied"),
    pytest.param(untied_spec, 2, 0.7, id="untied_b2"),
]


@pytest.mark.parametrize("make, b, eta", COUPLING)
def test_one_step_of_the_chain_is_the_full_step(make, b, eta, gen):
    """Rebuild the full simulator's random stream (frame, initial weights, tokens G, then label
    noise), express the tokens in the frame (w*, u, v) and the rest, and step the chain with
    those coordinates: m, e (and q) equal the full simulator's to round-off."""
    spec = make()
    mod = links_module(spec, gen)
    L, r, S, d, seed = spec.L, spec.r, 5, 60, 3
    m0, e0 = 0.35, ([0.25] if r else [])
    res = run(spec, gen, eta=eta, d=d, steps=1, seeds=S, seed=seed, m0=m0,
              e0=e0 if r else None, batch=b, record_every=1)
    rng = np.random.Generator(np.random.SFC64(seed))
    sqrtd = math.sqrt(d)
    c = eta / (b * d)
    if not spec.untied:
        wstar, U = make_frame(rng, S, d, r)
        w0 = initial_weights(rng, wstar, U, m0, e0)
        G = rng.standard_normal((b * L, S, d)).reshape(b, L, S, d)   # row i L + l
        rho0 = math.sqrt(1 - m0 * m0 - sum(x * x for x in e0))
        v = (w0 - m0 * wstar - sqrtd * np.einsum("a,sad->sd", np.asarray(e0), U)) \
            / (sqrtd * rho0)
        basis = np.concatenate([wstar[:, None] / sqrtd, v[:, None], U], axis=1)   # (S, k, d)
        coords, rest = _coordinates(G, basis)                 # (k, b, L, S), (b, L, S, d)
        D = coords.transpose(0, 2, 1, 3).copy()                      # (k, L, b, S)
        chain = reduced.ReducedTied(spec, S, d, m0, e0, b)
        chain.prepare(D[None])
        zs = D[0].reshape(L, -1)
        mdl = _mdl(spec, mod, zs, chain.fields(D), lambda K: rng.standard_normal((K, b * S)))
        mdl4 = mdl.reshape(b, S, L)
        out = np.einsum("bsl,blsd->sd", mdl4, rest)                  # sum_il mdl_il o_il
        chi = np.einsum("sd,sd->s", out, out) / np.einsum("bsl,bsl->s", mdl4, mdl4)
        chain.update(mdl, D, np.sqrt(chi), c)
        m, e, q = chain.state()
        np.testing.assert_allclose(m, res.overlaps["m"][:, 1], rtol=0, atol=1e-12)
        names = ("e",) if r == 1 else tuple(f"e{a + 1}" for a in range(r))
        for a, name in enumerate(names):
            np.testing.assert_allclose(e[:, a], res.overlaps[name][:, 1], rtol=0, atol=1e-12)
        np.testing.assert_allclose(q, res.overlaps["q_norm"][:, 1], rtol=0, atol=1e-12)
        assert np.abs(m - m0).mean() > 1e-3                           # the step moved
        return
    wstar, _ = make_frame(rng, S, d, 0)
    W = np.stack([initial_weights(rng, wstar, np.zeros((S, 0, d)), m0, ()) for _ in range(L)],
                 axis=1)                                              # (S, L, d)
    G = rng.standard_normal((L, b, S, d) if b > 1 else (L, S, d)).reshape(L, b, S, d)
    rho0 = math.sqrt(1 - m0 * m0)
    V = (W - m0 * wstar[:, None]) / (sqrtd * rho0)                    # v_l, (S, L, d)
    gs = np.einsum("lbsd,sd->lbs", G, wstar) / sqrtd
    hs = np.einsum("lbsd,sld->lbs", G, V)
    rest = (G - gs[..., None] * (wstar / sqrtd)[None, None]
            - hs[..., None] * V.transpose(1, 0, 2)[:, None])
    D = np.stack([gs, hs])                                            # (2, L, b, S)
    chain = reduced.ReducedUntied(spec, S, d, m0, b)
    mdl = _mdl(spec, mod, gs.reshape(L, -1), chain.fields(D), None)
    mdlT = mdl.T.reshape(L, b, S)
    out = np.einsum("lbs,lbsd->lsd", mdlT, rest)
    chi = np.einsum("lsd,lsd->ls", out, out) / np.einsum("lbs,lbs->ls", mdlT, mdlT)
    chain.update(mdl, D, np.sqrt(chi), c)
    ms, qs = chain.state()
    for l in range(L):
        np.testing.assert_allclose(ms[l], res.overlaps[f"m{l + 1}"][:, 1], rtol=0, atol=1e-12)
        np.testing.assert_allclose(qs[l], res.overlaps[f"q{l + 1}"][:, 1], rtol=0, atol=1e-12)
    assert np.abs(ms - m0).mean() > 1e-3


# ----------------------------------------------------------------------------------------------
# 2. equal in law: one-step mean and covariance
# ----------------------------------------------------------------------------------------------

def increments(spec, gen, method, d, n, seed, **kw):
    """d (X_1 - X_0) of n independent single steps, (names, n), names = spec.overlap_names;
    the full simulator in batches of at most ~2^23 numbers per draw."""
    b = kw.get("batch", 1)
    per = n if method == "reduced" else max(1, min(n, 2 ** 23 // (b * spec.L * d)))
    out, k = [], 0
    while k < n:
        s = min(per, n - k)
        res = run(spec, gen, d=d, steps=1, seeds=s, seed=seed + k, method=method,
                  record_every=1, **kw)
        out.append([d * (res.overlaps[x][:, 1] - res.overlaps[x][:, 0])
                    for x in spec.overlap_names])
        k += s
    return np.concatenate(out, axis=1)


def law_z_scores(A, B):
    """z-scores of the differences of the means and of the covariance entries of two samples
    (rows: variables, columns: draws). The standard error of a sample covariance s_jk is
    sqrt((E[(x_j - mu_j)^2 (x_k - mu_k)^2] - s_jk^2) / n), from the fourth moments."""
    zs = {}
    stats = []
    for X in (A, B):
        n = X.shape[1]
        mu = X.mean(axis=1)
        Xc = X - mu[:, None]
        cov = Xc @ Xc.T / n
        m4 = np.einsum("jn,kn->jk", Xc ** 2, Xc ** 2) / n
        stats.append((mu, X.var(axis=1) / n, cov, (m4 - cov ** 2) / n))
    (mu_a, v_a, c_a, vc_a), (mu_b, v_b, c_b, vc_b) = stats
    zs["mean"] = (mu_a - mu_b) / np.sqrt(v_a + v_b)
    zs["cov"] = (c_a - c_b) / np.sqrt(vc_a + vc_b)
    return zs


LAW_CASES = [
    # spec, options: tied with positional encoding (spherical); untied (spherical, q_l move);
    # a batch of 4 (plain: q tracked, positional encoding, label noise)
    pytest.param(lambda: shipped("tied_he2_pe"), dict(eta=0.3, m0=0.4, e0=0.3), id="tied_pe"),
    pytest.param(untied_spec, dict(eta=0.3, m0=0.3), id="untied"),
    pytest.param(plain_pe_noisy, dict(eta=0.4, m0=0.3, e0=0.2, batch=4), id="batch4"),
]


@pytest.mark.parametrize("d, n", [(200, 40000), (2000, 12000)])
@pytest.mark.parametrize("make, kw", LAW_CASES)
def test_one_step_increments_equal_in_law(make, kw, d, n, gen, monkeypatch):
    """Means and covariances of d (X_1 - X_0) agree within Z_MAX standard errors. At d = 200
    the test is shown to be sharp: a chain whose chi-square has twice the degrees of freedom
    (the outside part of the step twice too large, an O(1) change of d times the increment)
    fails it."""
    spec = make()
    full = increments(spec, gen, "full", d, n, 10, **kw)
    red = increments(spec, gen, "reduced", d, n, 20, **kw)
    zs = law_z_scores(full, red)
    names = spec.overlap_names
    for what, z in zs.items():
        worst = np.unravel_index(np.argmax(np.abs(z)), z.shape)
        assert np.all(np.abs(z) <= Z_MAX), (
            f"{spec.name} d = {d}: {what} of d*dX differ by z = {z[worst]:.2f} at "
            f"{[names[i] for i in worst]}; full mean {full.mean(axis=1)}, reduced "
            f"{red.mean(axis=1)}")
    if d == 200:
        chain_of = reduced.reduced_chain

        def wrong(*args):
            chain = chain_of(*args)
            chain.df *= 2
            return chain
        monkeypatch.setattr(reduced, "reduced_chain", wrong)
        bad = increments(spec, gen, "reduced", d, n, 20, **kw)
        assert max(np.abs(z).max() for z in law_z_scores(full, bad).values()) > Z_MAX


# ----------------------------------------------------------------------------------------------
# 3. escape-time distributions at d = 1000
# ----------------------------------------------------------------------------------------------

def test_escape_time_distributions_pass_ks(gen):
    """noisy_linear_pe (L = 2, r = 2, label noise), eta = 0.5, d = 1000, from m0 = 1/sqrt(d):
    300 full seeds against 600 reduced seeds, ks_2samp p > 0.01. Power: the reduced chain at
    eta = 0.35 is rejected (p < 1e-6) against the same full sample."""
    spec = shipped("noisy_linear_pe")
    kw = dict(eta=0.5, d=1000, steps=5000, stop_when_escaped=True, record_every=10 ** 6)
    full = run(spec, gen, seeds=300, seed=1, **kw).escape_times["escape"]
    red = run(spec, gen, seeds=600, seed=2, method="reduced", **kw).escape_times["escape"]
    assert np.all(np.isfinite(full)) and np.all(np.isfinite(red))
    p = ks_2samp(full, red).pvalue
    assert p > 0.01, (p, np.median(full), np.median(red))
    slow = run(spec, gen, seeds=600, seed=3, method="reduced", **{**kw, "eta": 0.35})
    assert ks_2samp(full, slow.escape_times["escape"]).pvalue < 1e-6


# ----------------------------------------------------------------------------------------------
# 4. large d: the ODE, and no d-sized memory
# ----------------------------------------------------------------------------------------------

def _ode_mean_check(spec, gen, res, eta_of_t, m0):
    """|mean m(t) - m_ode(t)| <= 5 sd / sqrt(S) + 5 / d at every record after t = 0, with the
    ODE dm/dt = drift(m; eta(t)) of the module; returns the worst ratio deviation / tolerance."""
    mod = links_module(spec, gen)
    sol = solve_ivp(lambda t, x: np.asarray(mod.drift(x[0], eta=eta_of_t(t)), dtype=float),
                    (0.0, float(res.t[-1])), [m0], t_eval=res.t, rtol=1e-10, atol=1e-12)
    m = res.overlaps["m"]
    dev = np.abs(m.mean(axis=0) - sol.y[0])[1:]
    tol = 5 * m.std(axis=0)[1:] / math.sqrt(m.shape[0]) + 5 / res.d
    return dev, tol, sol.y[0]


def test_reduced_at_d_1e5_follows_the_ode_without_d_sized_memory(gen):
    """he2_L1, eta = 0.1, d = 10^5, 100 seeds from m0 = 0.3 to t = 1.5 (150000 steps): the mean
    of m follows the ODE. tracemalloc (on 2000 steps: it slows NumPy down): the peak at
    d = 10^5 is far below one d-vector per seed, and at d = 10^12 (the full simulator would
    need 8 TB per seed) it is the same."""
    spec = shipped("he2_L1")
    d, S, m0, eta = 100_000, 100, 0.3, 0.1
    links_module(spec, gen)
    peaks = []
    for dd in (d, 10 ** 12):
        tracemalloc.start()
        run(spec, gen, eta=eta, d=dd, steps=2000, seeds=S, seed=4, m0=m0, method="reduced",
            record_every=500)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[0] < 8 * d * S / 20 and peaks[1] < 1.2 * peaks[0], peaks
    res = run(spec, gen, eta=eta, d=d, steps=150_000, seeds=S, seed=4, m0=m0,
              method="reduced", record_every=25_000)
    dev, tol, ode = _ode_mean_check(spec, gen, res, lambda t: eta, m0)
    assert np.all(dev <= tol), (res.t, dev, tol)
    assert ode[-1] - m0 > 20 * tol.max()                         # it moved: the check is sharp


# ----------------------------------------------------------------------------------------------
# 5. schedules and batches
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["full", "reduced"])
def test_constant_half_schedule_is_half_eta_bit_for_bit(method, gen):
    spec = shipped("tied_he2_pe")
    kw = dict(d=120, steps=300, seeds=3, seed=9, m0=0.2, e0=0.1, method=method, record_every=1)
    half = run(spec, gen, eta=0.1, **kw)
    for f in (lambda t: 0.5, lambda t: np.full(np.shape(t), 0.5)):
        sched = run(spec, gen, eta=0.2, schedule=f, **kw)
        assert sched.scheduled and not half.scheduled
        for name in half.overlaps:
            np.testing.assert_array_equal(sched.overlaps[name], half.overlaps[name])
    base = run(spec, gen, eta=0.2, **kw)
    assert not np.array_equal(base.overlaps["m"], half.overlaps["m"])


def test_schedule_follows_the_scheduled_ode(gen):
    """eta(t) = eta0 / (1 + t / t0), eta0 = 0.3, t0 = 0.5: the mean of 200 reduced seeds at
    d = 10^4 from m0 = 0.2 follows dm/dt = drift(m; eta(t)) within the seeds' standard error,
    and differs from the ODE at constant eta0 by many tolerances."""
    spec = shipped("he2_L1")
    eta0, t0, d, m0 = 0.3, 0.5, 10_000, 0.2
    sched = lambda t: 1.0 / (1.0 + np.asarray(t) / t0)
    res = run(spec, gen, eta=eta0, d=d, steps=30_000, seeds=200, seed=5, m0=m0,
              method="reduced", record_every=5000, schedule=sched)
    dev, tol, ode = _ode_mean_check(spec, gen, res, lambda t: eta0 * sched(t), m0)
    assert np.all(dev <= tol), (res.t, dev, tol)
    dev_c, _, _ = _ode_mean_check(spec, gen, res, lambda t: eta0, m0)
    assert np.max(dev_c / tol) > 5                    # a constant eta0 would fail the test


def test_spec_batch_and_schedule_are_used(gen, tmp_path):
    """A spec with [training] batch = 3 and schedule = "1 / (1 + t / t0)" simulates as the
    plain spec with batch=3 and schedule=f given explicitly (bit for bit, both methods); an
    explicit argument wins over the spec."""
    base = make_spec("lin_sched", 1, "z1", parameters={"t0": 0.5})
    spec = make_spec("lin_sched_b3", 1, "z1", parameters={"t0": 0.5}, batch=3,
                     schedule="1 / (1 + t / t0)")
    f = lambda t: 1.0 / (1.0 + np.asarray(t) / 0.5)
    for method in ("full", "reduced"):
        kw = dict(eta=0.4, d=80, steps=200, seeds=3, seed=2, m0=0.1, method=method,
                  record_every=1)
        a = run(spec, tmp_path, **kw)
        b = run(base, tmp_path, batch=3, schedule=f, **kw)
        assert a.batch == 3 and a.scheduled and a.to_json()["batch"] == 3
        np.testing.assert_array_equal(a.overlaps["m"], b.overlaps["m"])
        c = run(spec, tmp_path, batch=1, schedule=lambda t: 1.0, **kw)
        d = run(base, tmp_path, **kw)
        assert c.batch == 1
        np.testing.assert_array_equal(c.overlaps["m"], d.overlaps["m"])
        # the parameter value reaches the schedule
        e = run(spec, tmp_path, params={"t0": 2.0}, **kw)
        g = run(base, tmp_path, params={"t0": 2.0}, batch=3,
                schedule=lambda t: 1.0 / (1.0 + np.asarray(t) / 2.0), **kw)
        np.testing.assert_array_equal(e.overlaps["m"], g.overlaps["m"])
        assert not np.array_equal(e.overlaps["m"], a.overlaps["m"])


# ----------------------------------------------------------------------------------------------
# 6. random stream, output, CLI, refusals
# ----------------------------------------------------------------------------------------------

def test_reduced_stream_and_result(gen, monkeypatch):
    """The reduced trajectory does not depend on the chunk size of the draws, the record grid,
    steps or the early stop; the result has the full simulator's layout."""
    spec = shipped("noisy_linear_pe")
    kw = dict(eta=0.5, d=500, seeds=4, seed=7, method="reduced")
    a = run(spec, gen, steps=1500, record_every=1, **kw)
    monkeypatch.setattr(reduced, "CHUNK_NORMALS", 37)
    b = run(spec, gen, steps=1200, record_every=1, **kw)
    for name in a.overlaps:
        np.testing.assert_array_equal(b.overlaps[name], a.overlaps[name][:, :1201])
    monkeypatch.undo()
    c = run(spec, gen, steps=1500, record_every=100, stop_when_escaped=True, **kw)
    assert c.stopped_early
    np.testing.assert_array_equal(c.escape_times["escape"], a.escape_times["escape"])
    for key in ("semantic", "positional"):                  # those reached before the stop
        hit = np.isfinite(c.escape_times[key])
        np.testing.assert_array_equal(c.escape_times[key][hit], a.escape_times[key][hit])
    steps = np.round(c.t * 500).astype(int)
    np.testing.assert_array_equal(c.overlaps["m"], a.overlaps["m"][:, steps])
    full = run(spec, gen, steps=20, **{**kw, "method": "full"})
    out = c.to_json()
    assert set(out) == set(full.to_json()) and out["method"] == "reduced"
    assert set(c.overlaps) == set(full.overlaps) == {"m", "e1", "e2", "q_norm"}
    np.testing.assert_allclose(c.overlaps["q_norm"], 1.0, atol=1e-13)
    json.dumps(out, allow_nan=False)


def test_cli_method_reduced(gen, capsys):
    spec = str(DERIVATIONS / "he2_L1.toml")
    assert main(["simulate", spec, "--eta", "0.1", "--d", "1e6", "--steps", "300", "--seeds",
                 "20", "--method", "reduced", "--batch", "2", "--out", str(gen), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["method"] == "reduced" and out["d"] == 10 ** 6 and out["batch"] == 2
    assert len(out["overlaps"]["m"]) == 20 and out["steps_run"] == 300
    assert main(["simulate", spec, "--eta", "0.1", "--d", "100", "--steps", "3", "--out",
                 str(gen)]) == 0
    assert "method full" in capsys.readouterr().out
    assert main(["simulate", spec, "--eta", "0.1", "--d", "100", "--steps", "3", "--method",
                 "exact", "--out", str(gen), "--json"]) == 2
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert cap.out == "" and len(lines) == 1 and lines[0].startswith("ssi: error: method")


@pytest.mark.parametrize("kwargs, exc, words", [
    (dict(method="exact"), StateError, "method"),
    (dict(method="reduced", dtype=np.float32), StateError, "dtype"),
    (dict(batch=0), StateError, "batch"),
    (dict(batch=1.5), StateError, "batch"),
    (dict(schedule=0.5), StateError, "schedule"),
    (dict(schedule=lambda t: 1.0 - t), StateError, "schedule"),
    (dict(schedule=lambda t: np.ones(3)), StateError, "schedule"),
    (dict(method="reduced", schedule=lambda t: np.nan), StateError, "schedule"),
])
def test_refusals(kwargs, exc, words, gen):
    with pytest.raises(exc) as info:
        run(shipped("tied_he2_pe"), gen, eta=0.1, d=100, steps=2000, seeds=2, **kwargs)
    msg = str(info.value)
    assert words in msg and "\n" not in msg


def test_reduced_refuses_students_it_does_not_reduce():
    """A student whose overlaps are not those of one direction (the multi-index layout of
    MATH.md 8, not implemented yet) is refused with one line naming the key."""
    multi = type("Spec", (), {"L": 1, "r": 0, "untied": False, "spherical": True, "C": (),
                              "overlap_names": ("m1_1", "m2_1"),
                              "where": staticmethod(lambda key: key)})()
    with pytest.raises(SpecError) as info:
        reduced.reduced_chain(multi, 2, 100, 0.1, (), 1)
    assert "student" in str(info.value) and "\n" not in str(info.value)
