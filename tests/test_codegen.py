"""Generated code: agreement with sympy.lambdify, reproducibility, caching, atomic writes."""
import subprocess
import sys

import numpy as np
import pytest
import sympy as sp

from ssi_symbolic.backends import attention
from ssi_symbolic.backends.registry import generate
from ssi_symbolic.backends.files import load_module, read_hash
from ssi_symbolic.backends.exact import module_source, salt, tool_salt
from ssi_symbolic.symbolic.derive import D_SYM, ETA, derive
from ssi_symbolic.model.spec import load_spec, make_spec

from .conftest import DERIVATIONS, GENERATED


def _random_states(names, n, rng, spherical=True):
    """Random states inside the unit ball (q in [0.5, 1.5] for plain SGD)."""
    k = len([x for x in names if x != "q"])
    v = rng.normal(size=(k, n))
    v *= rng.uniform(0, 1, n) ** (1 / k) / np.linalg.norm(v, axis=0)
    out = list(v)
    if not spherical:
        qq = rng.uniform(0.5, 1.5, n)
        out = [x * np.sqrt(qq) for x in out] + [qq]
    return out


def test_regenerating_reproduces_committed_modules(spec_files):
    """generated/<name>.py is exactly what the tool writes for derivations/<name>.toml."""
    assert spec_files
    for f in spec_files:
        spec = load_spec(f)
        full = spec.diffusion  # [derivation] diffusion = false: <name>_drift_only.py
        committed = GENERATED / f"{spec.name}{'' if full else '_drift_only'}.py"
        assert committed.exists(), f"{committed} missing: run `ssi derive {f}`"
        if attention.handles(spec):  # softmax specs: quadrature backend, see test_attention.py
            assert read_hash(committed) == spec.hash(attention.backend_salt()), committed
            continue
        assert read_hash(committed) == spec.hash(salt(full)), f"{committed} is stale"
        assert module_source(derive(spec, diffusion=full), full) == committed.read_text(), \
            f"{committed} differs"


@pytest.mark.parametrize("name", ["tied_he2_pe", "he4_example_pe", "noisy_linear_pe",
                                  "linear_plain", "tied_network_he2_L2"])
def test_generated_matches_lambdify(name):
    """Each generated function equals sympy.lambdify of the same expressions at random points."""
    spec = load_spec(DERIVATIONS / f"{name}.toml")
    D = derive(spec)
    mod = load_module(GENERATED / f"{name}.py")
    rng = np.random.default_rng(1)
    state = _random_states(spec.overlap_names, 200, rng, spec.spherical)
    params = {p: rng.uniform(0.2, 1.0, 200) for p in spec.parameters}
    eta = rng.uniform(0.01, 0.5, 200)
    d = 1000.0
    syms = list(D.state) + list(D.parameters)
    vals = state + [params[str(p)] for p in D.parameters]
    lam = lambda ex, extra=(): sp.lambdify(syms + list(extra), ex, modules=["numpy", "scipy"])
    np.testing.assert_allclose(mod.population_loss(*state, **params),
                               lam(D.population_loss)(*vals), rtol=1e-10, atol=1e-12)
    for got, ex in zip(mod.drift_eta1(*state, **params), D.drift_eta1):
        np.testing.assert_allclose(got, lam(ex)(*vals) + 0 * eta, rtol=1e-10, atol=1e-12)
    for got, ex in zip(mod.drift(*state, eta=eta, **params), D.drift):
        np.testing.assert_allclose(got, lam(ex, [ETA])(*vals, eta), rtol=1e-10, atol=1e-12)
    diff = mod.diffusion(*state, eta=eta, d=d, **params)
    n = len(D.state)
    for i in range(n):
        for j in range(n):
            ref = lam(D.diffusion[i, j], [ETA, D_SYM])(*vals, eta, d)
            np.testing.assert_allclose(diff[i][j], ref + 0 * eta, rtol=1e-9, atol=1e-14)


def test_links_in_generated_module():
    mod = load_module(GENERATED / "he4_example_pe.py")
    z1, z2 = np.array([0.3, -1.2]), np.array([1.1, 0.4])
    he4 = lambda x: x ** 4 - 6 * x ** 2 + 3
    np.testing.assert_allclose(mod.teacher_link(z1, z2)[0], 4 / 3 + he4(z1) + 2 * he4(z2))
    grad = mod.student_link_gradient(z1, z2)
    np.testing.assert_allclose(grad[0][1], 2 * (4 * z2 ** 3 - 12 * z2))


def test_generated_imports_only_numpy_scipy(spec_files):
    for f in sorted(GENERATED.glob("*.py")):
        imports = [ln for ln in f.read_text().splitlines() if ln.startswith(("import ", "from "))]
        assert imports == ["import numpy", "import scipy.special"], (f, imports)
        code = (f"import sys, runpy; runpy.run_path({str(f)!r}); "
                "assert 'sympy' not in sys.modules, 'sympy imported'")
        subprocess.run([sys.executable, "-c", code], check=True)


def test_cache_and_hash(tmp_path):
    """A second generate() with the same spec writes nothing; a changed spec regenerates."""
    spec = make_spec("cached", 1, "z1**2")
    path, written = generate(spec, tmp_path)
    assert written
    mtime = path.stat().st_mtime_ns
    path2, written2 = generate(spec, tmp_path)
    assert path2 == path and not written2 and path.stat().st_mtime_ns == mtime
    spec_b = make_spec("cached", 1, "z1**3")
    _, written3 = generate(spec_b, tmp_path)
    assert written3 and read_hash(path) == spec_b.hash(tool_salt())
    assert [p.name for p in tmp_path.iterdir()] == ["cached.py"]  # no temporary files left


def test_written_modules_have_the_permissions_of_any_new_file(tmp_path):
    """write_atomic's temporary file is private (0o600); the module it becomes gets the mode
    of any new file, 0o666 less the umask (readable by the other jobs of a cluster)."""
    import os
    import stat
    old = os.umask(0o022)
    try:
        path, _ = generate(make_spec("modes", 1, "z1**2"), tmp_path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
        os.umask(0o077)
        path, _ = generate(make_spec("modes", 1, "z1**3"), tmp_path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_ssi_derive_ends_quickly_and_completely(tmp_path):
    """`python -m ssi_symbolic derive` ends without the interpreter's teardown (cli.run): its
    module is written whole, its output printed, its exit code kept (0, or 2 for a bad spec
    with one error line)."""
    import subprocess
    import sys
    spec = tmp_path / "quick.toml"
    spec.write_text('name = "quick"\nL = 1\n[teacher]\nlink = "z1**2"\n')
    p = subprocess.run([sys.executable, "-m", "ssi_symbolic", "derive", str(spec), "--out",
                        str(tmp_path / "gen")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == str(tmp_path / "gen" / "quick.py")
    text = (tmp_path / "gen" / "quick.py").read_text()
    compile(text, "quick.py", "exec")  # whole
    bad = subprocess.run([sys.executable, "-m", "ssi_symbolic", "derive",
                          str(tmp_path / "missing.toml")], capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode == 2 and bad.stderr.startswith("ssi: error:")
    assert len(bad.stderr.strip().splitlines()) == 1


def test_vectorised_throughput_shapes():
    """Functions broadcast over arrays of states and parameter values of any shape."""
    mod = load_module(GENERATED / "noisy_linear_pe.py")
    e1 = np.zeros((3, 4))
    out = mod.drift(0.1, e1, 0.2, eta=0.05, alpha=np.linspace(0, 1, 4))
    assert all(np.shape(o) == (3, 4) for o in out)
    assert np.shape(mod.diffusion(0.1, 0.0, 0.0, eta=0.1, d=10)) == (3, 3)
