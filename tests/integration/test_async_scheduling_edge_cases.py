"""Async scheduling's edge cases: each the smallest case that once made EngineConfig.async_scheduling=True give
outputs other than the synchronous engine's (fixed since), and the strongest of the tries that held: logprobs
without a request for them, a tight KV cache, hand-driven steps with arrivals and aborts, the prefix cache."""

import pytest
import torch

from bstar.engine import LLM, SamplingParams
from bstar.testing.model_factory import make_model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("async_review") / "llama")
    return make_model(path, "llama", seed=4, max_position_embeddings=96)


def _prompts(seed, lengths, vocab=320):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _greedy(path, prompts, max_tokens):
    llm = LLM(path, dtype="float32", device="cpu")
    sp = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]


@pytest.mark.parametrize("mode", ["raw_logits", "processed_logits"])
def test_cumulative_logprob_of_a_request_without_logprobs_equals_sync(llama, mode):
    """Request B asks no logprobs; request A asks for them and stops early (a stop id).
    With async scheduling A is scheduled once more after that token (its row is discarded), so the
    step after A stops still has a row that wants logprobs, and B's value of that step was then the
    logprobs_mode's value (a raw logit) instead of the sampler kernel's logprob: B's
    cumulative_logprob differed from the synchronous engine's (by several units here). Now every row's
    value is its mode's value, whatever its batch asks."""
    prompts = _prompts(11, [9, 13])
    free = _greedy(llama, prompts[:1], 6)[0]
    params = [
        SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[free[2]], logprobs=1),  # A
        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),  # B
    ]
    outs = {}
    for flag in (False, True):
        llm = LLM(llama, dtype="float32", device="cpu", logprobs_mode=mode, async_scheduling=flag)
        got = llm.generate(prompts, params, use_tqdm=False)
        outs[flag] = (
            [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in got],
            [o.outputs[0].cumulative_logprob for o in got],
        )
    assert outs[True][0] == outs[False][0]  # the same tokens
    assert outs[False][0][0] == (free[: free.index(free[2]) + 1], "stop")  # A stopped early, B ran on
    assert outs[True][1] == pytest.approx(outs[False][1], abs=1e-3)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_tight_kv_cache_with_two_sampled_candidates_makes_progress(llama, async_scheduling):
    """Not async scheduling's own bug (the synchronous engine fails the same way), found while
    fuzzing it. Two sampled candidates of a 13-token prompt need 3 shared + 2 x 5 own blocks, the
    cache has 10: one is preempted. Each candidate alone fits (8 blocks), so the engine must finish
    them one after the other; a preempted candidate re-admitted from the queue kept the blocks
    `match_prefix` gave it when the admission then broke for want of free blocks (Scheduler.schedule),
    the running one preempted itself, and both waited holding blocks that no preemption could take
    back: "scheduler made no progress". Now a sequence not admitted gives its prefix hits back."""
    prompt = [131, 72, 53, 43, 87, 83, 94, 22, 199, 195, 105, 218, 112]
    sp = SamplingParams(n=2, temperature=1.0, seed=48, max_tokens=17, ignore_eos=True)
    opts = dict(dtype="float32", device="cpu", num_kv_blocks=10, block_size=4)
    out = LLM(llama, async_scheduling=async_scheduling, **opts).generate([prompt], sp, use_tqdm=False)[0]
    assert [len(c.token_ids) for c in out.outputs] == [17, 17]
    roomy = LLM(llama, dtype="float32", device="cpu", block_size=4).generate([prompt], sp, use_tqdm=False)[0]
    assert [c.token_ids for c in out.outputs] == [c.token_ids for c in roomy.outputs]


# -- what held: the strongest of the tries, kept as tests ------------------------------------------


def _rows(outs):
    """Every field of each candidate's output (request ids left out), plus the prompt_logprobs."""
    rows = []
    for o in outs:
        pl = o.prompt_logprobs and [e and {t: (x.logprob, x.rank) for t, x in e.items()} for e in o.prompt_logprobs]
        for c in o.outputs:
            lps = c.logprobs and [{t: (x.logprob, x.rank) for t, x in e.items()} for e in c.logprobs]
            rows.append((c.index, c.token_ids, c.finish_reason, c.stop_reason, c.text, lps, c.cumulative_logprob, pl))
    return rows


def _close(a, b, tol=1e-4):
    """Equal, floats within tol (batches of other shapes round differently)."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) < tol
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    return a == b


def _random_params(rng, n_max=3):
    kw = dict(n=rng.choice([1, 2, n_max]), temperature=rng.choice([0, 0.8, 1.0]), seed=rng.randrange(100))
    kw["max_tokens"] = rng.choice([1, 2, 5, 9, 16])
    if rng.random() < 0.5:
        kw["stop_token_ids"] = rng.sample(range(3, 256), rng.randint(1, 4))
    if rng.random() < 0.3:
        kw["min_tokens"] = min(rng.randint(1, 4), kw["max_tokens"])
    if rng.random() < 0.4:
        kw["logprobs"] = rng.choice([0, 2])
    if rng.random() < 0.2:
        kw["prompt_logprobs"] = 1
    if rng.random() < 0.3:
        kw.update(presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.2)
    if rng.random() < 0.2:
        kw.update(top_k=20, top_p=0.9)
    return SamplingParams(**kw)


@pytest.mark.parametrize(
    "seed, opts",
    [
        (1, dict(num_kv_blocks=16, block_size=4, max_num_batched_tokens=8)),
        (2, dict(max_num_seqs=3, logprobs_mode="processed_logprobs")),
        (3, dict(num_kv_blocks=24, block_size=4, max_num_batched_tokens=16, enable_prefix_caching=False)),
        (4, dict(block_size=4)),
    ],
)
def test_hand_driven_steps_with_arrivals_aborts_and_switching(llama, seed, opts):
    """LLMEngine.step() by hand: requests arrive between steps, some are aborted at random steps
    (with tokens in flight, preempted, partly finished), and async scheduling is switched on and
    off between steps. The requests left equal the synchronous engine's, aborted outputs never show
    a pending token, and nothing is left behind."""
    import random

    from bstar.engine.core.sequence import PENDING_TOKEN

    rng = random.Random(seed)
    prompts = _prompts(seed, [rng.randint(1, 14) for _ in range(6)])
    params = [_random_params(rng) for _ in prompts]
    arrive = sorted(rng.randrange(8) for _ in prompts)
    abort_at = {i: rng.randrange(1, 12) for i in range(len(prompts)) if rng.random() < 0.4}
    llm = LLM(llama, dtype="float32", device="cpu", async_scheduling=True, **opts)
    eng = llm.engine
    got, step, added, switched = {}, 0, 0, 0
    while added < len(prompts) or eng.has_unfinished_requests():
        while added < len(prompts) and arrive[added] <= step:
            eng.add_request(f"r{added}", prompts[added], params[added])
            added += 1
        for i, t in abort_at.items():
            if t == step and f"r{i}" in eng.requests:
                for c in eng.abort_request(f"r{i}").outputs:
                    assert PENDING_TOKEN not in c.token_ids
                    assert c.logprobs is None or len(c.logprobs) == len(c.token_ids)
        if rng.random() < 0.15:
            eng.ecfg.async_scheduling = not eng.ecfg.async_scheduling
            switched += 1
        got.update({o.request_id: o for o in eng.step()})
        step += 1
        assert step < 400
    assert eng.block_manager.num_used == 0 and not eng.scheduler.has_work() and eng._in_flight is None
    keep = [i for i in range(len(prompts)) if f"r{i}" in got]
    assert keep and switched
    ref = LLM(llama, dtype="float32", device="cpu", **opts)
    want = _rows(ref.generate([prompts[i] for i in keep], [params[i] for i in keep], use_tqdm=False))
    assert _close(_rows([got[f"r{i}"] for i in keep]), want)


@pytest.mark.parametrize("k", range(1, 8))
def test_abort_at_each_step_then_again_equals_sync(llama, k):
    """Two n=2 penalised, seeded requests in a cache that preempts: abort both after k steps
    (tokens in flight, a candidate preempted with its token pending), reset the prefix cache,
    add them again under the same ids; their outputs equal the synchronous engine's, and so do
    those of a synchronous generate on the same engine afterwards."""
    prompts = _prompts(1, [6, 11])
    sp = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=10, ignore_eos=True, logprobs=1, presence_penalty=0.7)
    opts = dict(dtype="float32", device="cpu", block_size=4, num_kv_blocks=14)
    want = _rows(LLM(llama, **opts).generate(prompts, sp, use_tqdm=False))
    llm = LLM(llama, async_scheduling=True, **opts)
    eng = llm.engine
    for rid, p in zip("ab", prompts):
        eng.add_request(rid, p, sp)
    for _ in range(k):
        eng.step()
    for rid in "ab":
        eng.abort_request(rid)
    assert eng.reset_prefix_cache() and eng.block_manager.num_used == 0
    got = {}
    for rid, p in zip("ab", prompts):
        eng.add_request(rid, p, sp)
    while eng.has_unfinished_requests():
        got.update({o.request_id: o for o in eng.step()})
    assert _close(_rows([got["a"], got["b"]]), want)
    assert eng.scheduler.num_preemptions > 0
    eng.ecfg.async_scheduling = False
    assert _close(_rows(llm.generate(prompts, sp, use_tqdm=False)), want)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_generated_text_reused_through_the_prefix_cache(llama, seed):
    """A request's prompt + output as the next requests' prompts: with async scheduling the block
    of a stop token (computed by the discarded extra step) is cached too; the next rounds (sampled,
    greedy, prompt_logprobs, after a sleep and wake_up) equal the synchronous engine's."""
    import random

    def rounds(flag):
        rng = random.Random(seed)
        opts = dict(dtype="float32", device="cpu", block_size=4)
        if seed % 2:
            opts.update(num_kv_blocks=24, max_num_batched_tokens=16)
        llm = LLM(llama, async_scheduling=flag, **opts)
        prompts = _prompts(seed, [rng.randint(3, 14) for _ in range(3)])
        free = _greedy(llama, prompts, 12)
        stops = [ids[rng.randrange(1, 12)] for ids in free]
        sp = SamplingParams(n=2, temperature=0, max_tokens=12, stop_token_ids=stops, logprobs=2)
        outs = llm.generate(prompts, sp, use_tqdm=False)
        res = [_rows(outs)]
        again = [o.prompt_token_ids + c.token_ids for o in outs for c in o.outputs]
        sp2 = SamplingParams(temperature=0.8, seed=1, max_tokens=8, logprobs=1, prompt_logprobs=1)
        res.append(_rows(llm.generate(again, sp2, use_tqdm=False)))
        if seed < 2:
            llm.sleep(1)
            llm.wake_up()
        sp3 = SamplingParams(temperature=0, max_tokens=6, logprobs=0)
        res.append(_rows(llm.generate([q + [5] for q in again], sp3, use_tqdm=False)))
        eng = llm.engine
        assert eng.block_manager.num_used == 0 and not eng.has_unfinished_requests()
        return res, eng.num_discarded_tokens

    (want, _), (got, discarded) = rounds(False), rounds(True)
    assert discarded > 0
    assert _close(got, want)
