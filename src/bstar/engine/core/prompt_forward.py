"""Prompt-only forwards: the final hidden states of whole token lists, no sampling.

Used by `LLM.compute_logits` and `PRM` scoring. It packs lists into batches under the engine's
token budget (a list longer than the budget runs alone, in chunks) and borrows the engine's block
manager and model runner, so it needs an idle engine: no request may be in flight.
"""

import torch

from bstar.engine.core.llm_engine import LLMEngine
from bstar.engine.core.scheduler import Batch
from bstar.engine.core.sequence import Sequence
from bstar.engine.entrypoints.sampling_params import SamplingParams


@torch.inference_mode()
def forward_prompts(
    engine: LLMEngine,
    token_lists: list[list[int]],
    use_prefix_cache: bool = False,
    prefix_limits: list[int] | None = None,
):
    """Final hidden states of each token list: yields (index, first_row, hidden [n, H]).

    With use_prefix_cache, tokens already in the prefix cache (at most prefix_limits[i] of them)
    are not recomputed and first_row says where the returned rows start; computed blocks are
    registered for later lists, so lists sharing a prefix (a question and its candidates)
    compute it once."""
    if engine.scheduler.has_work():
        raise RuntimeError("forward_prompts needs an idle engine (no unfinished requests)")
    engine.require_awake("forward")
    bm, budget_total = engine.block_manager, engine.ecfg.max_num_batched_tokens
    for ids in token_lists:
        engine.check_prompt_len(len(ids))
    i, N = 0, len(token_lists)
    while i < N:
        batch, starts, index = Batch(), [], []
        budget = budget_total
        while i < N:
            seq = Sequence(f"_fwd{i}", token_lists[i], SamplingParams())
            if use_prefix_cache:
                bm.match_prefix(seq, None if prefix_limits is None else prefix_limits[i])
            n = len(seq) - seq.num_computed
            fits = bm.blocks_needed(seq, n) <= bm.num_free
            if batch.seqs and (n > budget or not fits):
                bm.release_prefix(seq)
                break
            if not fits:
                raise RuntimeError(f"KV cache too small for a {len(seq)}-token forward")
            bm.allocate(seq, n)
            batch.seqs.append(seq)
            batch.num_new.append(n)
            starts.append(seq.num_computed)
            index.append(i)
            budget -= n
            i += 1
        with engine.runner.guard():
            if len(batch.seqs) == 1 and batch.num_new[0] > budget_total:
                hs = [_chunked_forward(engine, batch.seqs[0], batch.num_new[0])]
            else:
                h, _ = engine.runner.hidden_states(batch)
                hs = list(h.split(batch.num_new))
        for seq, n, start, k, hh in zip(batch.seqs, batch.num_new, starts, index, hs):
            seq.num_computed += n
            bm.register_full_blocks([seq])
            bm.free_seq(seq)
            yield k, start, hh


def _chunked_forward(engine: LLMEngine, seq: Sequence, n: int) -> torch.Tensor:
    """Hidden states [n, H] of a list longer than the token budget, one budget-sized chunk per forward.
    Leaves seq.num_computed where it was: the caller advances it once."""
    out, left = [], n
    while left:
        m = min(left, engine.ecfg.max_num_batched_tokens)
        h, _ = engine.runner.hidden_states(Batch(seqs=[seq], num_new=[m], num_decode=int(m == 1)))
        out.append(h)
        seq.num_computed += m
        left -= m
    seq.num_computed -= n
    return torch.cat(out)
