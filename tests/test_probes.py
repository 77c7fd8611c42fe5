"""Probes as a careful user and as an attacker would send them: bad API inputs, a poisoned batch, bad CLI
inputs and I/O faults. Each asserts one line (a typed error, or "error: ..." and exit 1 from the CLI, no
traceback), that nothing was written, and that the engine still serves the good requests, whose outputs
equal the same requests run alone."""

import asyncio
import json
import random

import pytest

from bstar.engine import LLM, AsyncLLM, RequestError, SamplingParams

CPU = dict(device="cpu", dtype="float32")
VOCAB = 256  # good prompt ids are below model_factory's vocabulary


@pytest.fixture(scope="module")
def llm(llama_dir):
    return LLM(str(llama_dir), **CPU, num_kv_blocks=48, block_size=16)  # < the context: a KV refusal


def _good(rng: random.Random, k: int):
    """A random valid request: prompt ids and seeded params (a seeded draw depends only on its request)."""
    prompt = [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 12))]
    params = SamplingParams(
        n=rng.choice([1, 1, 2]),
        temperature=rng.choice([0, 0.7, 1.0, 1.3]),
        top_p=rng.choice([1.0, 0.9]),
        top_k=rng.choice([-1, 0, 5, 1000]),
        min_p=rng.choice([0.0, 0.05]),
        max_tokens=rng.randint(1, 6),
        min_tokens=rng.choice([0, 1]),
        stop_token_ids=rng.choice([None, [rng.randrange(VOCAB)]]),
        repetition_penalty=rng.choice([1.0, 1.2]),
        logprobs=rng.choice([None, 0, 2]),
        seed=1000 + k,
        ignore_eos=rng.choice([False, True]),
    )
    return prompt, params


BAD_PARAMS = [
    dict(temperature="0.5"),
    dict(max_tokens=True),
    dict(n=2.0),
    dict(top_p=float("nan")),
    dict(top_k=1.5),
    dict(min_p="0"),
    dict(seed="7"),
    dict(logprobs=True),
    dict(stop=5),
    dict(stop=[b"x"]),
    dict(stop_token_ids="1 2"),
    dict(stop_token_ids=[-1]),
    dict(ignore_eos="yes"),
    dict(presence_penalty=float("inf")),
    dict(repetition_penalty=None),
]


@pytest.mark.parametrize(
    "bad", BAD_PARAMS, ids=[next(iter(b)) + "=" + repr(next(iter(b.values()))) for b in BAD_PARAMS]
)
def test_sampling_params_refuse_bad_types_in_one_line(bad):
    name = next(iter(bad))
    with pytest.raises(RequestError, match=f"invalid sampling value {name}=") as e:
        SamplingParams(**bad)
    assert "\n" not in str(e.value)
    p = SamplingParams()  # a field changed after construction is checked when the request is added
    setattr(p, name, bad[name])
    with pytest.raises(RequestError, match=f"invalid sampling value {name}="):
        p.validate()


def _bad_requests(eng):
    """(prompt, params, what the one line says) that add_request must refuse before anything runs."""
    vocab, max_model_len = eng.mcfg.vocab_size, eng.max_model_len
    return [
        ([1, 2, 3], SamplingParams(min_tokens=3, stop_token_ids=[10**9]), "stop token id 1000000000 is outside"),
        ([1, 2, vocab], SamplingParams(), f"prompt token id {vocab} is outside the vocabulary"),
        ([1, -2], SamplingParams(), "prompt token id -2 is outside"),
        ([], SamplingParams(), "empty prompt"),
        ([5] * max_model_len, SamplingParams(), "longer than the context"),
        ([5] * 40, SamplingParams(max_tokens=2000), "needs .* KV blocks but the whole cache has"),
        ([5, 6], {"temperature": 0}, "must be a SamplingParams"),
        ([5, 6], SamplingParams(logprobs=10**6), "more than max_logprobs"),
    ]


def test_bad_requests_refused_at_admission_engine_keeps_serving(llama_dir):
    llm = LLM(str(llama_dir), **CPU, num_kv_blocks=8, block_size=16, max_model_len=512)
    eng = llm.llm_engine
    good = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    ref = llm.generate([[7, 8, 9]], good, use_tqdm=False)[0].outputs[0].token_ids
    for k, (prompt, params, why) in enumerate(_bad_requests(eng)):
        with pytest.raises(RequestError, match=why) as e:
            eng.add_request(f"bad{k}", prompt, params)
        assert "\n" not in str(e.value)
        assert not eng.has_unfinished_requests() and eng.block_manager.num_used == 0
    assert llm.generate([[7, 8, 9]], good, use_tqdm=False)[0].outputs[0].token_ids == ref


def test_candidate_outgrowing_the_whole_cache_fails_alone(llama_dir):
    """max_tokens=None lets a candidate grow to the context: with 2 blocks it ends with an error, not a
    RuntimeError that takes the next request down too (the issue's probe)."""
    llm = LLM(str(llama_dir), **CPU, num_kv_blocks=2, block_size=16)
    long = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)
    good = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    outs = llm.generate([[5, 6, 7], [8, 9]], [long, good], use_tqdm=False)
    assert outs[0].outputs[0].finish_reason == "error" and "whole cache" in outs[0].error
    assert len(outs[0].outputs[0].token_ids) >= 32 - 3 - 1  # it ran until the cache was full
    assert outs[1].error is None and len(outs[1].outputs[0].token_ids) == 3
    assert llm.llm_engine.block_manager.num_used == 0
    assert llm.generate([[8, 9]], good, use_tqdm=False)[0].outputs[0].token_ids == outs[1].outputs[0].token_ids


def _poison_runner(eng, poison: set[str], where: str = "run"):
    """Make the model step raise whenever a poisoned request is in the batch (a stand-in for any fault
    inside a step: a kernel, the sampler, a device error)."""
    target = eng.runner if where == "run" else eng.sampler
    name = "run" if where == "run" else "__call__"
    orig = getattr(target, name)

    def poisoned(*args, **kwargs):
        seqs = args[0].seqs if where == "run" else args[2]
        if any(s.request_id in poison for s in seqs):
            raise IndexError("index 1000000000 is out of bounds (injected)")
        return orig(*args, **kwargs)

    if where == "run":
        eng.runner.run = poisoned
        return lambda: delattr(eng.runner, "run")
    cls = type(eng.sampler)
    eng.sampler = type("PoisonedSampler", (cls,), {"__call__": lambda self, *a, **k: poisoned(*a, **k)})(
        eng.eos_ids, eng.ecfg.logprobs_mode
    )
    return lambda: setattr(eng, "sampler", cls(eng.eos_ids, eng.ecfg.logprobs_mode))


def _alone(llm, prompt, params):
    return [c.token_ids for c in llm.generate([prompt], params, use_tqdm=False)[0].outputs]


@pytest.mark.parametrize("where", ["run", "sampler"])
def test_fifty_good_and_one_poisoned_request_in_a_step(llm, where):
    """50 good requests + 1 whose step raises: 50 good outputs (equal to each run alone) and 1 error; the
    blocks are freed and the engine keeps serving."""
    rng = random.Random(29)
    reqs = [_good(rng, k) for k in range(50)]
    eng = llm.llm_engine
    ids = [f"g{k}" for k in range(50)]
    for rid, (prompt, params) in zip(ids, reqs):
        eng.add_request(rid, prompt, params)
    eng.add_request("poison", [9, 9, 9], SamplingParams(max_tokens=4))
    restore = _poison_runner(eng, {"poison"}, where)
    try:
        got = {}
        while eng.has_unfinished_requests():
            for out in eng.step():
                got[out.request_id] = out
    finally:
        restore()
    assert got["poison"].outputs[0].finish_reason == "error"
    assert "IndexError" in got["poison"].error and "\n" not in got["poison"].error
    assert all(got[r].error is None for r in ids)
    assert eng.block_manager.num_used == 0 and not eng.has_unfinished_requests()
    for rid, (prompt, params) in zip(ids, reqs):
        assert [c.token_ids for c in got[rid].outputs] == _alone(llm, prompt, params), rid


def test_fuzz_mixed_batches_good_outputs_equal_alone(llm):
    """Random batches of good requests with bad ones mixed in (refused at admission, or poisoned inside a
    step): every good output equals the same request run alone."""
    rng = random.Random(7)
    eng = llm.llm_engine
    for round_ in range(3):
        reqs = [_good(rng, 100 * round_ + k) for k in range(rng.randint(4, 10))]
        bad = _bad_requests(eng)
        poison = {f"p{round_}-{k}" for k in range(rng.randint(1, 2))}
        ids = []
        for k, (prompt, params) in enumerate(reqs):
            ids.append(f"r{round_}-{k}")
            eng.add_request(ids[-1], prompt, params)
            if rng.random() < 0.5:  # refused, one line; the batch is untouched
                prompt_b, params_b, why = rng.choice(bad)
                with pytest.raises(RequestError, match=why):
                    eng.add_request(f"b{round_}-{k}", prompt_b, params_b)
        for rid in poison:
            eng.add_request(rid, [rng.randrange(3, VOCAB)], SamplingParams(max_tokens=3, seed=1))
        restore = _poison_runner(eng, poison, rng.choice(["run", "sampler"]))
        try:
            got = {}
            while eng.has_unfinished_requests():
                for out in eng.step():
                    got[out.request_id] = out
        finally:
            restore()
        assert {r for r in got if got[r].error} == poison
        assert eng.block_manager.num_used == 0
        for rid, (prompt, params) in zip(ids, reqs):
            assert [c.token_ids for c in got[rid].outputs] == _alone(llm, prompt, params), rid


def test_async_llm_fifty_good_and_one_bad(llama_dir):
    """AsyncLLM with 50 good requests in flight: one refused at admission raises its one line in its own
    generator, one poisoned inside a step ends with finish_reason "error"; the 50 finish as run alone."""
    engine = AsyncLLM(str(llama_dir), **CPU, num_kv_blocks=64)
    rng = random.Random(50)
    reqs = [_good(rng, k) for k in range(50)]
    restore = _poison_runner(engine.llm_engine, {"poison"})

    async def collect(prompt, params, rid):
        last = None
        async for out in engine.generate(prompt, params, rid):
            last = out
        return last

    async def main():
        good = [collect(p, sp, f"a{k}") for k, (p, sp) in enumerate(reqs)]
        bad = collect([1, 2, 3], SamplingParams(min_tokens=3, stop_token_ids=[10**9]), "bad")
        poisoned = collect([4, 5], SamplingParams(max_tokens=3), "poison")
        return await asyncio.gather(*good, bad, poisoned, return_exceptions=True)

    try:
        *outs, bad, poisoned = asyncio.run(main())
    finally:
        restore()
        engine.shutdown()
    assert isinstance(bad, RequestError) and "stop token id 1000000000" in str(bad)
    assert poisoned.outputs[0].finish_reason == "error" and poisoned.error
    llm = LLM(str(llama_dir), **CPU, num_kv_blocks=64)
    for out, (prompt, params) in zip(outs, reqs):
        assert not isinstance(out, BaseException), out
        assert out.error is None and [c.token_ids for c in out.outputs] == _alone(llm, prompt, params)


def test_nan_weights_end_requests_with_an_error_and_valid_json(tmp_path):
    """All-NaN weights: the request ends with an error (never "NaN" in an output), the engine serves on."""
    import torch

    from bstar.testing.model_factory import hf_model, make_model

    d = make_model(str(tmp_path / "nan"), "llama", seed=3)
    llm = LLM(d, **CPU)
    llm.load_weights([(n, torch.full_like(t, float("nan"))) for n, t in hf_model(d).state_dict().items()])
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, logprobs=1), use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "error" and "NaN" in out.error
    json.dumps([c.cumulative_logprob for c in out.outputs], allow_nan=False)
    assert llm.llm_engine.block_manager.num_used == 0
