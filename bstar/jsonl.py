"""JSONL reading with line-numbered errors, and atomic writing."""

import json
import os
import tempfile

from engine.errors import DataError


def iter_jsonl(path: str):
    """(line number, record) of every non-empty line; a malformed line raises DataError naming
    file and line."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise DataError(f"{where}: line is not valid UTF-8") from None
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON ({e.msg})") from None
            if not isinstance(rec, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            yield lineno, rec


def read_jsonl(path: str, required: tuple[str, ...] = ()) -> list[dict]:
    """Every record of a JSONL file, each holding the `required` fields."""
    if not os.path.isfile(path):
        raise DataError(f"data file {path} does not exist")
    records = []
    for lineno, rec in iter_jsonl(path):
        missing = [k for k in required if k not in rec]
        if missing:
            raise DataError(f"{path}:{lineno}: missing field {missing[0]!r}")
        records.append(rec)
    return records


def write_jsonl(path: str, records) -> None:
    """Write records atomically: a crash never leaves a half-written file at `path`."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".jsonl")
    try:
        with os.fdopen(fd, "w") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def emit(records: list[dict], out: str) -> None:
    """Records to `out` as JSONL (atomically), or to stdout when out is '-'."""
    import click

    if out == "-":
        for r in records:
            click.echo(json.dumps(r, ensure_ascii=False))
    else:
        write_jsonl(out, records)
        click.echo(f"wrote {len(records)} records to {out}", err=True)
