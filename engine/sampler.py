"""From logits rows to sampled tokens: per-row parameters, bans, seeds, logprobs.

Each draw's seed is a function of the request's seed, the candidate's index and the token
position only (`candidate_seed`, then `position_seed`), so a candidate's tokens do not depend on
batching, preemption or other requests.
"""

import torch

import kernels
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence
from kernels.host import to_device

_MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def candidate_seed(request_seed: int, candidate: int) -> int:
    """The part of a draw's seed fixed for a candidate's lifetime."""
    return splitmix64(splitmix64(request_seed & _MASK64) ^ candidate)


def position_seed(candidate_base: int, position: int) -> int:
    """Seed (int64) of one draw from its candidate's base and the token position."""
    h = splitmix64(candidate_base ^ position)
    return h - (1 << 64) if h >= 1 << 63 else h


class Sampler:
    """Draws the next token of each candidate of a step."""

    def __init__(self, eos_ids: set[int]):
        self.eos_ids = eos_ids  # banned, with params.stop_token_ids, until params.min_tokens

    def __call__(self, logits: torch.Tensor, rows: list[int], seqs: list[Sequence]):
        """logits float32 [R, V]; seqs[i] draws from row rows[i]. Returns sample_rows' lists."""
        if len(rows) != logits.shape[0] or rows != list(range(len(rows))):
            logits = logits[to_device(rows, torch.int64, logits.device)]
        for s in seqs:
            if s.seed_base is None:
                s.seed_base = candidate_seed(s.seed, s.index)
        seeds = [position_seed(s.seed_base, s.num_output) for s in seqs]
        bans = [self._banned(s) if s.params.min_tokens else [] for s in seqs]
        return sample_rows(logits, [s.params for s in seqs], seeds, bans)

    def _banned(self, s: Sequence) -> list[int]:
        if s.num_output >= s.params.min_tokens:
            return []
        ban = list(s.params.stop_token_ids)
        if not s.params.ignore_eos:
            ban += list(self.eos_ids)
        return ban


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], seeds: list[int], bans: list[list[int]]):
    """logits float32 [R, V]; one SamplingParams, seed and banned-id list per row.

    Returns (tokens list[int], logprobs list[float], top list[dict[int, float]] | None per row)."""
    dev = logits.device
    for r, ban in enumerate(bans):
        if ban:
            logits[r, ban] = float("-inf")
    R, p0 = len(params), params[0]
    if all(p is p0 for p in params):  # the common case: one request's (or one call's) parameters
        temperature, top_k, top_p, min_p = (
            torch.full((R,), v, dtype=dt, device=dev)
            for v, dt in (
                (p0.temperature, torch.float32),
                (p0.top_k, torch.int32),
                (p0.top_p, torch.float32),
                (p0.min_p, torch.float32),
            )
        )
    else:
        # (host lists through pinned memory, non-blocking: no stream sync before the kernel)
        temperature = to_device([float(p.temperature) for p in params], torch.float32, dev)
        top_k = to_device([int(p.top_k) for p in params], torch.int32, dev)
        top_p = to_device([float(p.top_p) for p in params], torch.float32, dev)
        min_p = to_device([float(p.min_p) for p in params], torch.float32, dev)
    seed_t = to_device(seeds, torch.int64, dev)
    tokens, logprobs = kernels.sample(logits, temperature, top_k, top_p, min_p, seed_t)
    want = max((p.logprobs or 0) for p in params)
    top = [None] * len(params)
    if want:
        lp = torch.log_softmax(logits, dim=-1)
        vals, ids = lp.topk(min(want, lp.shape[-1]), dim=-1)
        vals, ids = vals.tolist(), ids.tolist()
        for r, p in enumerate(params):
            if p.logprobs:
                top[r] = dict(zip(ids[r][: p.logprobs], vals[r][: p.logprobs]))
    return tokens.tolist(), logprobs.tolist(), top
