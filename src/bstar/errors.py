"""The product's base error, and the loop's data errors. The CLI prints a BStarError's message as one line
and exits non-zero; the engine's own errors (bstar.engine.errors) derive from it."""


class BStarError(Exception):
    """Base class: bad input, missing file, unsupported checkpoint, invalid option."""


class DataError(BStarError, ValueError):
    """A malformed data file (bad JSONL line, missing field); the message names file and line."""
