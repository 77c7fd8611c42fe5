"""Dense decode attention: each row's query heads against that row's own keys, stored contiguously.

The own part of the cascade decode path on CPU (kernels/cascade_attention.py): the rows' generated
tokens' K/V, kept in per-row buffers across steps. `dense_decode_attention` runs the C kernel
(dense_decode_attention_cpu.c, built by kernels/native.py) on float32 CPU tensors, else the torch
reference `dense_decode_attention_ref` (ATen's CPU flash attention).
"""

import ctypes
import functools

import torch

from bstar.kernels import native

_NEG_INF = float("-inf")
_MAX_HEADS, _MAX_DIM = 64, 256  # the C kernel's per-row scratch (MAX_HEADS, MAX_DIM there)


def attend(q, k, v, bias, scale):
    """Softmax attention that also returns the log-sum-exp of the scores.

    q [N, H, M, D], k/v [N, H, L, D] (any strides), bias float [N, 1, 1, L] additive, or None.
    Returns (out [N, H, M, D], lse [N, H, M]); a row whose keys are all masked gets out 0 and an
    lse the caller must overwrite with -inf.
    """
    flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if flash is not None and q.device.type == "cpu":
        # ATen's CPU flash kernel: one pass over K/V, and it hands back the lse we need to merge.
        out, lse = flash(q, k, v, attn_mask=bias, scale=scale)
        return out, lse
    s = (q @ k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.nan_to_num(neginf=0.0)[..., None])
    return p @ v, lse


def dense_decode_attention_ref(q, k, v, lens, scale):
    """q [B, H, G, D] (the G query heads of each KV head), k/v [B, L, H, D] (any strides),
    lens int64 [B] keys of each row (None: all L). Returns (out [B, H, G, D], lse [B, H, G]) in
    float32; a row with no keys gets out 0 and lse -inf."""
    L = k.shape[1]
    bias = None
    if lens is not None:
        bias = torch.zeros(len(lens), L, dtype=torch.float32, device=q.device).masked_fill_(
            torch.arange(L, device=q.device) >= lens[:, None], _NEG_INF
        )
        bias = bias.view(-1, 1, 1, L)
    out, lse = attend(q.float(), k.transpose(1, 2).float(), v.transpose(1, 2).float(), bias, scale)
    if lens is not None:  # rows with no key, masked without asking whether any (no host sync on CUDA)
        empty = (lens == 0).view(-1, 1, 1)
        out, lse = out.masked_fill(empty[..., None], 0.0), lse.masked_fill(empty, _NEG_INF)
    return out, lse


@functools.cache
def _kernel(lib: ctypes.CDLL):
    fn = lib.dense_decode_attention
    fn.restype = None
    i64, i32 = ctypes.c_int64, ctypes.c_int
    fn.argtypes = [ctypes.c_void_p] * 6 + [i64, i64, i32, i32, i32, i64, i64, i64, ctypes.c_float, i32]
    return fn


def native_fits(q, k, v, lens) -> bool:
    """Whether the C kernel takes these tensors: float32 on CPU, shapes that agree (it reads raw
    pointers: anything else goes to the reference, which raises), D contiguous, K and V alike."""
    B, H, G, D = q.shape
    return (
        q.device.type == "cpu"
        and q.dtype == k.dtype == v.dtype == torch.float32
        and k.dim() == 4
        and k.shape[0] == B
        and k.shape[2:] == (H, D)
        and v.shape == k.shape
        and k.stride() == v.stride()
        and k.stride(-1) == 1
        and H * G <= _MAX_HEADS
        and D <= _MAX_DIM
        and (lens is None or (lens.shape == (B,) and lens.dtype == torch.int64 and lens.is_contiguous()))
    )


def dense_decode_attention(q, k, v, lens, scale):
    """`dense_decode_attention_ref`'s contract; the C kernel where `native_fits` and it is built."""
    lib = native.load("dense_decode_attention") if native_fits(q, k, v, lens) else None
    if lib is None:
        return dense_decode_attention_ref(q, k, v, lens, scale)
    B, H, G, D = q.shape
    q = q.contiguous()
    out = torch.empty_like(q)
    lse = torch.empty(B, H, G, dtype=torch.float32)  # not the default dtype: the kernel writes float32
    _kernel(lib)(
        q.data_ptr(),
        k.data_ptr(),
        v.data_ptr(),
        out.data_ptr(),
        lse.data_ptr(),
        lens.data_ptr() if lens is not None else None,
        k.shape[1],
        B,
        H,
        G,
        D,
        k.stride(0),
        k.stride(1),
        k.stride(2),
        scale,
        torch.get_num_threads(),
    )
    return out, lse
