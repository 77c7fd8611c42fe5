"""Triton paged decode attention (flash-decoding).

One query token per sequence against its paged KV cache. Decode is memory bound, so the design
goal is to read every K/V byte exactly once:

* one program per (sequence, KV head, split): the G query heads that share a KV head are
  processed together as the rows of one `tl.dot` tile, so each KV head is loaded once per group;
* split-KV: when batch * kv_heads programs do not fill whole waves of the GPU (wave_splits), the
  context is cut into `num_splits` ranges processed in parallel, each writing a normalised partial
  output and its log-sum-exp; a second small kernel merges them. With enough programs the split
  pass writes the final output directly and the merge kernel is skipped.

Block tables are gathered per token, so any page size works and many sequences may share blocks.
The launcher does no host synchronisation (CUDA-graph friendly): the split count is derived from
the block table's width, an upper bound of the context length.

No recompiles: the split count is a runtime argument (not specialised), the merge kernel loops
over the splits and `mid_lse` has a fixed split stride, so one compiled variant of each kernel
serves every batch size; the engine passes a full-width block table (stride fixed per engine).
The tile size and launch options come from `triton.autotune` over a pruned list, keyed on the GQA
group, head dim and page size (and dtypes); under the interpreter or on CPU tensors the list is
pruned to the single hand-picked default, so nothing is benchmarked there.
"""

import functools

import torch
import triton
import triton.language as tl

from bstar.kernels.contract import MAX_SPLITS, MIN_TOKENS_PER_SPLIT, wave_splits
from bstar.kernels.launch import gpu_configs, jit, launch, traced
from bstar.kernels.paged_triton import needs_64bit_offsets as _needs_64bit_offsets
from bstar.kernels.paged_triton import paged_row_offsets

_LOG2E = 1.4426950408889634


@jit(do_not_specialize=["num_splits", "min_split"], do_not_specialize_on_alignment=["BT", "SEQ"])
def _decode_split_kernel(
    Q,
    K,
    V,
    BT,
    SEQ,
    OUT,
    MID_O,
    MID_LSE,
    scale_log2,
    num_splits,
    min_split,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_bt,
    stride_ob,
    stride_oh,
    stride_mb,
    stride_mh,
    stride_ms,
    stride_lb,
    stride_lh,
    G: tl.constexpr,
    D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    OFF64: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(SEQ + b)
    # Every split of a sequence gets the same number of whole BLOCK_N tiles, at least min_split
    # tokens (a short sequence uses fewer splits; the programs of the others find nothing to do).
    split_len = tl.cdiv(tl.maximum(tl.cdiv(seq_len, num_splits), min_split), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_g = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < G
    mask_d = offs_d < D
    heads = kvh * G + offs_g  # query heads of this KV group
    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=mask_g[:, None] & mask_d[None, :],
        other=0.0,
    )
    q = q.to(K.dtype.element_ty)  # [BLOCK_H, BLOCK_D]

    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    bt_row = BT + b * stride_bt
    k_head = K + kvh * stride_kh
    v_head = V + kvh * stride_vh
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        blk = tl.load(bt_row + offs_n // PAGE, mask=mask_n, other=0)
        k_off, v_off = paged_row_offsets(blk, offs_n, PAGE, stride_kb, stride_ks, stride_vb, stride_vs, OFF64)
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_head + k_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [BLOCK_H, BLOCK_N], log2 units
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_head + v_off[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    safe_l = tl.where(l_i > 0, l_i, 1.0)
    o = acc / safe_l[:, None]
    omask = mask_g[:, None] & mask_d[None, :]
    if num_splits == 1:
        tl.store(
            OUT + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :], o.to(OUT.dtype.element_ty), mask=omask
        )
    else:
        tl.store(
            MID_O + b * stride_mb + heads[:, None] * stride_mh + split * stride_ms + offs_d[None, :], o, mask=omask
        )
        lse = tl.where(l_i > 0, m_i + tl.log2(safe_l), float("-inf"))  # log2 domain; -inf: empty split
        tl.store(MID_LSE + b * stride_lb + heads * stride_lh + split, lse, mask=mask_g)


@triton.jit(do_not_specialize=["num_splits"])
def _decode_merge_kernel(
    MID_O,
    MID_LSE,
    OUT,
    num_splits,
    stride_mb,
    stride_mh,
    stride_ms,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    D: tl.constexpr,
    MAX_S: tl.constexpr,
    TILE_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out = sum_s w_s o_s / sum_s w_s with w_s = 2^(lse_s - max lse), over the runtime number of
    splits (TILE_S partial outputs at a time)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, MAX_S)
    offs_t = tl.arange(0, TILE_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    lse_row = MID_LSE + b * stride_lb + h * stride_lh
    lse = tl.load(lse_row + offs_s, mask=offs_s < num_splits, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)  # all splits empty (seq_len 0): output zeros
    denom = tl.sum(tl.exp2(lse - m), 0)
    acc = tl.zeros([BLOCK_D], tl.float32)
    o_row = MID_O + b * stride_mb + h * stride_mh
    for s0 in range(0, num_splits, TILE_S):
        s = s0 + offs_t
        mask_s = s < num_splits
        w = tl.exp2(tl.load(lse_row + s, mask=mask_s, other=float("-inf")) - m)  # [TILE_S]
        o = tl.load(o_row + s[:, None] * stride_ms + offs_d[None, :], mask=mask_s[:, None] & mask_d[None, :], other=0.0)
        acc += tl.sum(o * w[:, None], 0)
    out = acc / tl.where(denom > 0, denom, 1.0)
    tl.store(OUT + b * stride_ob + h * stride_oh + offs_d, out.to(OUT.dtype.element_ty), mask=mask_d)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_num_splits(
    batch: int,
    kv_heads: int,
    max_context: int,
    device: torch.device,
    min_tokens_per_split: int = MIN_TOKENS_PER_SPLIT,
    max_splits: int = MAX_SPLITS,
) -> int:
    """wave_splits for batch x kv_heads programs on the device's SMs (132 off a GPU: an H100 SXM's or H200's)."""
    sms = (
        _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        if device.type == "cuda"
        else 132
    )
    return wave_splits(
        batch * kv_heads, max_context, sms, min_tokens_per_split=min_tokens_per_split, max_splits=max_splits
    )


def _config(D: int, dtype: torch.dtype):
    """The hand-picked default (BLOCK_N, num_warps, num_stages). ptxas (sm_90) reports no spills for
    any of these; a 16-bit D=128 program uses 142 registers with 32-token tiles (3 programs per SM,
    as sglang's grouped decode), D=64 uses 135 with 64-token tiles."""
    if dtype == torch.float32 or D > 128:
        return 16, 4, 2
    return (64 if D <= 64 else 32), 4, 2


# Candidates for the autotuner: the hand-picked default and two neighbours for each head dim
# (each candidate costs a compile at start-up, ~1 s).
_CONFIGS = [
    triton.Config({"BLOCK_N": n}, num_warps=w, num_stages=st)
    for n, w, st in [(16, 4, 2), (32, 4, 2), (64, 4, 2), (64, 4, 3), (32, 4, 3), (128, 8, 2)]
]
_CANDIDATES = {  # (D <= 64, D <= 128) -> configs as (BLOCK_N, num_warps, num_stages)
    64: [(64, 4, 2), (32, 4, 2), (128, 8, 2)],
    128: [(32, 4, 2), (32, 4, 3), (64, 4, 3)],
}


def _prune_configs(configs, nargs, **kwargs):
    D, dtype = kwargs["D"], nargs["K"].dtype
    default = _config(D, dtype)
    key = lambda c: (c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
    if not gpu_configs(nargs["K"]) or dtype == torch.float32 or D > 128:
        want = [default]  # nothing to time (CPU), or the fp32 / wide-head paths: the default only
    else:
        want = _CANDIDATES[64 if D <= 64 else 128]
    return [c for c in configs if key(c) in want]


_decode_split_tuned = triton.autotune(
    configs=_CONFIGS, key=["G", "D", "PAGE"], prune_configs_by={"early_config_prune": _prune_configs}
)(_decode_split_kernel)


@traced
def paged_decode_attention_triton(
    q, k_cache, v_cache, block_tables, seq_lens, scale=None, *, max_context=None, num_splits=None, block_n=None
):
    """Same contract as kernels.decode_attention.paged_decode_attention_ref.

    max_context: an upper bound of seq_lens known on the host (default: the block table's width);
    it caps the split count. Each sequence splits into pieces of at least MIN_TOKENS_PER_SPLIT
    tokens at run time, so a bound that is too high costs idle programs, not work.
    num_splits / block_n override the heuristics (tests use them to cover both code paths: an
    explicit split count is applied exactly; an explicit block_n skips the autotuner).
    """
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(
            f"expected q [B, Hq, D] and k/v caches [blocks, block_size, Hkv, D], got "
            f"q {tuple(q.shape)}, k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}"
        )
    B, Hq, D = q.shape
    _, page, Hkv, Dk = k_cache.shape
    if Dk != D or Hq % Hkv:
        raise ValueError(f"head dim {D} vs cache {Dk}, or Hq={Hq} not a multiple of Hkv={Hkv}")
    if block_tables.dim() != 2 or block_tables.shape[0] != B or seq_lens.shape != (B,):
        raise ValueError(
            f"block_tables must be [B={B}, max_blocks] and seq_lens [B], got "
            f"{tuple(block_tables.shape)} and {tuple(seq_lens.shape)}"
        )
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else float(scale)
    out = torch.empty_like(q)
    if B == 0:
        return out
    # Only the innermost (head-dim) stride is assumed to be 1.
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_cache = k_cache if k_cache.stride(-1) == 1 else k_cache.contiguous()
    v_cache = v_cache if v_cache.stride(-1) == 1 else v_cache.contiguous()
    seq_lens = seq_lens.contiguous()

    BLOCK_H = max(16, triton.next_power_of_2(G))  # tl.dot needs M >= 16
    BLOCK_D = max(16, triton.next_power_of_2(D))
    min_split = 1  # an explicit split count is applied as given
    if num_splits is None:
        context = block_tables.shape[1] * page if max_context is None else max_context
        num_splits = choose_num_splits(B, Hkv, context, q.device)
        min_split = MIN_TOKENS_PER_SPLIT
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")
    precision = "ieee" if k_cache.dtype == torch.float32 else "tf32"  # fp32 caches: no TF32 rounding

    # float32 partials in every case (one kernel signature); with one split they are not touched.
    mid_o = torch.empty(B, Hq, num_splits, D, dtype=torch.float32, device=q.device) if num_splits > 1 else None
    mid_lse = torch.empty(B, Hq, MAX_SPLITS, dtype=torch.float32, device=q.device) if num_splits > 1 else None
    if num_splits == 1:
        mid_o = mid_lse = torch.empty(1, dtype=torch.float32, device=q.device)
    mid_strides = (Hq * num_splits * D, num_splits * D, D, Hq * MAX_SPLITS, MAX_SPLITS)
    args = (
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        out,
        mid_o,
        mid_lse,
        scale * _LOG2E,
        num_splits,
        min_split,
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
        *mid_strides,
    )
    meta = dict(
        G=G,
        D=D,
        PAGE=page,
        BLOCK_H=BLOCK_H,
        BLOCK_D=BLOCK_D,
        PRECISION=precision,
        OFF64=_needs_64bit_offsets(k_cache, v_cache),
    )
    grid = (B, Hkv, num_splits)
    if block_n is None:
        launch(_decode_split_tuned, grid, *args, **meta)
    else:
        _, num_warps, num_stages = _config(D, k_cache.dtype)
        launch(_decode_split_kernel, grid, *args, **meta, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages)
    if num_splits > 1:
        launch(
            _decode_merge_kernel,
            (B, Hq),
            mid_o,
            mid_lse,
            out,
            num_splits,
            *mid_strides,
            out.stride(0),
            out.stride(1),
            D=D,
            MAX_S=MAX_SPLITS,
            TILE_S=8,
            BLOCK_D=BLOCK_D,
            num_warps=4 if BLOCK_D >= 128 else 2,
        )
    return out


__all__ = ["paged_decode_attention_triton", "choose_num_splits", "wave_splits", "MAX_SPLITS", "MIN_TOKENS_PER_SPLIT"]
