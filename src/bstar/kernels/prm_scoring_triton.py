"""Triton PRM step scoring: P(good) at step-tag rows from a two-row head, then per-candidate aggregates.

Only the S tagged rows of `hidden` are read (gathered by index) and dotted with the two head rows,
so no [tokens, vocab] (or even [tokens, 2]) logits exist: P(good) = softmax([l_good, l_bad])[0]
= sigmoid(l_good - l_bad). A second kernel reduces each candidate's contiguous run of steps
(step_candidate is non-decreasing) to min / last / prod / mean; a candidate without steps gets 0.
"""

import torch
import triton
import triton.language as tl

from bstar.kernels.contract import AGGREGATES
from bstar.kernels.launch import launch, traced

_AGG_CODE = {name: i for i, name in enumerate(AGGREGATES)}  # min 0, last 1, prod 2, mean 3


@triton.jit(do_not_specialize=["S"])  # the step count varies per call: one variant for all
def _prm_step_kernel(
    HIDDEN,
    TAG,
    W,
    BIAS,
    P_GOOD,
    S,
    H,
    stride_hid,
    stride_w,
    HAS_BIAS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    offs_s = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = offs_s < S
    rows = tl.load(TAG + offs_s, mask=mask_s, other=0).to(tl.int64)
    good = tl.zeros([BLOCK_S], tl.float32)
    bad = tl.zeros([BLOCK_S], tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        x = tl.load(
            HIDDEN + rows[:, None] * stride_hid + offs_h[None, :], mask=mask_s[:, None] & mask_h[None, :], other=0.0
        ).to(tl.float32)
        w_good = tl.load(W + offs_h, mask=mask_h, other=0.0).to(tl.float32)
        w_bad = tl.load(W + stride_w + offs_h, mask=mask_h, other=0.0).to(tl.float32)
        good += tl.sum(x * w_good[None, :], 1)
        bad += tl.sum(x * w_bad[None, :], 1)
    if HAS_BIAS:
        good += tl.load(BIAS).to(tl.float32)
        bad += tl.load(BIAS + 1).to(tl.float32)
    p = 1.0 / (1.0 + tl.exp(bad - good))  # exp overflow -> inf -> p = 0, as softmax gives
    tl.store(P_GOOD + offs_s, p, mask=mask_s)


@triton.jit
def _mul(a, b):
    return a * b


@triton.jit
def _prm_aggregate_kernel(P_GOOD, STARTS, OUT, AGG: tl.constexpr, BLOCK: tl.constexpr):
    c = tl.program_id(0)
    start = tl.load(STARTS + c)
    end = tl.load(STARTS + c + 1)
    lo = tl.full([BLOCK], float("inf"), tl.float32)
    prod = tl.full([BLOCK], 1.0, tl.float32)
    total = tl.zeros([BLOCK], tl.float32)
    for s0 in range(start, end, BLOCK):
        offs = s0 + tl.arange(0, BLOCK)
        mask = offs < end
        p = tl.load(P_GOOD + offs, mask=mask, other=1.0)
        lo = tl.minimum(lo, p)
        prod *= p
        total += tl.where(mask, p, 0.0)
    n = end - start
    if AGG == 0:
        res = tl.min(lo, 0)
    elif AGG == 1:
        res = tl.load(P_GOOD + tl.maximum(end - 1, 0), mask=n > 0, other=0.0)
    elif AGG == 2:
        res = tl.reduce(prod, 0, _mul)
    else:
        res = tl.sum(total, 0) / tl.maximum(n, 1).to(tl.float32)
    tl.store(OUT + c, tl.where(n > 0, res, 0.0))


@traced
def prm_step_scores_triton(hidden, tag_index, head_weight, head_bias, step_candidate, num_candidates, agg="min"):
    """Same contract as kernels.prm_scoring.prm_step_scores_ref."""
    if agg not in AGGREGATES:
        raise ValueError(f"unknown PRM aggregate {agg!r}; choose one of {AGGREGATES}")
    if hidden.dim() != 2 or head_weight.shape != (2, hidden.shape[1]):
        raise ValueError(
            f"expected hidden [T, H] and head_weight [2, H], got {tuple(hidden.shape)} and {tuple(head_weight.shape)}"
        )
    S = tag_index.shape[0]
    if step_candidate.shape != (S,):
        raise ValueError(f"step_candidate must be [S={S}], got {tuple(step_candidate.shape)}")
    if head_bias is not None and head_bias.shape != (2,):
        raise ValueError(f"head_bias must be [2], got {tuple(head_bias.shape)}")
    T, H = hidden.shape
    device = hidden.device
    cand = step_candidate.long().contiguous()
    tags = tag_index.long().contiguous()
    if S:
        # One host sync per scoring call (not per token): the kernels rely on these.
        bad = (
            (tags.min() < 0)
            | (tags.max() >= T)
            | (cand.min() < 0)
            | (cand.max() >= num_candidates)
            | (cand[1:] < cand[:-1]).any()
        )
        if bool(bad):
            raise ValueError(
                f"tag_index must lie in [0, {T}) and step_candidate must be non-decreasing in [0, {num_candidates})"
            )
    hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    head_weight = head_weight if head_weight.stride(-1) == 1 else head_weight.contiguous()

    p_good = torch.empty(S, dtype=torch.float32, device=device)
    out = torch.empty(num_candidates, dtype=torch.float32, device=device)
    if S:
        BLOCK_S, BLOCK_H = 16, min(256, triton.next_power_of_2(H))
        launch(
            _prm_step_kernel,
            (triton.cdiv(S, BLOCK_S),),
            hidden,
            tags,
            head_weight,
            head_bias if head_bias is not None else head_weight,
            p_good,
            S,
            H,
            hidden.stride(0),
            head_weight.stride(0),
            HAS_BIAS=head_bias is not None,
            BLOCK_S=BLOCK_S,
            BLOCK_H=BLOCK_H,
            num_warps=4,
        )
    if num_candidates:
        # starts[c] = first step of candidate c (steps are grouped by candidate)
        starts = torch.searchsorted(cand, torch.arange(num_candidates + 1, device=device, dtype=torch.long))
        launch(_prm_aggregate_kernel, (num_candidates,), p_good, starts, out, AGG=_AGG_CODE[agg], BLOCK=32, num_warps=1)
    return p_good, out


__all__ = ["prm_step_scores_triton"]
