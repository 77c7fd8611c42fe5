"""Config fields that carry their own help. `setting(default, help, ...)` is a dataclasses.field whose
metadata the command line reads (bstar.cli.options derives a command's options from the dataclass), so a
field's name, type, default and help are written once, beside the field: adding a field with its help is all
it takes to get an option."""

import functools
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, Field, field


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
    command line and back (e.g. a 'start:stop:step' grid). low / high: bounds the option checks."""
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
