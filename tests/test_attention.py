"""Softmax attention (issue 4): the attention backend's loss tables, exact Hessian at the origin,
landscape analysis, surfaces and phase diagrams.

Every reference here is computed independently of ssi_symbolic.attention: the loss from the
explicit 2 x 2 softmax formulas (sigmoids) by a high-order tensor Gauss-Hermite rule over the four
Gaussian variables written in this file, a Monte Carlo over real d-dimensional tokens, and the
Hessian from Richardson-extrapolated finite differences of that reference.
"""
import json
import math
import time

import numpy as np
import pytest
from scipy.special import expit

from ssi_symbolic.cli import main
from ssi_symbolic.backends.files import load_module
from ssi_symbolic.model.spec import load_spec, spec_from_dict

from .conftest import DERIVATIONS, GENERATED

PS = DERIVATIONS / "positional_semantic.toml"
TR = DERIVATIONS / "softmax_trace_he2.toml"


@pytest.fixture(scope="module")
def ps(gen):
    from ssi_symbolic.backends.registry import generate
    path, _ = generate(load_spec(PS), gen)
    return load_module(path)


@pytest.fixture(scope="module")
def tr(gen):
    from ssi_symbolic.backends.registry import generate
    path, _ = generate(load_spec(TR), gen)
    return load_module(path)


def cli_json(argv, capsys):
    assert main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


# ----------------------------------------------------------------------------- references
def _gh(n):
    x, w = np.polynomial.hermite_e.hermegauss(n)
    return x, w / math.sqrt(2 * math.pi)


def _rule2(n):
    x, w = _gh(n)
    a, b = np.repeat(x, n), np.tile(x, n)
    W = np.outer(w, w).ravel()
    keep = W > 1e-16 * W.max()
    return a[keep], b[keep], W[keep]


def ref_terms(m, e, n_star=72, n_g=72):
    """Independent E over the 4 Gaussians of the pieces of 1/2||T - S||^2 for the model of
    MATH.md section 7: returns the expectations needed to assemble R for any (omega, a)."""
    a1, a2, wa = _rule2(n_star)
    g1, g2, wg = _rule2(n_g)
    s = math.sqrt(max(0.0, 1 - m * m))
    t11, t21 = expit(a1 * (a1 - a2)), expit(a2 * (a1 - a2))     # teacher softmax rows
    z1 = (m * a1 + e)[:, None] + s * g1[None, :]
    z2 = (m * a2 - e)[:, None] + s * g2[None, :]
    s11, s21 = expit(z1 * (z1 - z2)), expit(z2 * (z1 - z2))
    E = lambda x: float(wa @ (x @ wg))                           # noqa: E731
    one = np.ones_like(s11)
    return {
        "TS11": E(t11[:, None] * s11), "TS21": E(t21[:, None] * s21),
        "T11": float(wa @ t11), "T21": float(wa @ t21),
        "T11sq": float(wa @ t11 ** 2), "T21sq": float(wa @ t21 ** 2),
        "S11": E(s11), "S21": E(s21), "S11sq": E(s11 ** 2), "S21sq": E(s21 ** 2),
        "one": E(one),
    }


def ref_loss(m, e, omega, a, terms=None):
    """R = E 1/2 sum_ij (T_ij - S_ij)^2 with T = (1 - omega) T0 + omega A, rows of 2 x 2
    softmaxes written as sigmoids: T_i2 = 1 - T_i1, S_i2 = 1 - S_i1, so each row contributes
    (T_i1 - S_i1)^2 twice."""
    t = terms or ref_terms(m, e)
    A11, A21 = expit(2 * a * a), expit(-2 * a * a)
    out = 0.0
    for i, Ai in (("11", A11), ("21", A21)):
        # E (T - S)^2 with T = (1 - omega) t + omega A
        ET2 = (1 - omega) ** 2 * t[f"T{i}sq"] + 2 * omega * (1 - omega) * Ai * t[f"T{i}"] \
            + omega ** 2 * Ai ** 2
        ETS = (1 - omega) * t[f"TS{i}"] + omega * Ai * t[f"S{i}"]
        out += ET2 - 2 * ETS + t[f"S{i}sq"]
    return out


POINTS = [(0.0, 0.0, 0.5, 1.0), (0.3, 0.2, 0.5, 1.0), (0.9, 0.1, 0.2, 0.7),
          (0.995, 0.09, 0.67, 1.0), (0.1, 0.99, 0.8, 0.9), (0.6, 0.79, 0.3, 0.55),
          (0.707, 0.707, 0.9, 0.6), (0.05, 0.5, 0.0, 1.0), (0.5, 0.05, 1.0, 0.8),
          (0.999, 0.0, 0.1, 0.95), (0.0, 1.0, 0.6, 0.75), (0.42, 0.77, 0.45, 0.65)]


@pytest.mark.parametrize("m, e, omega, a", POINTS)
def test_loss_against_independent_quadrature(ps, m, e, omega, a):
    """population_loss agrees with a 72-node-per-dimension tensor rule to 1e-6, including
    points on or near the circle m^2 + e^2 = 1."""
    got = float(ps.population_loss(m, e, omega=omega, a=a))
    want = ref_loss(m, e, omega, a)
    assert abs(got - want) < 1e-6, (got, want, got - want)
    # symmetry in m and in e (MATH.md section 7)
    assert abs(float(ps.population_loss(-m, -e, omega=omega, a=a)) - got) < 1e-12


def test_loss_vectorised_and_error_estimate(ps):
    m = np.linspace(-1, 1, 7)[:, None]
    e = np.linspace(-1, 1, 5)[None, :]
    R = ps.population_loss(m, e, omega=0.3, a=0.8)
    assert R.shape == (7, 5)
    for i in (0, 3, 6):
        for j in (1, 2):
            assert R[i, j] == pytest.approx(float(ps.population_loss(m[i, 0], e[0, j],
                                                                     omega=0.3, a=0.8)), abs=1e-14)
    om = np.array([0.0, 0.5, 1.0])
    Rv = ps.population_loss(0.3, 0.4, omega=om, a=1.0)
    assert Rv.shape == (3,)
    assert np.isnan(ps.population_loss(1.2, 0.0))
    assert 0 < ps.LOSS_ERROR_ESTIMATE < 1e-6
    # omega = 0 at the teacher's own weights: the student is the teacher, R = 0
    assert abs(float(ps.population_loss(1.0, 0.0, omega=0.0, a=1.0))) < 1e-7


def test_loss_against_monte_carlo_of_real_tokens(ps):
    """Conventions of MATH.md sections 1-2 with real vectors: d = 3, w* = sqrt(d) e1, u = e2,
    w = sqrt(d) (m e1 + e e2 + sqrt(1 - m^2 - e^2) e3), tokens x_l ~ N(0, I/d),
    z*_l = x_l . w*, z_l = (x_l + C_l u / sqrt(d)) . w."""
    rng = np.random.default_rng(1)
    d, N = 3, 400_000
    m, e, omega, a = 0.6, 0.5, 0.4, 0.9
    w_star = math.sqrt(d) * np.array([1.0, 0, 0])
    w = math.sqrt(d) * np.array([m, e, math.sqrt(1 - m * m - e * e)])
    u = np.array([0, 1.0, 0])
    x = rng.normal(0, 1 / math.sqrt(d), size=(N, 2, d))
    zs = x @ w_star
    z = (x + np.array([1.0, -1.0])[None, :, None] * u / math.sqrt(d)) @ w

    def smx(v):
        M = v[:, :, None] * v[:, None, :]
        M = M - M.max(axis=2, keepdims=True)
        E = np.exp(M)
        return E / E.sum(axis=2, keepdims=True)
    A = np.exp(a * a * np.array([[1, -1], [-1, 1]]))
    A = A / A.sum(axis=1, keepdims=True)
    T = (1 - omega) * smx(zs) + omega * A
    loss = 0.5 * ((T - smx(z)) ** 2).sum(axis=(1, 2))
    mc, se = loss.mean(), loss.std() / math.sqrt(N)
    got = float(ps.population_loss(m, e, omega=omega, a=a))
    assert abs(got - mc) < 5 * se, (got, mc, se)


# ----------------------------------------------------------------------------- Hessian
def _richardson_second(f, h):
    """f''(0) of an even function by central differences (f(h) - 2 f(0) + f(-h)) / h^2 at
    h, h/2, h/4, extrapolated twice (error O(h^6))."""
    f0 = f(0.0)
    D = [2 * (f(x) - f0) / x ** 2 for x in (h, h / 2, h / 4)]
    D1 = [(4 * D[1] - D[0]) / 3, (4 * D[2] - D[1]) / 3]
    return (16 * D1[1] - D1[0]) / 15


_FD_CACHE = {}


def fd_terms(m, e):
    """Reference terms for the finite differences, with the same 96 nodes per dimension at
    every state (so the quadrature error varies smoothly; 48 nodes leave 4e-5 in R_mm)."""
    key = (round(m, 12), round(e, 12))
    if key not in _FD_CACHE:
        _FD_CACHE[key] = ref_terms(m, e, 96, 96)
    return _FD_CACHE[key]


def fd_hessian(omega, a):
    Hmm = _richardson_second(lambda x: ref_loss(x, 0.0, omega, a, fd_terms(x, 0.0)), 0.2)
    Hee = _richardson_second(lambda x: ref_loss(0.0, x, omega, a, fd_terms(0.0, x)), 0.2)
    return Hmm, Hee


@pytest.mark.parametrize("omega, a", [(0.0, 1.0), (0.5, 1.0), (0.67, 1.0), (0.9, 0.6)])
def test_hessian_origin_against_richardson(ps, omega, a):
    Hmm, Hee = fd_hessian(omega, a)
    H = ps.hessian_origin(omega=omega, a=a)
    assert abs(float(H[0][0]) - Hmm) < 1e-5, (float(H[0][0]), Hmm)
    assert abs(float(H[1][1]) - Hee) < 1e-5, (float(H[1][1]), Hee)
    assert abs(float(H[0][1])) < 1e-12 and abs(float(H[1][0])) < 1e-12   # R even in m and e
    g = ps.gradient_origin(omega=omega, a=a)
    assert abs(float(g[0])) < 1e-12 and abs(float(g[1])) < 1e-12


def test_transition_against_finite_differences(ps):
    """omega_trans(1) where R_ee = R_mm: the FD Hessians are affine in omega, so two omegas
    give the independent root; the root finder of `ssi phase-diagram --transition omega`
    agrees to 1e-5."""
    from ssi_symbolic.analysis.landscape import transition

    def diff(omega):
        Hmm, Hee = fd_hessian(omega, 1.0)
        return Hee - Hmm
    d0, d1 = diff(0.0), diff(1.0)
    want = d0 / (d0 - d1)
    got = transition(PS, "omega", {"a": 1.0}, out_dir=ps.__file__.rsplit("/", 1)[0])
    assert abs(got - want) < 1e-5, (got, want)
    H = ps.hessian_origin(omega=got, a=1.0)
    assert abs(float(H[0][0]) - float(H[1][1])) < 1e-12


# ----------------------------------------------------------------------------- trace spec
def test_trace_spec_against_quadrature_and_hessian(tr):
    """Student tr softmax_rows(z z^T)/sqrt 2 on (He2(z1) + He2(z2))/sqrt 2: loss against the
    4-dim reference, Hessian against Richardson differences."""
    def ref(m, e, n=64):
        a1, a2, wa = _rule2(n)
        g1, g2, wg = _rule2(n)
        s = math.sqrt(max(0.0, 1 - m * m))
        T = (a1 ** 2 + a2 ** 2 - 2) / math.sqrt(2)
        z1 = (m * a1 + e)[:, None] + s * g1[None, :]
        z2 = (m * a2 - e)[:, None] + s * g2[None, :]
        S = (expit(z1 * (z1 - z2)) + expit(z2 * (z2 - z1))) / math.sqrt(2)
        return float(wa @ ((0.5 * (T[:, None] - S) ** 2) @ wg))
    for m, e in [(0.3, 0.4), (0.9, 0.3), (0.0, 0.95)]:
        assert abs(float(tr.population_loss(m, e)) - ref(m, e)) < 1e-6
    H = tr.hessian_origin()
    Hmm = _richardson_second(lambda x: ref(x, 0.0, 96), 0.2)
    Hee = _richardson_second(lambda x: ref(0.0, x, 96), 0.2)
    assert abs(float(H[0][0]) - Hmm) < 1e-5 and abs(float(H[1][1]) - Hee) < 1e-5


# ----------------------------------------------------------------------------- derive
def imports_ok(text):
    """The generated module imports numpy and scipy.special only (like every other module)."""
    imports = [ln for ln in text.splitlines() if ln.startswith(("import ", "from "))]
    return imports == ["import numpy", "import scipy.special"]


def test_derive_attention_spec_fast_and_hashed(tmp_path, capsys):
    t0 = time.perf_counter()
    assert main(["derive", str(PS), str(TR), "--out", str(tmp_path)]) == 0
    elapsed = time.perf_counter() - t0
    assert elapsed < 60   # seconds on a shared 2-core machine (the symbolic path hangs)
    text = (tmp_path / "positional_semantic.py").read_text()
    assert "# spec-hash: " in text
    from ssi_symbolic.backends.attention import backend_salt, pinned_environment
    from ssi_symbolic.backends.files import read_hash
    for spec_path in (PS, TR):
        spec = load_spec(spec_path)
        committed = GENERATED / f"{spec.name}.py"
        assert read_hash(committed) == spec.hash(backend_salt()), f"{committed} is stale"
        if pinned_environment() is not None:   # x86-64 with AVX2: the same bytes everywhere
            assert (tmp_path / f"{spec.name}.py").read_text() == committed.read_text()
    assert imports_ok(text)
    capsys.readouterr()
    assert main(["derive", str(PS), "--out", str(tmp_path)]) == 0
    assert "up to date" in capsys.readouterr().err
    mod = load_module(tmp_path / "positional_semantic.py")
    assert mod.OVERLAPS == ("m", "e") and mod.PARAMETERS == ("omega", "a")


def test_pinned_environment_keeps_avx2_and_below():
    """On x86-64 with AVX2 and FMA the child gets OpenBLAS's Haswell kernels on one thread and
    NumPy without its dispatch targets above AVX2 (X86_V4, AVX512_*), and nothing else."""
    import platform
    from numpy._core import _multiarray_umath as umath
    from ssi_symbolic.backends.attention import pinned_environment
    env = pinned_environment()
    feats = umath.__cpu_features__
    if platform.machine() != "x86_64" or not (feats.get("AVX2") and feats.get("FMA3")):
        assert env is None
        return
    assert env["OPENBLAS_CORETYPE"] == "Haswell" and env["OPENBLAS_NUM_THREADS"] == "1"
    above = [t for t in umath.__cpu_dispatch__ if t == "X86_V4" or t.startswith("AVX512")]
    disabled = env.get("NPY_DISABLE_CPU_FEATURES", "")
    assert sorted(filter(None, disabled.split(","))) == sorted(above)
    assert set(env) <= {"OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS", "NPY_DISABLE_CPU_FEATURES"}


def test_pinned_child_computes_under_the_pinned_environment_and_raises_its_errors():
    """The child sees the pinned variables (its NumPy dispatches no AVX-512 target), and an
    error in the child is raised in the parent with its class and message."""
    import os
    import subprocess
    import sys
    from ssi_symbolic.backends.attention import pinned_environment, pinned_module_source
    from ssi_symbolic.errors import SpecError
    env = pinned_environment()
    if env is None:
        pytest.skip("this machine cannot pin NumPy and OpenBLAS to AVX2 (not x86-64 with AVX2)")
    code = ("from numpy.lib.introspect import opt_func_info; "
            "print(opt_func_info(func_name='exp', signature='float64')['exp']['dd']['current'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, **env))
    if "ImportError" in out.stderr or "ModuleNotFoundError" in out.stderr:
        pass  # NumPy < 2 has no introspection of its dispatch: the error check below still runs
    else:
        assert out.returncode == 0, out.stderr
        current = out.stdout.strip()
        assert current and current != "X86_V4" and "AVX512" not in current, current
    spec = load_spec(DERIVATIONS / "he2_L1.toml")   # not an attention spec: refused at once
    with pytest.raises(SpecError, match="norm loss is supported only for softmax attention"):
        pinned_module_source(spec)


def test_norm_loss_spec(tmp_path):
    """kind = "norm": R = E ||T - S||_F, against the independent rule (the norm has a kink where
    T = S, so the tolerance is that of the module's own two-order estimate)."""
    import tomllib
    data = tomllib.loads(PS.read_text())
    data["name"] = "positional_semantic_norm"
    data["loss"] = {"kind": "norm"}
    spec = spec_from_dict(data)
    assert spec.loss == "norm"
    from ssi_symbolic.backends.registry import generate
    path, _ = generate(spec, tmp_path)
    mod = load_module(path)
    m, e, omega, a = 0.5, 0.3, 0.4, 0.9
    got, err = mod.quadrature_error(mod.population_loss, m, e, omega=omega, a=a)
    a1, a2, wa = _rule2(48)
    s = math.sqrt(1 - m * m)
    z1 = (m * a1 + e)[:, None] + s * a1[None, :]
    z2 = (m * a2 - e)[:, None] + s * a2[None, :]
    A11, A21 = expit(2 * a * a), expit(-2 * a * a)
    d11 = (1 - omega) * expit(a1 * (a1 - a2))[:, None] + omega * A11 - expit(z1 * (z1 - z2))
    d21 = (1 - omega) * expit(a2 * (a1 - a2))[:, None] + omega * A21 - expit(z2 * (z1 - z2))
    want = float(wa @ (np.sqrt(2 * d11 ** 2 + 2 * d21 ** 2) @ wa))
    assert abs(float(got) - want) < max(5 * float(err), 1e-4)
    # O(eta) drift of the norm loss: the projected gradient of its own population loss (same
    # Gauss-Hermite rule: checks dl = -sum_k r_k dS_k / ||r|| against the loss itself)
    h = 1e-4
    R = lambda mm, ee: float(mod.population_loss(mm, ee, omega=omega, a=a))   # noqa: E731
    gm = (R(m + h, e) - R(m - h, e)) / (2 * h)
    ge = (R(m, e + h) - R(m, e - h)) / (2 * h)
    r = m * gm + e * ge
    d1 = mod.drift_eta1(m, e, omega=omega, a=a)
    assert abs(float(d1[0]) + (gm - m * r)) < 1e-4 and abs(float(d1[1]) + (ge - e * r)) < 1e-4


def test_norm_loss_rejected_for_non_attention_spec(tmp_path, capsys):
    bad = tmp_path / "lin_norm.toml"
    bad.write_text('name = "lin_norm"\nL = 1\n[teacher]\nlink = "z1"\n[loss]\nkind = "norm"\n')
    assert main(["derive", str(bad), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ssi: error:") and "norm" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "lin_norm.py").exists()


# ----------------------------------------------------------------------------- landscape
def test_landscape_regions_and_json(ps, capsys):
    out = ps.__file__.rsplit("/", 1)[0]
    r0 = cli_json(["landscape", str(PS), "--param", "omega=0", "--param", "a=1", "--out", out],
                  capsys)
    assert r0["region"] == "Unique Semantic Minimum"
    assert r0["initial_direction"] == "semantic"
    assert len(r0["minima"]) == 1 and r0["global_minimum"]["m"] > 0.99
    r1 = cli_json(["landscape", str(PS), "--param", "omega=1", "--param", "a=1", "--out", out],
                  capsys)
    assert r1["region"] == "Unique Positional Minimum"
    assert r1["initial_direction"] == "positional"
    assert r1["global_minimum"]["e"] > r1["global_minimum"]["m"]
    r = cli_json(["landscape", str(PS), "--param", "omega=0.67", "--param", "a=1", "--out", out],
                 capsys)
    assert set(r) >= {"minima", "global_minimum", "hessian", "initial_direction", "region"}
    assert all(set(mn) >= {"e", "m", "loss"} for mn in r["minima"])
    # each reported minimum is a constrained local minimum: no lower value nearby in the disk
    for mn in r["minima"]:
        rad = np.linspace(0, 0.02, 5)
        ang = np.linspace(0, 2 * np.pi, 24)
        ee = np.clip(mn["e"] + np.outer(rad, np.cos(ang)), 0, 1)
        mm = np.clip(mn["m"] + np.outer(rad, np.sin(ang)), 0, 1)
        inside = ee ** 2 + mm ** 2 <= 1
        vals = ps.population_loss(mm[inside], ee[inside], omega=0.67, a=1.0)
        assert vals.min() >= mn["loss"] - 1e-9


def test_surface_cli(ps, tmp_path, capsys):
    out = ps.__file__.rsplit("/", 1)[0]
    f = tmp_path / "s.npz"
    assert main(["surface", str(PS), "--grid", "e=-1:1:41", "--grid", "m=-1:1:31",
                 "--param", "omega=0.6", "--out", str(f), "--generated", out]) == 0
    capsys.readouterr()
    z = np.load(f)
    assert z["loss"].shape == (41, 31)
    E, M = np.meshgrid(z["e"], z["m"], indexing="ij")
    assert np.all(np.isnan(z["loss"][E ** 2 + M ** 2 > 1 + 1e-12]))
    assert np.all(np.isfinite(z["loss"][E ** 2 + M ** 2 <= 1]))
    i, j = 25, 20
    assert z["loss"][i, j] == pytest.approx(float(ps.population_loss(M[i, j], E[i, j],
                                                                     omega=0.6, a=1.0)))


def test_phase_diagram_small_and_transition(ps, capsys):
    out = ps.__file__.rsplit("/", 1)[0]
    r = cli_json(["phase-diagram", str(PS), "--grid", "omega=0:1:5", "--grid", "a=0.5:1:3",
                  "--transition", "omega", "--out", out], capsys)
    names = r["regions"]
    idx = np.array(r["region_index"])
    assert idx.shape == (5, 3)
    assert names[idx[0, 2]] == "Unique Semantic Minimum"
    assert names[idx[4, 2]] == "Unique Positional Minimum"
    t1 = [t for t in r["transition"] if t["a"] == 1.0][0]["omega"]
    assert 0 < t1 < 1
    r2 = cli_json(["phase-diagram", str(PS), "--grid", "a=0.8:1:3", "--transition", "omega",
                   "--out", out], capsys)
    assert [t["a"] for t in r2["transition"]] == [0.8, 0.9, 1.0]
    assert r2["transition"][2]["omega"] == pytest.approx(t1, abs=1e-12)
    # the transition moves to larger omega as a decreases (weaker positional teacher)
    oms = [t["omega"] for t in r2["transition"]]
    assert oms[0] > oms[1] > oms[2]


@pytest.mark.parametrize("argv, needle", [
    (["phase-diagram", str(PS), "--grid", "omega=0:1"], "start:stop:count"),
    (["phase-diagram", str(PS), "--grid", "beta=0:1:3", "--grid", "a=0:1:3"], "beta"),
    (["phase-diagram", str(PS), "--grid", "omega=0:1:x", "--grid", "a=0:1:3"], "count"),
    (["landscape", str(PS), "--param", "omega=zz"], "zz"),
    (["landscape", str(PS), "--param", "gamma=1"], "gamma"),
    (["landscape", str(DERIVATIONS / "he2_L1.toml")], "attention"),
    (["surface", str(PS), "--grid", "e=-1:1:5", "--out", "x.txt"], ".npz"),
    (["surface", str(PS), "--grid", "e=-1:1:5", "--grid", "q=0:1:3", "--out", "/tmp/x.npz"],
     "m"),
])
def test_bad_input_one_line_errors(ps, argv, needle, capsys):
    out = ps.__file__.rsplit("/", 1)[0]
    extra = ["--generated", out] if argv[0] == "surface" else ["--out", out]
    assert main(argv + extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ssi: error:") and needle in err and len(err.splitlines()) == 1


# ----------------------------------------------------------------------------- drift, escape
def _softmax_and_jacobian(z):
    """Row softmax of z z^T (z: (N, L)) and dS_ij/dz_l from d(z_i z_j)/dz_l = d_il z_j + d_jl z_i:
    dS_ij/dz_l = S_ij (dM_ij/dz_l - sum_k S_ik dM_ik/dz_l)."""
    N, L = z.shape
    M = z[:, :, None] * z[:, None, :]
    M = M - M.max(axis=2, keepdims=True)
    S = np.exp(M)
    S /= S.sum(axis=2, keepdims=True)
    eye = np.eye(L)
    dM = eye[None, :, None, :] * z[:, None, :, None] + eye[None, None, :, :] * z[:, :, None, None]
    dS = S[..., None] * (dM - np.einsum("nik,nikl->nil", S, dM)[:, :, None, :])
    return S, dS                                              # (N, L, L), (N, L, L, L)


def test_drift_against_monte_carlo_of_real_tokens(ps):
    """MATH.md section 4 spherical drift with real tokens (d = 3 as in the loss test):
    eta-part -(A_m - m A_q), -(A_e - e A_q); eta^2-part -(x/2) B, with the explicit softmax
    Jacobian; 5 standard errors plus the table tolerance."""
    rng = np.random.default_rng(2)
    d, N = 3, 300_000
    m, e, omega, a = 0.35, 0.3, 0.6, 1.0
    w = math.sqrt(d) * np.array([m, e, math.sqrt(1 - m * m - e * e)])
    x = rng.normal(0, 1 / math.sqrt(d), size=(N, 2, d))
    C = np.array([1.0, -1.0])
    zs = x[:, :, 0] * math.sqrt(d)
    zeta = x[:, :, 1] * math.sqrt(d)
    z = (x + C[None, :, None] * np.array([0, 1.0, 0]) / math.sqrt(d)) @ w
    Ts, _ = _softmax_and_jacobian(zs)
    A = np.exp(a * a * np.array([[1, -1], [-1, 1]]))
    A = A / A.sum(axis=1, keepdims=True)
    T = (1 - omega) * Ts + omega * A
    S, dS = _softmax_and_jacobian(z)
    dl = -np.einsum("nij,nijl->nl", T - S, dS)
    Am = (dl * zs).sum(1)
    Ae = (dl * (zeta + C)).sum(1)
    Aq = (dl * z).sum(1)
    B = (dl ** 2).sum(1)
    samples = {"m1": -(Am - m * Aq), "e1": -(Ae - e * Aq), "m2": -0.5 * m * B, "e2": -0.5 * e * B}
    d1 = ps.drift_eta1(m, e, omega=omega, a=a)
    d2 = ps.drift_eta2(m, e, omega=omega, a=a)
    got = {"m1": d1[0], "e1": d1[1], "m2": d2[0], "e2": d2[1]}
    for k, v in samples.items():
        se = v.std() / math.sqrt(N)
        assert abs(float(got[k]) - v.mean()) < 5 * se + 2e-4, (k, float(got[k]), v.mean(), se)


def test_drift_eta1_is_projected_gradient_of_the_reference(ps):
    """At the origin's neighbourhood the O(eta) drift equals -(I - x x^T) grad R, with grad R
    from central differences of the independent reference loss."""
    m, e, omega, a = 0.4, 0.25, 0.5, 0.9
    h = 1e-3
    gm = (ref_loss(m + h, e, omega, a, ref_terms(m + h, e, 64, 64))
          - ref_loss(m - h, e, omega, a, ref_terms(m - h, e, 64, 64))) / (2 * h)
    ge = (ref_loss(m, e + h, omega, a, ref_terms(m, e + h, 64, 64))
          - ref_loss(m, e - h, omega, a, ref_terms(m, e - h, 64, 64))) / (2 * h)
    r = m * gm + e * ge
    d1 = ps.drift_eta1(m, e, omega=omega, a=a)
    assert abs(float(d1[0]) + (gm - m * r)) < 1e-5
    assert abs(float(d1[1]) + (ge - e * r)) < 1e-5


def test_simulated_escape_direction(ps):
    """Finite-d SGD from (0, 0): a purely semantic teacher escapes along m, a purely
    positional one along e; the linear-SDE prediction agrees."""
    from ssi_symbolic.analysis.attention import simulate_escape
    from ssi_symbolic.analysis.landscape import predict_escape
    spec = load_spec(PS)
    out = ps.__file__.rsplit("/", 1)[0]
    for omega, kind in ((0.1, "semantic"), (0.95, "positional")):
        kinds, times = simulate_escape(spec, {"omega": omega, "a": 1.0}, eta=2.0, d=200,
                                       runs=6, max_steps=8000, seed=5, out_dir=out)
        assert kinds.count(kind) == 6, kinds
        pred = predict_escape(PS, {"omega": omega, "a": 1.0}, eta=2.0, d=200, paths=100,
                              out_dir=out)
        assert pred[kind] == 1.0


def test_bilinear_projection_student(tmp_path):
    """u^T softmax_rows(z z^T) v (the authors' bilinear reduction) on the He2 target: a scalar
    link through the same backend, against the 64-node reference: S = 2 sigmoid(z1 (z1 - z2)) - 1
    for u = (1, 0), v = (1, -1)."""
    from ssi_symbolic.backends.registry import generate
    spec = spec_from_dict({
        "name": "bilinear_he2", "L": 2,
        "teacher": {"link": "(He(2, z1) + He(2, z2)) / sqrt(2)"},
        "student": {"link": "Matrix([[1, 0]]) * softmax_rows(outer(z, z)) * Matrix([[1], [-1]])",
                    "positional": [[1.0], [-1.0]]}})
    mod = load_module(generate(spec, tmp_path)[0])
    a1, a2, W = _rule2(64)
    for m, e in [(0.5, 0.4), (0.95, 0.1)]:
        s = math.sqrt(1 - m * m)
        z1 = (m * a1 + e)[:, None] + s * a1[None, :]
        z2 = (m * a2 - e)[:, None] + s * a2[None, :]
        S = 2 * expit(z1 * (z1 - z2)) - 1
        T = ((a1 ** 2 + a2 ** 2 - 2) / math.sqrt(2))[:, None]
        assert abs(float(mod.population_loss(m, e)) - W @ ((0.5 * (T - S) ** 2) @ W)) < 1e-6
