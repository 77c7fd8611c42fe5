"""Paged-KV addressing shared by the Triton attention kernels (decode and prefill)."""

import triton
import triton.language as tl


def needs_64bit_offsets(*caches) -> bool:
    """True when a cache is too large for 32-bit element offsets."""
    return any(c.shape[0] * c.stride(0) >= 2**31 for c in caches)


@triton.jit
def paged_row_offsets(blk, offs_n, PAGE: tl.constexpr, stride_kb, stride_ks, stride_vb, stride_vs, OFF64: tl.constexpr):
    """Element offsets of the K and V rows of tokens `offs_n`, whose blocks `blk` were read from
    the block table. 32-bit unless OFF64: half the address registers when the cache allows."""
    if OFF64:
        blk = blk.to(tl.int64)
    slot = offs_n % PAGE
    return blk * stride_kb + slot * stride_ks, blk * stride_vb + slot * stride_vs
