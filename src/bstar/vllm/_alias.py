"""The opt-in: `bstar.vllm.install()` makes `import vllm` (and every `vllm.x.y` this package mirrors) resolve
to bstar.vllm, and `importlib.metadata.version("vllm")` answer VLLM_API_VERSION, in this process only.

Both go through one finder on sys.meta_path: its find_spec aliases the module names, its
find_distributions answers for the "vllm" distribution (what importlib.metadata asks every finder).
Nothing is written to disk: no .pth file, no fake dist-info in site-packages. uninstall() undoes it.
"""

import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import sys

from bstar.engine.errors import UnsupportedError

_ALIAS, _TARGET = "vllm", "bstar.vllm"


class _AliasLoader(importlib.abc.Loader):
    """Hands out the already-imported bstar.vllm module under its vllm name (one module object, two names)."""

    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)

    def exec_module(self, module):
        pass  # (the target module ran when it was imported)


class _Distribution(importlib.metadata.Distribution):
    """The metadata of the "vllm" distribution: its name, version and top-level package, nothing else."""

    def read_text(self, filename):
        from bstar.vllm.version import VLLM_API_VERSION

        if filename == "METADATA":
            return f"Metadata-Version: 2.1\nName: vllm\nVersion: {VLLM_API_VERSION}\nSummary: bstar.vllm\n"
        if filename == "top_level.txt":
            return "vllm\n"
        return None

    def locate_file(self, path):
        return None


class VllmAliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != _ALIAS and not fullname.startswith(_ALIAS + "."):
            return None
        real = _TARGET + fullname[len(_ALIAS) :]
        if importlib.util.find_spec(real) is None:  # (mirrors only what exists: ModuleNotFoundError otherwise)
            return None
        is_pkg = hasattr(importlib.import_module(real), "__path__")
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(real), is_package=is_pkg)

    def find_distributions(self, context=None):
        name = getattr(context, "name", None)
        if name is None or name.lower().replace("_", "-") == "vllm":
            yield _Distribution()


def _finder() -> VllmAliasFinder | None:
    return next((f for f in sys.meta_path if isinstance(f, VllmAliasFinder)), None)


def real_vllm_present() -> str | None:
    """Where a real vLLM is (its module file or its distribution), or None."""
    mod = sys.modules.get(_ALIAS)
    if mod is not None and getattr(mod, "__name__", None) != _TARGET:
        return getattr(mod, "__file__", None) or "sys.modules['vllm']"
    spec = importlib.util.find_spec(_ALIAS) if mod is None and _finder() is None else None
    if spec is not None:
        return spec.origin or "an importable vllm"
    for dist in importlib.metadata.distributions(name="vllm"):
        if not isinstance(dist, _Distribution):
            return f"the installed vllm {dist.version} distribution"
    return None


def install():
    """Make `import vllm` and importlib.metadata's "vllm" resolve to bstar.vllm in this process. Idempotent.
    Refused (one line) when a real vLLM is installed: the two would shadow each other."""
    if _finder() is not None:
        return
    where = real_vllm_present()
    if where is not None:
        raise UnsupportedError(
            f"bstar.vllm.install(): a real vLLM is installed ({where}); uninstall it or import bstar.vllm directly"
        )
    sys.meta_path.insert(0, VllmAliasFinder())


def uninstall():
    """Undo install(): drop the finder and the vllm module names it made."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, VllmAliasFinder)]
    for name in [n for n in sys.modules if n == _ALIAS or n.startswith(_ALIAS + ".")]:
        if sys.modules[name].__name__.startswith(_TARGET):
            del sys.modules[name]
