"""The module contract (backends/contract.py) over every committed module and over modules freshly
written by every backend; a module missing a declared piece fails it."""
import types

import pytest

from ssi_symbolic.backends.contract import (PIECES, ContractError, check_module, checked,
                                            provides, require, why_not)
from ssi_symbolic.backends.files import load_module
from ssi_symbolic.backends.registry import BACKENDS, backend_for, generate
from ssi_symbolic.model.spec import load_spec, make_spec

from .conftest import DERIVATIONS, GENERATED


def _committed():
    return sorted(GENERATED.glob("*.py"))


@pytest.mark.parametrize("path", _committed(), ids=lambda p: p.stem)
def test_every_committed_module_complies(path):
    stem = path.stem.removesuffix("_drift_only")  # [derivation] diffusion = false specs
    spec = load_spec(DERIVATIONS / f"{stem}.toml")
    mod = load_module(path)
    assert check_module(mod, spec) == []
    assert mod.BACKEND == backend_for(spec).name
    for piece in PIECES:  # every piece is there or declared unavailable with a reason
        assert provides(mod, piece) or why_not(mod, piece).strip()


# one small spec per backend, written fresh (the attention one is the softmax trace model)
FRESH = {
    "exact": lambda: make_spec("fresh_exact", 2, "(He(2, z1) + He(2, z2)) / sqrt(2)",
                               positional=[[1], [-1]]),
    "attention": lambda: load_spec(DERIVATIONS / "softmax_trace_he2.toml"),
}


def test_every_backend_is_exercised():
    assert {b.name for b in BACKENDS} == set(FRESH)


@pytest.mark.parametrize("backend", sorted(FRESH))
def test_fresh_modules_of_every_backend_comply(backend, tmp_path):
    spec = FRESH[backend]()
    assert backend_for(spec).name == backend
    path, written = generate(spec, tmp_path, force=True)
    assert written
    mod = load_module(path)
    assert check_module(mod, spec) == []
    if backend == "exact":  # the drift-only module declares what it leaves out
        p2, _ = generate(spec, tmp_path, diffusion=False)
        lean = load_module(p2)
        assert check_module(lean, spec) == []
        assert not provides(lean, "covariance") and not provides(lean, "finite_d_correction")
        assert provides(lean, "drift") and provides(lean, "student_link_gradient")
        with pytest.raises(ContractError, match="the SDE needs diffusion.*drift-only"):
            require(lean, "diffusion", "the SDE")
    if backend == "attention":  # tables without the drift: the module says so
        from ssi_symbolic.backends.attention import Integrals, module_source
        lean_path = tmp_path / "lean.py"
        lean_path.write_text(module_source(spec, Integrals(spec, drift=False)))
        lean = load_module(lean_path)
        assert check_module(lean, spec) == []
        assert not provides(lean, "drift") and not provides(lean, "drift_jacobian")
        assert provides(lean, "population_loss") and provides(lean, "covariance")


def _clone(mod, drop=(), **changes):
    out = types.ModuleType(mod.__name__)
    out.__dict__.update({k: v for k, v in vars(mod).items() if k not in drop})
    out.__dict__.update(changes)
    return out


@pytest.mark.parametrize("piece", sorted(PIECES))
def test_a_module_missing_a_declared_piece_fails(piece):
    mod = load_module(GENERATED / "tied_he2_pe.py")
    broken = _clone(mod, drop=(piece,))
    problems = check_module(broken)
    assert any(piece in p for p in problems), problems
    with pytest.raises(ContractError, match=piece):
        checked(broken)
    # declaring it unavailable, with a reason, makes the module comply again
    declared = _clone(mod, drop=(piece,), UNAVAILABLE={piece: "not derived in this test"})
    assert check_module(declared) == []
    assert why_not(declared, piece) == "not derived in this test"


def test_contract_catches_wrong_constants_and_signatures():
    mod = load_module(GENERATED / "tied_he2_pe.py")
    assert any("NAME" in p for p in check_module(_clone(mod, drop=("NAME",))))
    assert any("METHOD" in p for p in check_module(_clone(mod, METHOD="guess")))
    bad_sig = _clone(mod, drift=lambda m, eta: None)  # forgets the state variable e
    assert any(p.startswith("drift(") for p in check_module(bad_sig))
    no_reason = _clone(mod, drop=("covariance",), UNAVAILABLE={"covariance": ""})
    assert any("reason" in p for p in check_module(no_reason))
    other = load_spec(DERIVATIONS / "he2_L1.toml")
    assert any("OVERLAPS" in p for p in check_module(mod, other))
