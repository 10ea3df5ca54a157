from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DERIVATIONS = ROOT / "derivations"
GENERATED = ROOT / "generated"


@pytest.fixture
def spec_files():
    return sorted(DERIVATIONS.glob("*.toml"))
