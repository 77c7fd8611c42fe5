"""Every Triton launch of the engine goes through `launch`, so the compiled variants can be watched.

Triton compiles one binary per kernel variant: the constexpr values, the launch options
(num_warps, num_stages) and a specialisation of each runtime argument (an integer equal to 1 is
folded in, one divisible by 16 is marked so; a pointer is marked when 16-byte aligned), except
for arguments listed in the kernel's `do_not_specialize` / `do_not_specialize_on_alignment`.
Each new variant met at run time costs a compile (1-3 s on a GPU) and would break a CUDA graph
capture, so the engine warms every variant it will meet at start-up and must meet no other.

- `record_variants()` collects the variant key of every launch, computed by Triton's own binder
  on the real arguments. It works under TRITON_INTERPRET=1 on CPU tensors, where nothing is
  compiled, so CI can check which variants a run of the engine needs. With `run=False` launches
  are only recorded, not run (to sweep batch sizes 1..256 in milliseconds).
- `compiled_count()` counts the binaries Triton actually holds for the kernels launched so far
  (a GPU only; the interpreter compiles nothing): a generate call must leave it unchanged.
- `gpu_configs(t)` decides, for every wrapper, whether a launch on `t` takes a GPU's launch
  configs (tiles, rows per program, autotune candidates) or the interpreter's; `as_gpu()` makes
  CPU tensors take the GPU's, so bench/compile_check.py can record the exact launches a GPU
  would make and compile them for sm_90 on a machine without one.
"""

import contextlib
import functools
import inspect
import os

_recorder = None  # callable(kernel, args, kwargs) -> bool (run the launch?), while recording
_launched: dict[int, object] = {}  # kernels launched through `launch`, for compiled_count
_as_gpu = False  # as_gpu(): CPU tensors take the GPU's launch configs


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def gpu_configs(t) -> bool:
    """Whether a launch on tensor `t` takes a GPU's launch configs: a CUDA tensor outside the
    interpreter, or any tensor inside `as_gpu()`."""
    return _as_gpu or (t.is_cuda and not interpreting())


@contextlib.contextmanager
def as_gpu():
    """Launch configs of a GPU for CPU tensors (with record_variants(run=False): nothing runs)."""
    global _as_gpu
    old, _as_gpu = _as_gpu, True
    try:
        yield
    finally:
        _as_gpu = old


def launch(kernel, grid, *args, **kwargs):
    """kernel[grid](*args, **kwargs), seen by `record_variants` when it is active."""
    if id(kernel) not in _launched:
        _launched[id(kernel)] = kernel
    rec = _recorder
    if rec is not None and not rec(kernel, args, kwargs):
        return None
    if interpreting():
        kernel, kwargs = _one_config(kernel, args, kwargs)
    return kernel[grid](*args, **kwargs)


def _one_config(kernel, args, kwargs):
    """Under the interpreter, an autotuner whose candidates prune to one runs that config directly: Triton < 3.8
    times even a single candidate, which needs a GPU driver (nothing is timed in the interpreter anyway)."""
    from triton.runtime.autotuner import Autotuner

    if not isinstance(kernel, Autotuner):
        return kernel, kwargs
    kernel.nargs = dict(zip(kernel.arg_names, args))
    try:
        configs = kernel.prune_configs(kwargs)
    finally:
        kernel.nargs = None
    if len(configs) != 1:
        return kernel, kwargs
    return kernel.fn, {**kwargs, **configs[0].all_kwargs()}


def jit(**options):
    """triton.jit(**options), minus the options this Triton lacks (do_not_specialize_on_alignment
    came with Triton 3.2; older ones then specialise on alignment, costing at most a variant)."""
    import triton

    known = inspect.signature(triton.jit).parameters
    return triton.jit(**{k: v for k, v in options.items() if k in known})


def _jit_of(kernel):
    """The JITFunction (or interpreter stand-in) under an autotuner."""
    while hasattr(kernel, "fn") and not inspect.isfunction(kernel.fn):
        kernel = kernel.fn
    return kernel


@functools.cache
def _binder(kernel):
    """Triton's argument binder for the kernel's Python function, as a compiling JITFunction
    would build it (also under the interpreter, whose kernels are not JITFunctions)."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    jit = _jit_of(kernel)
    opts = getattr(jit, "kwargs", None)  # the interpreter's InterpretedFunction keeps them here
    if opts is not None:
        dns, dnsa = opts.get("do_not_specialize") or [], opts.get("do_not_specialize_on_alignment") or []
    else:
        dns, dnsa = jit.do_not_specialize or [], getattr(jit, "do_not_specialize_on_alignment", None) or []
    shadow = JITFunction(jit.fn, do_not_specialize=dns, do_not_specialize_on_alignment=dnsa)
    return shadow.fn.__name__, create_function_from_signature(shadow.signature, shadow.params, BaseBackend)


def _freeze(x):
    if isinstance(x, (list, tuple)):
        return tuple(_freeze(v) for v in x)
    if isinstance(x, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in x.items()))
    return x if isinstance(x, (int, float, str, bool, type(None))) else str(x)


def variant_key(kernel, args, kwargs) -> tuple:
    """(kernel name, specialisation, launch options): what decides which binary a launch needs.
    For an autotuned kernel the tuned constexprs are not included: they are fixed per autotune key,
    and the key's values (head dim, GQA group, page size, dtypes) are part of the specialisation."""
    name, binder = _binder(kernel)
    configs = getattr(kernel, "configs", None)  # an autotuner: its tuned constexprs are not in kwargs
    if configs:
        kwargs = {**configs[0].all_kwargs(), **kwargs}
    _, spec, options = binder(*args, **kwargs)
    return name, _freeze(spec), _freeze(options)


@contextlib.contextmanager
def record_variants(run: bool = True, launches: list | None = None):
    """Yields a dict {kernel name: set of variant keys} filled by every launch inside the block;
    with `launches`, each launch's (kernel, args, kwargs) is appended to it too."""
    global _recorder
    seen: dict[str, set] = {}

    def rec(kernel, args, kwargs):
        key = variant_key(kernel, args, kwargs)
        seen.setdefault(key[0], set()).add(key)
        if launches is not None:
            launches.append((kernel, args, kwargs))
        return run

    old, _recorder = _recorder, rec
    try:
        yield seen
    finally:
        _recorder = old


def compiled_count() -> int:
    """Binaries Triton has compiled so far for the kernels launched through `launch` (0 under the
    interpreter, which compiles nothing)."""
    n = 0
    for kernel in list(_launched.values()):
        jit = _jit_of(kernel)
        caches = getattr(jit, "device_caches", None)
        if caches is not None:  # triton >= 3.2: {device: (kernel_cache, ...)}
            n += sum(len(c[0]) for c in caches.values())
        elif isinstance(getattr(jit, "cache", None), dict):  # older: {device: {key: kernel}}
            n += sum(len(c) for c in jit.cache.values())
    return n


__all__ = [
    "jit",
    "launch",
    "record_variants",
    "variant_key",
    "compiled_count",
    "gpu_configs",
    "as_gpu",
    "interpreting",
]
