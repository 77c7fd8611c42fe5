"""Triton RMSNorm (optionally fused with the residual add), neox-style rotary embedding, and
Qwen3's per-head q/k RMSNorm fused with the rotary.

All are memory bound, the norm one program per token row, the rotary kernels one per block of
tokens (token_tiles): the fusion saves the separate passes torch makes (add, square, mean, rsqrt,
mul, mul; or slice, cat, mul, add per q and k). Rounding follows the references step by step (sum
rounded to the activation dtype, normalised value rounded before the weight multiply, rotary
products rounded before the add; the rotary kernels compiled without FMA contraction), so
outputs agree to the last bit or so, not just to a tolerance.
"""

import torch
import triton
import triton.language as tl

from bstar.kernels.launch import gpu_configs, launch, traced


@triton.jit
def _rms_norm_kernel(
    X,
    RES,
    W,
    OUT,
    RES_OUT,
    H,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    eps,
    HAS_RES: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_H)
    mask = offs < H
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(RES + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        xs = (x + r).to(RES_OUT.dtype.element_ty)  # x + residual in the activation dtype
        tl.store(RES_OUT + row * stride_ro + offs, xs, mask=mask)
        x = xs.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, 0) / H + eps)
    if HAS_RES:
        h = (x * rstd).to(RES_OUT.dtype.element_ty)
    else:
        h = (x * rstd).to(X.dtype.element_ty)
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row * stride_o + offs, (w * h.to(tl.float32)).to(OUT.dtype.element_ty), mask=mask)


@traced
def rms_norm_triton(x, weight, eps, residual=None):
    """Same contract as kernels.norm_rope.rms_norm_ref (x [..., H]); returns new tensors."""
    H = x.shape[-1]
    if weight.shape != (H,):
        raise ValueError(f"weight must be [{H}], got {tuple(weight.shape)}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} differs from x {tuple(x.shape)}")
    x2 = x.reshape(-1, H)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    rows = x2.shape[0]
    res_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = torch.empty(rows, H, dtype=torch.promote_types(weight.dtype, res_dtype), device=x.device)
    res_out = r2 = None
    if residual is not None:
        r2 = residual.reshape(-1, H)
        r2 = r2 if r2.stride(-1) == 1 else r2.contiguous()
        res_out = torch.empty(rows, H, dtype=res_dtype, device=x.device)
    if rows:
        BLOCK_H = triton.next_power_of_2(H)
        num_warps = 4 if BLOCK_H <= 1024 else (8 if BLOCK_H <= 4096 else 16)
        launch(
            _rms_norm_kernel,
            (rows,),
            x2,
            r2 if r2 is not None else x2,
            weight,
            out,
            res_out if res_out is not None else out,
            H,
            x2.stride(0),
            r2.stride(0) if r2 is not None else 0,
            out.stride(0),
            res_out.stride(0) if res_out is not None else 0,
            float(eps),
            HAS_RES=residual is not None,
            BLOCK_H=BLOCK_H,
            num_warps=num_warps,
        )
    out = out.view(x.shape)
    return out if residual is None else (out, res_out.view(x.shape))


@triton.jit
def _load_halves(
    X, rows, rmask, stride_xh, NH, HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr
):
    """The first and second halves of every head of a block of tokens, as float32
    [BLOCK_T, BLOCK_HEADS, BLOCK_HALF]; rows [BLOCK_T] are the tokens' offsets from X, rmask [BLOCK_T]
    the tokens to read (the others read as 0)."""
    heads = tl.arange(0, BLOCK_HEADS)
    offs = tl.arange(0, BLOCK_HALF)
    mask = rmask[:, None, None] & (heads[None, :, None] < NH) & (offs[None, None, :] < HALF)
    ptr = X + rows[:, None, None] + heads[None, :, None] * stride_xh + offs[None, None, :]
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    return x1, x2


@triton.jit
def _store_halves(
    OUT, rows, rmask, stride_oh, o1, o2, NH, HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr
):
    """Store the halves of every head at OUT + rows[t] + head * stride_oh for the tokens of rmask,
    cast to OUT's dtype."""
    heads = tl.arange(0, BLOCK_HEADS)
    offs = tl.arange(0, BLOCK_HALF)
    mask = rmask[:, None, None] & (heads[None, :, None] < NH) & (offs[None, None, :] < HALF)
    optr = OUT + rows[:, None, None] + heads[None, :, None] * stride_oh + offs[None, None, :]
    tl.store(optr, o1.to(OUT.dtype.element_ty), mask=mask)
    tl.store(optr + HALF, o2.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _load_cos_sin(CS, pos, tmask, stride_cs, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """cos, sin [BLOCK_T, BLOCK_HALF] float32 of positions pos [BLOCK_T] (tokens of tmask)."""
    offs = tl.arange(0, BLOCK_HALF)
    m = tmask[:, None] & (offs < HALF)[None, :]
    ptr = CS + pos[:, None] * stride_cs + offs[None, :]
    cos = tl.load(ptr, mask=m, other=0.0)
    sin = tl.load(ptr + HALF, mask=m, other=0.0)
    return cos, sin


@triton.jit
def _round(x, DT: tl.constexpr):
    """x rounded to dtype DT, as float32 (the reference's cos_sin.to(q.dtype))."""
    return x.to(DT).to(tl.float32)


@triton.jit
def _rotate(x1, x2, cos, sin, DT: tl.constexpr):
    """out = x * cos + rotate_half(x) * sin per half, in dtype DT; cos/sin [BLOCK_T, BLOCK_HALF]
    float32 already rounded to the reference's dtype (_round). Each product is rounded to DT before
    the add, as the eager reference."""
    c = cos[:, None, :]
    s = sin[:, None, :]
    o1 = ((x1 * c).to(DT).to(tl.float32) - (x2 * s).to(DT).to(tl.float32)).to(DT)
    o2 = ((x2 * c).to(DT).to(tl.float32) + (x1 * s).to(DT).to(tl.float32)).to(DT)
    return o1, o2


@triton.jit
def _rms_norm_halves(x1, x2, W, eps, XT: tl.constexpr, DT: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """RMSNorm of each head over its 2 * HALF values (weight W [2 * HALF]), as float32 values of DT.
    Rounds as qk_norm_rope_ref: normalised value to the input dtype XT, times the weight to DT."""
    # the weight as a whole tile like x1's (every head the same row): loaded 16 bytes a thread as
    # the rows are, where a [BLOCK_HALF] vector would be a few elements a thread (L1 serves the repeats)
    offs = tl.zeros(x1.shape, tl.int32) + tl.arange(0, BLOCK_HALF)[None, None, :]
    hm = offs < HALF
    rstd = tl.rsqrt((tl.sum(x1 * x1, 2) + tl.sum(x2 * x2, 2)) / (2 * HALF) + eps)[:, :, None]
    w1 = tl.load(W + offs, mask=hm, other=0.0).to(tl.float32)
    w2 = tl.load(W + HALF + offs, mask=hm, other=0.0).to(tl.float32)
    n1 = (w1 * (x1 * rstd).to(XT).to(tl.float32)).to(DT).to(tl.float32)
    n2 = (w2 * (x2 * rstd).to(XT).to(tl.float32)).to(DT).to(tl.float32)
    return n1, n2


def token_tiles(x, hq: int, hk: int, half: int) -> tuple[int, int, int]:
    """(tokens per program, q heads per chunk, num_warps) of the rotary kernels, which hold every
    head of BLOCK_T tokens as [BLOCK_T, heads, D/2] half-tiles, k whole and q in chunks.

    On a GPU: enough tokens and few enough warps that each thread holds 16 bytes of the k
    half-tile (8 elements in 16-bit dtypes), so every row load and store is 16 bytes wide (one 0.5B
    token is a [2, 32] half-tile: 64 elements, 2 a thread of one warp; sm_90 SASS,
    bench/compile_check.py), and q in chunks of at most 4x that (32 elements a half a thread) to
    bound registers in a large GQA group. Under the interpreter, whose cost is per op: 16 tokens
    a program, q in one chunk."""
    if not gpu_configs(x):
        return 16, triton.next_power_of_2(hq), 4
    per_thread = max(1, 16 // x.element_size())
    bk = triton.next_power_of_2(hk)
    k = bk * triton.next_power_of_2(half)
    block_t = max(1, 32 * per_thread // k)
    chunk = min(triton.next_power_of_2(hq), 4 * bk)
    return block_t, chunk, max(1, min(4, block_t * k // (32 * per_thread)))


def rotary_launch(x, T: int, hq: int, hk: int, d: int, tiles=None) -> tuple[tuple[int], dict]:
    """(grid, launch options) of the three rotary kernels (this file's two and kernels/rope_store_triton.py's):
    token_tiles' blocks (or `tiles`), power-of-2 head and half-dim blocks, and no FMA contraction."""
    half = d // 2
    block_t, chunk, warps = tiles or token_tiles(x, hq, hk, half)
    options = dict(
        HALF=half,
        BLOCK_T=block_t,
        BLOCK_HQ=triton.next_power_of_2(hq),
        BLOCK_HQC=chunk,
        BLOCK_HK=triton.next_power_of_2(hk),
        BLOCK_HALF=triton.next_power_of_2(half),
        num_warps=warps,
        # no FMA contraction of x1 * cos - x2 * sin (or the norm's sum of squares) in float32, which a
        # GPU compile would otherwise do: one rounding fewer than the torch reference (the interpreter
        # never fuses)
        enable_fp_fusion=False,
    )
    return (triton.cdiv(T, block_t),), options


@triton.jit(do_not_specialize=["T"])
def _rotary_kernel(
    Q,
    K,
    POS,
    CS,
    QO,
    KO,
    T,
    HQ,
    HK,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_qot,
    stride_qoh,
    stride_kot,
    stride_koh,
    stride_cs,
    HALF: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HQC: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < T
    pos = tl.load(POS + t, mask=tm, other=0).to(tl.int64)
    cos, sin = _load_cos_sin(CS, pos, tm, stride_cs, HALF, BLOCK_HALF)
    cos, sin = _round(cos, QO.dtype.element_ty), _round(sin, QO.dtype.element_ty)  # to q's dtype, as the reference
    for h0 in tl.static_range(0, BLOCK_HQ, BLOCK_HQC):  # q heads in chunks (registers)
        q1, q2 = _load_halves(Q + h0 * stride_qh, t * stride_qt, tm, stride_qh, HQ - h0, HALF, BLOCK_HQC, BLOCK_HALF)
        q1, q2 = _rotate(q1, q2, cos, sin, QO.dtype.element_ty)
        _store_halves(
            QO + h0 * stride_qoh, t * stride_qot, tm, stride_qoh, q1, q2, HQ - h0, HALF, BLOCK_HQC, BLOCK_HALF
        )
    k1, k2 = _load_halves(K, t * stride_kt, tm, stride_kh, HK, HALF, BLOCK_HK, BLOCK_HALF)
    k1, k2 = _rotate(k1, k2, cos, sin, KO.dtype.element_ty)
    _store_halves(KO, t * stride_kot, tm, stride_koh, k1, k2, HK, HALF, BLOCK_HK, BLOCK_HALF)


@traced
def apply_rotary_triton(q, k, positions, cos_sin_cache):
    """Same contract as kernels.norm_rope.apply_rotary_ref; returns new (q, k)."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"expected q [T, Hq, D] and k [T, Hkv, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    T, Hq, D = q.shape
    Hk = k.shape[1]
    if D % 2 or cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != D or positions.shape != (T,):
        raise ValueError(
            f"need an even head dim, cos_sin_cache [max_pos, {D}] and positions [{T}], got "
            f"D={D}, {tuple(cos_sin_cache.shape)}, {tuple(positions.shape)}"
        )
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    cs = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    qo, ko = torch.empty_like(q), torch.empty_like(k)
    if T:
        grid, options = rotary_launch(q, T, Hq, Hk, D)
        launch(
            _rotary_kernel,
            grid,
            q,
            k,
            positions.contiguous(),
            cs,
            qo,
            ko,
            T,
            Hq,
            Hk,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            qo.stride(0),
            qo.stride(1),
            ko.stride(0),
            ko.stride(1),
            cs.stride(0),
            **options,
        )
    return qo, ko


@triton.jit
def _norm_rotate_heads(
    X,
    W,
    OUT,
    rows,
    orows,
    tm,
    stride_xh,
    stride_oh,
    cos,
    sin,
    NH,
    eps,
    HALF: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """RMSNorm of each head of a block of tokens (weight W [2 * HALF]), then the rotary; cos/sin
    [BLOCK_T, BLOCK_HALF] float32 (rounded to the output dtype here, as the reference)."""
    dt = OUT.dtype.element_ty
    x1, x2 = _load_halves(X, rows, tm, stride_xh, NH, HALF, BLOCK_HEADS, BLOCK_HALF)
    n1, n2 = _rms_norm_halves(x1, x2, W, eps, X.dtype.element_ty, dt, HALF, BLOCK_HALF)
    o1, o2 = _rotate(n1, n2, _round(cos, dt), _round(sin, dt), dt)
    _store_halves(OUT, orows, tm, stride_oh, o1, o2, NH, HALF, BLOCK_HEADS, BLOCK_HALF)


@triton.jit(do_not_specialize=["T"])
def _qk_norm_rope_kernel(
    Q,
    K,
    QW,
    KW,
    POS,
    CS,
    QO,
    KO,
    T,
    HQ,
    HK,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_qot,
    stride_qoh,
    stride_kot,
    stride_koh,
    stride_cs,
    eps,
    HALF: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HQC: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    tm = t < T
    pos = tl.load(POS + t, mask=tm, other=0).to(tl.int64)
    cos, sin = _load_cos_sin(CS, pos, tm, stride_cs, HALF, BLOCK_HALF)
    for h0 in tl.static_range(0, BLOCK_HQ, BLOCK_HQC):  # q heads in chunks (registers)
        _norm_rotate_heads(
            Q + h0 * stride_qh,
            QW,
            QO + h0 * stride_qoh,
            t * stride_qt,
            t * stride_qot,
            tm,
            stride_qh,
            stride_qoh,
            cos,
            sin,
            HQ - h0,
            eps,
            HALF,
            BLOCK_HQC,
            BLOCK_HALF,
        )
    _norm_rotate_heads(
        K,
        KW,
        KO,
        t * stride_kt,
        t * stride_kot,
        tm,
        stride_kh,
        stride_koh,
        cos,
        sin,
        HK,
        eps,
        HALF,
        BLOCK_HK,
        BLOCK_HALF,
    )


@traced
def qk_norm_rope_triton(q, k, q_weight, k_weight, eps, positions, cos_sin_cache):
    """Same contract as kernels.norm_rope.qk_norm_rope_ref; one program per block of tokens
    normalises and rotates all of their q and k heads (one read and one write of each, instead of
    four passes)."""
    if q.dim() != 3 or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"expected q [T, Hq, D] and k [T, Hkv, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    T, Hq, D = q.shape
    Hk = k.shape[1]
    if D % 2 or cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] != D or positions.shape != (T,):
        raise ValueError(
            f"need an even head dim, cos_sin_cache [max_pos, {D}] and positions [{T}], got "
            f"D={D}, {tuple(cos_sin_cache.shape)}, {tuple(positions.shape)}"
        )
    if q_weight.shape != (D,) or k_weight.shape != (D,):
        raise ValueError(f"q/k norm weights must be [{D}], got {tuple(q_weight.shape)} and {tuple(k_weight.shape)}")
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    cs = cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
    # the reference's dtypes: the norm's output promotes with its weight, the rotary keeps it
    qo = torch.empty(q.shape, dtype=torch.promote_types(q_weight.dtype, q.dtype), device=q.device)
    ko = torch.empty(k.shape, dtype=torch.promote_types(k_weight.dtype, k.dtype), device=k.device)
    if T:
        grid, options = rotary_launch(q, T, Hq, Hk, D)
        launch(
            _qk_norm_rope_kernel,
            grid,
            q,
            k,
            q_weight.contiguous(),
            k_weight.contiguous(),
            positions.contiguous(),
            cs,
            qo,
            ko,
            T,
            Hq,
            Hk,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            qo.stride(0),
            qo.stride(1),
            ko.stride(0),
            ko.stride(1),
            cs.stride(0),
            float(eps),
            **options,
        )
    return qo, ko


__all__ = ["rms_norm_triton", "apply_rotary_triton", "qk_norm_rope_triton"]
