"""A run directory's one writer, its recovery after a crash, and stopping on SIGINT / SIGTERM.

`open_run(out)` is held for the whole of a run (docs/resume.md has the consistency model):
  * the lock: a POSIX record lock on <out>/.lock, taken by rank 0. The kernel drops it when the process
    ends in any way, SIGKILL included, so a crashed run leaves no stale lock; processes the run forks (grading
    workers) do not inherit it. A second `run --resume` on the same directory is refused with one line.
  * recovery: a checkpoint swap that a kill interrupted is completed (checkpoint.finish_replace) and the
    temporaries of interrupted writes are removed, so that only committed state is left for the resume to read.
  * signals: the first SIGINT or SIGTERM asks the run to stop once its current phase has committed
    (`Stop.check`, at every phase boundary); a second one stops at once, abandoning the phase (nothing of it
    is committed; its temporaries are swept on the way out). Either way the run ends with one line and
    `--resume` continues it.
"""

import errno
import fcntl
import os
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bstar.errors import BStarError
from bstar.train.checkpoint import finish_replace
from bstar.utils import distributed as dist_utils
from bstar.utils.jsonl import is_temp

LOCK = ".lock"
CHECKPOINTS = ("policy",)  # directories replaced by checkpoint.atomic_replace
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunStopped(BStarError):
    """The run stopped on a signal; resumable. `exit_code`: 128 + the signal number, as a shell reports it."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def _resume_hint(out: Path) -> str:
    return f"continue it with: bstar-engine run --resume {out}"


class Stop:
    """The stop requests of SIGINT / SIGTERM (installed in the main thread only; elsewhere never set)."""

    def __init__(self, out: Path):
        self.out, self.signum = out, None
        self._old: dict = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for s in SIGNALS:
            self._old[s] = signal.signal(s, self._on_signal)

    def restore(self) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum = signum
            print(
                f"{name}: stopping once the current phase is committed (send it again to stop at once)",
                file=sys.stderr,
                flush=True,
            )
            return
        raise RunStopped(
            f"stopped by {name} during a phase, which was abandoned (nothing of it committed); "
            + _resume_hint(self.out),
            signum,
        )

    def check(self, where: str) -> None:
        """At a phase boundary: stop if any rank was asked to (ranks agree, so all stop at the same one)."""
        signum = self.signum
        if dist_utils.world()[1] > 1:
            signum = max((s or 0 for s in dist_utils.all_gather_json(signum)), default=0) or None
        if signum is not None:
            name = signal.Signals(signum).name
            raise RunStopped(f"stopped by {name} after {where} was committed; " + _resume_hint(self.out), signum)


def _lock(out: Path) -> int:
    """Takes the directory's lock; returns its fd (closing it releases the lock)."""
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            raise BStarError(f"cannot lock {out / LOCK}: {e.strerror}") from None
        raise BStarError(
            f"{out} is in use by another run (pid {holder or '?'}); one run writes a run directory at a time"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def temporaries(out: Path) -> list[Path]:
    """The temporaries (utils.jsonl.is_temp) of interrupted writes in a run directory and its sub-folders."""
    dirs = [out] + [d for d in sorted(out.iterdir()) if d.is_dir() and not is_temp(d.name)]
    return [p for d in dirs for p in sorted(d.iterdir()) if is_temp(p.name)]


def recover(out: Path) -> None:
    """Leaves only committed state: completes an interrupted checkpoint swap, removes temporaries."""
    for name in CHECKPOINTS:
        finish_replace(out / name)
    for p in temporaries(out):
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink()


@contextmanager
def open_run(out: str | os.PathLike) -> Iterator[Stop]:
    """Holds the run directory `out` (which exists) for a run: lock, recovery, stop signals (module doc)."""
    out = Path(out)
    rank, world = dist_utils.world()
    fd, problem = None, None
    if rank == 0:
        try:
            fd = _lock(out)
            recover(out)
        except BStarError as e:
            problem = str(e)
    if world > 1:
        problem = dist_utils.broadcast_json(problem)
    if problem:
        if fd is not None:
            os.close(fd)
        raise BStarError(problem)
    stop = Stop(out)
    stop.install()
    try:
        yield stop
    except RunStopped:
        if rank == 0:
            recover(out)  # the abandoned phase's temporaries
        raise
    finally:
        stop.restore()
        if fd is not None:
            os.close(fd)


class Forward:
    """SIGINT / SIGTERM of a parent that runs resumable runs as child processes (`run --compare`): each signal
    is passed on to every running child (each child's own Stop handles it: the first lets its phase commit, a
    second abandons it), and the first also stops the parent from starting more. The children run in
    sessions of their own (`start_new_session`), so a terminal's Ctrl-C reaches them only through here, once."""

    def __init__(self):
        self.signum, self.children = None, []
        self._old: dict = {}

    def __enter__(self) -> "Forward":
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._old[s] = signal.signal(s, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}

    def _on_signal(self, signum, frame) -> None:
        first = self.signum is None
        self.signum = self.signum or signum
        for p in self.children:
            if p.poll() is None:
                p.send_signal(signum)
        if first:
            print(
                f"{signal.Signals(signum).name}: stopping the runs once their current phases are committed "
                "(send it again to stop at once)",
                file=sys.stderr,
                flush=True,
            )

    def stopped(self, dirs: list[str | os.PathLike]) -> RunStopped:
        """The one line for a stop, naming how to continue each of `dirs` (the runs not finished)."""
        name = signal.Signals(self.signum).name
        each = "; ".join(f"bstar-engine run --resume {d}" for d in dirs)
        return RunStopped(
            f"stopped by {name}; rerun the same command to continue, or each run with: {each}", self.signum
        )
