"""JSONL reading with line-numbered errors (the one reader of every JSONL file), and atomic writing."""

import json
import os
import tempfile
from collections.abc import Iterator

import click

from bstar.errors import DataError


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


def dumps(record) -> str:
    """One JSONL line. NaN and infinities are not JSON: refused (DataError), never written as `NaN`."""
    try:
        return json.dumps(record, ensure_ascii=False, allow_nan=False)
    except ValueError as e:
        raise DataError(f"a record holds a value JSON cannot store ({e})") from None


def write_jsonl(path: str | os.PathLike, records) -> None:
    """Write records atomically: a crash, a full disk or a bad value never leaves a half-written file at
    `path` (an I/O error is one line naming the file)."""
    d = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".jsonl")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in records:
                f.write(dumps(r) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        raise DataError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def emit(records: list[dict], out: str) -> None:
    """Records to `out` as JSONL (atomically), or to stdout when out is '-'."""
    if out == "-":
        for line in [dumps(r) for r in records]:  # (all checked before the first is printed)
            click.echo(line)
    else:
        write_jsonl(out, records)
        click.echo(f"wrote {len(records)} records to {out}", err=True)
