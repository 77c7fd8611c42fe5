"""Config fields that carry their own help. `setting(default, help, ...)` is a dataclasses.field whose
metadata the command line reads (bstar.cli.options derives a command's options from the dataclass), so a
field's name, type, default and help are written once, beside the field: adding a field with its help is all
it takes to get an option. check_settings holds an instance to the same choices and bounds the option checks."""

import functools
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, Field, field, fields

from bstar.errors import BStarError


def setting(
    default=MISSING,
    help: str = "",
    *,
    factory: Callable | None = None,
    choices: Sequence[str] | None = None,
    unset: str | None = None,
    parse: Callable[[str], object] | None = None,
    show: Callable[[object], str] | None = None,
    low: float | None = None,
    high: float | None = None,
):
    """A dataclass field with its command-line help.

    factory: a mutable default's factory (dataclasses' default_factory). choices: the values allowed.
    unset: what None means, shown as the default (e.g. "all"). parse / show: a list field's text form on the
    command line and back (e.g. a 'start:stop:step' grid). low / high: bounds (inclusive), checked by the option
    and by check_settings."""
    meta = {"help": help, "choices": choices, "unset": unset, "parse": parse, "show": show, "low": low, "high": high}
    meta = {k: v for k, v in meta.items() if v is not None}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def field_default(f: Field):
    """A field's default value (a fresh one from its factory)."""
    return f.default_factory() if f.default_factory is not MISSING else f.default


def field_type(cls: type, name: str) -> tuple[object, bool]:
    """A dataclass field's type without None, and whether None is allowed: `int | None` -> (int, True)."""
    hint = _hints(cls)[name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return (args[0] if len(args) == 1 else hint), len(args) < len(typing.get_args(hint))
    return hint, False


@functools.cache
def _hints(cls: type) -> dict:
    return typing.get_type_hints(cls)


def check_settings(obj) -> None:
    """Every field of the dataclass instance `obj` among its choices and within its bounds (setting's
    choices, low, high; None passes): one line naming the field (NaN is out of every range)."""
    for f in fields(obj):
        v, meta = getattr(obj, f.name), f.metadata
        if v is None:
            continue
        if "choices" in meta and v not in meta["choices"]:
            raise BStarError(f"{f.name} must be one of {', '.join(meta['choices'])}, got {v!r}")
        if ("low" in meta or "high" in meta) and not within(v, meta.get("low"), meta.get("high")):
            raise BStarError(f"{f.name} must be {bounds_text(meta.get('low'), meta.get('high'))}, got {v!r}")


def within(value, low: float | None, high: float | None) -> bool:
    return (low is None or value >= low) and (high is None or value <= high)


def bounds_text(low: float | None, high: float | None) -> str:
    """'>= 1', '<= 2' or 'in [0, 1]'."""
    if low is not None and high is not None:
        return f"in [{low:g}, {high:g}]"
    return f">= {low:g}" if low is not None else f"<= {high:g}"
