"""Checks every command runs before it writes anything: a refused command leaves no trace under --out, so
the corrected command just works. Each failure is one line naming the option or file and what to do."""

import math
import os
from pathlib import Path

from bstar.errors import BStarError


def check_number(option: str, value: float, low: float | None = None, low_open: bool = False) -> None:
    """A finite number, at least `low` (above it when low_open)."""
    ok = math.isfinite(value) and (low is None or (value > low if low_open else value >= low))
    if not ok:
        bound = "" if low is None else f" {'>' if low_open else '>='} {low:g}"
        raise BStarError(f"{option} must be a finite number{bound}, got {value}")


def check_out_dir(out: str | os.PathLike) -> None:
    """--out can be created (or is a directory) and written: not under a file, not read-only."""
    if Path(out).exists() and not Path(out).is_dir():
        raise BStarError(f"--out {out} is a file; give a directory")
    _check_creatable(out)


def _check_creatable(out: str | os.PathLike) -> None:
    """Its nearest existing ancestor is a writable directory."""
    parent = Path(out).absolute()
    while not parent.exists():
        parent = parent.parent
    if parent != Path(out).absolute() and not parent.is_dir():
        raise BStarError(f"cannot write to out dir {out}: it is under a file ({parent}); give a path in a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BStarError(f"cannot write to out dir {out}: {parent} is read-only (or not yours); give another --out")


def make_out_dir(out: str | os.PathLike) -> None:
    """Create --out (checked first), as one line on an I/O error (a full or read-only disk)."""
    check_out_dir(out)
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BStarError(f"cannot create --out {out}: {e.strerror or e}") from None


def check_out_file(out: str) -> None:
    """An output file ('-': stdout) whose folder can be created and written, and that is not a folder."""
    if out == "-":
        return
    if Path(out).is_dir():
        raise BStarError(f"--out {out} is a directory; give a file path")
    _check_creatable(out)


def check_model_dir(path: str, option: str = "--model") -> None:
    """A checkpoint directory whose config.json describes a model the engine can build (no weights read)."""
    from bstar.engine.config import ModelConfig  # torch: only when a command runs

    if not Path(path).is_dir():
        raise BStarError(f"{option}: model directory {path} does not exist")
    ModelConfig.from_dir(path)
