"""Triton KV store: a program writes the K and V rows (all KV heads) of BLOCK_T new tokens into the
paged cache, cast to the cache dtype; a token whose slot is negative (a padded CUDA-graph row)
writes nothing. One launch instead of two `index_copy_`, and no host sync. One token per program
on a GPU (a few when a token has fewer than 256 K elements, so that each thread moves 16 bytes);
many under the interpreter, whose cost is per op."""

import triton
import triton.language as tl

from bstar.kernels.launch import gpu_configs, launch, traced


@triton.jit(do_not_specialize=["T"])
def _store_kv_kernel(
    K,
    V,
    KC,
    VC,
    SLOTS,
    T,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kcb,
    stride_kcs,
    stride_kch,
    stride_vcb,
    stride_vcs,
    stride_vch,
    H: tl.constexpr,
    D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_HD: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    slot = tl.load(SLOTS + t, mask=t < T, other=-1).to(tl.int64)
    blk = slot // PAGE
    off = slot % PAGE
    hd = tl.arange(0, BLOCK_HD)  # (head, dim) flattened
    h = hd // D
    d = hd % D
    mask = (slot >= 0)[:, None] & (hd < H * D)[None, :]
    k = tl.load(K + t[:, None] * stride_kt + (h * stride_kh + d)[None, :], mask=mask, other=0.0)
    v = tl.load(V + t[:, None] * stride_vt + (h * stride_vh + d)[None, :], mask=mask, other=0.0)
    kc = KC + (blk * stride_kcb + off * stride_kcs)[:, None] + (h * stride_kch + d)[None, :]
    vc = VC + (blk * stride_vcb + off * stride_vcs)[:, None] + (h * stride_vch + d)[None, :]
    tl.store(kc, k.to(KC.dtype.element_ty), mask=mask)
    tl.store(vc, v.to(VC.dtype.element_ty), mask=mask)


@traced
def store_kv_triton(k, v, k_cache, v_cache, slot_mapping):
    """Same contract as kernels.kv_store.store_kv_ref."""
    if k.dim() != 3 or k.shape != v.shape or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"expected k, v [T, Hkv, D] and caches [blocks, block_size, Hkv, D], got k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}, caches {tuple(k_cache.shape)}, {tuple(v_cache.shape)}"
        )
    T, H, D = k.shape
    if k_cache.shape[2:] != (H, D) or slot_mapping.shape != (T,):
        raise ValueError(f"cache heads/dim {tuple(k_cache.shape[2:])} vs k ({H}, {D}), or slot_mapping not [{T}]")
    if T == 0:
        return
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("the caches' head dim must be contiguous")
    # GPU: one token a program, or the few tokens that give each thread of the warp 8 elements
    # (16-byte accesses in 16-bit dtypes; one 0.5B token is 128 elements: 8-byte accesses)
    BLOCK_T = max(1, 256 // triton.next_power_of_2(H * D)) if gpu_configs(k) else 64
    launch(
        _store_kv_kernel,
        (triton.cdiv(T, BLOCK_T),),
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping.contiguous(),
        T,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        H=H,
        D=D,
        PAGE=k_cache.shape[1],
        BLOCK_T=BLOCK_T,
        BLOCK_HD=triton.next_power_of_2(H * D),
        num_warps=1 if H * D <= 512 else 4,
    )


__all__ = ["store_kv_triton"]
