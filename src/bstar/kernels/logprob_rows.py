"""Top-1 prompt logprob entries from logits rows: the C kernel (logprob_rows_cpu.c, built by kernels/native.py)
for float32 CPU logits, in sampler.prompt_logprob_tensors' flat layout; None where it does not apply, and the
caller takes the torch path (runner/sampler.py), which is also the reference the kernel is tested against."""

import ctypes
import functools

import torch

from bstar.kernels import native


@functools.cache
def _kernel(lib: ctypes.CDLL):
    fn = lib.logprob_rows
    fn.restype = ctypes.c_int64
    i64 = ctypes.c_int64
    fn.argtypes = [ctypes.c_void_p, i64, i64, i64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    fn.argtypes += [ctypes.c_int]
    return fn


def logprob_rows(logits: torch.Tensor, targets: torch.Tensor):
    """(values [R * 2], ids [R * 2], ranks [R], 2) as prompt_logprob_tensors(logits, targets, want) with
    max(want) == 1 gives them (row r: the target's logprob and id, then the greedy token's; the target's
    rank), or None: not float32 rows on the CPU, no compiler, or a row with non-finite logits."""
    if logits.device.type != "cpu" or logits.dtype != torch.float32 or logits.dim() != 2 or logits.stride(-1) != 1:
        return None
    lib = native.load("logprob_rows")
    if lib is None:
        return None
    R, V = logits.shape
    targets = targets.to(torch.int64).contiguous()
    vals = torch.empty(R * 2, dtype=torch.float32)
    ids = torch.empty(R * 2, dtype=torch.int64)
    ranks = torch.empty(R, dtype=torch.int64)
    args = (logits.data_ptr(), R, V, logits.stride(0), targets.data_ptr(), vals.data_ptr(), ids.data_ptr())
    if _kernel(lib)(*args, ranks.data_ptr(), torch.get_num_threads()):
        return None
    return vals, ids, ranks, 2
