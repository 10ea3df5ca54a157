"""Mini-batches (MATH.md section 9): the derived drift, Cov(G) and O(1/d) drift of a batch of b
sequences per step against an independent Monte Carlo of the batched step.

The Monte Carlo is the exact one-step algebra of the d-dimensional step (the frame of
tests/test_simulate.one_step_correction), written here for b sequences: with token coordinates
c_il ~ N(0, I_{2+r}) in the orthonormal frame (w*/sqrt d, u_a, residual of w) and
v_il = c_il + (C[l, :] on the u coordinates), V_i = sum_l dl_il v_il, one step is
w' = w - (eta / b) sum_il dl_il (x_il + p_l / sqrt d), so

    d (m' - m) = -eta mean_i A_m,i            d (e_a' - e_a) = -eta mean_i A_a,i
    |w'|^2 / d = 1 + a / d,  a = -2 eta mean_i A_q,i + (eta / b)^2 sum_ij Gamma_ij,
    E[sum_ij Gamma_ij | c] = sum_i B_i + (|sum_i V_i|^2 - (2 + r) sum_i B_i) / d.

Plain SGD tracks q: G_q = a0 = -2 eta mean A_q + (eta^2 / b) mean B and its O(1/d) drift is
eta^2 beta, beta = (|sum_i V_i|^2 - (2 + r) sum_i B_i) / b^2. Spherical SGD divides by
sqrt(1 + a/d): G_X = -eta mean A_X - X a0 / 2 and the O(1/d) drift is
E[eta mean(A_X) a0 / 2 + 3 X a0^2 / 8] - X eta^2 beta / 2.
"""
import math

import numpy as np
import pytest

from ssi_symbolic.backends.registry import ensure_module
from ssi_symbolic.errors import SpecError
from ssi_symbolic.model.spec import make_spec

from .test_simulate import plain_pe_spec, shipped


def _with_batch(spec, b):
    import dataclasses
    return dataclasses.replace(spec, name=f"{spec.name}_b{b}", batch=b)


def batched_step_samples(mod, spec, m, e, eta, b, n, rng):
    """Samples (n,) per overlap of G (d x the leading increment) and of the O(1/d) drift
    integrand, for a batch of b sequences at (m, e, q = 1)."""
    L, r = spec.L, spec.r
    C = np.array([[float(c) for c in row] for row in spec.C]).reshape(L, r)
    e = np.atleast_1d(np.asarray(e, dtype=float)).reshape(r)
    s = math.sqrt(1.0 - m * m - e @ e)
    c = rng.standard_normal((b, n, L, 2 + r))
    zs, zeta = c[..., 0], c[..., 1:1 + r]
    z = m * zs + zeta @ e + s * c[..., -1] + C @ e
    params = {k: float(v) for k, v in spec.parameters.items()}
    zs2, z2 = zs.reshape(b * n, L), z.reshape(b * n, L)
    y = np.array(mod.teacher_link(*zs2.T, **params), dtype=float).reshape(-1, b * n)
    K = y.shape[0]
    y = y + math.sqrt(float(spec.noise)) * rng.standard_normal(y.shape)
    yh = np.broadcast_to(np.array(mod.student_link(*z2.T, **params)).reshape(K, -1), (K, b * n))
    dg = np.array(mod.student_link_gradient(*z2.T, **params)).reshape(K, L, -1)
    dl = -np.einsum("kn,kln->nl", y - yh, np.broadcast_to(dg, (K, L, b * n))).reshape(b, n, L)
    A = {"m": np.einsum("bnl,bnl->bn", dl, zs).mean(0)}
    A_e = np.einsum("bnl,bnla->bna", dl, zeta + C).mean(0)
    e_names = ("e",) if r == 1 else tuple(f"e{a + 1}" for a in range(r))
    for a, name in enumerate(e_names):
        A[name] = A_e[:, a]
    A_q = np.einsum("bnl,bnl->bn", dl, z).mean(0)
    B = np.einsum("bnl,bnl->bn", dl, dl)
    v = c.copy()
    v[..., 1:1 + r] += C
    V = np.einsum("bnl,bnlj->nj", dl, v)                    # sum over the batch
    beta = (np.einsum("nj,nj->n", V, V) - (2 + r) * B.sum(0)) / b ** 2
    a0 = -2 * eta * A_q + eta ** 2 / b * B.mean(0)
    values = dict(zip(("m",) + e_names, (m,) + tuple(e)))
    G, corr = {}, {}
    for name in spec.overlap_names:
        if not spec.spherical:
            G[name] = a0 if name == "q" else -eta * A[name]
            corr[name] = eta ** 2 * beta if name == "q" else np.zeros(n)
        else:
            X = values[name]
            G[name] = -eta * A[name] - X * a0 / 2
            corr[name] = eta * A[name] * a0 / 2 + 3 * X * a0 ** 2 / 8 - X * eta ** 2 * beta / 2
    return G, corr


CASES = [
    pytest.param(lambda: shipped("tied_he2_pe"), 0.4, 0.3, 0.4, 4, id="tied_he2_pe_b4"),
    pytest.param(plain_pe_spec, 0.3, 0.2, 0.5, 4, id="plain_pe_noisy_b4"),
    pytest.param(lambda: shipped("he2_L1"), 0.3, None, 0.8, 3, id="he2_L1_b3"),
]


@pytest.mark.parametrize("make, m, e, eta, b", CASES)
def test_batch_drift_covariance_and_finite_d_match_the_batched_step(make, m, e, eta, b,
                                                                    tmp_path):
    spec = _with_batch(make(), b)
    mod = ensure_module(spec, tmp_path)
    e_list = [] if e is None else list(np.atleast_1d(e))
    n = 400_000
    G, corr = batched_step_samples(mod, spec, m, e_list, eta, b, n, np.random.default_rng(5))
    state = [m] + e_list + ([] if spec.spherical else [1.0])
    names = spec.overlap_names
    drift = np.array(mod.drift(*state, eta=eta), dtype=float)
    cov = np.array(mod.covariance(*state, eta=eta), dtype=float)
    fdc = np.array(mod.finite_d_correction(*state, eta=eta), dtype=float)
    S = np.array([G[k] for k in names])
    for i, k in enumerate(names):
        se = S[i].std() / math.sqrt(n)
        assert abs(drift[i] - S[i].mean()) <= 5 * se + 1e-12, (k, drift[i], S[i].mean(), se)
        c, se_c = corr[k].mean(), corr[k].std() / math.sqrt(n)
        assert abs(fdc[i] - c) <= 5 * se_c + 1e-12, (k, "finite d", fdc[i], c, se_c)
        for j in range(i, len(names)):
            x = (S[i] - S[i].mean()) * (S[j] - S[j].mean())
            se_x = x.std() / math.sqrt(n)
            assert abs(cov[i, j] - x.mean()) <= 5 * se_x + 1e-12, (k, names[j], cov[i, j],
                                                                   x.mean(), se_x)
    # the batch matters: b = 1 gives a covariance many standard errors away
    one = ensure_module(_with_batch(make(), 1), tmp_path)
    c1 = np.array(one.covariance(*state, eta=eta), dtype=float)
    x = (S[0] - S[0].mean()) ** 2
    assert abs(c1[0, 0] - x.mean()) > 20 * x.std() / math.sqrt(n)


def test_batch_enters_the_hash_and_leaves_b1_unchanged():
    import dataclasses
    spec = shipped("he2_L1")
    assert dataclasses.replace(spec, batch=1).hash() == spec.hash()
    assert dataclasses.replace(spec, batch=4).hash() != spec.hash()


@pytest.mark.parametrize("bad, why", [
    ({"batch": 0}, "training.batch"), ({"batch": 2.5}, "training.batch"),
    ({"batch": True}, "training.batch"), ({"bach": 2}, "training.bach: unknown key"),
    ({"schedule": "1 - t"}, "training.schedule"), ({"schedule": "1/(1 + t/t1)"}, "'t1'"),
])
def test_training_keys_are_validated(bad, why):
    from ssi_symbolic.model.spec import spec_from_dict
    data = {"name": "x", "L": 1, "teacher": {"link": "He(2, z1)"}, "training": bad}
    with pytest.raises(SpecError, match=why):
        spec_from_dict(data)


def test_schedule_factor_is_the_expression_at_the_parameters():
    spec = make_spec("sched", 1, "He(2, z1)", parameters={"t0": 50.0},
                     schedule="1 / (1 + t / t0)")
    t = np.array([0.0, 25.0, 50.0, 150.0])
    np.testing.assert_allclose(spec.schedule_factor()(t), 1 / (1 + t / 50), rtol=1e-15)
    np.testing.assert_allclose(spec.schedule_factor({"t0": 10.0})(t), 1 / (1 + t / 10),
                               rtol=1e-15)
    assert make_spec("flat", 1, "He(2, z1)").schedule_factor() is None


def test_ode_and_sde_follow_the_schedule(tmp_path):
    """Under eta(t) = eta0 / (1 + t / t0) the ODE's escape time equals that of a direct
    solve_ivp written here from MATH.md 9 (eta(t) in both orders of the drift), is later than at
    constant eta0, and lies within the quartiles of the SDE under the same schedule."""
    from scipy.integrate import solve_ivp

    from ssi_symbolic.analysis.predict import predict_sde, predict_solve
    spec = make_spec("he2_sched", 1, "He(2, z1)", parameters={"t0": 10.0},
                     schedule="1 / (1 + t / t0)")
    eta, d = 0.05, 1000
    out = predict_solve(spec, eta, d, out_dir=tmp_path)
    mod = ensure_module(spec, tmp_path)

    def rhs(t, x):
        et = eta / (1 + t / 10.0)
        return [et * float(mod.drift_eta1(x[0])[0]) + et ** 2 * float(mod.drift_eta2(x[0])[0])]

    hit = lambda t, x: x[0] - 0.5
    hit.terminal, hit.direction = True, 1
    ref = solve_ivp(rhs, (0, 1e5), [1 / math.sqrt(d)], events=hit, rtol=1e-11, atol=1e-13)
    assert out["escape_time"] == pytest.approx(float(ref.t_events[0][0]), rel=1e-6)
    assert "t0" in out["schedule"] and out["batch"] == 1
    const = predict_solve(make_spec("he2_const", 1, "He(2, z1)"), eta, d, out_dir=tmp_path)
    assert out["escape_time"] > 1.5 * const["escape_time"]
    sde = predict_sde(spec, eta, d, runs=200, seed=1, out_dir=tmp_path)
    q1, q3 = sde["quartiles"]
    assert q1 <= out["escape_time"] <= q3, (q1, out["escape_time"], q3)


def test_constant_learning_rate_analyses_refuse_a_schedule(tmp_path):
    from ssi_symbolic.analysis.predict import predict_max_lr
    spec = make_spec("he2_sched", 1, "He(2, z1)", schedule="1 / (1 + t / 10)")
    with pytest.raises(SpecError, match="training.schedule"):
        predict_max_lr(spec, out_dir=tmp_path)


def test_attention_backend_refuses_a_batch():
    import dataclasses

    from ssi_symbolic.backends.registry import backend_for
    spec = shipped("positional_semantic")
    with pytest.raises(SpecError, match="training.batch"):
        backend_for(dataclasses.replace(spec, batch=2))


def test_ode_escape_time_lies_within_the_simulated_quartiles_for_b_1_4_16(tmp_path):
    """MATH.md 9 end to end: the ODE of the derived batch-b drift against the exact reduced
    simulator of b-sequence SGD steps (64 seeds, d = 2000, he2_L1's link, eta = 0.25): the ODE
    escape time lies between the simulated quartiles for b = 1, 4 and 16, and the batch
    matters (b = 16 escapes outside the b = 1 quartiles)."""
    import ssi_symbolic as ssi
    eta, d, quartiles = 0.25, 2000, {}
    for b in (1, 4, 16):
        model = ssi.Model(make_spec(f"he2_b{b}", 1, "He(2, z1)/sqrt(2)", batch=b), tmp_path)
        tau = model.solve(eta=eta, d=d)["escape_time"]
        res = model.simulate(eta=eta, d=d, steps=int(4 * tau * d), seeds=64, seed=1,
                             method="reduced", stop_when_escaped=True)
        esc = np.asarray(res.escape_times["escape"], dtype=float)
        assert np.isfinite(esc).all()
        q1, q3 = np.percentile(esc, [25, 75])
        assert q1 <= tau <= q3, (b, q1, tau, q3)
        quartiles[b] = (q1, q3, tau)
    assert quartiles[16][2] < quartiles[1][0]
