"""Work done on the machine's second core while this process goes on (POSIX fork).

Derivation: the expectations of a derivation (loss, means, products of base statistics) are
independent, and each is a function of its expression alone (the closed forms' budget counts
every sub-problem a term reaches, memoised or not). :func:`two_ends` lets this process take them
from the front of the list and a forked child from the back, each claiming the next one when it
is done, until they meet (symbolic.expectation.Expectation.expect_many).

Code generation has a part that depends only on the quadrature nodes: their integrand functions
and the node count that meets the tolerance (node_counts.choose_nodes, which compiles and evaluates
them, importing scipy.special on the way). It runs in a forked child while the parent does the
common-subexpression elimination and the printing of the state functions; the child sends back
its (small, picklable) result through a pipe.

The child computes exactly what the parent would, from a copy of the parent's memory, so the
module is the same text either way (tests/test_fast_paths.py compares the two). Whenever the
child cannot be used, the caller computes the same result itself:

* no fork (not Linux), or other Python threads in this process (a Dask worker, a pytest-xdist
  worker: forking a threaded process can deadlock the child), or SSI_SERIAL=1 in the
  environment (everything in one process, for debugging and profiling);
* the child raised (the parent then meets the same error itself) or died, or the system had
  no process or descriptor left for it.
"""
from __future__ import annotations

import fcntl
import gc
import os
import pickle
import signal
import struct
import sys
import tempfile
import threading


def can_fork() -> bool:
    """Whether Background work may run in a forked child here (see the module docstring)."""
    return (sys.platform.startswith("linux") and hasattr(os, "fork")
            and not os.environ.get("SSI_SERIAL") and threading.active_count() == 1)


def _die_with(parent: int) -> None:
    """Make this (forked) process end when its parent does, whatever kills the parent: a
    SIGKILL (a timeout, the OOM killer) leaves no chance to stop the child, which would go on
    computing on the user's second core. Linux's prctl(PR_SET_PDEATHSIG, SIGKILL); if the
    parent is already gone (a race with the fork), exit at once."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # no prctl: the parent's close() still stops the child
        pass
    if os.getppid() != parent:
        os._exit(1)


class Background:
    """work() started in a forked child (when can_fork()); result() is its return value, or
    None when it ran nowhere or failed (the caller then calls work itself)."""

    def __init__(self, work):
        self.pid = self.fd = None
        if not can_fork():
            return
        try:
            r, w = os.pipe()
        except OSError:  # no descriptors left: the caller computes the result
            return
        sys.stdout.flush()
        sys.stderr.flush()
        parent = os.getpid()
        # the objects made so far out of the collector's sight in both processes: a
        # collection in one of them would otherwise write to the header of every object it
        # walks, a page fault and a page copy each (the gc module's advice before a fork)
        gc.freeze()
        try:
            pid = os.fork()
        except OSError:  # no process or memory for a child: likewise
            gc.unfreeze()
            os.close(r)
            os.close(w)
            return
        if pid == 0:  # the child: compute, send, leave without running the parent's exit code
            code = 0
            try:
                _die_with(parent)
                os.close(r)
                try:
                    data = pickle.dumps((True, work()), protocol=pickle.HIGHEST_PROTOCOL)
                except BaseException as err:  # noqa: BLE001 - reported to the parent
                    data = pickle.dumps((False, repr(err)))
                with os.fdopen(w, "wb") as f:
                    f.write(data)
            except BaseException:  # noqa: BLE001 - the parent sees no result and computes
                code = 1
            finally:
                os._exit(code)
        os.close(w)
        self.pid, self.fd = pid, r

    def result(self):
        """The child's value of work(), waiting for it; None when there is none."""
        if self.pid is None:
            return None
        fd, self.fd = self.fd, None
        try:
            with os.fdopen(fd, "rb") as f:
                data = f.read()
            ok, value = pickle.loads(data)
        except Exception:  # noqa: BLE001 - a dead child: the caller computes the result
            ok, value = False, None
        finally:
            self.close()
        return value if ok else None

    def close(self) -> None:
        """Stop the child (if it still runs), reap it, and give the objects frozen at the
        fork back to the collector."""
        if self.pid is not None:
            gc.unfreeze()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(self.pid, 0)
            self.pid = None


class _Claims:
    """The indices 0..n-1 claimed one at a time from the front (this process) and from the
    back (a forked child): the two counters live in an unlinked temporary file, guarded by a
    POSIX record lock, which the kernel releases when its holder dies (a killed child never
    leaves the lock held)."""

    def __init__(self, n: int):
        self.file = tempfile.TemporaryFile()
        os.pwrite(self.file.fileno(), struct.pack("<qq", 0, n), 0)

    def take(self, front: bool):
        """The next free index from that end, or None when the two ends have met."""
        fd = self.file.fileno()
        fcntl.lockf(fd, fcntl.LOCK_EX)
        try:
            lo, hi = struct.unpack("<qq", os.pread(fd, 16, 0))
            if lo >= hi:
                return None
            if front:
                i, lo = lo, lo + 1
            else:
                hi -= 1
                i = hi
            os.pwrite(fd, struct.pack("<qq", lo, hi), 0)
            return i
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN)

    def indices(self, front: bool):
        while (i := self.take(front)) is not None:
            yield i


def two_ends(n: int, front, back):
    """Share the indices 0..n-1 between this process and a forked child: front(indices) runs
    here over the indices it claims from the front, back(indices) in the child over those it
    claims from the back, each claiming the next free one when done with the last (so the
    split follows the actual costs). Returns back's return value (picklable), or None when no
    child ran or it failed; front has then claimed every index that no child did, and the
    caller computes whatever is missing from its results (a child that died after claiming
    indices returns nothing for them). Without a child (can_fork() false, fewer than two
    indices, no temporary file) front gets every index."""
    if n < 2 or not can_fork():
        front(iter(range(n)))
        return None
    try:
        claims = _Claims(n)
    except OSError:
        front(iter(range(n)))
        return None
    try:
        child = Background(lambda: back(claims.indices(False)))
        try:
            front(claims.indices(True))
        except BaseException:
            child.close()
            raise
        return child.result()
    finally:
        claims.file.close()


__all__ = ["Background", "can_fork", "two_ends"]
