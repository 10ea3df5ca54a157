"""Generated module files: where they live, the spec hash in their header, atomic writes and
loading them back (no SymPy needed to load one)."""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile
from pathlib import Path

HASH_PREFIX = "# spec-hash: "


def _header_lines(path, count: int) -> list:
    """The first `count` lines of a file (all of a shorter one); [] when it cannot be read."""
    try:
        with open(path) as fh:
            return [line for _, line in zip(range(count), fh)]
    except OSError:
        return []


def read_hash(path) -> str | None:
    """The spec hash recorded in a generated module's header, or None."""
    for line in _header_lines(path, 40):
        if line.startswith(HASH_PREFIX):
            return line[len(HASH_PREFIX):].strip()
    return None


def read_unverified(path) -> tuple[dict, float | None]:
    """({k: n_k}, tolerance) from a generated module's header: the k-dimensional quadrature
    rules whose node count no probe showed to meet QUADRATURE_TOLERANCE
    (QUADRATURE_UNVERIFIED, node_counts.choose_nodes), and that tolerance; ({}, None) for a
    module without quadrature or an unreadable file."""
    import ast
    found, tol = {}, None
    try:
        for line in _header_lines(path, 80):
            if line.startswith("QUADRATURE_UNVERIFIED = "):
                found = ast.literal_eval(line.split(" = ", 1)[1])
            elif line.startswith("QUADRATURE_TOLERANCE = "):
                tol = float(line.split(" = ", 1)[1])
    except (ValueError, SyntaxError):
        return {}, None
    return found, tol


def unverified_message(path) -> str:
    """What a generated module's QUADRATURE_UNVERIFIED means, in one sentence naming the
    module, its rules and its tolerance; "" when it has none (`ssi derive` prints it after
    `ssi: note:`, Model.derive warns with it)."""
    rules, tol = read_unverified(path)
    if not rules:
        return ""
    which = ", ".join(f"{k}-d: {n}" for k, n in sorted(rules.items()))
    return (f"{path}: the node counts of its quadrature rules ({which} nodes per dimension) "
            f"are not shown to meet QUADRATURE_TOLERANCE = {tol:g} (a finer rule exceeds the "
            f"point or probing budget); `ssi evaluate` and quadrature_error() give each "
            f"value's error estimate")


def _file_mode() -> int:
    """The mode a newly created file gets here: 0o666 less the process's umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomic(path, text: str) -> None:
    """Write text to path atomically (temporary file in the same folder, then rename), with the
    permissions of any new file (the temporary file is private: 0o600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def module_path(spec, out_dir="generated", diffusion: bool = True) -> Path:
    return Path(out_dir) / f"{spec.name}{'' if diffusion else '_drift_only'}.py"



def load_module(path):
    """Import a generated module from its file (no SymPy needed at run time)."""
    path = Path(path).resolve()
    name = f"ssi_generated_{path.stem}_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules.setdefault(name, module)
    return module


__all__ = ["HASH_PREFIX", "read_hash", "read_unverified", "write_atomic", "module_path",
           "load_module"]
