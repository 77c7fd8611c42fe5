"""A command's options derived from a config dataclass (RunConfig for `run`, SFTConfig for `sft`, SamplingParams
for `generate`'s sampling), as nano-vllm filters keywords through `fields(Config)`: each field's name, type,
default and help (its bstar.utils.settings.setting metadata) are written once, beside the field. A field
`max_per_query: int | None` becomes `--max-per-query INTEGER`; a bool becomes `--name/--no-name`; a list, a
repeatable option or, with a parse function, one text form (a 'start:stop:step' grid); a tuple, several values.
Every option shows its default in --help, and a bad value is one line naming the option (BStarError: the group
prints it, exit 1)."""

import dataclasses
import typing
from collections.abc import Callable, Iterable

import click
from click.core import ParameterSource

from bstar.errors import BStarError
from bstar.utils.settings import bounds_text, field_default, field_type, within


def option_name(field_name: str) -> str:
    """The option of a field: max_per_query -> --max-per-query."""
    return "--" + field_name.replace("_", "-")


def config_options(
    cls,
    *,
    covered: Iterable[str] = (),
    only: Iterable[str] | None = None,
    defaults: dict | None = None,
    alternative: tuple[str, object] | None = None,
) -> Callable:
    """A decorator adding one option per field of the dataclass `cls`, in field order: every field but the
    `covered` ones (the command sets those from options of its own), or `only` those named. `defaults`: the
    command's own defaults for some fields (generate: 256 new tokens, not SamplingParams' 16). `alternative`:
    (label, an instance of cls) whose values --help shows beside the defaults where they differ (the built-in
    task's run settings)."""
    defaults = defaults or {}
    base = cls() if alternative is not None else None
    decorators = []
    for f in dataclasses.fields(cls):
        if f.name in covered or (only is not None and f.name not in only):
            continue
        default = defaults.get(f.name, field_default(f))
        shown = show_value(f, default)
        if alternative is not None and getattr(alternative[1], f.name) != getattr(base, f.name):
            shown += f"; {alternative[0]}: {show_value(f, getattr(alternative[1], f.name))}"
        decorators.append(_option(f, field_type(cls, f.name)[0], default, shown))

    def decorate(fn):
        for d in reversed(decorators):  # click lists a command's options in decoration order, last applied first
            fn = d(fn)
        return fn

    return decorate


def config_values(cls, values: dict) -> dict:
    """The fields of `cls` among a command's parsed `values`, as the dataclass takes them: a repeatable option
    as a list (given none, the field's default)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            v = values[f.name]
            out[f.name] = (list(v) or field_default(f)) if isinstance(v, tuple) and _repeatable(cls, f.name) else v
    return out


def _repeatable(cls, name: str) -> bool:
    """A list of strings or numbers (or one string, or a list of them): given as a repeated option."""
    kind = field_type(cls, name)[0]
    return typing.get_origin(kind) is list or list[str] in typing.get_args(kind)


def given_options(values: dict, ctx: click.Context | None = None) -> dict:
    """Those of `values` given on the command line, not left at their defaults."""
    ctx = ctx or click.get_current_context()
    unset = (None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)
    return {k: v for k, v in values.items() if ctx.get_parameter_source(k) not in unset}


def show_value(f: dataclasses.Field, value) -> str:
    """A field's value as --help shows it (as it would be typed, where it can be)."""
    meta = f.metadata
    if value is None:
        return meta.get("unset", "none")
    if "show" in meta:
        return meta["show"](value)
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return " ".join(show_value(f, v) for v in value)
    if isinstance(value, list):
        return ", ".join(show_value(f, v) for v in value) or "none"
    if isinstance(value, str) and (not value or any(c.isspace() and c != " " for c in value)):
        return repr(value)
    return str(value)


def _option(f: dataclasses.Field, kind, default, shown: str) -> Callable:
    meta, decls = f.metadata, [option_name(f.name), f.name]
    if list[str] in typing.get_args(kind):  # one string or a list of them (SamplingParams.stop): a list
        kind = list[str]
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    attrs, text = dict(default=default), meta.get("help", "")
    if kind is bool:
        decls[0] = f"{decls[0]}/--no-{decls[0][2:]}"
    elif "choices" in meta:
        attrs["type"] = _Choice(meta["choices"])
    elif "parse" in meta:
        attrs["type"] = _Parsed(meta["parse"])
    elif origin is list:
        attrs.update(type=_Scalar(args[0]), multiple=True, default=tuple(default or ()))
        text += "" if "repeatable" in text else " (repeatable)"
    elif origin is tuple:
        attrs["type"] = click.Tuple([_Scalar(a) for a in args])
    elif kind in (int, float, str):
        attrs["type"] = _Scalar(kind, meta.get("low"), meta.get("high"))
    else:
        raise TypeError(f"{f.name}: no command-line form for {kind}; give it a parse function (setting(parse=...))")
    # the default in the help text, as typed (click's show_default would wrap a text in parentheses)
    return click.option(*decls, help=f"{text}  [default: {shown}]".lstrip(), **attrs)


def _fail(param: click.Parameter | None, what: str, value) -> None:
    name = param.opts[0] if param is not None and param.opts else "a value"
    raise BStarError(f"{name} must be {what}, got {value!r}")


class _Scalar(click.ParamType):
    """An int, float or str from the command line, within [low, high] where given."""

    def __init__(self, kind: type, low: float | None = None, high: float | None = None):
        self.kind, self.low, self.high = kind, low, high
        self.name = {int: "integer", float: "float", str: "text"}[kind]

    def convert(self, value, param, ctx):
        v = value
        if isinstance(value, str) and self.kind is not str:
            try:
                v = self.kind(value)
            except ValueError:
                _fail(param, "an integer" if self.kind is int else "a number", value)
        if (self.low, self.high) != (None, None) and not within(v, self.low, self.high):
            _fail(param, bounds_text(self.low, self.high), v)
        return v


class _Choice(click.Choice):
    """One of the field's choices; anything else is one line naming them."""

    def convert(self, value, param, ctx):
        if value not in self.choices:
            _fail(param, f"one of {', '.join(self.choices)}", value)
        return value


class _Parsed(click.ParamType):
    """A list field written as text (a grid); its default passes as the list it is."""

    name = "grid"

    def __init__(self, parse: Callable[[str], list]):
        self.parse = parse

    def convert(self, value, param, ctx):
        return self.parse(value) if isinstance(value, str) else list(value)
