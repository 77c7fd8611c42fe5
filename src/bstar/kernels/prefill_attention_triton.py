"""Triton paged prefill / extend attention.

The new tokens of B sequences are packed in q [T, Hq, D]; their K/V are already in the paged
cache. A query at position p attends keys 0..p of its own sequence: the cached prefix (shared
prompt, prefix-cache hit) plus the causal part of the new tokens.

One program per (query tile of BLOCK_M new tokens, query head, sequence), FlashAttention-2 style
online softmax. The key loop has two phases: keys strictly before the tile's first query need no
mask (that is the whole cached prefix, usually the bulk of the work), then the diagonal tiles
apply the causal mask. Query heads of one KV group are neighbours on the grid, so the K/V tiles
they share are served from L2.

The tile sizes and launch options come from `triton.autotune` over a pruned list keyed on the GQA
group, head dim and page size (and dtypes); under the interpreter or on CPU tensors the list is
pruned to the hand-picked default. The longest query length is passed from the host (the engine
knows it), so a launch does not synchronise; the per-sequence tensors are not specialised on
alignment (the engine passes views at any row offset), so one binary serves every batch.
"""

import torch
import triton
import triton.language as tl

from bstar.kernels.launch import gpu_configs, jit, launch, traced
from bstar.kernels.paged_triton import needs_64bit_offsets as _needs_64bit_offsets
from bstar.kernels.paged_triton import paged_row_offsets

_LOG2E = 1.4426950408889634


@jit(do_not_specialize_on_alignment=["BT", "CU_Q", "SEQ"])
def _prefill_kernel(
    Q,
    K,
    V,
    BT,
    CU_Q,
    SEQ,
    OUT,
    scale_log2,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bt,
    stride_ot,
    stride_oh,
    G: tl.constexpr,
    D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    OFF64: tl.constexpr,
):
    m_tile = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start = tl.load(CU_Q + b)
    q_len = tl.load(CU_Q + b + 1) - q_start
    if m_tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(SEQ + b)
    prefix = seq_len - q_len  # cached tokens before the first new token
    kvh = h // G

    offs_m = m_tile * BLOCK_M + tl.arange(0, BLOCK_M)  # index among the new tokens
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < q_len
    mask_d = offs_d < D
    qpos = prefix + offs_m  # absolute positions of the queries
    q = tl.load(
        Q + (q_start + offs_m)[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    ).to(K.dtype.element_ty)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    bt_row = BT + b * stride_bt
    k_head = K + kvh * stride_kh
    v_head = V + kvh * stride_vh

    first_q = prefix + m_tile * BLOCK_M
    unmasked_end = (first_q // BLOCK_N) * BLOCK_N  # keys < this are visible to every query of the tile
    end = tl.minimum(seq_len, first_q + BLOCK_M)

    # Phase 1: keys every query of the tile sees (no mask needed: all < first_q <= seq_len).
    for n0 in range(0, unmasked_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        blk = tl.load(bt_row + offs_n // PAGE)
        k_off, v_off = paged_row_offsets(blk, offs_n, PAGE, stride_kb, stride_ks, stride_vb, stride_vs, OFF64)
        k = tl.load(k_head + k_off[:, None] + offs_d[None, :], mask=mask_d[None, :], other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_head + v_off[:, None] + offs_d[None, :], mask=mask_d[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    # Phase 2: the diagonal, causal mask key <= query position.
    for n0 in range(unmasked_end, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        blk = tl.load(bt_row + offs_n // PAGE, mask=mask_n, other=0)
        k_off, v_off = paged_row_offsets(blk, offs_n, PAGE, stride_kb, stride_ks, stride_vb, stride_vs, OFF64)
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_head + k_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        visible = (offs_n[None, :] <= qpos[:, None]) & mask_n[None, :]
        s = tl.where(visible, s, float("-inf"))
        # Padded query rows (past q_len) may see no key at all; keep their max finite.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_head + v_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        OUT + (q_start + offs_m)[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
        o.to(OUT.dtype.element_ty),
        mask=mask_m[:, None] & mask_d[None, :],
    )


def _config(D: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for sm_90, chosen so that ptxas reports no register
    spills for the gathered (paged) K/V tiles at D=64/128 in fp16/bf16 and fp32 (bench/compile_check.py:
    fp32 at D=128 takes 16-row tiles, 32 spilled 656 bytes); D=256 is not checked."""
    if dtype == torch.float32:
        return (32 if D <= 64 else 16), 16, 4, 2
    if D <= 64:
        return 128, 64, 8, 2
    if D <= 128:
        return 128, 32, 8, 2
    return 64, 32, 8, 2


_CONFIGS = [
    triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
    for m, n, w, st in [
        (16, 16, 4, 2),
        (32, 16, 4, 2),
        (64, 32, 4, 3),
        (64, 32, 8, 2),
        (64, 64, 4, 3),
        (128, 32, 8, 2),
        (128, 64, 8, 2),
    ]
]
_CANDIDATES = {  # the hand-picked default and two neighbours per head dim (a compile each at start-up)
    64: [(128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 8, 2)],
    128: [(128, 32, 8, 2), (64, 32, 4, 3), (64, 64, 4, 3)],
}


def _prune_configs(configs, nargs, **kwargs):
    D, dtype = kwargs["D"], nargs["K"].dtype
    default = _config(D, dtype)
    key = lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
    if not gpu_configs(nargs["K"]) or dtype == torch.float32 or D > 128:
        want = [default]  # nothing to time (CPU), or the fp32 / wide-head paths: the default only
    else:
        want = _CANDIDATES[64 if D <= 64 else 128]
    return [c for c in configs if key(c) in want]


_prefill_tuned = triton.autotune(
    configs=_CONFIGS, key=["G", "D", "PAGE"], prune_configs_by={"early_config_prune": _prune_configs}
)(_prefill_kernel)


@traced
def paged_prefill_attention_triton(
    q,
    k_cache,
    v_cache,
    block_tables,
    cu_seqlens_q,
    seq_lens,
    scale=None,
    *,
    max_seqlen_q=None,
    block_m=None,
    block_n=None,
):
    """Same contract as kernels.prefill_attention.paged_prefill_attention_ref.

    max_seqlen_q: the longest new-token count (an upper bound will do); the engine passes it from
    the host. Without it it is read from cu_seqlens_q (one host sync).
    block_m / block_n override the tile sizes and skip the autotuner (tests use small tiles to cover
    several of them).
    """
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"expected q [T, Hq, D] and k/v caches [blocks, block_size, Hkv, D], got "
            f"q {tuple(q.shape)}, k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}"
        )
    T, Hq, D = q.shape
    _, page, Hkv, Dk = k_cache.shape
    if Dk != D or Hq % Hkv:
        raise ValueError(f"head dim {D} vs cache {Dk}, or Hq={Hq} not a multiple of Hkv={Hkv}")
    B = seq_lens.shape[0]
    if cu_seqlens_q.shape != (B + 1,) or block_tables.dim() != 2 or block_tables.shape[0] != B:
        raise ValueError(
            f"cu_seqlens_q must be [B+1={B + 1}] and block_tables [B, max_blocks], got "
            f"{tuple(cu_seqlens_q.shape)} and {tuple(block_tables.shape)}"
        )
    scale = D**-0.5 if scale is None else float(scale)
    out = torch.empty_like(q)
    if T == 0 or B == 0:
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_cache = k_cache if k_cache.stride(-1) == 1 else k_cache.contiguous()
    v_cache = v_cache if v_cache.stride(-1) == 1 else v_cache.contiguous()
    cu_seqlens_q = cu_seqlens_q.contiguous()
    seq_lens = seq_lens.contiguous()

    if max_seqlen_q is None:
        max_seqlen_q = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item())
    max_q = max(1, int(max_seqlen_q))
    args = (
        q,
        k_cache,
        v_cache,
        block_tables,
        cu_seqlens_q,
        seq_lens,
        out,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
    )
    meta = dict(
        G=Hq // Hkv,
        D=D,
        PAGE=page,
        BLOCK_D=max(16, triton.next_power_of_2(D)),
        PRECISION="ieee" if k_cache.dtype == torch.float32 else "tf32",
        OFF64=_needs_64bit_offsets(k_cache, v_cache),
    )
    if block_m is None and block_n is None:
        grid = lambda m: (triton.cdiv(max_q, m["BLOCK_M"]), Hq, B)
        launch(_prefill_tuned, grid, *args, **meta)
    else:
        cfg_m, cfg_n, num_warps, num_stages = _config(D, k_cache.dtype)
        BLOCK_M, BLOCK_N = block_m or cfg_m, block_n or cfg_n
        grid = (triton.cdiv(max_q, BLOCK_M), Hq, B)
        launch(
            _prefill_kernel,
            grid,
            *args,
            **meta,
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            num_warps=num_warps,
            num_stages=num_stages,
        )
    return out


__all__ = ["paged_prefill_attention_triton"]
