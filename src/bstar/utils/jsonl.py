"""JSONL reading with line-numbered errors (the one reader of every JSONL file), and atomic writing (of
every file a run directory commits: JSON and JSONL alike)."""

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

import click

from bstar.errors import DataError
from bstar.utils import failpoint


def parse_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict | None, str | None]]:
    """(line number, record, None) for every non-empty line holding a JSON object, and (line number,
    None, what is wrong) for every other non-empty line, so that callers choose to raise or to collect.
    A missing file raises DataError."""
    if not os.path.isfile(path):
        raise DataError(f"data file {path} does not exist")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, None, f"line is not valid UTF-8 ({e.reason} at byte {e.start})"
                continue
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, None, f"malformed JSON ({e.msg})"
                continue
            except RecursionError:  # (e.g. 400,000 nested brackets: no data file nests that deep)
                yield lineno, None, "JSON nested too deeply"
                continue
            if not isinstance(rec, dict):
                yield lineno, None, f"expected a JSON object, got {type(rec).__name__}"
                continue
            yield lineno, rec, None


def read_json(path: str | os.PathLike):
    """A JSON state file (config.json, state.json, search.json...); a truncated or garbage one is one line
    naming it and what to do (DataError)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (ValueError, RecursionError) as e:  # (bad JSON, not UTF-8, nested too deeply)
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e).splitlines()[0][:100]
        raise DataError(f"{path} is corrupt ({why}); restore it from a backup or delete it to redo that step") from None


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, record) of every non-empty line; a bad line raises DataError naming file and line."""
    for lineno, rec, problem in parse_jsonl(path):
        if problem is not None:
            raise DataError(f"{path}:{lineno}: {problem}")
        yield lineno, rec


def read_jsonl(path: str | os.PathLike, required: tuple[str, ...] = ()) -> list[dict]:
    """Every record of a JSONL file, each holding the `required` fields."""
    records = []
    for lineno, rec in iter_jsonl(path):
        missing = [k for k in required if k not in rec]
        if missing:
            raise DataError(f"{path}:{lineno}: missing field {missing[0]!r}")
        records.append(rec)
    return records


TMP_TAG = ".tmp-"  # in every temporary name (".<name>.tmp-<pid>"): what a resume sweeps


def temp_path(path: str | os.PathLike) -> str:
    """The temporary name `path` is written under before it is renamed into place."""
    d, name = os.path.split(os.path.abspath(path))
    return os.path.join(d, f".{name}{TMP_TAG}{os.getpid()}")


def is_temp(name: str) -> bool:
    return name.startswith(".") and TMP_TAG in name


def fsync_dir(path: str | os.PathLike) -> None:
    """Makes the names in directory `path` durable (a rename into it survives a power loss)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """Makes a directory written in full (a checkpoint before it is renamed into place) durable: every file's
    data, then every directory's names, deepest first."""
    for root, _, files in os.walk(path, topdown=False):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


@contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[IO[str]]:
    """A text file that appears at `path` only when the block ends without an error: a crash leaves the old
    file (or none) there, never a half-written one; at most a temporary (`is_temp`) beside it. The data is
    fsync'ed before the rename and the directory after it, so a commit also survives a power loss. An I/O
    error (full disk, read-only directory) is one line naming the file (DataError)."""
    tmp = temp_path(path)
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(os.path.dirname(os.path.abspath(path)))
    except OSError as e:
        raise DataError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def dumps(record) -> str:
    """One JSONL line. NaN and infinities are not JSON: refused (DataError), never written as `NaN`."""
    try:
        return json.dumps(record, ensure_ascii=False, allow_nan=False)
    except ValueError as e:
        raise DataError(f"a record holds a value JSON cannot store ({e})") from None


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path) as f:
        half = len(text) // 2
        f.write(text[:half])
        f.flush()
        failpoint.hit("mid-write")
        f.write(text[half:])


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))


def write_jsonl(path: str | os.PathLike, records) -> None:
    """Write records atomically (atomic_open), one line at a time; every record is checked (dumps) first."""
    lines = [dumps(r) for r in records]
    with atomic_open(path) as f:
        for i, line in enumerate(lines):
            if i == len(lines) // 2:
                f.flush()
                failpoint.hit("mid-write")
            f.write(line + "\n")


def emit(records: list[dict], out: str) -> None:
    """Records to `out` as JSONL (atomically), or to stdout when out is '-'."""
    if out == "-":
        for line in [dumps(r) for r in records]:  # (all checked before the first is printed)
            click.echo(line)
    else:
        write_jsonl(out, records)
        click.echo(f"wrote {len(records)} records to {out}", err=True)
