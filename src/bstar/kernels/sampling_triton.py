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

Small batches (at most SPLIT_VOCAB_MAX_ROWS rows) spread each row's vocabulary over programs: with
one program per row, a batch of 1-8 rows at vocabulary 151,936 keeps only a few SMs busy. The
split path runs four short kernels:
  a. per (row, vocabulary chunk): max, argmax and the two sums-exp of pass 1, over the chunk;
  b. per row: combine the chunks' statistics, then min-p and passes 2-3 as above (top-k / top-p
     rows still scan their whole row here: the bisections need whole-row counts);
  c. per (row, chunk): the Gumbel-max draw over the chunk's allowed tokens;
  d. per row: the best chunk's token (the first on ties, as argmax), and its logprob.
Same noise per token id, same thresholds, so the split path draws the same tokens as the row
kernel (up to rounding in the top-p normaliser, a sum taken in another order).

No recompiles: the batch size is not specialised; tile sizes depend only on the vocabulary size
and the device (under the interpreter, whose cost is per op, programs take many rows at once,
with a row count fixed per path).
"""

import torch
import triton
import triton.language as tl

from bstar.kernels.launch import gpu_configs, launch, traced

SPLIT_VOCAB_MAX_ROWS = 64  # batches up to this many rows take the split-vocabulary path


@triton.jit
def _ordered_key(x):
    """float32 -> int32 with the same order (for non-NaN x): flip the magnitude bits of negatives."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _min_p_threshold(mx, min_p):
    """Min-p (relative to the most likely token), first as in vLLM: (min_x, min_key), the
    smallest allowed x = raw / t and its ordered key (the lowest key when min-p is off)."""
    use_min_p = min_p > 0.0
    min_x = tl.where(use_min_p, mx + tl.log(tl.minimum(tl.maximum(min_p, 1e-30), 1.0)), float("-inf"))
    key = _ordered_key(min_x).to(tl.int64)
    return min_x, tl.where(use_min_p, key, key * 0 - 2147483648)


@triton.jit
def _thresholds(
    base,
    rmask,
    t,
    mx,
    s_x,
    greedy,
    top_k,
    top_p,
    min_p,
    min_key,
    V,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Passes 2-3 for [BLOCK_R] rows after min-p (_min_p_threshold): keep_key. A token x is
    allowed iff ordered_key(x) >= keep_key and x >= min_x. mx: max of x = raw / t; s_x: sum
    exp(x - mx)."""
    offs = tl.arange(0, BLOCK_V)
    NEG_INF: tl.constexpr = float("-inf")
    top_key = _ordered_key(mx).to(tl.int64)
    use_min_p = min_p > 0.0

    # ---- pass 2: top-k threshold key (largest c with count(key >= c) >= k) ----
    use_k = (top_k > 0) & (top_k < V) & (~greedy) & rmask
    lo = top_key * 0 - 2147483648  # count(key >= lo) = V >= k
    hi = tl.where(use_k, top_key + 1, lo + 1)  # count(key >= hi) = 0 < k
    while tl.max(hi - lo, 0) > 1:
        mid = lo + (hi - lo) // 2
        # lo <= mid <= top_key: a probe fits in int32, so the tiles compare 32-bit keys (the int64
        # bounds only keep hi - lo and top_key + 1 from overflowing)
        mid32 = mid.to(tl.int32)
        cnt = tl.zeros([BLOCK_R], tl.int32)
        for v0 in range(0, V, BLOCK_V):
            idx = v0 + offs[None, :]
            valid = rmask[:, None] & (idx < V)
            x = tl.load(base + idx, mask=valid, other=NEG_INF).to(tl.float32) / t
            cnt += tl.sum(((_ordered_key(x) >= mid32[:, None]) & valid).to(tl.int32), 1)
        take = cnt >= top_k
        lo = tl.where(take, mid, lo)
        hi = tl.where(take, tl.where(cnt == top_k, mid + 1, hi), mid)  # exactly k kept: done
    k_key = tl.maximum(lo, min_key)  # min-p first: top-k among the min-p survivors
    k_key32 = k_key.to(tl.int32)  # lo and min_key are both at most top_key

    # mass of the min-p / top-k set (relative to exp(mx)): the top-p normaliser
    need_zk = (use_k | use_min_p) & (top_p < 1.0)
    z_k = tl.where(need_zk, 0.0, s_x)
    if tl.max(need_zk.to(tl.int32), 0) > 0:
        for v0 in range(0, V, BLOCK_V):
            idx = v0 + offs[None, :]
            valid = rmask[:, None] & (idx < V)
            x = tl.load(base + idx, mask=valid, other=NEG_INF).to(tl.float32) / t
            sel = (_ordered_key(x) >= k_key32[:, None]) & valid & need_zk[:, None]
            z_k += tl.sum(tl.where(sel, tl.exp(x - mx[:, None]), 0.0), 1)

    # ---- pass 3: top-p threshold key (largest c with mass(key >= c) >= top_p * z_k) ----
    use_p = (top_p < 1.0) & (~greedy) & rmask
    target = top_p * z_k
    lo = k_key
    hi = tl.where(use_p, top_key + 1, lo + 1)
    while tl.max(hi - lo, 0) > 1:
        mid = lo + (hi - lo) // 2
        mid32 = mid.to(tl.int32)  # k_key <= mid <= top_key
        mass = tl.zeros([BLOCK_R], tl.float32)
        smallest = tl.full([BLOCK_R], float("inf"), tl.float32)
        for v0 in range(0, V, BLOCK_V):
            idx = v0 + offs[None, :]
            valid = rmask[:, None] & (idx < V)
            x = tl.load(base + idx, mask=valid, other=NEG_INF).to(tl.float32) / t
            sel = (_ordered_key(x) >= mid32[:, None]) & valid
            mass += tl.sum(tl.where(sel, tl.exp(x - mx[:, None]), 0.0), 1)
            smallest = tl.minimum(smallest, tl.min(tl.where(sel, x, float("inf")), 1))
        take = mass >= target
        exact = mass - tl.exp(smallest - mx) < target  # the probe set is exactly the top-p set
        lo = tl.where(take, mid, lo)
        hi = tl.where(take, tl.where(exact, mid + 1, hi), mid)
    return lo


@triton.jit(do_not_specialize=["B"])
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

    min_x, min_key = _min_p_threshold(mx, min_p)
    keep_key = _thresholds(base, rmask, t, mx, s_x, greedy, top_k, top_p, min_p, min_key, V, BLOCK_R, BLOCK_V)

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


# ----------------------------------------------------------------------------- split vocabulary


@triton.jit(do_not_specialize=["B"])
def _chunk_stats_kernel(
    LOGITS,
    TEMP,
    M,
    ARG,
    SRAW,
    SX,
    B,
    V,
    stride_row,
    CHUNK: tl.constexpr,
    NC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """(a) pass 1 over one vocabulary chunk of BLOCK_R rows: stats [B, NC] at column chunk."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1)
    rmask = rows < B
    base = LOGITS + rows.to(tl.int64)[:, None] * stride_row
    t_row = tl.maximum(tl.load(TEMP + rows, mask=rmask, other=1.0).to(tl.float32), 1e-6)
    t = t_row[:, None]
    offs = tl.arange(0, BLOCK_V)
    NEG_INF: tl.constexpr = float("-inf")
    m = tl.full([BLOCK_R], NEG_INF, tl.float32)
    s_raw = tl.zeros([BLOCK_R], tl.float32)
    s_x = tl.zeros([BLOCK_R], tl.float32)
    arg = tl.zeros([BLOCK_R], tl.int32)
    start = c * CHUNK
    for v0 in range(start, start + CHUNK, BLOCK_V):
        idx = v0 + offs[None, :]
        valid = rmask[:, None] & (idx < V)
        raw = tl.load(base + idx, mask=valid, other=NEG_INF).to(tl.float32)
        tile_max = tl.max(raw, 1)
        tile_arg = v0 + tl.argmax(raw, 1)
        arg = tl.where(tile_max > m, tile_arg, arg)
        m_new = tl.maximum(m, tile_max)
        m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
        mx_safe = m_safe / t_row
        s_raw = s_raw * tl.exp(m - m_safe) + tl.sum(tl.exp(raw - m_safe[:, None]), 1)
        s_x = s_x * tl.exp(m / t_row - mx_safe) + tl.sum(tl.exp(raw / t - mx_safe[:, None]), 1)
        m = m_new
    out = rows * NC + c
    tl.store(M + out, m, mask=rmask)
    tl.store(ARG + out, arg, mask=rmask)
    tl.store(SRAW + out, s_raw, mask=rmask)
    tl.store(SX + out, s_x, mask=rmask)


@triton.jit(do_not_specialize=["B"])
def _combine_thresholds_kernel(
    LOGITS,
    TEMP,
    TOPK,
    TOPP,
    MINP,
    M,
    ARG,
    SRAW,
    SX,
    KEEP_KEY,
    MIN_X,
    LSE,
    ARGMAX,
    B,
    V,
    stride_row,
    NC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """(b) per row: the chunks' statistics combined, then the thresholds."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    if BLOCK_R == 1:  # one program per row (grid B): every row exists, and a constant mask frees
        rmask = tl.full([BLOCK_R], 1, tl.int1)  # the predicate ptxas spilled across the loops
    else:
        rmask = rows < B
    base = LOGITS + rows.to(tl.int64)[:, None] * stride_row
    temp = tl.load(TEMP + rows, mask=rmask, other=1.0).to(tl.float32)
    top_k = tl.load(TOPK + rows, mask=rmask, other=0).to(tl.int32)
    top_p = tl.load(TOPP + rows, mask=rmask, other=1.0).to(tl.float32)
    min_p = tl.load(MINP + rows, mask=rmask, other=0.0).to(tl.float32)
    greedy = temp <= 0.0
    t_row = tl.maximum(temp, 1e-6)
    t = t_row[:, None]
    NEG_INF: tl.constexpr = float("-inf")
    offs_c = tl.arange(0, BLOCK_C)
    cmask = rmask[:, None] & (offs_c[None, :] < NC)
    stat = rows[:, None] * NC + offs_c[None, :]
    mc = tl.load(M + stat, mask=cmask, other=NEG_INF)  # [BLOCK_R, BLOCK_C]
    m = tl.max(mc, 1)
    first = tl.argmax(mc, 1)  # the first chunk holding the max: the first index overall
    arg = tl.sum(tl.where(offs_c[None, :] == first[:, None], tl.load(ARG + stat, mask=cmask, other=0), 0), 1)
    m_safe = tl.where(m == NEG_INF, 0.0, m)
    live = mc > NEG_INF
    w_raw = tl.where(live, tl.exp(mc - m_safe[:, None]), 0.0)
    w_x = tl.where(live, tl.exp(mc / t - (m_safe / t_row)[:, None]), 0.0)
    s_raw = tl.sum(tl.load(SRAW + stat, mask=cmask, other=0.0) * w_raw, 1)
    s_x = tl.sum(tl.load(SX + stat, mask=cmask, other=0.0) * w_x, 1)
    # Everything but the top-k / top-p key is stored before the threshold loops, which do not need
    # it: kept live across them, ptxas spilled it to local memory (sm_90, triton 3.6 and 3.9).
    tl.store(LSE + rows, m + tl.log(s_raw), mask=rmask)
    tl.store(ARGMAX + rows, arg, mask=rmask)
    mx = m / t_row
    min_x, min_key = _min_p_threshold(mx, min_p)
    tl.store(MIN_X + rows, min_x, mask=rmask)
    keep_key = _thresholds(base, rmask, t, mx, s_x, greedy, top_k, top_p, min_p, min_key, V, BLOCK_R, BLOCK_V)
    tl.store(KEEP_KEY + rows, keep_key, mask=rmask)


@triton.jit(do_not_specialize=["B"])
def _chunk_draw_kernel(
    LOGITS,
    TEMP,
    SEEDS,
    KEEP_KEY,
    MIN_X,
    BEST,
    TOK,
    B,
    V,
    stride_row,
    CHUNK: tl.constexpr,
    NC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """(c) the Gumbel-max draw over one chunk's allowed tokens: best score and token [B, NC]."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1)
    rmask = rows < B
    base = LOGITS + rows.to(tl.int64)[:, None] * stride_row
    temp = tl.load(TEMP + rows, mask=rmask, other=1.0).to(tl.float32)
    greedy = temp <= 0.0
    t = tl.maximum(temp, 1e-6)[:, None]
    seed = tl.load(SEEDS + rows, mask=rmask, other=0)[:, None]
    keep_key = tl.load(KEEP_KEY + rows, mask=rmask, other=0)
    min_x = tl.load(MIN_X + rows, mask=rmask, other=0.0)
    offs = tl.arange(0, BLOCK_V)
    NEG_INF: tl.constexpr = float("-inf")
    best = tl.full([BLOCK_R], NEG_INF, tl.float32)
    token = tl.zeros([BLOCK_R], tl.int32)
    start = c * CHUNK
    if tl.min(greedy.to(tl.int32), 0) == 0:
        for v0 in range(start, start + CHUNK, BLOCK_V):
            idx = v0 + offs[None, :]
            valid = rmask[:, None] & (idx < V)
            x = tl.load(base + idx, mask=valid, other=NEG_INF).to(tl.float32) / t
            allowed = valid & (_ordered_key(x) >= keep_key[:, None]) & (x >= min_x[:, None]) & (~greedy)[:, None]
            u = tl.rand(seed, idx)
            score = tl.where(allowed, x - tl.log(-tl.log(u)), NEG_INF)
            tile_best = tl.max(score, 1)
            tile_arg = v0 + tl.argmax(score, 1)
            token = tl.where(tile_best > best, tile_arg, token)
            best = tl.maximum(best, tile_best)
    out = rows * NC + c
    tl.store(BEST + out, best, mask=rmask)
    tl.store(TOK + out, token, mask=rmask)


@triton.jit(do_not_specialize=["B"])
def _combine_draw_kernel(
    LOGITS,
    TEMP,
    BEST,
    TOK,
    LSE,
    ARGMAX,
    TOKENS,
    LOGPROBS,
    B,
    stride_row,
    NC: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """(d) per row: the token of the best chunk (argmax for greedy rows) and its raw logprob."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < B
    greedy = tl.load(TEMP + rows, mask=rmask, other=1.0).to(tl.float32) <= 0.0
    offs_c = tl.arange(0, BLOCK_C)
    cmask = rmask[:, None] & (offs_c[None, :] < NC)
    stat = rows[:, None] * NC + offs_c[None, :]
    best = tl.load(BEST + stat, mask=cmask, other=float("-inf"))
    first = tl.argmax(best, 1)
    drawn = tl.sum(tl.where(offs_c[None, :] == first[:, None], tl.load(TOK + stat, mask=cmask, other=0), 0), 1)
    no_draw = tl.max(best, 1) == float("-inf")  # greedy rows (and rows with nothing allowed)
    token = tl.where(greedy | no_draw, tl.load(ARGMAX + rows, mask=rmask, other=0), drawn)
    raw_tok = tl.load(LOGITS + rows.to(tl.int64) * stride_row + token, mask=rmask, other=0.0).to(tl.float32)
    tl.store(TOKENS + rows, token.to(tl.int64), mask=rmask)
    tl.store(LOGPROBS + rows, raw_tok - tl.load(LSE + rows, mask=rmask, other=0.0), mask=rmask)


def _split_tiles(V: int, cuda: bool, block_v=None):
    """(CHUNK, BLOCK_V): vocabulary per program and per tile. On a GPU 2048-token chunks (75
    programs per row at vocabulary 151,936); under the interpreter about 16 chunks per row."""
    if cuda:
        block = block_v or min(1024, triton.next_power_of_2(V))
        return max(block, 2048 if V > 2048 else block), block
    chunk = max(256, triton.next_power_of_2(triton.cdiv(V, 16)))
    block = min(block_v or chunk, chunk)
    return chunk, block


def _sample_split(logits, temperature, top_k, top_p, min_p, seeds, tokens, logprobs, block_v=None):
    B, V = logits.shape
    cuda = gpu_configs(logits)
    CHUNK, BLOCK_V = _split_tiles(V, cuda, block_v)
    NC = triton.cdiv(V, CHUNK)
    BLOCK_C = triton.next_power_of_2(NC)
    BLOCK_R = 1 if cuda else SPLIT_VOCAB_MAX_ROWS  # interpreter: one program per chunk for all rows
    dev = logits.device
    f32 = dict(dtype=torch.float32, device=dev)
    m, s_raw, s_x, best = (torch.empty(B, NC, **f32) for _ in range(4))
    arg, tok = (torch.empty(B, NC, dtype=torch.int32, device=dev) for _ in range(2))
    keep_key = torch.empty(B, dtype=torch.int64, device=dev)
    min_x, lse = torch.empty(B, **f32), torch.empty(B, **f32)
    argmax = torch.empty(B, dtype=torch.int32, device=dev)
    rows_grid = triton.cdiv(B, BLOCK_R)
    warps = 4 if BLOCK_V >= 512 else 2
    stride = logits.stride(0)
    launch(
        _chunk_stats_kernel,
        (rows_grid, NC),
        logits,
        temperature,
        m,
        arg,
        s_raw,
        s_x,
        B,
        V,
        stride,
        CHUNK=CHUNK,
        NC=NC,
        BLOCK_R=BLOCK_R,
        BLOCK_V=BLOCK_V,
        num_warps=warps,
    )
    launch(
        _combine_thresholds_kernel,
        (rows_grid,),
        logits,
        temperature,
        top_k,
        top_p,
        min_p,
        m,
        arg,
        s_raw,
        s_x,
        keep_key,
        min_x,
        lse,
        argmax,
        B,
        V,
        stride,
        NC=NC,
        BLOCK_C=BLOCK_C,
        BLOCK_R=BLOCK_R,
        BLOCK_V=min(2048, triton.next_power_of_2(V)) if cuda else BLOCK_V,
        num_warps=8 if cuda else 4,
    )
    launch(
        _chunk_draw_kernel,
        (rows_grid, NC),
        logits,
        temperature,
        seeds,
        keep_key,
        min_x,
        best,
        tok,
        B,
        V,
        stride,
        CHUNK=CHUNK,
        NC=NC,
        BLOCK_R=BLOCK_R,
        BLOCK_V=BLOCK_V,
        num_warps=warps,
    )
    launch(
        _combine_draw_kernel,
        (rows_grid,),
        logits,
        temperature,
        best,
        tok,
        lse,
        argmax,
        tokens,
        logprobs,
        B,
        stride,
        NC=NC,
        BLOCK_C=BLOCK_C,
        BLOCK_R=BLOCK_R,
        num_warps=4 if BLOCK_C >= 128 else 1,
    )


@traced
def sample_triton(logits, temperature, top_k, top_p, min_p, seeds, *, block_v=None, block_r=None, split=None):
    """Same contract as kernels.sampling.sample_ref (same distribution, not the same random stream).

    split: spread each row's vocabulary over programs (default: when the batch has at most
    SPLIT_VOCAB_MAX_ROWS rows). block_v / block_r override the vocabulary tile and the rows per
    program of the row kernel (tests cover several tiles).
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
    args = (
        temperature.contiguous(),
        top_k.contiguous(),
        top_p.contiguous(),
        min_p.contiguous(),
        seeds.to(torch.int64).contiguous(),
    )
    if split if split is not None else B <= SPLIT_VOCAB_MAX_ROWS:
        temp, tk, tp, mp, sd = args
        _sample_split(logits, temp, tk, tp, mp, sd, tokens, logprobs, block_v)
        return tokens, logprobs
    BLOCK_V = block_v or min(2048, triton.next_power_of_2(V))
    # One row per program on a GPU; the interpreter's cost is per op, so it takes many rows at once
    # (a fixed count: the batch size does not pick the variant).
    BLOCK_R = block_r or (1 if gpu_configs(logits) else 256)
    launch(
        _sample_kernel,
        (triton.cdiv(B, BLOCK_R),),
        logits,
        *args,
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


__all__ = ["sample_triton", "SPLIT_VOCAB_MAX_ROWS"]
