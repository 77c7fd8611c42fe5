"""Names a package exports that load their module on first use (PEP 562), so importing the package costs
nothing heavy: bstar.engine, bstar.vllm and bstar.train export their names this way."""

import importlib
import sys
from collections.abc import Callable


def lazy_names(package: str, module_of: dict[str, str], shown: str | None = None) -> tuple[Callable, Callable]:
    """The package's module-level `__getattr__` and `__dir__`: `module_of` maps each exported name to the
    module that defines it; `shown` names the package in the AttributeError (default: its import name)."""
    namespace = vars(sys.modules[package])

    def __getattr__(name: str):
        if name not in module_of:
            raise AttributeError(f"module {shown or repr(package)} has no attribute {name!r}")
        value = getattr(importlib.import_module(module_of[name]), name)
        namespace[name] = value  # later lookups skip this function
        return value

    def __dir__():
        return sorted(set(namespace) | set(module_of))

    return __getattr__, __dir__
