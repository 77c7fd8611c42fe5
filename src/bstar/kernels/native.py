"""CPU kernels in C, compiled on first use for the ISA torch runs with, loaded with ctypes.

A `<name>_cpu.c` file in kernels/ is compiled once per (source, compiler flags) into
`<cache>/native/<name>-<hash>.so` (`$BSTAR_CACHE` or ~/.cache/bstar-engine; written to a temp
name and renamed, so concurrent processes are safe) with gcc (`$CC` to pick another):
-O3 -ffast-math (vectorised expf) -fopenmp, and the vector ISA of `torch.backends.cpu.get_cpu_capability()`,
so `ATEN_CPU_CAPABILITY=avx2` caps these kernels as it caps ATen's. Compiled and linked in two
steps: linked with -ffast-math, gcc < 13 adds a constructor that turns on flush-to-zero for the
whole process. OpenMP resolves to the libgomp torch has already loaded, so the kernels share
torch's thread pool.

No compiler, a failed compile or `BSTAR_CPU_NATIVE=0`: `load` returns None (with one warning for a
failure) and callers take their torch path.
"""

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

_HERE = Path(__file__).resolve().parent
_ISA_FLAGS = {
    "AVX2": ["-mavx2", "-mfma"],
    "AVX512": ["-mavx2", "-mfma", "-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq", "-mprefer-vector-width=512"],
}


def cache_root() -> Path:
    """The project's on-disk cache: `$BSTAR_CACHE` or ~/.cache/bstar-engine."""
    return Path(os.environ.get("BSTAR_CACHE") or Path.home() / ".cache" / "bstar-engine")


def enabled() -> bool:
    flag = os.environ.get("BSTAR_CPU_NATIVE", "1").strip().lower()
    if flag not in ("0", "1"):
        raise ValueError(f"BSTAR_CPU_NATIVE must be 0 or 1, got {flag!r}")
    return flag == "1"


def compile_flags() -> list[str]:
    isa = torch.backends.cpu.get_cpu_capability()  # "AVX2", "AVX512", "DEFAULT", or another architecture's
    return ["-O3", "-ffast-math", "-fopenmp", "-fPIC", *_ISA_FLAGS.get(isa, [])]


def load(name: str) -> ctypes.CDLL | None:
    """kernels/<name>_cpu.c compiled for this CPU (cached), or None where it cannot be built."""
    return _load(name, os.environ.get("CC") or "gcc", tuple(compile_flags())) if enabled() else None


@functools.cache  # per process: the first load's cache dir holds the library
def _load(name: str, cc: str, flags: tuple[str, ...]) -> ctypes.CDLL | None:
    src = _HERE / f"{name}_cpu.c"
    if shutil.which(cc) is None:
        return None  # no compiler: the torch path, silently (a normal state off Linux dev boxes)
    digest = hashlib.sha256(src.read_bytes() + " ".join([cc, *flags]).encode()).hexdigest()[:16]
    so = cache_root() / "native" / f"{name}-{digest}.so"
    try:
        if not so.is_file():
            so.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=so.parent) as tmp:
                obj, lib = Path(tmp) / f"{name}.o", Path(tmp) / f"{name}.so"
                compile_, link = [cc, *flags, "-c", src, "-o", obj], [cc, "-shared", "-fopenmp", obj, "-o", lib, "-lm"]
                for cmd in (compile_, link):
                    subprocess.run(cmd, check=True, capture_output=True, text=True)
                os.replace(lib, so)
        return ctypes.CDLL(str(so))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = e.stderr.strip().splitlines()[-1:] if isinstance(e, subprocess.CalledProcessError) else [str(e)]
        warnings.warn(f"CPU kernel {name} not built ({cc}: {' '.join(detail)}); using the torch path", stacklevel=3)
        return None
