"""Named kill points for the fault-injection tests: `hit("mid-write")` kills this process with SIGKILL when
$BSTAR_FAILPOINT names it, and does nothing otherwise (one dict lookup).

A point's full name is "<scope>:<name>"; the scope is set by whoever owns the work (the B-STaR controller
sets "t<iteration>/<phase>"), so shared helpers (atomic writes, the checkpoint swap) name their points
once and every phase that uses them gets its own. $BSTAR_FAILPOINT is a full name, optionally with "#k"
to die at its k-th hit (default the first), "+S" to die S seconds after the hit instead (a timer: a kill
in the middle of work that has no point of its own, such as the plot redraw) and "@r" to kill only the
torchrun rank r ($RANK; the other ranks hit the point and go on, as when one node of a job is lost).
A trailing "!ENOSPC" (any errno name) makes the point raise that OSError instead of killing: the write
in progress there fails as on a full (or read-only...) disk.
$BSTAR_FAILPOINT_TRACE
names a file that every hit appends its full name to, so a test can check that the points it enumerates
are the points the code has."""

import errno
import os
import signal
import threading
from contextlib import contextmanager

_scope = ""
_hits: dict[str, int] = {}


def _spec() -> tuple[str, int, float | None, str | None] | None:
    spec = os.environ.get("BSTAR_FAILPOINT")
    if not spec:
        return None
    error = None
    if "!" in spec:
        spec, error = spec.rsplit("!", 1)
    if "@" in spec:
        spec, rank = spec.rsplit("@", 1)
        if int(rank) != int(os.environ.get("RANK", "0")):
            return None
    delay = None
    if "+" in spec:
        spec, d = spec.rsplit("+", 1)
        delay = float(d)
    count = 1
    if "#" in spec:
        spec, c = spec.rsplit("#", 1)
        count = int(c)
    return spec, count, delay, error


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def hit(name: str) -> None:
    """Kill point `name` of the current scope (outside any scope there is nothing to kill), or an injected
    I/O error there."""
    if not _scope:
        return
    full = f"{_scope}:{name}"
    trace = os.environ.get("BSTAR_FAILPOINT_TRACE")
    if trace:
        with open(trace, "a") as f:
            f.write(full + "\n")
    spec = _spec()
    if spec is None or spec[0] != full:
        return
    _hits[full] = _hits.get(full, 0) + 1
    if _hits[full] != spec[1]:
        return
    if spec[3] is not None:
        code = getattr(errno, spec[3])
        raise OSError(code, os.strerror(code))
    if spec[2] is None:
        _die()
    timer = threading.Timer(spec[2], _die)
    timer.daemon = True  # a process that finishes first exits normally
    timer.start()


@contextmanager
def scope(name: str):
    """Points hit inside are named "<name>:<point>"."""
    global _scope
    outer, _scope = _scope, name
    try:
        yield
    finally:
        _scope = outer
