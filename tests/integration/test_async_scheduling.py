"""Async scheduling (EngineConfig.async_scheduling): each step is launched before the previous
step's draw reaches the host. Outputs must equal the synchronous engine's in every feature that
the one-step lag touches: stop rules, forks, preemption, chunked prefill, prefix caching,
logprobs, penalties (which count the pending token on the device), aborts; on the torch path and on the
GPU code path (Triton interpreter)."""

import os

import pytest
import torch

from bstar.engine import LLM, SamplingParams
from bstar.engine.core.sequence import PENDING_TOKEN
from bstar.engine.runner.sampler import Draw
from bstar.testing.model_factory import make_model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_model(str(tmp_path_factory.mktemp("async") / "llama"), "llama", seed=4, max_position_embeddings=96)


def _prompts(seed, lengths, vocab=320):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _summary(outs):
    """Everything a request's output holds that async scheduling could change."""
    rows = []
    for o in outs:
        for c in o.outputs:
            lps = None if c.logprobs is None else [{t: round(x.logprob, 4) for t, x in e.items()} for e in c.logprobs]
            rows.append((o.request_id, c.index, c.token_ids, c.finish_reason, c.stop_reason, c.text, lps))
    return rows


def _free_greedy(path, prompts):
    llm = LLM(path, dtype="float32", device="cpu")
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm.get_tokenizer()


def _mixed_requests(path, penalties=False):
    """Prompts (two repeated: prefix cache) and per-request parameters that stop at many different
    steps and in every way: stop ids (greedy and seeded sampling, n > 1), max_tokens, the context,
    min_tokens, logprobs, a stop string; with `penalties`, one request with presence, frequency and
    repetition penalties."""
    prompts = _prompts(3, [37, 20, 50, 9, 33, 28, 20, 70])
    prompts[6] = prompts[1]
    free, tok = _free_greedy(path, prompts)
    stops = sorted({ids[i] for ids in free for i in (3, 9)})[:6]  # stop ids ending candidates at many steps
    text = tok.decode(free[4])
    stop_str = next(text[i : i + 2] for i in range(6, len(text) - 1) if text[i : i + 2].strip() == text[i : i + 2])
    params = [
        SamplingParams(temperature=0, max_tokens=30, stop_token_ids=stops[:2]),
        SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=25, stop_token_ids=stops, logprobs=2),
        SamplingParams(n=2, temperature=0.8, top_p=0.9, seed=3, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=40, stop_token_ids=stops[2:4], min_tokens=5, logprobs=0),
        SamplingParams(temperature=0, max_tokens=24, stop=[stop_str], ignore_eos=True),
        SamplingParams(
            n=2,
            temperature=1.0,
            seed=2,
            max_tokens=15,
            presence_penalty=1.5 * penalties,
            frequency_penalty=0.5 * penalties,
            repetition_penalty=1.3 if penalties else 1.0,
        ),
        SamplingParams(n=2, temperature=0, max_tokens=20, stop_token_ids=stops[1:3]),
        SamplingParams(temperature=0.7, seed=1, max_tokens=None, ignore_eos=True),  # up to the context (96)
    ]
    return prompts, params


@pytest.mark.parametrize(
    "opts",
    [
        dict(),
        dict(num_kv_blocks=16, max_num_batched_tokens=16),  # preemption and chunked prefill
        dict(max_num_seqs=3, enable_prefix_caching=False),
        dict(penalties=True),
    ],
    ids=["default", "preempt-chunked", "few-seqs", "penalties"],
)
def test_async_outputs_equal_sync(llama, opts):
    opts = dict(opts)
    prompts, params = _mixed_requests(llama, penalties=opts.pop("penalties", False))
    sync = LLM(llama, dtype="float32", device="cpu", **opts)
    want = _summary(sync.generate(prompts, params, use_tqdm=False))
    llm = LLM(llama, dtype="float32", device="cpu", async_scheduling=True, **opts)
    eng = llm.engine
    fed = []
    run = eng.runner.run
    eng.runner.run = lambda batch: (fed.append(len(batch.feed_rows)), run(batch))[1]
    got = _summary(llm.generate(prompts, params, use_tqdm=False))
    assert got == want
    assert any(r[3] == "stop" and isinstance(r[4], str) for r in got)  # the stop string ended one
    assert sum(fed) > 0  # decode inputs were read on the device
    assert eng.num_discarded_tokens > 0  # candidates that a token stopped had drawn once more
    assert eng.num_generated_tokens == sync.engine.num_generated_tokens
    assert eng.block_manager.num_used == 0 and not eng.has_unfinished_requests()
    if "num_kv_blocks" in opts:
        assert eng.scheduler.num_preemptions > 0
    # the prefix cache holds the same generated blocks (a pending token's block was hashed later)
    if sync.engine.block_manager.enable_prefix_caching:
        assert set(eng.block_manager.hash_to_block) >= set(sync.engine.block_manager.hash_to_block)


def test_each_step_launches_before_taking_the_previous_draw(llama):
    """The overlap itself: step k+1's forward and draw are launched before step k's draw is read on
    the host (Draw.host), penalties too (they count the pending tokens on the device)."""
    llm = LLM(llama, dtype="float32", device="cpu", async_scheduling=True)
    eng = llm.engine
    events = []
    run, host = eng.runner.run, Draw.host
    eng.runner.run = lambda batch: (events.append("run"), run(batch))[1]

    def logged_host(self):
        events.append("host")
        return host(self)

    prompts = _prompts(5, [10, 14])
    sp = SamplingParams(n=2, temperature=1.0, seed=1, max_tokens=6, ignore_eos=True)
    try:
        Draw.host = logged_host
        llm.generate(prompts, sp, use_tqdm=False)
        steady = "".join("r" if e == "run" else "h" for e in events)
        events.clear()
        llm.generate(prompts, SamplingParams(temperature=1.0, seed=1, max_tokens=6, presence_penalty=0.5))
        penalised = "".join("r" if e == "run" else "h" for e in events)
    finally:
        Draw.host = host
    # one prefill step, then 6 decode steps' draws each taken after the next launch; the last alone
    assert steady == "r" + "rh" * 5 + "h", steady
    assert penalised == "r" + "rh" * 5 + "h", penalised


def test_abort_and_sleep_with_a_step_in_flight(llama):
    prompts = _prompts(8, [12, 25, 7])
    sp = SamplingParams(n=2, temperature=1.0, seed=4, max_tokens=20, ignore_eos=True)
    llm = LLM(llama, dtype="float32", device="cpu", async_scheduling=True)
    eng = llm.engine
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, sp)
    for _ in range(5):
        eng.step()
    assert eng._in_flight is not None and any(s.num_pending for s in eng.scheduler.running)
    out = eng.abort_request("r1")
    assert all(PENDING_TOKEN not in c.token_ids and len(c.token_ids) == 4 for c in out.outputs)
    assert all(c.finish_reason == "abort" for c in out.outputs)
    rest = {}
    while eng.has_unfinished_requests():
        rest.update({o.request_id: o for o in eng.step()})
    ref = LLM(llama, dtype="float32", device="cpu").generate([prompts[0], prompts[2]], sp, use_tqdm=False)
    assert [[c.token_ids for c in rest[r].outputs] for r in ("r0", "r2")] == [
        [c.token_ids for c in o.outputs] for o in ref
    ]
    # abort everything while a step is in flight, then sleep and wake: nothing is left behind
    for i, p in enumerate(prompts):
        eng.add_request(f"s{i}", p, sp)
    eng.step()
    eng.step()
    for i in range(3):
        eng.abort_request(f"s{i}")
    eng.sleep(1)
    eng.wake_up()
    assert not eng.has_unfinished_requests() and eng.block_manager.num_used == 0
    again = llm.generate(prompts[:1], sp, use_tqdm=False)
    assert [c.token_ids for c in again[0].outputs] == [c.token_ids for c in ref[0].outputs]


needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="Triton kernels on CPU tensors need TRITON_INTERPRET=1"
)


@needs_interpreter
def test_async_on_the_gpu_code_path(tmp_path, monkeypatch):
    """The GPU path (persistent inputs, padded decode buckets, device block tables) with the
    inputs of decode rows filled on the device from the step in flight: equal to the synchronous
    engine with stop ids, n > 1 forks, preemption and chunked prefill."""
    monkeypatch.setenv("BSTAR_KERNELS", "triton")
    path = make_model(str(tmp_path / "q"), "qwen2", seed=3, tokenizer=False, num_key_value_heads=1)
    prompts = _prompts(6, [13, 20, 9])
    free = LLM(path, dtype="float32", device="cpu", max_num_seqs=8).generate(
        prompts, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False
    )
    stops = [free[0].outputs[0].token_ids[6], free[2].outputs[0].token_ids[7]]
    params = [
        SamplingParams(n=2, temperature=0, max_tokens=10, stop_token_ids=stops),
        SamplingParams(n=2, temperature=1.0, seed=5, max_tokens=9, stop_token_ids=stops),
        SamplingParams(temperature=0, max_tokens=10, stop_token_ids=stops),
    ]
    opts = dict(dtype="float32", device="cpu", num_kv_blocks=7, block_size=8, max_num_batched_tokens=16, max_num_seqs=8)
    want = _summary(LLM(path, **opts).generate(prompts, params, use_tqdm=False))
    llm = LLM(path, async_scheduling=True, **opts)
    got = _summary(llm.generate(prompts, params, use_tqdm=False))
    assert got == want
    eng = llm.engine
    assert eng.scheduler.num_preemptions > 0 and eng.num_discarded_tokens > 0
    assert eng.runner.graphs is not None and eng.runner.graphs.replays  # padded buckets ran
    assert eng.block_manager.num_used == 0


def test_async_llm_streams_known_tokens_only(llama):
    """AsyncLLM's cumulative outputs are built from the running sequences: with a step in flight they
    hold its pending tokens, which must not show."""
    import asyncio

    from bstar.engine import AsyncLLM

    prompts = _prompts(9, [11, 17, 6])
    sp = SamplingParams(n=2, temperature=1.0, seed=8, max_tokens=9, ignore_eos=True, logprobs=1)
    ref = LLM(llama, dtype="float32", device="cpu").generate(prompts, sp, use_tqdm=False)
    engine = AsyncLLM(llama, dtype="float32", device="cpu", async_scheduling=True)

    async def collect(ids, rid):
        return [out async for out in engine.generate(ids, sp, rid)]

    async def main():  # (a failure in the engine's thread would leave the streams waiting)
        return await asyncio.wait_for(asyncio.gather(*[collect(p, f"a{i}") for i, p in enumerate(prompts)]), 120)

    try:
        streams = asyncio.run(main())
    finally:
        engine.shutdown()
    for seen, want in zip(streams, ref):
        final = [c.token_ids for c in seen[-1].outputs]
        assert final == [c.token_ids for c in want.outputs]
        for out in seen:
            for c, f in zip(out.outputs, final):
                assert c.token_ids == f[: len(c.token_ids)] and len(c.logprobs) == len(c.token_ids)


@needs_interpreter
@pytest.mark.parametrize("mode", ["raw_logprobs", "processed_logprobs"])
def test_async_launch_never_waits_for_the_device(tmp_path, monkeypatch, mode):
    """What makes the overlap real on a GPU: from scheduling a step to launching its draw's copy to
    the host, the GPU path never makes the host wait (no item/tolist/bool of a tensor, no
    synchronize), for prefill, decode and mixed steps, greedy and sampled rows, n > 1 forks and
    logprobs (the processed modes filter the logits in the sampler: top-k, top-p); only Draw.host()
    waits, after the next step is launched."""
    from test_gpu_path import no_host_sync

    from bstar.engine.core.llm_engine import LLMEngine

    monkeypatch.setenv("BSTAR_KERNELS", "triton")
    path = make_model(str(tmp_path / "q"), "qwen2", seed=3, tokenizer=False, num_key_value_heads=1)
    run = LLMEngine._run
    launched = []

    def guarded(self, batch):
        with no_host_sync(staging=True):
            seqs, draw = run(self, batch)
            if seqs:
                draw.start_copy()
        launched.append((batch.num_decode, len(batch.seqs)))
        return seqs, draw

    monkeypatch.setattr(LLMEngine, "_run", guarded)
    llm = LLM(
        path,
        dtype="float32",
        device="cpu",
        max_num_seqs=8,
        max_num_batched_tokens=24,
        async_scheduling=True,
        logprobs_mode=mode,
    )
    params = [
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
        SamplingParams(n=3, temperature=1.0, top_p=0.9, top_k=20, seed=2, max_tokens=5, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0.8, seed=3, max_tokens=5, min_tokens=3, stop_token_ids=[7, 9], presence_penalty=1),
        SamplingParams(temperature=0.8, seed=4, max_tokens=5, repetition_penalty=1.2, frequency_penalty=0.1),
        SamplingParams(temperature=0.8, seed=5, max_tokens=4, prompt_logprobs=2),  # over two prefill chunks
    ]
    outs = llm.generate(_prompts(7, [9, 30, 12, 5, 28]), params, use_tqdm=False)
    assert any(nd == B for nd, B in launched) and any(0 < nd < B for nd, B in launched)  # decode-only and mixed
    plp = outs[-1].prompt_logprobs  # (launched without a wait, taken in a later step)
    assert plp[0] is None and all(len(e) >= 2 for e in plp[1:]) and len(plp) == 28


def test_prompt_logprobs_of_a_request_aborted_in_flight_are_dropped(llama):
    """Prompt logprobs are launched with their step and put in their request a step later; a request
    aborted in between loses them without harm to the others."""
    llm = LLM(llama, dtype="float32", device="cpu", async_scheduling=True)
    eng = llm.engine
    a, b = _prompts(3, [9, 12])
    eng.add_request("a", a, SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=1))
    eng.add_request("b", b, SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=1))
    assert eng.step() == [] and len(eng.prompt_logprobs.copies) == 1  # launched, not taken in
    aborted = eng.abort_request("a")
    assert aborted.prompt_logprobs == [None] * 9
    outs = []
    while eng.has_unfinished_requests():
        outs += eng.step()
    assert [o.request_id for o in outs] == ["b"] and not eng.prompt_logprobs.copies
    assert aborted.prompt_logprobs == [None] * 9  # an output handed out is not written to afterwards
    want = LLM(llama, dtype="float32", device="cpu").generate(
        [b], SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=1), use_tqdm=False
    )[0]
    got = [e and {t: (x.logprob, x.rank) for t, x in e.items()} for e in outs[0].prompt_logprobs]
    assert got == [e and {t: (x.logprob, x.rank) for t, x in e.items()} for e in want.prompt_logprobs]
    assert got[0] is None and all(got[1:])
