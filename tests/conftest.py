import os
import shutil
import tempfile
from pathlib import Path

import pytest

# compiled kernels of the numba engine (numeric/compiled.py) go to a cache folder of the test
# runs, not to the user's ~/.cache (shared by the xdist workers: kernel files are written
# atomically and Numba's cache tolerates concurrent writers)
os.environ.setdefault("SSI_CACHE_DIR", str(Path(tempfile.gettempdir()) / "ssi-test-cache"))

ROOT = Path(__file__).resolve().parent.parent
DERIVATIONS = ROOT / "derivations"
GENERATED = ROOT / "generated"


@pytest.fixture
def spec_files():
    return sorted(DERIVATIONS.glob("*.toml"))


def copy_generated(out: Path) -> Path:
    """Copy the committed modules into `out` (tests never write into generated/)."""
    for f in GENERATED.glob("*.py"):
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    """A copy of the committed modules: the tests never write into generated/."""
    return copy_generated(tmp_path_factory.mktemp("generated"))
