"""Prompt-only forwards: the final hidden states of whole token lists, no sampling.

Used by `LLM.compute_logits` and `PRM` scoring. Each list is a prompt-only sequence of the engine's own
scheduler (Sequence.prompt_only), so the rules of every other request govern its KV: admission under the
token budget and max_num_seqs, chunked prefill, the prefix cache, copy-on-write copies and preemption.
The scheduler is borrowed, so the engine must be idle: no request may be in flight.
"""

import torch

from bstar.engine.core.llm_engine import LLMEngine
from bstar.engine.core.sequence import Sequence, SequenceStatus
from bstar.engine.entrypoints.sampling_params import SamplingParams


@torch.inference_mode()
def forward_prompts(
    engine: LLMEngine,
    token_lists: list[list[int]],
    use_prefix_cache: bool = False,
    prefix_limits: list[int] | None = None,
):
    """Final hidden states of each token list: yields (index, first_row, hidden [n, H]), in index order.

    With use_prefix_cache, tokens already in the prefix cache (at most prefix_limits[i] of them)
    are not recomputed and first_row says where the returned rows start; computed blocks are
    registered for later lists, so lists sharing a prefix (a question and its candidates)
    compute it once."""
    sched = engine.scheduler
    if sched.has_work():
        raise RuntimeError("forward_prompts needs an idle engine (no unfinished requests)")
    engine.require_awake("forward")
    for ids in token_lists:
        engine.check_prompt_len(len(ids))
    seqs = [_prompt_only(i, ids, use_prefix_cache, prefix_limits) for i, ids in enumerate(token_lists)]
    index = {s.seq_id: i for i, s in enumerate(seqs)}
    parts: dict[int, tuple[int, list[torch.Tensor]]] = {}  # seq_id: (first row, hidden chunks so far)
    sched.focus = None  # (a leftover isolation focus would hold these back; the next step sets its own)
    for s in seqs:
        sched.add(s)
    try:
        while sched.has_work():
            batch = sched.schedule()
            if not batch:  # (check_prompt_len makes every list fit an empty cache)
                raise RuntimeError(f"KV cache too small for a {len(sched.waiting[0])}-token forward")
            starts = [s.num_computed for s in batch.seqs]
            with engine.runner.guard():
                h, _ = engine.runner.hidden_states(batch)
            sched.advance(batch)
            done = []
            for s, start, hh in zip(batch.seqs, starts, h.split(batch.num_new)):
                first, chunks = parts.pop(s.seq_id, (start, []))
                if start != first + sum(len(c) for c in chunks):  # preempted meanwhile: computed again
                    first, chunks = start, []
                chunks.append(hh)
                if s.status is SequenceStatus.FINISHED:
                    done.append((index[s.seq_id], first, chunks))
                else:
                    parts[s.seq_id] = (first, chunks)
            for k, first, chunks in sorted(done, key=lambda d: d[0]):
                yield k, first, chunks[0] if len(chunks) == 1 else torch.cat(chunks)
    finally:  # (a consumer that stops early, or a failed forward, leaves no sequence behind)
        for s in seqs:
            if s.status is not SequenceStatus.FINISHED:
                sched.abort(s.request_id)


def _prompt_only(i: int, ids: list[int], use_prefix_cache: bool, prefix_limits: list[int] | None) -> Sequence:
    seq = Sequence(f"_fwd{i}", ids, SamplingParams())
    seq.prompt_only = True
    seq.prefix_limit = (None if prefix_limits is None else prefix_limits[i]) if use_prefix_cache else 0
    return seq
