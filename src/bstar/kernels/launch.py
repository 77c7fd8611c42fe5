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
- `record_calls()` collects every call of a Triton wrapper (the `*_triton` functions, marked
  `@traced`) as a JSON-able spec: each tensor's shape, strides, dtype and 16-byte alignment, the
  other arguments as given. `replay_call(spec)` makes that call again on CPU tensors of the same
  layout: bench/gpu_check.py's dry run records the engine's calls, and bench/compile_check.py
  replays them inside `as_gpu()`, so it compiles what the engine launches (a tiny model's head dim
  16 in fp32, page size 8, a 320-token vocabulary, one-block tables), not a list kept by hand.
"""

import contextlib
import functools
import inspect
import os

_recorder = None  # callable(kernel, args, kwargs) -> bool (run the launch?), while recording
_launched: dict[int, object] = {}  # kernels launched through `launch`, for compiled_count
_as_gpu = False  # as_gpu(): CPU tensors take the GPU's launch configs
_calls: list | None = None  # record_calls(): the traced wrapper calls, as specs
_depth = 0  # traced calls in progress (a wrapper calling another records the outer call only)


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
    """kernel[grid](*args, **kwargs), seen by `record_variants` when it is active.

    An autotuned kernel goes through `Autotuner.run` once per tuning key (its key arguments' values and
    its tensors' dtypes, as the autotuner keys its own cache); the config that run chose is kept here and
    later launches with that key call the tuned function directly with it: Autotuner.run builds an
    argument dict and a str(dtype) per argument on every launch, a few microseconds each eager step."""
    if id(kernel) not in _launched:
        _launched[id(kernel)] = kernel
    rec = _recorder
    if rec is not None and not rec(kernel, args, kwargs):
        return None
    keys = getattr(kernel, "keys", None)
    if keys is None:
        return kernel[grid](*args, **kwargs)
    key = _tuning_key(kernel, keys, args, kwargs)
    config = _tuned.get(key)
    if config is None and interpreting() and times_a_lone_candidate():
        config = _tuned[key] = _only_config(kernel, args, kwargs)
    if config is not None:
        return kernel.fn[grid](*args, **kwargs, **config)
    out = kernel[grid](*args, **kwargs)
    best = kernel.best_config
    if best.pre_hook is None:  # (a config with a hook must run it: through the autotuner every time)
        _tuned[key] = best.all_kwargs()
    return out


_tuned: dict[tuple, dict] = {}  # launch(): (autotuner, tuning key, GPU configs?) -> its chosen config's kwargs


def _tuning_key(kernel, keys, args, kwargs) -> tuple:
    names = kernel.arg_names
    given = len(args)  # (a key argument left to its default is not in the key, as in Autotuner.run)
    values = [kwargs[k] if k in kwargs else args[names.index(k)] for k in keys if k in kwargs or names.index(k) < given]
    tensors = [a for a in args if hasattr(a, "dtype")] + [v for v in kwargs.values() if hasattr(v, "dtype")]
    # (the pruning that picks the candidates also depends on whether the launch takes GPU configs)
    return (id(kernel), *values, *(t.dtype for t in tensors), gpu_configs(tensors[0]) if tensors else None)


@functools.cache
def times_a_lone_candidate() -> bool:
    """Triton < 3.8's Autotuner.run benchmarks even one candidate left after pruning (a GPU driver's timer)."""
    import triton

    return tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 8)


def _only_config(kernel, args, kwargs) -> dict | None:
    """Under the interpreter, the kwargs of an autotuner's one candidate left after pruning (None: several):
    Triton < 3.8 times even a single candidate, which needs a GPU driver (the interpreter times nothing)."""
    kernel.nargs = dict(zip(kernel.arg_names, args))
    try:
        configs = kernel.prune_configs(kwargs)
    finally:
        kernel.nargs = None
    return configs[0].all_kwargs() if len(configs) == 1 and configs[0].pre_hook is None else None


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


def _arg_spec(x):
    import torch

    if isinstance(x, torch.Tensor):
        return {
            "tensor": str(x.dtype).removeprefix("torch."),
            "shape": list(x.shape),
            "stride": list(x.stride()),
            "align": x.storage_offset() * x.element_size() % 16,  # (the data_ptr % 16 a binder sees)
        }
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise TypeError(f"cannot record an argument of type {type(x).__name__}")


def traced(fn):
    """Mark a Triton wrapper: record_calls() sees its calls."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        global _depth
        if _calls is None:  # (the hot path: one global read)
            return fn(*args, **kwargs)
        if _depth == 0:
            try:
                spec = dict(
                    fn=f"{fn.__module__}:{fn.__name__}",
                    args=[_arg_spec(a) for a in args],
                    kwargs={k: _arg_spec(v) for k, v in kwargs.items()},
                )
            except TypeError:
                spec = None
            if spec is not None and spec not in _calls:
                _calls.append(spec)
        _depth += 1
        try:
            return fn(*args, **kwargs)
        finally:
            _depth -= 1

    return wrapper


@contextlib.contextmanager
def record_calls():
    """Yields a list filled with the spec of every distinct traced wrapper call inside the block."""
    global _calls
    old, _calls = _calls, []
    try:
        yield _calls
    finally:
        mine, _calls = _calls, old
        if old is not None:  # (nested: the outer recorder sees them too)
            old += [c for c in mine if c not in old]


def _build_arg(spec):
    import torch

    if not isinstance(spec, dict):
        return spec
    dtype = getattr(torch, spec["tensor"])
    size = dtype.itemsize
    offset = spec["align"] // size
    extent = 1 + sum((n - 1) * st for n, st in zip(spec["shape"], spec["stride"]) if n > 0)
    if 0 in spec["shape"]:
        extent = 0
    base = torch.zeros(offset + extent, dtype=dtype)
    return base.as_strided(spec["shape"], spec["stride"], offset)


def replay_call(spec):
    """Call the recorded wrapper again on zero-filled CPU tensors of the recorded layout (inside
    as_gpu() and record_variants(run=False): the launches a GPU would make, none run)."""
    import importlib

    module, name = spec["fn"].split(":")
    fn = getattr(importlib.import_module(module), name)
    return fn(*[_build_arg(a) for a in spec["args"]], **{k: _build_arg(v) for k, v in spec["kwargs"].items()})


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
    "traced",
    "record_calls",
    "replay_call",
]
