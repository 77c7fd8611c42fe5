"""Triton rotary (+ Qwen3's q/k norm) fused with the K/V store: one program per block of tokens
(norm_rope_triton.token_tiles: on a GPU enough that every thread moves 16 bytes of k) rotates their
q heads (written out), rotates their k heads and writes them and their v heads straight into the
paged cache at each token's slot (none when the slot is negative). One launch and one read of q, k
and v, instead of two launches and a write and re-read of the rotated k.

The rotary and norm code is norm_rope_triton's, so rounding follows the references step by step
(k rounded in the activation dtype, then cast to the cache's as store_kv_ref does; no FMA
contraction, which a GPU compile would otherwise apply in float32).
"""

import torch
import triton
import triton.language as tl

from bstar.kernels.launch import launch, traced
from bstar.kernels.norm_rope_triton import (
    _load_cos_sin,
    _load_halves,
    _rms_norm_halves,
    _rotate,
    _round,
    _store_halves,
    rotary_launch,
)


@triton.jit(do_not_specialize=["T"])
def _rope_store_kv_kernel(
    Q,
    K,
    V,
    QW,
    KW,
    POS,
    CS,
    SLOTS,
    QO,
    KC,
    VC,
    T,
    HQ,
    HK,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_qot,
    stride_qoh,
    stride_cs,
    stride_kcb,
    stride_kcs,
    stride_kch,
    stride_vcb,
    stride_vcs,
    stride_vch,
    eps,
    QK_NORM: tl.constexpr,
    PAGE: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HQC: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T] tokens
    tm = t < T
    pos = tl.load(POS + t, mask=tm, other=0).to(tl.int64)
    slot = tl.load(SLOTS + t, mask=tm, other=-1).to(tl.int64)
    # q and k round in QO's dtype (the wrapper checks k's reference dtype is the same)
    dt = QO.dtype.element_ty
    cos, sin = _load_cos_sin(CS, pos, tm, stride_cs, HALF, BLOCK_HALF)
    cos, sin = _round(cos, dt), _round(sin, dt)
    # q finished before k is loaded: fewer live registers
    for h0 in tl.static_range(0, BLOCK_HQ, BLOCK_HQC):  # q heads in chunks (registers)
        q1, q2 = _load_halves(Q + h0 * stride_qh, t * stride_qt, tm, stride_qh, HQ - h0, HALF, BLOCK_HQC, BLOCK_HALF)
        if QK_NORM:
            q1, q2 = _rms_norm_halves(q1, q2, QW, eps, Q.dtype.element_ty, dt, HALF, BLOCK_HALF)
        q1, q2 = _rotate(q1, q2, cos, sin, dt)
        _store_halves(
            QO + h0 * stride_qoh, t * stride_qot, tm, stride_qoh, q1, q2, HQ - h0, HALF, BLOCK_HQC, BLOCK_HALF
        )
    # k and v into the cache row of each slot; a padded row (slot -1) reads and writes nothing
    sm = slot >= 0
    blk = slot // PAGE
    off = slot % PAGE
    k1, k2 = _load_halves(K, t * stride_kt, sm, stride_kh, HK, HALF, BLOCK_HK, BLOCK_HALF)
    if QK_NORM:
        k1, k2 = _rms_norm_halves(k1, k2, KW, eps, K.dtype.element_ty, dt, HALF, BLOCK_HALF)
    k1, k2 = _rotate(k1, k2, cos, sin, dt)
    _store_halves(KC, blk * stride_kcb + off * stride_kcs, sm, stride_kch, k1, k2, HK, HALF, BLOCK_HK, BLOCK_HALF)
    v1, v2 = _load_halves(V, t * stride_vt, sm, stride_vh, HK, HALF, BLOCK_HK, BLOCK_HALF)
    _store_halves(VC, blk * stride_vcb + off * stride_vcs, sm, stride_vch, v1, v2, HK, HALF, BLOCK_HK, BLOCK_HALF)


@traced
def rope_store_kv_triton(
    q,
    k,
    v,
    k_cache,
    v_cache,
    slot_mapping,
    positions,
    cos_sin_cache,
    q_weight=None,
    k_weight=None,
    eps=1e-6,
    *,
    tiles=None,
):
    """Same contract as kernels.rope_store.rope_store_kv_ref; returns the rotated q (a new tensor).

    tiles: (tokens per program, q heads per chunk, num_warps) instead of token_tiles' choice (the
    GPU benchmark compares the choice with one token a program)."""
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(
            f"rope_store_kv expects q [T, Hq, D] and k, v [T, Hkv, D], got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    T, Hq, D = q.shape
    Hk = k.shape[1]
    if D % 2 or cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != D or positions.shape != (T,):
        raise ValueError(
            f"rope_store_kv needs an even head dim, cos_sin_cache [max_pos, {D}] and positions [{T}], got "
            f"D={D}, {tuple(cos_sin_cache.shape)}, {tuple(positions.shape)}"
        )
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.shape[2:] != (Hk, D):
        raise ValueError(
            f"rope_store_kv expects caches [blocks, block_size, {Hk}, {D}], got {tuple(k_cache.shape)} "
            f"and {tuple(v_cache.shape)}"
        )
    if slot_mapping.shape != (T,):
        raise ValueError(f"rope_store_kv expects slot_mapping [{T}], got {tuple(slot_mapping.shape)}")
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("rope_store_kv needs the caches' head dim contiguous")
    qk_norm = q_weight is not None
    if qk_norm != (k_weight is not None):
        raise ValueError("rope_store_kv needs both q/k norm weights or neither")
    if qk_norm and (q_weight.shape != (D,) or k_weight.shape != (D,)):
        raise ValueError(f"q/k norm weights must be [{D}], got {tuple(q_weight.shape)} and {tuple(k_weight.shape)}")
    # One rounding dtype for q and k (the engine's case: both views of one projection, weights alike).
    if q.dtype != k.dtype or (qk_norm and q_weight.dtype != k_weight.dtype):
        raise ValueError(
            f"rope_store_kv needs q and k (and their norm weights) of one dtype, got q {q.dtype}, k {k.dtype}"
            + (f", weights {q_weight.dtype}, {k_weight.dtype}" if qk_norm else "")
        )
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    cs = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    # the reference's dtype: the norm's output promotes with its weight, the rotary keeps it
    qo = torch.empty(
        q.shape, dtype=torch.promote_types(q_weight.dtype, q.dtype) if qk_norm else q.dtype, device=q.device
    )
    if T:
        grid, options = rotary_launch(k, T, Hq, Hk, D, tiles)
        launch(
            _rope_store_kv_kernel,
            grid,
            q,
            k,
            v,
            q_weight.contiguous() if qk_norm else q,  # (unread without the norm)
            k_weight.contiguous() if qk_norm else q,
            positions.contiguous(),
            cs,
            slot_mapping.contiguous(),
            qo,
            k_cache,
            v_cache,
            T,
            Hq,
            Hk,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            qo.stride(0),
            qo.stride(1),
            cs.stride(0),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            v_cache.stride(0),
            v_cache.stride(1),
            v_cache.stride(2),
            float(eps),
            QK_NORM=qk_norm,
            PAGE=k_cache.shape[1],
            **options,
        )
    return qo


__all__ = ["rope_store_kv_triton"]
