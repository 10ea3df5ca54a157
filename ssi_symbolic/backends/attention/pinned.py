"""An attention module's source computed in a fresh interpreter with pinned floating point.

An attention module carries numbers computed at generation time (Gauss-Hermite quadratures,
Chebyshev tables, Hermite moments, their error estimates), printed with ``repr``. NumPy chooses
its SIMD kernels for exp, log, sums, ... (AVX2 or AVX-512) and OpenBLAS its dot-product kernels
and thread split by the CPU it runs on, once, when it is loaded; the last bits of those numbers,
and so the module's bytes, then differ between machines (seen: a module generated on an AVX2
machine and regenerated on an AVX-512 one differed in 15-17 lines, the error estimates in their
ninth digit).

So that ``generated/`` is reproducible byte for byte on every x86-64 machine with AVX2 and FMA,
the source is computed in a child interpreter started with

    OPENBLAS_CORETYPE=Haswell          OpenBLAS's AVX2 kernels, whatever the CPU
    OPENBLAS_NUM_THREADS=1             one thread: the same summation order on any core count
    NPY_DISABLE_CPU_FEATURES=...       every NumPy dispatch target above AVX2 (X86_V4 and the
                                       AVX512_* groups this NumPy was built with)

which makes an AVX-512 machine compute what an AVX2 machine computes. The spec goes to the child
pickled on its stdin (an object of this package, sent to a process of this package); the source
comes back on its stdout, or the exception that stopped it, raised again here. On a machine that
cannot run those kernels (not x86-64, or without AVX2 and FMA) nothing can be pinned: the source
is computed in this process and its numbers may differ from the committed ones in the last bits
(`pinned_environment` returns None there; the byte-for-byte test says so and skips).
"""
from __future__ import annotations

import os
import pickle
import platform
import subprocess
import sys
from pathlib import Path

from ...errors import SSIError

#: Prefixes of the NumPy dispatch targets above AVX2 and FMA (X86_V4 in NumPy 2.x, AVX512F and
#: the AVX512_* groups): disabled in the child. AVX2 (X86_V3) and everything below it is kept.
_ABOVE_AVX2 = ("X86_V4", "AVX512")

_CHILD = ("from ssi_symbolic.backends.attention.pinned import _child_main; _child_main()")


def pinned_environment() -> dict | None:
    """The environment variables that pin NumPy's and OpenBLAS's kernels to AVX2, or None when
    this machine cannot run them (not x86-64, or no AVX2 and FMA)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        from numpy._core import _multiarray_umath as umath   # NumPy >= 2
    except ImportError:  # pragma: no cover - NumPy 1.x
        from numpy.core import _multiarray_umath as umath
    features = getattr(umath, "__cpu_features__", {})
    if not (features.get("AVX2") and features.get("FMA3")):
        return None
    dispatch = getattr(umath, "__cpu_dispatch__", [])
    above = [t for t in dispatch if t.startswith(_ABOVE_AVX2)]
    env = {"OPENBLAS_CORETYPE": "Haswell", "OPENBLAS_NUM_THREADS": "1"}
    if above:
        env["NPY_DISABLE_CPU_FEATURES"] = ",".join(above)
    return env


def pinned_module_source(spec) -> str:
    """attention.source.module_source(spec), computed in a child interpreter whose NumPy and
    OpenBLAS run the AVX2 kernels (`pinned_environment`); in this process where nothing can be
    pinned, or no interpreter can be started (sys.executable empty). The child's error, if
    any, is raised here (an SSIError keeps its class and message)."""
    env = pinned_environment()
    if env is None or not sys.executable:  # or an embedded interpreter: no child to start
        from .source import module_source
        return module_source(spec)
    root = str(Path(__file__).resolve().parents[3])  # the folder holding ssi_symbolic/
    full = dict(os.environ, **env)
    full["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-c", _CHILD], input=pickle.dumps(spec),
                          stdout=subprocess.PIPE, env=full)
    try:
        kind, value = pickle.loads(proc.stdout)
    except Exception:
        raise SSIError(f"attention backend: the child computing the tables of {spec.name!r} "
                       f"ended with exit code {proc.returncode} and no result") from None
    if kind == "error":
        raise value
    return value


def _child_main() -> None:
    """The child: a pickled spec on stdin, a pickled ("source", text) or ("error", exception)
    on stdout; anything the computation prints goes to stderr. Ctrl-C (which the parent gets
    too, and reports) ends it quietly."""
    out = sys.stdout.buffer
    sys.stdout = sys.stderr
    try:
        spec = pickle.loads(sys.stdin.buffer.read())
        from .source import module_source
        result = ("source", module_source(spec))
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # sent back and raised again in the parent
        try:
            pickle.dumps(exc)
            result = ("error", exc)
        except Exception:
            result = ("error", RuntimeError(f"{type(exc).__name__}: {exc}"))
    out.write(pickle.dumps(result))
    out.flush()
