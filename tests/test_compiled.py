"""The compiled reduced chain (ssi_symbolic.numeric.compiled, `engine="numba"`) against the
d-dimensional simulator and the NumPy engine of the same chain (MATH.md 10).

1. Equal in law, one step: mean and covariance of d times the one-step increments of the
   numba engine and of the full simulator from the same state agree within 5 standard errors
   (tests/test_reduced.law_z_scores), at d = 200 and 2000: tied with positional encoding
   (spherical), a batch of 4 (plain SGD, positional encoding, label noise), softmax attention
   (a matrix link, several outputs), a ReLU student (a Heaviside gradient), the norm loss, and
   untied students (spherical; plain with a batch of 2).
2. Escape times: two-sample KS test against the NumPy engine (600 seeds each, d = 1000), with
   power (eta 30 % smaller is rejected).
3. The chi-square sampler against scipy.stats.chi2 (KS), df = 1 (the boosted branch), 3, 10^5.
4. Bookkeeping: escape steps are the first records over theta (record_every = 1; tied and
   untied); the stop
   rule's continuation gives the same trajectories as records_after_escape=False up to each
   seed's escape, NaN after it there; a seed's stream depends on (seed, s) only (fewer seeds,
   one worker thread: identical).
5. Schedules: a constant factor 1/2 is eta / 2 bit for bit; eta0 / (1 + t / t0) follows the
   scheduled ODE.
6. Refusals and the CLI.

The whole module is skipped when Numba is not installed (the optional extra [fast]). Kernels are
compiled into the tests' cache folder (conftest: SSI_CACHE_DIR).
"""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from scipy import stats

pytest.importorskip("numba")

from ssi_symbolic.cli import main  # noqa: E402
from ssi_symbolic.errors import SpecError, StateError  # noqa: E402
from ssi_symbolic.model.spec import load_spec, make_spec  # noqa: E402
from ssi_symbolic.numeric import compiled  # noqa: E402
from ssi_symbolic.numeric.simulate import simulate  # noqa: E402

from .conftest import DERIVATIONS  # noqa: E402
from .test_reduced import _ode_mean_check, increments, law_z_scores  # noqa: E402

Z_MAX = 5.0


def shipped(name):
    return load_spec(DERIVATIONS / f"{name}.toml")


def plain_pe_noisy():
    return make_spec("plain_pe_noisy", 2, "z1 + z2/2", positional=[[1.0], [-0.5]], noise=0.25,
                     spherical=False)


def relu_student():
    return make_spec("relu_red", 1, "He(2, z1)/sqrt(2) + z1/2", student="relu(z1)")


def untied_spec(spherical=True):
    return make_spec("untied_red" + ("" if spherical else "_plain"), 2, "z1*z2 + He(2, z1)/2",
                     student="He(2, (z1 + z2)/sqrt(2))/sqrt(2)", weights="untied",
                     spherical=spherical)


def norm_loss(tmp_path_factory):
    """The positional-semantic attention model with the norm loss (its own module)."""
    from ssi_symbolic.numeric.sgd_step import spec_with_loss
    return spec_with_loss(shipped("positional_semantic"), "norm")


def run(spec, gen, **kw):
    kw.setdefault("progress", False)
    return simulate(spec, out_dir=gen, **kw)


def numba_run(spec, gen, **kw):
    return run(spec, gen, method="reduced", engine="numba", **kw)


# ----------------------------------------------------------------------------------------------
# 1. equal in law, one step, against the full simulator
# ----------------------------------------------------------------------------------------------

LAW_CASES = [
    pytest.param(lambda f: shipped("tied_he2_pe"), dict(eta=0.3, m0=0.4, e0=0.3), id="tied_pe"),
    pytest.param(lambda f: plain_pe_noisy(), dict(eta=0.4, m0=0.3, e0=0.2, batch=4),
                 id="batch4"),
    pytest.param(lambda f: shipped("positional_semantic"), dict(eta=1.0, m0=0.3, e0=0.2),
                 id="softmax_attention"),
    pytest.param(lambda f: relu_student(), dict(eta=0.4, m0=0.3), id="relu_student"),
    pytest.param(norm_loss, dict(eta=0.3, m0=0.4), id="norm_loss"),
    pytest.param(lambda f: untied_spec(), dict(eta=0.3, m0=0.3), id="untied"),
    pytest.param(lambda f: untied_spec(spherical=False), dict(eta=0.3, m0=0.3, batch=2),
                 id="untied_plain_b2"),
]


@pytest.mark.parametrize("d, n", [(200, 30000), (2000, 10000)])
@pytest.mark.parametrize("make, kw", LAW_CASES)
def test_one_step_equal_in_law_to_the_full_step(make, kw, d, n, gen, tmp_path_factory):
    """Means and covariances of d (X_1 - X_0): numba engine against the full simulator."""
    spec = make(tmp_path_factory)
    full = increments(spec, gen, "full", d, n, 10, **kw)
    fast = increments(spec, gen, "reduced", d, n, 20, engine="numba", **kw)
    zs = law_z_scores(full, fast)
    for what, z in zs.items():
        assert np.all(np.abs(z) <= Z_MAX), (spec.name, d, what, z, full.mean(axis=1),
                                            fast.mean(axis=1))
    # the increments are not degenerate (the comparison has something to compare)
    assert np.abs(fast).mean() > 1e-3


# ----------------------------------------------------------------------------------------------
# 2. escape-time distributions
# ----------------------------------------------------------------------------------------------

def test_escape_times_match_the_numpy_engine(gen):
    """he2_L1, eta = 0.2, d = 1000, from m0 = 1/sqrt(d): 600 seeds of each engine, ks_2samp
    p > 0.01; the numba engine at eta = 0.1 is rejected (p < 1e-6)."""
    spec = shipped("he2_L1")
    kw = dict(eta=0.2, d=1000, steps=200_000, stop_when_escaped=True, record_every=10 ** 6)
    ref = run(spec, gen, seeds=600, seed=1, method="reduced", **kw).escape_times["escape"]
    fast = numba_run(spec, gen, seeds=600, seed=2, **kw).escape_times["escape"]
    assert np.all(np.isfinite(ref)) and np.all(np.isfinite(fast))
    assert stats.ks_2samp(ref, fast).pvalue > 0.01, (np.median(ref), np.median(fast))
    slow = numba_run(spec, gen, seeds=600, seed=3, **{**kw, "eta": 0.1})
    assert stats.ks_2samp(ref, slow.escape_times["escape"]).pvalue < 1e-6


# ----------------------------------------------------------------------------------------------
# 3. the chi-square sampler
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("df", [1.0, 3.0, 1e5])
def test_chisquare_sampler(df):
    """200000 draws of the kernel's Marsaglia-Tsang chi-square against scipy.stats.chi2(df):
    KS p > 0.001, and the mean within 5 standard errors of df."""
    import numba
    mod = compiled.kernel_module(shipped("he2_L1"))
    chisquare, params = mod.chisquare, mod.chisquare_params

    @numba.njit
    def draws(rng, n, df):
        dd, cc, inv_a = params(df)
        out = np.empty(n)
        for i in range(n):
            out[i] = chisquare(rng, dd, cc, inv_a)
        return out

    n = 200_000
    x = draws(np.random.Generator(np.random.SFC64(7)), n, df)
    assert stats.kstest(x, stats.chi2(df).cdf).pvalue > 1e-3
    assert abs(x.mean() - df) <= 5 * math.sqrt(2 * df / n)


# ----------------------------------------------------------------------------------------------
# 4. bookkeeping and random streams
# ----------------------------------------------------------------------------------------------

def test_escape_steps_are_the_first_records_over_theta(gen):
    """With record_every = 1 every step is recorded: each seed's escape time is the first t
    with |m| >= theta (he2_L1), and for tied_he2_pe the 'escape', 'semantic', 'positional'
    times are the first t with ||(m, e)||, |m|, |e| >= theta."""
    for name, theta in (("he2_L1", 0.3), ("tied_he2_pe", 0.3)):
        spec = shipped(name)
        res = numba_run(spec, gen, eta=0.5, d=200, steps=4000, seeds=6, seed=3, theta=theta,
                        record_every=1, m0=0.1)
        m = res.overlaps["m"]
        e = res.overlaps["e"] if spec.r else np.zeros_like(m)
        for key, val in (("escape", m * m + e * e), ("semantic", m * m),
                         ("positional", e * e if spec.r else None)):
            if val is None:
                continue
            hit = val >= theta * theta
            first = np.where(hit.any(axis=1), res.t[np.argmax(hit, axis=1)], np.nan)
            np.testing.assert_array_equal(first, res.escape_times[key])
        assert np.isfinite(res.escape_times["escape"]).sum() >= 3


def test_untied_escape_steps_and_records(gen):
    """Untied student: the escape time is the first recorded t with sqrt(mean_l m_l^2) >=
    theta (record_every = 1), q_norm is the mean of the q_l, and spherical SGD keeps
    sum_l q_l = L."""
    spec = untied_spec()
    res = numba_run(spec, gen, eta=0.2, d=200, steps=8000, seeds=6, seed=3, theta=0.3,
                    record_every=1, m0=0.1)
    ms = np.stack([res.overlaps["m1"], res.overlaps["m2"]])
    qs = np.stack([res.overlaps["q1"], res.overlaps["q2"]])
    hit = np.sqrt((ms ** 2).mean(axis=0)) >= 0.3
    first = np.where(hit.any(axis=1), res.t[np.argmax(hit, axis=1)], np.nan)
    np.testing.assert_array_equal(first, res.escape_times["escape"])
    np.testing.assert_array_equal(first, res.escape_times["semantic"])
    assert np.isfinite(first).sum() >= 3
    np.testing.assert_allclose(res.overlaps["q_norm"], qs.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(qs.sum(axis=0), 2.0, rtol=1e-12)
    assert res.escape_kinds[int(np.nanargmin(first))] == "semantic"


def test_stop_rule_records_and_continuation(gen):
    """stop_when_escaped: records end at the last seed's escape. The run with
    records_after_escape=False has the same trajectories up to each seed's escape (the seed's
    stream does not depend on the continuation) and NaN after it, without a warning."""
    spec = shipped("tied_he2_pe")
    kw = dict(eta=0.1, d=500, steps=10 ** 6, seeds=5, seed=11, stop_when_escaped=True,
              record_every=100)
    full = numba_run(spec, gen, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        part = numba_run(spec, gen, records_after_escape=False, **kw)
    esc = full.escape_times["escape"]
    np.testing.assert_array_equal(esc, part.escape_times["escape"])
    assert full.stopped_early and full.t[-1] == pytest.approx(np.max(esc))
    np.testing.assert_array_equal(full.t, part.t)
    for name, a in full.overlaps.items():
        b = part.overlaps[name]
        assert np.all(np.isfinite(a))
        before = full.t[None, :] <= esc[:, None]
        np.testing.assert_array_equal(a[before], b[before])
        assert np.all(np.isnan(b[~before]))
        assert (~before).any()


def test_stream_per_seed(gen, monkeypatch):
    """A seed's trajectory depends on (seed, s) only: the first 3 of 5 seeds equal a 3-seed
    run, with one worker thread or several; another seed differs."""
    spec = shipped("noisy_linear_pe")
    kw = dict(eta=0.3, d=300, steps=3000, seed=4, record_every=50)
    five = numba_run(spec, gen, seeds=5, **kw)
    monkeypatch.setattr(compiled.os, "cpu_count", lambda: 1)
    three = numba_run(spec, gen, seeds=3, **kw)
    other = numba_run(spec, gen, seeds=3, **{**kw, "seed": 5})
    for name in spec.overlap_names:
        np.testing.assert_array_equal(five.overlaps[name][:3], three.overlaps[name])
        assert not np.allclose(other.overlaps[name], three.overlaps[name])
    assert five.engine == "numba" and five.to_json()["engine"] == "numba"


# ----------------------------------------------------------------------------------------------
# 5. schedules
# ----------------------------------------------------------------------------------------------

def test_constant_half_schedule_is_half_eta_bit_for_bit(gen):
    spec = shipped("tied_he2_pe")
    kw = dict(d=400, steps=compiled.BLOCK + 500, seeds=3, seed=8, record_every=1000)
    a = numba_run(spec, gen, eta=0.2, schedule=lambda t: 0.5 + 0 * np.asarray(t), **kw)
    b = numba_run(spec, gen, eta=0.1, **kw)
    for name in spec.overlap_names:
        np.testing.assert_array_equal(a.overlaps[name], b.overlaps[name])
    assert a.scheduled and not b.scheduled


def test_schedule_follows_the_scheduled_ode(gen):
    """eta(t) = eta0 / (1 + t / t0): the mean of 200 seeds at d = 10^4 from m0 = 0.2 follows
    dm/dt = drift(m; eta(t)) (tests/test_reduced._ode_mean_check) and not the constant-eta ODE."""
    spec = shipped("he2_L1")
    eta0, t0, d, m0 = 0.3, 0.5, 10_000, 0.2
    sched = lambda t: 1.0 / (1.0 + np.asarray(t) / t0)
    res = numba_run(spec, gen, eta=eta0, d=d, steps=30_000, seeds=200, seed=5, m0=m0,
                    record_every=5000, schedule=sched)
    dev, tol, _ = _ode_mean_check(spec, gen, res, lambda t: eta0 * sched(t), m0)
    assert np.all(dev <= tol), (res.t, dev, tol)
    dev_c, _, _ = _ode_mean_check(spec, gen, res, lambda t: eta0, m0)
    assert np.max(dev_c / tol) > 5


# ----------------------------------------------------------------------------------------------
# 6. refusals and the CLI
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec_name, kw, exc, words", [
    ("he2_L1", dict(method="full", engine="numba"), StateError, "method='reduced'"),
    ("he2_L1", dict(method="reduced", engine="fortran"), StateError, "numpy, numba"),
    ("committee_erf_K2", dict(method="reduced", engine="numba"), SpecError,
     "several directions"),
    ("he2_L1", dict(method="reduced", engine="numpy", records_after_escape="no"), StateError,
     "records_after_escape"),
])
def test_refusals(spec_name, kw, exc, words, gen):
    with pytest.raises(exc, match=words):
        run(shipped(spec_name), gen, eta=0.1, d=100, steps=10, seeds=2, **kw)


def test_missing_numba_is_refused(gen, monkeypatch):
    monkeypatch.setattr(compiled, "numba_available", lambda: False)
    with pytest.raises(StateError, match=r"Numba is not installed.*\[fast\]"):
        numba_run(shipped("he2_L1"), gen, eta=0.1, d=100, steps=10, seeds=2)


def test_numpy_engine_honours_records_after_escape(gen):
    """The NumPy engine with records_after_escape=False: NaN after each seed's escape."""
    res = run(shipped("he2_L1"), gen, eta=0.5, d=200, steps=10 ** 5, seeds=4, seed=2,
              method="reduced", stop_when_escaped=True, records_after_escape=False,
              record_every=10)
    esc = res.escape_times["escape"]
    after = res.t[None, :] > esc[:, None]
    assert after.any() and np.all(np.isnan(res.overlaps["m"][after]))
    assert np.all(np.isfinite(res.overlaps["m"][~after]))


def test_cli_engine(gen, capsys):
    spec = str(DERIVATIONS / "he2_L1.toml")
    code = main(["simulate", spec, "--eta", "0.3", "--d", "300", "--steps", "2000", "--seeds",
                 "3", "--method", "reduced", "--engine", "numba", "--out", str(gen), "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["engine"] == "numba" and out["method"] == "reduced"
    code = main(["simulate", spec, "--eta", "0.3", "--d", "300", "--steps", "20", "--method",
                 "reduced", "--engine", "numba", "--out", str(gen)])
    assert code == 0 and "(numba engine)" in capsys.readouterr().out
    code = main(["simulate", spec, "--eta", "0.3", "--d", "300", "--steps", "20", "--method",
                 "reduced", "--engine", "cuda", "--out", str(gen)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("ssi: error: engine") and "Traceback" not in err


def test_unwritable_cache_is_one_clear_error(gen, tmp_path, monkeypatch):
    """SSI_CACHE_DIR under a regular file: StateError naming the folder and SSI_CACHE_DIR."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("SSI_CACHE_DIR", str(blocker / "cache"))
    spec = make_spec("cache_probe", 1, "z1**3/7 + z1", student="z1**3/7 + z1")
    with pytest.raises(StateError, match=r"cannot write the kernel cache .*SSI_CACHE_DIR"):
        numba_run(spec, gen, eta=0.1, d=100, steps=10, seeds=2)
