"""Triton RMSNorm (optionally fused with the residual add), neox-style rotary embedding, and
Qwen3's per-head q/k RMSNorm fused with the rotary.

All are one program per token row, memory bound: the fusion saves the separate passes torch
makes (add, square, mean, rsqrt, mul, mul; or slice, cat, mul, add per q and k). Rounding follows
the references step by step (sum rounded to the activation dtype, normalised value rounded
before the weight multiply, rotary products rounded before the add), so outputs agree to the
last bit or so, not just to a tolerance.
"""

import torch
import triton
import triton.language as tl

from kernels.launch import launch


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
    X, stride_xt, stride_xh, t, NH, HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr
):
    """The first and second halves of every head of token t, as float32 [BLOCK_HEADS, BLOCK_HALF]."""
    heads = tl.arange(0, BLOCK_HEADS)
    offs = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < NH) & (offs[None, :] < HALF)
    ptr = X + t * stride_xt + heads[:, None] * stride_xh + offs[None, :]
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    return x1, x2


@triton.jit
def _store_halves(OUT, stride_oh, o1, o2, NH, HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Store the halves of every head at OUT + head * stride_oh, cast to OUT's dtype."""
    heads = tl.arange(0, BLOCK_HEADS)
    offs = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < NH) & (offs[None, :] < HALF)
    optr = OUT + heads[:, None] * stride_oh + offs[None, :]
    tl.store(optr, o1.to(OUT.dtype.element_ty), mask=mask)
    tl.store(optr + HALF, o2.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _load_cos_sin(CS, pos, stride_cs, DT: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """cos, sin [BLOCK_HALF] of position pos, rounded to the activation dtype DT first (as the
    reference's .to(q.dtype)), then float32."""
    offs = tl.arange(0, BLOCK_HALF)
    m = offs < HALF
    cos = tl.load(CS + pos * stride_cs + offs, mask=m, other=0.0).to(DT).to(tl.float32)
    sin = tl.load(CS + pos * stride_cs + HALF + offs, mask=m, other=0.0).to(DT).to(tl.float32)
    return cos, sin


@triton.jit
def _rotate(x1, x2, cos, sin, DT: tl.constexpr):
    """out = x * cos + rotate_half(x) * sin per half, in dtype DT; cos/sin [BLOCK_HALF] float32
    already rounded to DT. Each product is rounded to DT before the add, as the eager reference."""
    o1 = ((x1 * cos[None, :]).to(DT).to(tl.float32) - (x2 * sin[None, :]).to(DT).to(tl.float32)).to(DT)
    o2 = ((x2 * cos[None, :]).to(DT).to(tl.float32) + (x1 * sin[None, :]).to(DT).to(tl.float32)).to(DT)
    return o1, o2


@triton.jit
def _rms_norm_halves(x1, x2, W, eps, XT: tl.constexpr, DT: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """RMSNorm of each head over its 2 * HALF values (weight W [2 * HALF]), as float32 values of DT.
    Rounds as qk_norm_rope_ref: normalised value to the input dtype XT, times the weight to DT."""
    offs = tl.arange(0, BLOCK_HALF)
    hm = offs < HALF
    rstd = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)[:, None]
    w1 = tl.load(W + offs, mask=hm, other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(W + HALF + offs, mask=hm, other=0.0).to(tl.float32)[None, :]
    n1 = (w1 * (x1 * rstd).to(XT).to(tl.float32)).to(DT).to(tl.float32)
    n2 = (w2 * (x2 * rstd).to(XT).to(tl.float32)).to(DT).to(tl.float32)
    return n1, n2


@triton.jit
def _rotate_heads(
    X,
    OUT,
    stride_xt,
    stride_xh,
    stride_ot,
    stride_oh,
    t,
    cos,
    sin,
    NH,
    HALF: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """out = x * cos + rotate_half(x) * sin for all heads of token t; cos/sin [BLOCK_HALF]."""
    x1, x2 = _load_halves(X, stride_xt, stride_xh, t, NH, HALF, BLOCK_HEADS, BLOCK_HALF)
    o1, o2 = _rotate(x1, x2, cos, sin, OUT.dtype.element_ty)
    _store_halves(OUT + t * stride_ot, stride_oh, o1, o2, NH, HALF, BLOCK_HEADS, BLOCK_HALF)


def _rotary_warps(hq: int, half: int) -> int:
    """Warps for a program holding [Hq, D/2] half-tiles: at most 4, and few enough that each
    thread holds 8 elements of a q half-tile, so its loads and stores are 16 bytes wide in 16-bit
    dtypes (a [16, 32] tile over 4 warps is 4 elements a thread: 8-byte accesses; sm_90 SASS,
    bench/compile_check.py)."""
    return max(1, min(4, triton.next_power_of_2(hq) * triton.next_power_of_2(half) // 256))


@triton.jit
def _rotary_kernel(
    Q,
    K,
    POS,
    CS,
    QO,
    KO,
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
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(POS + t).to(tl.int64)
    cos, sin = _load_cos_sin(CS, pos, stride_cs, QO.dtype.element_ty, HALF, BLOCK_HALF)
    _rotate_heads(Q, QO, stride_qt, stride_qh, stride_qot, stride_qoh, t, cos, sin, HQ, HALF, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(K, KO, stride_kt, stride_kh, stride_kot, stride_koh, t, cos, sin, HK, HALF, BLOCK_HK, BLOCK_HALF)


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
        half = D // 2
        launch(
            _rotary_kernel,
            (T,),
            q,
            k,
            positions.contiguous(),
            cs,
            qo,
            ko,
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
            HALF=half,
            BLOCK_HQ=triton.next_power_of_2(Hq),
            BLOCK_HK=triton.next_power_of_2(Hk),
            BLOCK_HALF=triton.next_power_of_2(half),
            num_warps=_rotary_warps(Hq, half),
        )
    return qo, ko


@triton.jit
def _norm_rotate_heads(
    X,
    W,
    OUT,
    stride_xt,
    stride_xh,
    stride_ot,
    stride_oh,
    t,
    cos,
    sin,
    NH,
    eps,
    HALF: tl.constexpr,
    BLOCK_HEADS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """RMSNorm of each head of token t (weight W [2 * HALF]), then the rotary; cos/sin
    [BLOCK_HALF] float32 (rounded to the output dtype here, as the reference)."""
    dt = OUT.dtype.element_ty
    x1, x2 = _load_halves(X, stride_xt, stride_xh, t, NH, HALF, BLOCK_HEADS, BLOCK_HALF)
    n1, n2 = _rms_norm_halves(x1, x2, W, eps, X.dtype.element_ty, dt, HALF, BLOCK_HALF)
    o1, o2 = _rotate(n1, n2, cos.to(dt).to(tl.float32), sin.to(dt).to(tl.float32), dt)
    _store_halves(OUT + t * stride_ot, stride_oh, o1, o2, NH, HALF, BLOCK_HEADS, BLOCK_HALF)


@triton.jit
def _qk_norm_rope_kernel(
    Q,
    K,
    QW,
    KW,
    POS,
    CS,
    QO,
    KO,
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
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(POS + t).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    m = offs < HALF
    cos = tl.load(CS + pos * stride_cs + offs, mask=m, other=0.0)
    sin = tl.load(CS + pos * stride_cs + HALF + offs, mask=m, other=0.0)
    _norm_rotate_heads(
        Q, QW, QO, stride_qt, stride_qh, stride_qot, stride_qoh, t, cos, sin, HQ, eps, HALF, BLOCK_HQ, BLOCK_HALF
    )
    _norm_rotate_heads(
        K, KW, KO, stride_kt, stride_kh, stride_kot, stride_koh, t, cos, sin, HK, eps, HALF, BLOCK_HK, BLOCK_HALF
    )


def qk_norm_rope_triton(q, k, q_weight, k_weight, eps, positions, cos_sin_cache):
    """Same contract as kernels.norm_rope.qk_norm_rope_ref; one program per token normalises and
    rotates all of its q and k heads (one read and one write of each, instead of four passes)."""
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
        half = D // 2
        launch(
            _qk_norm_rope_kernel,
            (T,),
            q,
            k,
            q_weight.contiguous(),
            k_weight.contiguous(),
            positions.contiguous(),
            cs,
            qo,
            ko,
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
            HALF=half,
            BLOCK_HQ=triton.next_power_of_2(Hq),
            BLOCK_HK=triton.next_power_of_2(Hk),
            BLOCK_HALF=triton.next_power_of_2(half),
            num_warps=_rotary_warps(Hq, half),
        )
    return qo, ko


__all__ = ["rms_norm_triton", "apply_rotary_triton", "qk_norm_rope_triton"]
