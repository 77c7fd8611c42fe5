"""Scoring requests that share a prompt head (lm-eval's loglikelihood: each context with several continuations):
the head is computed once and its prompt_logprobs entries and KV are reused (PromptLogprobs.match), and every
entry still equals transformers' float64 log_softmax, whatever the chunking, async scheduling, preemption,
top-k asked or weight update in between."""

import random

import pytest
import torch

from bstar.engine import LLM, SamplingParams
from bstar.testing.model_factory import hf_model, make_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = dict(device="cpu", dtype="float32")
BS = 16  # the engine's default block size


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_model(str(tmp_path_factory.mktemp("llama")), "llama", seed=4, tokenizer=False)


def _mix(seed: int, vocab: int = 320) -> list[list[int]]:
    """lm-eval's shape: 4 contexts (2-4 full blocks, off block boundaries) x 3 continuations of 1-9 tokens,
    shuffled (lm-eval orders by length, so a context's continuations are not adjacent), and one context
    on its own."""
    rng = random.Random(seed)
    reqs = []
    for n in (40, 57, 33, 64):
        ctx = [rng.randrange(3, vocab) for _ in range(n)]
        reqs += [ctx + [rng.randrange(3, vocab) for _ in range(rng.randint(1, 9))] for _ in range(3)]
    reqs.append([rng.randrange(3, vocab) for _ in range(50)])
    rng.shuffle(reqs)
    return reqs


def _reference(path: str, reqs: list[list[int]]) -> list[torch.Tensor]:
    """float64 log_softmax of transformers' logits of every prompt position."""
    hf = hf_model(path)
    with torch.no_grad():
        return [torch.log_softmax(hf(torch.tensor([r])).logits[0].double(), -1) for r in reqs]


def _check(outs, reqs, refs, k: int):
    """vLLM's entries: the first None; then the prompt token with its rank, and the top-k with ranks 1..k."""
    for o, r, ref in zip(outs, reqs, refs):
        plp = o.prompt_logprobs
        assert len(plp) == len(r) and plp[0] is None
        for i in range(1, len(r)):
            e, tok, row = plp[i], r[i], ref[i - 1]
            assert next(iter(e)) == tok
            assert abs(e[tok].logprob - row[tok].item()) < 1e-4
            assert e[tok].rank == 1 + int((row > row[tok]).sum())
            top = torch.topk(row, k)
            assert set(e) == {tok, *top.indices.tolist()}
            for j, (t, v) in enumerate(zip(top.indices.tolist(), top.values.tolist())):
                assert abs(e[t].logprob - v) < 1e-4 and e[t].rank == j + 1


def _shared_tokens(reqs: list[list[int]]) -> int:
    """Prompt tokens the cache can serve: per request, all but the last full block its prompt shares with an
    earlier one (that block's last token gives the entry after it), and never its last token."""
    total = 0
    for i, r in enumerate(reqs):
        shared = 0
        for q in reqs[:i]:
            n = 0
            while n < min(len(r), len(q)) and r[n] == q[n]:
                n += 1
            shared = max(shared, n // BS)
        total += max(min(shared - 1, (len(r) - 1) // BS), 0) * BS
    return total


@pytest.mark.parametrize(
    "opts, max_tokens, k",
    [
        ({}, 1, 1),  # lm-eval's case (top-1: the C kernel where it is built)
        (dict(max_num_batched_tokens=16), 1, 2),
        (dict(async_scheduling=True), 1, 1),
        (dict(num_kv_blocks=12), 30, 2),
    ],
    ids=["one-step", "chunked", "async", "preempting"],
)
def test_shared_heads_are_computed_once_and_match_transformers(llama, opts, max_tokens, k):
    reqs = _mix(0)
    llm = LLM(llama, **CPU, **opts)
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, prompt_logprobs=k, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": r} for r in reqs], sp, use_tqdm=False)
    _check(outs, reqs, _reference(llama, reqs), k)
    hits = llm.llm_engine.block_manager.prefix_hits
    if "num_kv_blocks" not in opts:  # (evictions there: fewer hits)
        assert hits == _shared_tokens(reqs) > 0  # every shared head was computed once, within one call
    else:
        assert llm.llm_engine.scheduler.num_preemptions > 0 and hits > 0
    plain = LLM(llama, **CPU, enable_prefix_caching=False).generate(
        [{"prompt_token_ids": r} for r in reqs], sp, use_tqdm=False
    )
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in plain]


def test_top_k_asked_and_weight_updates_keep_entries_apart(llama, tmp_path):
    reqs = _mix(1)
    llm = LLM(llama, **CPU)
    bm = llm.llm_engine.block_manager
    prompts = [{"prompt_token_ids": r} for r in reqs]
    one = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1, detokenize=False)
    llm.generate(prompts, one, use_tqdm=False)
    hits = bm.prefix_hits
    three = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=3, detokenize=False)
    outs = llm.generate(prompts, three, use_tqdm=False)  # top-1 entries do not serve top-3 requests...
    _check(outs, reqs, _reference(llama, reqs), 3)
    assert bm.prefix_hits - hits == _shared_tokens(reqs)  # ...but the top-3 ones serve each other
    other = make_model(str(tmp_path / "other"), "llama", seed=9, tokenizer=False)
    llm.llm_engine.load_weights(hf_model(other).named_parameters())  # forgets the stored entries
    outs = llm.generate(prompts, three, use_tqdm=False)
    _check(outs, reqs, _reference(other, reqs), 3)
    outs = llm.generate(prompts, three, use_tqdm=False)  # every head stored now: all served from it
    _check(outs, reqs, _reference(other, reqs), 3)


def test_entries_served_from_the_store_are_the_requests_own(llama):
    """A request's entries are its own dicts (mutating one leaves the other requests' alone)."""
    reqs = _mix(2)
    sp = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1, detokenize=False)
    outs = LLM(llama, **CPU).generate([{"prompt_token_ids": r} for r in reqs], sp, use_tqdm=False)
    by_ctx = {}
    for o in outs:
        by_ctx.setdefault(tuple(o.prompt_token_ids[:BS]), []).append(o)
    a, b = next(v for v in by_ctx.values() if len(v) > 1)[:2]
    assert a.prompt_logprobs[5] == b.prompt_logprobs[5] and a.prompt_logprobs[5] is not b.prompt_logprobs[5]
