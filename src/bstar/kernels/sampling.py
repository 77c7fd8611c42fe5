"""Sampling from logits with per-row temperature, top-k, top-p, min-p and seed.

The reference draws by inverse CDF: one uniform per row from a counter-based hash of the row's
seed, then a search in the cumulative sum of the filtered distribution. A row's draw depends only
on its own seed and logits, never on the rest of the batch, and no vocabulary sort is needed unless
top-p is on. (The Triton kernel draws the same distribution by its own random stream.)
"""

import torch

from bstar.kernels.dispatch import use_triton

_M32 = 0xFFFFFFFF


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3 finaliser on uint32 values held in int64 (products wrap, low 32 bits stay exact)."""
    h = h & _M32
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def row_uniform(seeds: torch.Tensor) -> torch.Tensor:
    """u [B] float64 in (0, 1), a pure function of each row's int64 seed."""
    s = seeds.long()
    h = _fmix32(_fmix32((s >> 32) & _M32) ^ (s & _M32) ^ 0x9E3779B9)
    return (h.double() + 0.5) * (1.0 / 4294967296.0)


def filter_plan(temperature, top_k, top_p, min_p, V: int) -> tuple[bool, bool, int, bool]:
    """Which of apply_filters' passes any row needs, from the rows' values (host lists or device
    tensors): (temperature != 1, min-p, the largest top-k below V or 0, top-p)."""
    if isinstance(top_k, torch.Tensor):  # (reading device values makes the host wait for them)
        k = top_k.long()
        k = torch.where((k <= 0) | (k > V), torch.full_like(k, V), k)
        kmax = int(k.max()) if bool((k < V).any()) else 0
        return bool((temperature != 1).any()), bool((min_p > 0).any()), kmax, bool((top_p < 1).any())
    ks = [V if k <= 0 or k > V else k for k in top_k]
    kmax = max(ks) if any(k < V for k in ks) else 0
    return any(t != 1 for t in temperature), any(m > 0 for m in min_p), kmax, any(p < 1 for p in top_p)


def apply_filters(logits, temperature, top_k, top_p, min_p, plan: tuple | None = None):
    """Masked, temperature-scaled float32 logits [B, V]: -inf where a token is not allowed.

    vLLM's order: temperature, min-p (relative to the most likely token), top-k, top-p (over the
    distribution renormalised on what min-p and top-k kept). top_k <= 0, top_p >= 1 and
    min_p <= 0 mean off. plan: filter_plan of the same values from host lists (else it is read from
    the tensors, a wait for the device).
    """
    x = logits.float()
    B, V = x.shape
    use_t, use_min_p, kmax, use_p = plan if plan is not None else filter_plan(temperature, top_k, top_p, min_p, V)
    if use_t:  # dividing by 1 is exact: skip the pass over [B, V]
        x = x / temperature.clamp(min=1e-6).float()[:, None]
    if use_min_p:
        logp = torch.log_softmax(x, dim=-1)
        thresh = logp.max(dim=-1, keepdim=True).values + torch.log(min_p.float().clamp(min=1e-30))[:, None]
        x = x.masked_fill((logp < thresh) & (min_p > 0)[:, None], float("-inf"))
    k = top_k.long().clamp(min=0)
    k = torch.where((k <= 0) | (k > V), torch.full_like(k, V), k)
    if kmax and not use_p:  # top-k alone: a partial selection, no full sort
        kth = torch.topk(x, kmax, dim=-1).values.gather(1, (k - 1).clamp(max=kmax - 1)[:, None])
        x = x.masked_fill(x < kth, float("-inf"))
    elif use_p:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        rank = torch.arange(V, device=x.device)[None, :]
        keep = rank < k[:, None]
        sorted_x = sorted_x.masked_fill(~keep, float("-inf"))
        probs = torch.softmax(sorted_x, dim=-1)
        before = torch.cumsum(probs, dim=-1) - probs  # mass strictly before each token
        # top_p >= 1 is off: without the guard, rounding in the cumsum (mass reaching 1.0 early)
        # would drop tail tokens from rows that did not ask for top-p.
        keep &= (before < top_p.float()[:, None]) | (top_p >= 1)[:, None]
        keep[:, 0] = True
        x = torch.full_like(x, float("-inf")).scatter(1, order, sorted_x.masked_fill(~keep, float("-inf")))
    return x


def _inverse_cdf(e: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Token of each row where the cumulative weight first exceeds u * total.

    e [B, V] non-negative float32 weights (0 = masked), u float64 [B] in (0, 1). Two-level search:
    chunk sums and their cumsum locate the chunk, then one chunk's cumsum the token. That reads
    [B, V] once (a sum) instead of a sequential cumsum over the whole vocabulary. The pick always
    has a non-zero weight, whatever the rounding."""
    B, V = e.shape
    C = 64 if V <= 8192 else 512
    nc = -(-V // C)
    if nc * C != V:
        e = torch.nn.functional.pad(e, (0, nc * C - V))
    chunks = e.view(B, nc, C)
    ccdf = chunks.sum(-1).double().cumsum_(-1)  # [B, nc]
    total = ccdf[:, -1:]
    target = torch.minimum(u[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    j = torch.searchsorted(ccdf, target, right=True).clamp_(max=nc - 1)  # first chunk whose cdf > target
    before = torch.where(j > 0, ccdf.gather(1, (j - 1).clamp(min=0)), torch.zeros_like(target))
    rest = (target - before).clamp_(min=0)
    inner = chunks[torch.arange(B, device=e.device), j.squeeze(1)]  # [B, C]
    icdf = inner.double().cumsum(-1)
    k = torch.searchsorted(icdf, rest, right=True).squeeze(1)
    # k == C only by rounding (rest at or past the chunk's own total): take its last non-zero token.
    last = ((inner > 0) * torch.arange(1, C + 1, device=e.device)).argmax(-1)
    k = torch.where(k >= C, last, k)
    return j.squeeze(1) * C + k


def sample_ref(logits, temperature, top_k, top_p, min_p, seeds):
    """Torch reference.

    logits      [B, V] (any float dtype)
    temperature float32 [B]  (0 = greedy: argmax)
    top_k       int32 [B]    (<= 0: off)
    top_p       float32 [B]  (1.0: off)
    min_p       float32 [B]  (0.0: off)
    seeds       int64 [B]    (per-row seed of this draw)
    returns (tokens int64 [B], logprobs float32 [B]): the logprob is that of the raw model
    distribution log_softmax(logits), as vLLM reports it.
    """
    raw = logits.float()
    x = apply_filters(raw, temperature, top_k, top_p, min_p)
    # One fused softmax pass gives the draw's weights; with no filter at temperature 1 (x is then
    # raw itself) they are also the raw distribution, so the logprob needs no second pass.
    probs = torch.softmax(x, dim=-1)
    drawn = _inverse_cdf(probs, row_uniform(seeds))
    greedy = temperature <= 0
    tokens = torch.where(greedy, raw.argmax(-1), drawn) if bool(greedy.any()) else drawn
    if x is raw:  # a drawn token has a non-zero probability
        logprobs = probs.gather(1, tokens[:, None]).squeeze(1).log()
    else:
        logprobs = raw.gather(1, tokens[:, None]).squeeze(1) - torch.logsumexp(raw, dim=-1)
    return tokens, logprobs


def sample(logits, temperature, top_k, top_p, min_p, seeds, *, triton=None):
    if use_triton(logits, triton):
        from bstar.kernels.sampling_triton import sample_triton

        return sample_triton(logits, temperature, top_k, top_p, min_p, seeds)
    return sample_ref(logits, temperature, top_k, top_p, min_p, seeds)
