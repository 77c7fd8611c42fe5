"""Triton fused sampling: temperature, min-p, top-k, top-p and a seeded draw, without sorting.

Each row (one program per row on a GPU) streams its logits in vocabulary tiles:

1. statistics: max and log-sum-exp of the raw logits (for the reported logprob and greedy
   argmax) and of the temperature-scaled logits x; min-p is then a closed-form threshold,
   x >= max(x) + log(min_p);
2. top-k threshold: bisection on the 32-bit ordered key of x (float bits mapped to an int32
   whose order is the float order) for the largest key c with count(x >= c) >= k; exact in at
   most 32 passes, and it stops as soon as a probe keeps exactly k tokens. Min-p and top-k both
   keep the largest values, so min-p then top-k keeps x above the larger of the two thresholds;
3. top-p threshold over the distribution renormalised on what min-p and top-k kept (vLLM's
   order): bisection on the same keys for the largest c whose kept mass sum(p_i : x_i >= c) is
   still >= top_p; a token is then kept iff the mass strictly above it is < top_p, exactly the
   sorted-cumsum rule of the reference. It stops as soon as the probe set is the answer (its mass
   without its smallest member is < top_p);
4. the draw: Gumbel-max over the allowed tokens, argmax of x - log(-log(u)) with one Philox
   uniform u = `tl.rand(seed, token id)` per token, so a row's draw depends only on its seed and
   logits: deterministic, batch-independent, exact in distribution. (The reference draws by
   inverse CDF from one hashed uniform per row: the same distribution, not the same tokens.)

Passes 2 and 3 only run for rows that use top-k / top-p; greedy rows only run pass 1. Ties at a
threshold keep every tied token (so does the reference's top-k alone; with top-p on, its sort
keeps an arbitrary subset of them).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _ordered_key(x):
    """float32 -> int32 with the same order (for non-NaN x): flip the magnitude bits of negatives."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _sample_kernel(
    LOGITS,
    TEMP,
    TOPK,
    TOPP,
    MINP,
    SEEDS,
    TOKENS,
    LOGPROBS,
    B,
    V,
    stride_row,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """BLOCK_R rows per program (1 on GPU; many under the interpreter, whose cost is per op).
    Per-row state is a [BLOCK_R] vector; a bisection loop runs until every row has converged
    (a converged row probes mid == lo, which leaves it unchanged)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < B
    base = LOGITS + rows.to(tl.int64)[:, None] * stride_row  # [BLOCK_R, 1]
    temp = tl.load(TEMP + rows, mask=rmask, other=1.0).to(tl.float32)
    top_k = tl.load(TOPK + rows, mask=rmask, other=0).to(tl.int32)
    top_p = tl.load(TOPP + rows, mask=rmask, other=1.0).to(tl.float32)
    min_p = tl.load(MINP + rows, mask=rmask, other=0.0).to(tl.float32)
    seed = tl.load(SEEDS + rows, mask=rmask, other=0)[:, None]
    greedy = temp <= 0.0
    t_row = tl.maximum(temp, 1e-6)  # [BLOCK_R]
    t = t_row[:, None]  # [BLOCK_R, 1], divides the logit tiles
    offs = tl.arange(0, BLOCK_V)
    NEG_INF: tl.constexpr = float("-inf")

    # ---- pass 1: raw max / argmax / sum-exp, and sum-exp of x = raw / t (same argmax) ----
    m = tl.full([BLOCK_R], NEG_INF, tl.float32)
    s_raw = tl.zeros([BLOCK_R], tl.float32)
    s_x = tl.zeros([BLOCK_R], tl.float32)
    arg = tl.zeros([BLOCK_R], tl.int32)
    for v0 in range(0, V, BLOCK_V):
        idx = v0 + offs[None, :]
        valid = rmask[:, None] & (idx < V)
        raw = tl.load(base + idx, mask=valid, other=NEG_INF).to(tl.float32)
        tile_max = tl.max(raw, 1)
        tile_arg = v0 + tl.argmax(raw, 1)
        arg = tl.where(tile_max > m, tile_arg, arg)  # strict: first index wins ties, like torch
        m_new = tl.maximum(m, tile_max)
        m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
        mx_safe = m_safe / t_row
        s_raw = s_raw * tl.exp(m - m_safe) + tl.sum(tl.exp(raw - m_safe[:, None]), 1)
        s_x = s_x * tl.exp(m / t_row - mx_safe) + tl.sum(tl.exp(raw / t - mx_safe[:, None]), 1)
        m = m_new
    mx = m / t_row  # max of x (division is monotone, so exactly the max of raw / t)
    top_key = _ordered_key(mx).to(tl.int64)
    use_min_p = min_p > 0.0
    min_x = tl.where(use_min_p, mx + tl.log(tl.minimum(tl.maximum(min_p, 1e-30), 1.0)), NEG_INF)
    min_key = tl.where(use_min_p, _ordered_key(min_x).to(tl.int64), top_key * 0 - 2147483648)

    # ---- pass 2: top-k threshold key (largest c with count(key >= c) >= k) ----
    use_k = (top_k > 0) & (top_k < V) & (~greedy) & rmask
    lo = top_key * 0 - 2147483648  # count(key >= lo) = V >= k
    hi = tl.where(use_k, top_key + 1, lo + 1)  # count(key >= hi) = 0 < k
    while tl.max(hi - lo, 0) > 1:
        mid = lo + (hi - lo) // 2
        cnt = tl.zeros([BLOCK_R], tl.int32)
        for v0 in range(0, V, BLOCK_V):
            idx = v0 + offs[None, :]
            valid = rmask[:, None] & (idx < V)
            x = tl.load(base + idx, mask=valid, other=NEG_INF).to(tl.float32) / t
            cnt += tl.sum(((_ordered_key(x) >= mid[:, None]) & valid).to(tl.int32), 1)
        take = cnt >= top_k
        lo = tl.where(take, mid, lo)
        hi = tl.where(take, tl.where(cnt == top_k, mid + 1, hi), mid)  # exactly k kept: done
    k_key = tl.maximum(lo, min_key)  # min-p first: top-k among the min-p survivors

    # mass of the min-p / top-k set (relative to exp(mx)): the top-p normaliser
    need_zk = (use_k | use_min_p) & (top_p < 1.0)
    z_k = tl.where(need_zk, 0.0, s_x)
    if tl.max(need_zk.to(tl.int32), 0) > 0:
        for v0 in range(0, V, BLOCK_V):
            idx = v0 + offs[None, :]
            valid = rmask[:, None] & (idx < V)
            x = tl.load(base + idx, mask=valid, other=NEG_INF).to(tl.float32) / t
            sel = (_ordered_key(x) >= k_key[:, None]) & valid & need_zk[:, None]
            z_k += tl.sum(tl.where(sel, tl.exp(x - mx[:, None]), 0.0), 1)

    # ---- pass 3: top-p threshold key (largest c with mass(key >= c) >= top_p * z_k) ----
    use_p = (top_p < 1.0) & (~greedy) & rmask
    target = top_p * z_k
    lo = k_key
    hi = tl.where(use_p, top_key + 1, lo + 1)
    while tl.max(hi - lo, 0) > 1:
        mid = lo + (hi - lo) // 2
        mass = tl.zeros([BLOCK_R], tl.float32)
        smallest = tl.full([BLOCK_R], float("inf"), tl.float32)
        for v0 in range(0, V, BLOCK_V):
            idx = v0 + offs[None, :]
            valid = rmask[:, None] & (idx < V)
            x = tl.load(base + idx, mask=valid, other=NEG_INF).to(tl.float32) / t
            sel = (_ordered_key(x) >= mid[:, None]) & valid
            mass += tl.sum(tl.where(sel, tl.exp(x - mx[:, None]), 0.0), 1)
            smallest = tl.minimum(smallest, tl.min(tl.where(sel, x, float("inf")), 1))
        take = mass >= target
        exact = mass - tl.exp(smallest - mx) < target  # the probe set is exactly the top-p set
        lo = tl.where(take, mid, lo)
        hi = tl.where(take, tl.where(exact, mid + 1, hi), mid)
    keep_key = lo

    # ---- the Gumbel-max draw ----
    best = tl.full([BLOCK_R], NEG_INF, tl.float32)
    token = arg
    if tl.min(greedy.to(tl.int32), 0) == 0:
        for v0 in range(0, V, BLOCK_V):
            idx = v0 + offs[None, :]
            valid = rmask[:, None] & (idx < V)
            x = tl.load(base + idx, mask=valid, other=NEG_INF).to(tl.float32) / t
            allowed = valid & (_ordered_key(x) >= keep_key[:, None]) & (x >= min_x[:, None]) & (~greedy)[:, None]
            u = tl.rand(seed, idx)  # Philox on (row seed, token id); u == 0 gives -inf noise (prob. 0)
            score = tl.where(allowed, x - tl.log(-tl.log(u)), NEG_INF)
            tile_best = tl.max(score, 1)
            tile_arg = v0 + tl.argmax(score, 1)
            token = tl.where(tile_best > best, tile_arg, token)
            best = tl.maximum(best, tile_best)

    raw_tok = tl.load(LOGITS + rows.to(tl.int64) * stride_row + token, mask=rmask, other=0.0).to(tl.float32)
    tl.store(TOKENS + rows, token.to(tl.int64), mask=rmask)
    tl.store(LOGPROBS + rows, raw_tok - m - tl.log(s_raw), mask=rmask)


def sample_triton(logits, temperature, top_k, top_p, min_p, seeds, *, block_v=None, block_r=None):
    """Same contract as kernels.sampling.sample_ref (same distribution, not the same random stream).

    block_v / block_r override the vocabulary tile and rows per program (tests cover several tiles).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got {tuple(logits.shape)}")
    B, V = logits.shape
    for name, t in (
        ("temperature", temperature),
        ("top_k", top_k),
        ("top_p", top_p),
        ("min_p", min_p),
        ("seeds", seeds),
    ):
        if t.shape != (B,):
            raise ValueError(f"{name} must have shape [B={B}], got {tuple(t.shape)}")
    tokens = torch.empty(B, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(B, dtype=torch.float32, device=logits.device)
    if B == 0:
        return tokens, logprobs
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    BLOCK_V = block_v or min(2048, triton.next_power_of_2(V))
    # One row per program on a GPU; the interpreter's cost is per op, so it takes many rows at once.
    BLOCK_R = block_r or (1 if logits.is_cuda else min(256, triton.next_power_of_2(B)))
    _sample_kernel[(triton.cdiv(B, BLOCK_R),)](
        logits,
        temperature.contiguous(),
        top_k.contiguous(),
        top_p.contiguous(),
        min_p.contiguous(),
        seeds.to(torch.int64).contiguous(),
        tokens,
        logprobs,
        B,
        V,
        logits.stride(0),
        BLOCK_R=BLOCK_R,
        BLOCK_V=BLOCK_V,
        num_warps=8 if BLOCK_V >= 2048 else 4,
    )
    return tokens, logprobs


__all__ = ["sample_triton"]
