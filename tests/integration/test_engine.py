"""Engine against transformers (the reference implementation) on tiny random checkpoints."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from bstar.engine import LLM, CheckpointError, RequestError, SamplingParams
from bstar.testing.model_factory import ARCHS, hf_model, make_model, make_qwen3_model

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}
ARCH_OPTS = {
    "llama": dict(rope_scaling=LLAMA3_ROPE, rope_theta=50000.0),  # GQA 4:2 + llama3 rope
    "qwen2": dict(num_key_value_heads=1),  # q/k/v bias, GQA 4:1
    "qwen2_tied": dict(tie_word_embeddings=True),  # tied embeddings (greedy repeats itself: logits only)
    "mistral": dict(num_key_value_heads=4, sliding_window=4096),
    "qwen3": dict(),  # q_norm / k_norm, head_dim 24 (4 heads * 24 != hidden 64), GQA 4:2, no bias
    "qwen3_tied": dict(tie_word_embeddings=True, num_key_value_heads=1, head_dim=32),
}


def _build(path, arch, seed, **opts):
    if arch == "qwen3":
        return make_qwen3_model(path, seed=seed, **opts)
    return make_model(path, arch, seed=seed, **opts)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {a: _build(str(root / a), a.split("_")[0], seed=i + 1, **ARCH_OPTS[a]) for i, a in enumerate(ARCH_OPTS)}


@pytest.fixture(scope="module")
def llama(models):
    return models["llama"]


@pytest.mark.parametrize("module", ["bstar.engine", "bstar.engine.errors", "bstar.engine.entrypoints.sampling_params"])
def test_package_import_does_not_load_torch(module):
    """`from bstar.engine.errors import ...` (all that bstar's light modules need) must not pay for torch."""
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", f"importing {module} loaded {out.strip()}"


def test_package_names_resolve():
    import bstar.engine as engine

    assert sorted(engine.__all__) == sorted(engine._MODULE_OF)
    for name in engine.__all__:
        assert getattr(engine, name).__name__ == name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        engine.nope  # noqa: B018


def _prompts(seed, lengths, vocab=320):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("arch", list(ARCH_OPTS))
def test_logits_match_transformers(models, arch):
    path = models[arch]
    llm = LLM(path, dtype="float32", device="cpu")
    hf = hf_model(path)
    prompts = _prompts(0, [1, 7, 16, 33, 90])  # one batch, ragged, on and off block boundaries
    ours = llm.compute_logits(prompts)
    for p, o in zip(prompts, ours):
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0].float()
        assert o.shape == ref.shape
        assert (o - ref).abs().max().item() < 1e-4


def test_chunked_prefill_matches_whole(llama):
    prompts = _prompts(1, [70, 45])
    whole = LLM(llama, dtype="float32", device="cpu").compute_logits(prompts)
    chunked = LLM(llama, dtype="float32", device="cpu", max_num_batched_tokens=16).compute_logits(prompts)
    for a, b in zip(whole, chunked):
        assert (a - b).abs().max().item() < 1e-4


@pytest.mark.parametrize("use_prefix_cache", [False, True])
def test_prompt_forward_preempted_midway_is_recomputed(llama, monkeypatch, use_prefix_cache):
    """Prompt-only forwards (compute_logits, PRM) run under the scheduler's rules, preemption included: a
    list preempted mid-prefill is computed again and its rows are those of an uninterrupted run. A consumer
    that stops early leaves the engine idle with every block free."""
    from bstar.engine.core.prompt_forward import forward_prompts

    prompts = _prompts(2, [70, 45, 9, 33])
    eng = LLM(llama, dtype="float32", device="cpu", max_num_batched_tokens=16).engine
    want = [h for _, _, h in forward_prompts(eng, prompts)]
    eng.reset_prefix_cache()
    sched, advance, steps = eng.scheduler, eng.scheduler.advance, []

    def advance_then_preempt(batch):
        out = advance(batch)
        steps.append(batch)
        if len(steps) in (2, 6):
            sched.preempt_all()
        return out

    monkeypatch.setattr(sched, "advance", advance_then_preempt)
    got = list(forward_prompts(eng, prompts, use_prefix_cache=use_prefix_cache))
    assert sched.num_preemptions >= 2 and [k for k, _, _ in got] == [0, 1, 2, 3]
    for (_, first, h), w in zip(got, want):
        assert h.shape[0] == len(w) - first and (h - w[first:]).abs().max().item() < 1e-4
    assert not sched.has_work() and eng.block_manager.num_used == 0
    stream = forward_prompts(eng, prompts)
    next(stream)
    stream.close()
    assert not sched.has_work() and eng.block_manager.num_used == 0


# With a 16-token step budget, prompts longer than it prefill in chunks next to other prompts' decodes.
@pytest.mark.parametrize("max_num_batched_tokens", [4096, 16])
@pytest.mark.parametrize("arch", [*ARCHS, "qwen3"])
def test_greedy_matches_transformers_generate(models, arch, max_num_batched_tokens):
    path = models[arch]
    llm = LLM(path, dtype="float32", device="cpu", max_num_batched_tokens=max_num_batched_tokens)
    hf = hf_model(path)
    prompts = _prompts(2, [5, 19, 40])
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=40, min_tokens=40), use_tqdm=False)
    for p, o in zip(prompts, outs):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=40, min_new_tokens=40, do_sample=False)[0, len(p) :]
        assert o.outputs[0].token_ids == ref.tolist()
        assert len(set(ref.tolist())) > 3  # a real sequence, not one repeated token


def test_sliding_window_caps_the_context(tmp_path):
    """Mistral with a 32-token window: max_model_len is capped at the window (within it, sliding
    attention equals full attention), asked for or not; generation within it matches transformers."""
    path = make_model(str(tmp_path / "m"), "mistral", seed=4, sliding_window=32)
    for asked in (None, 64):
        assert LLM(path, dtype="float32", device="cpu", max_model_len=asked).engine.max_model_len == 32
    assert LLM(path, dtype="float32", device="cpu", max_model_len=16).engine.max_model_len == 16
    llm = LLM(path, dtype="float32", device="cpu")
    with pytest.raises(RequestError, match="max_model_len is 32"):
        llm.generate([list(range(3, 35))], SamplingParams(), use_tqdm=False)
    p = _prompts(18, [12])[0]
    o = llm.generate([p], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True), use_tqdm=False)[0]
    assert o.outputs[0].finish_reason == "length" and len(p) + len(o.outputs[0].token_ids) == 32
    ref = hf_model(path).generate(torch.tensor([p]), max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert o.outputs[0].token_ids == ref[0, len(p) :].tolist()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_close_to_transformers(models, arch, dtype):
    path = models[arch]
    name = {torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]
    llm = LLM(path, dtype=name, device="cpu")
    hf = hf_model(path, dtype=torch.float32)
    p = _prompts(3, [24])[0]
    ours = llm.compute_logits([p])[0]
    with torch.no_grad():
        ref = hf(torch.tensor([p])).logits[0]
    rel = (ours - ref).norm() / ref.norm()
    assert rel < (2e-2 if dtype == torch.bfloat16 else 5e-3)


@pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="Triton kernels on CPU tensors need TRITON_INTERPRET=1"
)
def test_qwen3_triton_path_matches_transformers(models, monkeypatch):
    """Qwen3 through the Triton kernels (under the interpreter on CPU): the fused q/k-norm + rotary,
    paged prefill / decode attention, RMSNorm and sampling, against transformers; fp32 (the
    interpreter's bf16 dot is unusable)."""
    monkeypatch.setenv("BSTAR_KERNELS", "triton")
    path = models["qwen3"]
    llm = LLM(path, dtype="float32", device="cpu", max_num_batched_tokens=24)
    hf = hf_model(path)
    prompts = _prompts(27, [1, 9, 30])
    for p, o in zip(prompts, llm.compute_logits(prompts)):
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0]
        assert (o - ref).abs().max().item() < 1e-4
    outs = llm.generate(prompts[1:], SamplingParams(temperature=0, max_tokens=10, min_tokens=10), use_tqdm=False)
    for p, o in zip(prompts[1:], outs):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=10, min_new_tokens=10, do_sample=False)[0, len(p) :]
        assert o.outputs[0].token_ids == ref.tolist()


def test_qwen3_config(models, tmp_path):
    """head_dim read from the config (never hidden / heads); the checkpoint's q_norm / k_norm names
    load; Qwen3's sliding window only where transformers' layer_types use it."""
    from bstar.engine.config import ModelConfig

    cfg = ModelConfig.from_dir(models["qwen3"])
    assert cfg.architecture == "Qwen3ForCausalLM" and cfg.qk_norm and cfg.head_dim == 24 and not cfg.qkv_bias
    assert cfg.sliding_window is None
    llm = LLM(models["qwen3"], dtype="float32", device="cpu")
    attn = llm.engine.model.model.layers[1].self_attn
    from safetensors.torch import load_file

    w = load_file(os.path.join(models["qwen3"], "model.safetensors"))
    assert torch.equal(attn.q_norm.weight, w["model.layers.1.self_attn.q_norm.weight"])
    assert torch.equal(attn.k_norm.weight, w["model.layers.1.self_attn.k_norm.weight"])
    base = json.load(open(os.path.join(models["qwen3"], "config.json")))
    for use, types, want in [
        (True, ["full_attention", "sliding_attention"], 64),
        (True, ["full_attention", "full_attention"], None),
        (False, ["sliding_attention"] * 2, None),
    ]:
        c = dict(base, use_sliding_window=use, sliding_window=64, layer_types=types)
        assert ModelConfig.from_dict(c).sliding_window == want
    c = dict(base, architectures=None, model_type="qwen3")
    assert ModelConfig.from_dict(c).architecture == "Qwen3ForCausalLM"


def test_n_candidates_share_prompt_blocks(llama):
    llm = LLM(llama, dtype="float32", device="cpu", num_kv_blocks=256)
    eng, bm = llm.engine, llm.engine.block_manager
    prompt = _prompts(4, [40])[0]  # 2 full blocks + a partial one
    eng.add_request("r", prompt, SamplingParams(n=16, temperature=1.0, max_tokens=4, ignore_eos=True, seed=0))
    eng.step()  # prefill once, then fork 16 candidates
    assert len(eng.scheduler.running) == 16
    assert bm.num_used == 3  # the prompt's KV is stored once
    tables = [s.block_table for s in eng.scheduler.running]
    assert all(t[:3] == tables[0][:3] for t in tables)
    eng.step()  # each candidate writes its first token: copy-on-write of the shared partial block
    assert bm.num_used == 3 + 15
    assert all(t[:2] == tables[0][:2] for t in (s.block_table for s in eng.scheduler.running))
    while eng.has_unfinished_requests():
        outs = eng.step()
    assert bm.num_used == 0
    assert len(outs[0].outputs) == 16 and all(len(c.token_ids) == 4 for c in outs[0].outputs)


def test_shared_prompt_candidates_equal_separate_requests(llama):
    """Forked candidates see the same KV as if each had prefilled the prompt alone."""
    llm = LLM(llama, dtype="float32", device="cpu", enable_prefix_caching=False)
    p = _prompts(5, [37])[0]
    forked = llm.generate([p], SamplingParams(n=4, temperature=1.0, max_tokens=12, seed=7), use_tqdm=False)[0]
    single = LLM(llama, dtype="float32", device="cpu", enable_prefix_caching=False)
    for j in range(4):
        eng = single.engine
        seq_out = forked.outputs[j]
        logits = single.compute_logits([p + seq_out.token_ids[:-1]])[0][len(p) - 1 :]
        lp = torch.log_softmax(logits, -1)[torch.arange(len(seq_out.token_ids)), seq_out.token_ids]
        assert abs(lp.sum().item() - seq_out.cumulative_logprob) < 1e-3
        assert eng.block_manager.num_used == 0


def test_preemption_keeps_greedy_outputs(llama):
    prompts = _prompts(6, [37, 20, 50, 9, 33, 28])
    sp = SamplingParams(n=3, temperature=0, max_tokens=40, ignore_eos=True)
    ref = LLM(llama, dtype="float32", device="cpu").generate(prompts, sp, use_tqdm=False)
    small = LLM(llama, dtype="float32", device="cpu", num_kv_blocks=14)
    got = small.generate(prompts, sp, use_tqdm=False)
    assert small.engine.scheduler.num_preemptions > 0
    for a, b in zip(ref, got):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert small.engine.block_manager.num_used == 0


def test_seeded_sampling_is_reproducible_across_batching(llama):
    prompts = _prompts(7, [12, 30])
    sp = SamplingParams(n=4, temperature=0.9, top_p=0.95, max_tokens=20, seed=11, ignore_eos=True)
    a = LLM(llama, dtype="float32", device="cpu").generate(prompts, sp, use_tqdm=False)
    b = LLM(llama, dtype="float32", device="cpu", num_kv_blocks=10, max_num_seqs=3).generate(
        prompts, sp, use_tqdm=False
    )
    assert [[c.token_ids for c in o.outputs] for o in a] == [[c.token_ids for c in o.outputs] for o in b]
    c = LLM(llama, dtype="float32", device="cpu").generate(
        prompts,
        SamplingParams(n=4, temperature=0.9, top_p=0.95, max_tokens=20, seed=12, ignore_eos=True),
        use_tqdm=False,
    )
    assert [[x.token_ids for x in o.outputs] for o in a] != [[x.token_ids for x in o.outputs] for o in c]
    # candidates of one prompt differ from one another
    assert len({tuple(x.token_ids) for x in a[0].outputs}) == 4


def test_engine_seed_makes_unseeded_requests_reproducible(llama):
    sp = SamplingParams(n=2, temperature=1.0, max_tokens=10, ignore_eos=True)
    p = _prompts(8, [10])
    a = LLM(llama, dtype="float32", device="cpu", seed=3).generate(p, sp, use_tqdm=False)
    b = LLM(llama, dtype="float32", device="cpu", seed=3).generate(p, sp, use_tqdm=False)
    assert [x.token_ids for x in a[0].outputs] == [x.token_ids for x in b[0].outputs]
    c = LLM(llama, dtype="float32", device="cpu", seed=4).generate(p, sp, use_tqdm=False)
    assert [x.token_ids for x in a[0].outputs] != [x.token_ids for x in c[0].outputs]


def _next_token_probs(path, prompt, temperature):
    with torch.no_grad():
        logits = hf_model(path)(torch.tensor([prompt])).logits[0, -1].double()
    return torch.softmax(logits / temperature, -1)


def test_sampling_frequencies_match_softmax(llama):
    """Chi-square of 4000 one-token draws against transformers' softmax at temperature 1.5."""
    from scipy.stats import chisquare

    p = _prompts(9, [8])[0]
    llm = LLM(llama, dtype="float32", device="cpu")
    out = llm.generate([p], SamplingParams(n=4000, temperature=1.5, max_tokens=1, seed=0), use_tqdm=False)[0]
    counts = torch.bincount(torch.tensor([c.token_ids[0] for c in out.outputs]), minlength=320).double()
    probs = _next_token_probs(llama, p, 1.5)
    big = probs * 4000 >= 5  # pool rare tokens into one bin
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([probs[big], probs[~big].sum()[None]]) * 4000
    assert chisquare(obs.numpy(), exp.numpy()).pvalue > 1e-3


@pytest.mark.parametrize("opts", [dict(top_k=5), dict(top_p=0.3), dict(min_p=0.2), dict(top_k=8, top_p=0.5)])
def test_only_allowed_tokens_are_drawn(llama, opts):
    p = _prompts(10, [8])[0]
    llm = LLM(llama, dtype="float32", device="cpu")
    out = llm.generate([p], SamplingParams(n=300, temperature=1.0, max_tokens=1, seed=1, **opts), use_tqdm=False)[0]
    drawn = {c.token_ids[0] for c in out.outputs}
    probs = _next_token_probs(llama, p, 1.0)
    order = torch.argsort(probs, descending=True)
    allowed = set(order.tolist())
    if "top_k" in opts:
        allowed &= set(order[: opts["top_k"]].tolist())
    if "top_p" in opts:
        q = probs[order[: opts.get("top_k", len(order))]]
        q = q / q.sum()
        before = torch.cumsum(q, 0) - q
        allowed &= set(order[: len(q)][before < opts["top_p"]].tolist())
    if "min_p" in opts:
        allowed &= set(torch.nonzero(probs >= opts["min_p"] * probs.max()).flatten().tolist())
    assert drawn <= allowed
    assert len(drawn) > 1


def test_logprobs_match_transformers(llama):
    p = _prompts(11, [15])[0]
    llm = LLM(llama, dtype="float32", device="cpu")
    out = llm.generate(
        [p], SamplingParams(temperature=0.7, max_tokens=6, logprobs=3, seed=2, ignore_eos=True), use_tqdm=False
    )[0].outputs[0]
    with torch.no_grad():
        logits = hf_model(llama)(torch.tensor([p + out.token_ids])).logits[0, len(p) - 1 : -1]
    ref = torch.log_softmax(logits.double(), -1)
    total = 0.0
    tok_text = llm.get_tokenizer()
    for t, (tok, d) in enumerate(zip(out.token_ids, out.logprobs)):
        assert next(iter(d)) == tok  # the sampled token first, as vLLM builds the dict
        assert abs(d[tok].logprob - ref[t, tok].item()) < 1e-4
        assert d[tok].rank == 1 + int((ref[t] > ref[t, tok]).sum())
        top = torch.topk(ref[t], 3)
        for j, (i, v) in enumerate(zip(top.indices.tolist(), top.values.tolist())):
            assert abs(d[i].logprob - v) < 1e-4 and d[i].rank == j + 1
        assert set(d) == {tok, *top.indices.tolist()}
        assert all(x.decoded_token == tok_text.decode([i], skip_special_tokens=False) for i, x in d.items())
        total += ref[t, tok].item()
    assert abs(out.cumulative_logprob - total) < 1e-3


def test_stopping_rules(llama):
    llm = LLM(llama, dtype="float32", device="cpu")
    p = _prompts(12, [10])[0]
    free = llm.generate([p], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)[0].outputs[
        0
    ]
    assert free.finish_reason == "length" and len(free.token_ids) == 30
    stop_id = free.token_ids[5]
    first = free.token_ids.index(stop_id)
    o = llm.generate([p], SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_id]), use_tqdm=False)[
        0
    ].outputs[0]
    assert o.finish_reason == "stop" and o.stop_reason == stop_id and o.token_ids == free.token_ids[: first + 1]
    # min_tokens bans the stop token until reached
    o = llm.generate(
        [p],
        SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_id], min_tokens=first + 2),
        use_tqdm=False,
    )[0].outputs[0]
    assert len(o.token_ids) >= first + 2 and stop_id not in o.token_ids[: first + 2]
    # stop strings cut the text: the first two-letter ASCII word piece of the free text after its
    # first character, so the cut output is non-empty
    tok = llm.get_tokenizer()
    text = tok.decode(free.token_ids)
    stop = next(
        text[i : i + 2] for i in range(1, len(text) - 1) if text[i : i + 2].isascii() and text[i : i + 2].isalnum()
    )
    k = text.find(stop)
    assert k > 0
    for include in (False, True):
        o = llm.generate(
            [p],
            SamplingParams(
                temperature=0, max_tokens=30, stop=stop, ignore_eos=True, include_stop_str_in_output=include
            ),
            use_tqdm=False,
        )[0].outputs[0]
        assert o.finish_reason == "stop" and o.stop_reason == stop
        assert o.text == (text[: k + len(stop)] if include else text[:k])
        # generation ended at the token that completed the stop string
        assert o.token_ids == free.token_ids[: len(o.token_ids)]
        assert stop in tok.decode(o.token_ids) and stop not in tok.decode(o.token_ids[:-1])


def test_eos_stops_unless_ignored(tmp_path):
    path = make_model(str(tmp_path / "m"), "llama", seed=3)
    llm = LLM(path, dtype="float32", device="cpu")
    p = _prompts(13, [6])[0]
    free = llm.generate([p], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)[0].outputs[
        0
    ]
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["eos_token_id"] = free.token_ids[3]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    os.remove(os.path.join(path, "generation_config.json")) if os.path.exists(
        os.path.join(path, "generation_config.json")
    ) else None
    llm = LLM(path, dtype="float32", device="cpu")
    o = llm.generate([p], SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)[0].outputs[0]
    k = free.token_ids.index(free.token_ids[3])
    assert o.finish_reason == "stop" and o.token_ids == free.token_ids[: k + 1]
    o = llm.generate([p], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    assert o.token_ids == free.token_ids


def test_prefix_cache_across_requests(llama):
    llm = LLM(llama, dtype="float32", device="cpu")
    shared = _prompts(14, [48])[0]
    a, b = shared + [5, 6, 7], shared + [9, 10]
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ra = llm.generate([a], sp, use_tqdm=False)[0]
    hits = llm.engine.block_manager.prefix_hits
    rb = llm.generate([b], sp, use_tqdm=False)[0]
    assert llm.engine.block_manager.prefix_hits - hits == 48  # three full blocks reused
    fresh = LLM(llama, dtype="float32", device="cpu", enable_prefix_caching=False)
    assert fresh.generate([b], sp, use_tqdm=False)[0].outputs[0].token_ids == rb.outputs[0].token_ids
    assert ra.outputs[0].token_ids == fresh.generate([a], sp, use_tqdm=False)[0].outputs[0].token_ids


def test_text_prompts_and_tokenizer(llama):
    llm = LLM(llama, dtype="float32", device="cpu")
    outs = llm.generate(
        ["Janet has 3 apples", "The quick brown fox"],
        SamplingParams(n=2, temperature=0.8, max_tokens=8, seed=0),
        use_tqdm=False,
    )
    tok = llm.get_tokenizer()
    assert outs[0].prompt_token_ids == tok.encode("Janet has 3 apples")
    assert outs[0].prompt_token_ids[0] == 0  # BOS from the tokenizer's post-processor
    for o in outs:
        for c in o.outputs:
            assert c.text == tok.decode(c.token_ids)


def test_load_weights_in_process(models, tmp_path):
    src, other = models["llama"], make_model(str(tmp_path / "other"), "llama", seed=99, **ARCH_OPTS["llama"])
    llm = LLM(src, dtype="float32", device="cpu")
    p = _prompts(15, [20])
    before = llm.generate(p, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0]
    from safetensors.torch import load_file

    llm.load_weights(load_file(os.path.join(other, "model.safetensors")).items())
    after_logits = llm.compute_logits(p)[0]
    ref_logits = LLM(other, dtype="float32", device="cpu").compute_logits(p)[0]
    assert torch.equal(after_logits, ref_logits)
    after = llm.generate(p, SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0]
    assert after.outputs[0].token_ids != before.outputs[0].token_ids


@pytest.fixture(scope="module")
def sharded(llama, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("sharded") / "m"
    AutoModelForCausalLM.from_pretrained(llama).save_pretrained(out, max_shard_size="40KB")
    assert (out / "model.safetensors.index.json").exists()
    return str(out)


def test_sharded_checkpoint(llama, sharded):
    p = _prompts(16, [9])
    a = LLM(sharded, dtype="float32", device="cpu").compute_logits(p)[0]
    b = LLM(llama, dtype="float32", device="cpu").compute_logits(p)[0]
    assert torch.equal(a, b)


# -- vLLM's sampling fields: penalties, logprobs modes, prompt logprobs, text rules ---------------


def _hf_logits(path, ids):
    with torch.no_grad():
        return hf_model(path)(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_repetition_penalty_greedy_matches_transformers(models, arch):
    """Greedy generation with repetition_penalty equals transformers' generate(repetition_penalty=...),
    one prompt per call (transformers counts a left-padded batch's pad tokens as seen)."""
    path = models[arch]
    llm = LLM(path, dtype="float32", device="cpu")
    hf = hf_model(path)
    prompts = _prompts(21, [6, 23])
    plain = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=30, min_tokens=30), use_tqdm=False)
    for penalty in (1.5, 0.8):
        sp = SamplingParams(temperature=0, max_tokens=30, min_tokens=30, repetition_penalty=penalty)
        outs = llm.generate(prompts, sp, use_tqdm=False)
        for p, o, q in zip(prompts, outs, plain):
            ref = hf.generate(
                torch.tensor([p]), max_new_tokens=30, min_new_tokens=30, do_sample=False, repetition_penalty=penalty
            )[0, len(p) :]
            assert o.outputs[0].token_ids == ref.tolist()
            if penalty > 1:  # the plain output repeats itself: discouraging that changes it
                assert o.outputs[0].token_ids != q.outputs[0].token_ids


MODES = ("raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits")


def test_logprobs_modes_match_transformers(llama):
    """Each logprobs_mode's value of the sampled token against transformers' logits: raw =
    log_softmax(logits) / logits; processed = after transformers' repetition penalty, temperature,
    top-k and top-p warpers (same order as vLLM's without min-p), masked tokens at -inf."""
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    p = _prompts(22, [15])[0]
    sp = SamplingParams(
        temperature=0.7, top_k=12, top_p=0.9, max_tokens=8, logprobs=2, seed=3, ignore_eos=True, repetition_penalty=1.2
    )
    outs = {
        m: LLM(llama, dtype="float32", device="cpu", logprobs_mode=m).generate([p], sp, use_tqdm=False) for m in MODES
    }
    outs = {m: o[0].outputs[0] for m, o in outs.items()}
    toks = outs["raw_logprobs"].token_ids
    assert all(o.token_ids == toks for o in outs.values())  # the mode never changes the draw
    raw = _hf_logits(llama, p + toks)[len(p) - 1 : -1]
    gap = 0.0
    for t, tok in enumerate(toks):
        ids = torch.tensor([p + toks[:t]])
        x = RepetitionPenaltyLogitsProcessor(1.2)(ids, raw[t : t + 1].clone())
        for warper in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(12), TopPLogitsWarper(0.9)):
            x = warper(ids, x)
        x = x[0].double()
        want = {
            "raw_logprobs": torch.log_softmax(raw[t].double(), -1),
            "raw_logits": raw[t].double(),
            "processed_logprobs": torch.log_softmax(x, -1),
            "processed_logits": x,
        }
        for m, o in outs.items():
            e = o.logprobs[t]
            assert abs(e[tok].logprob - want[m][tok].item()) < 2e-4, (m, t)
            assert e[tok].rank == 1 + int((want[m] > want[m][tok]).sum()) or e[tok].rank <= 2
            top = torch.topk(want[m], 2)
            for j, (i, v) in enumerate(zip(top.indices.tolist(), top.values.tolist())):
                assert abs(e[i].logprob - v) < 2e-4 and e[i].rank == j + 1
        assert torch.isinf(want["processed_logprobs"]).sum() > 200  # top-k 12 of 320
        gap += abs(want["processed_logprobs"][tok] - want["raw_logprobs"][tok]).item()
    assert gap / len(toks) > 0.1  # the modes really differ here
    for m in ("raw_logprobs", "processed_logprobs"):  # cumulative_logprob sums the reported values
        o = outs[m]
        assert abs(o.cumulative_logprob - sum(e[tk].logprob for tk, e in zip(o.token_ids, o.logprobs))) < 1e-5
    with pytest.raises(ValueError, match="logprobs_mode must be one of"):
        LLM(llama, dtype="float32", device="cpu", logprobs_mode="processed")


@pytest.mark.parametrize("mode, budget", [("raw_logprobs", 4096), ("processed_logprobs", 16)])
def test_prompt_logprobs_match_transformers(llama, mode, budget):
    """Raw log_softmax of transformers' logits at every prompt position (whatever logprobs_mode),
    vLLM's structure (first entry None, the prompt token first, then the top-k), once per request
    with n > 1, across prefill chunks, and with the prompt already in the prefix cache: such a
    request skips the cache (a cached prefix has no logits) and registers its blocks for others."""
    llm = LLM(llama, dtype="float32", device="cpu", max_num_batched_tokens=budget, logprobs_mode=mode)
    bm = llm.engine.block_manager
    prompts = _prompts(23, [37, 1, 50])
    sp = SamplingParams(n=3, temperature=0.8, top_k=5, max_tokens=4, seed=1, ignore_eos=True)
    plain = llm.generate(prompts, sp, use_tqdm=False)  # caches the prompts' blocks
    hits = bm.prefix_hits
    sp.prompt_logprobs = 2
    outs = llm.generate(prompts, sp, use_tqdm=False)
    assert bm.prefix_hits == hits
    for p, o, q in zip(prompts, outs, plain):
        assert [c.token_ids for c in o.outputs] == [c.token_ids for c in q.outputs]
        plp = o.prompt_logprobs
        assert len(plp) == len(p) and plp[0] is None
        if len(p) == 1:
            continue
        ref = torch.log_softmax(_hf_logits(llama, p).double(), -1)
        for i in range(1, len(p)):
            e, tok = plp[i], p[i]
            assert next(iter(e)) == tok
            assert abs(e[tok].logprob - ref[i - 1, tok].item()) < 1e-4
            top = torch.topk(ref[i - 1], 2)
            if tok not in top.indices.tolist():
                assert e[tok].rank == 1 + int((ref[i - 1] > ref[i - 1, tok]).sum()) and len(e) == 3
            for j, (k, v) in enumerate(zip(top.indices.tolist(), top.values.tolist())):
                assert abs(e[k].logprob - v) < 1e-4 and e[k].rank == j + 1
            assert e[tok].decoded_token == llm.get_tokenizer().decode([tok], skip_special_tokens=False)
    assert q.prompt_logprobs is None
    hits = bm.prefix_hits
    llm.generate([prompts[2]], SamplingParams(max_tokens=2), use_tqdm=False)
    assert bm.prefix_hits - hits == 48  # its blocks serve later requests


def test_prompt_logprobs_survive_preemption_and_abort(llama):
    prompts = _prompts(6, [37, 20, 50, 9, 33, 28])
    sp = SamplingParams(n=3, temperature=0, max_tokens=40, ignore_eos=True, prompt_logprobs=1, logprobs=0)
    ref = LLM(llama, dtype="float32", device="cpu").generate(prompts, sp, use_tqdm=False)
    small = LLM(llama, dtype="float32", device="cpu", num_kv_blocks=14, max_num_batched_tokens=16)
    got = small.generate(prompts, sp, use_tqdm=False)
    assert small.engine.scheduler.num_preemptions > 0
    for a, b in zip(ref, got):
        assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
        assert b.prompt_logprobs[0] is None and len(b.prompt_logprobs) == len(b.prompt_token_ids)
        for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            assert list(x) == list(y) and all(abs(x[t].logprob - y[t].logprob) < 1e-4 for t in x)
    eng = small.engine
    eng.add_request("x", prompts[2], sp)
    eng.step()  # the first 16-token chunk of 50
    eng.abort_request("x")
    assert not eng.prompt_logprobs.seqs and eng.block_manager.num_used == 0


def test_penalties_seeded_and_batch_independent(llama):
    prompts = _prompts(24, [12, 30])
    sp = SamplingParams(
        n=3, temperature=1.0, max_tokens=20, seed=5, ignore_eos=True, presence_penalty=1.0, frequency_penalty=0.5
    )
    a = LLM(llama, dtype="float32", device="cpu").generate(prompts, sp, use_tqdm=False)
    b = LLM(llama, dtype="float32", device="cpu", num_kv_blocks=10, max_num_seqs=2).generate(
        [prompts[0], prompts[0], prompts[1]], [sp, SamplingParams(max_tokens=3), sp], use_tqdm=False
    )
    assert [[c.token_ids for c in o.outputs] for o in a] == [[c.token_ids for c in o.outputs] for o in (b[0], b[2])]
    sp0 = SamplingParams(n=3, temperature=1.0, max_tokens=20, seed=5, ignore_eos=True)
    c = LLM(llama, dtype="float32", device="cpu").generate(prompts, sp0, use_tqdm=False)
    assert [[x.token_ids for x in o.outputs] for o in a] != [[x.token_ids for x in o.outputs] for o in c]
    # a strong presence penalty makes repeats rare
    d = LLM(llama, dtype="float32", device="cpu").generate(
        prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, presence_penalty=2.0), use_tqdm=False
    )
    e = LLM(llama, dtype="float32", device="cpu").generate(
        prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False
    )
    distinct = [len(set(o.outputs[0].token_ids)) for o in d]
    assert all(x > len(set(o.outputs[0].token_ids)) for x, o in zip(distinct, e))


def test_text_rules_detokenize_and_max_tokens_none(llama, tmp_path):
    """vLLM's text rules: a stop token or EOS that ended a candidate is not in .text (unless
    include_stop_str_in_output); detokenize=False gives no text and no decoded tokens; max_tokens=None
    runs to the end of the context."""
    path = _copy(llama, tmp_path / "m")
    llm = LLM(path, dtype="float32", device="cpu", max_model_len=48)
    tok = llm.get_tokenizer()
    p = _prompts(25, [10])[0]
    free = llm.generate([p], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True), use_tqdm=False)
    free = free[0].outputs[0].token_ids
    stop_id = free[4]
    k = free.index(stop_id)
    for include in (False, True):
        for skip in (True, False):
            sp = SamplingParams(
                temperature=0,
                max_tokens=30,
                stop_token_ids=[stop_id],
                include_stop_str_in_output=include,
                skip_special_tokens=skip,
                logprobs=1,
            )
            o = llm.generate([p], sp, use_tqdm=False)[0].outputs[0]
            assert o.token_ids == free[: k + 1] and o.stop_reason == stop_id
            assert o.text == tok.decode(free[: k + 1] if include else free[:k], skip)
            assert all(x.decoded_token == tok.decode([i], False) for d in o.logprobs for i, x in d.items())
    o = llm.generate(
        [p],
        SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_id], detokenize=False, logprobs=2),
        use_tqdm=False,
    )[0].outputs[0]
    assert o.text == "" and o.token_ids == free[: k + 1]
    assert all(x.decoded_token is None for d in o.logprobs for x in d.values())
    with pytest.raises(RequestError, match=r"invalid sampling value stop='x': stop strings need detokenize=True"):
        SamplingParams(stop="x", detokenize=False)
    o = llm.generate([p], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True), use_tqdm=False)[0]
    assert o.outputs[0].finish_reason == "length" and len(o.outputs[0].token_ids) == 48 - len(p)
    # EOS: the tokenizer's EOS (vLLM's primary) stops with stop_reason None, another EOS id of the
    # model's config with its id; neither is in .text
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg["eos_token_id"] = [1, stop_id]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    o = (
        LLM(path, dtype="float32", device="cpu")
        .generate([p], SamplingParams(temperature=0, max_tokens=30, skip_special_tokens=False), use_tqdm=False)[0]
        .outputs[0]
    )
    assert o.token_ids == free[: k + 1] and o.stop_reason == stop_id and o.text == tok.decode(free[:k], False)
    with open(os.path.join(path, "tokenizer_config.json")) as f:
        tcfg = json.load(f)
    tcfg["eos_token"] = tok.convert_ids_to_tokens(stop_id)
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(tcfg, f)
    o = (
        LLM(path, dtype="float32", device="cpu")
        .generate([p], SamplingParams(temperature=0, max_tokens=30, skip_special_tokens=False), use_tqdm=False)[0]
        .outputs[0]
    )
    assert o.token_ids == free[: k + 1] and o.stop_reason is None and o.text == tok.decode(free[:k], False)


def test_skip_special_tokens_only_changes_text(llama):
    llm = LLM(llama, dtype="float32", device="cpu")
    p = _prompts(26, [8])[0]
    outs = {
        skip: llm.generate(
            [p],
            SamplingParams(
                n=8, temperature=1.5, max_tokens=24, ignore_eos=True, seed=2, skip_special_tokens=skip, logprobs=1
            ),
            use_tqdm=False,
        )[0].outputs
        for skip in (True, False)
    }
    tok = llm.get_tokenizer()
    special = 0
    for a, b in zip(outs[True], outs[False]):
        assert a.token_ids == b.token_ids
        assert a.text == tok.decode(a.token_ids, True) and b.text == tok.decode(b.token_ids, False)
        special += sum(t in (0, 1, 2) for t in a.token_ids)
        for d in a.logprobs:  # decoded tokens keep special tokens (vLLM decodes each id alone, as is)
            assert all(x.decoded_token == tok.decode([i], False) != "" for i, x in d.items() if i in (0, 1, 2))
    assert special > 0 and any(a.text != b.text for a, b in zip(outs[True], outs[False]))


# -- bad input ------------------------------------------------------------------------------


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_checkpoint_errors(llama, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        LLM(str(tmp_path / "nope"), device="cpu")
    d = _copy(llama, tmp_path / "noconfig")
    os.remove(os.path.join(d, "config.json"))
    with pytest.raises(CheckpointError, match="config.json"):
        LLM(d, device="cpu")
    d = _copy(llama, tmp_path / "arch")
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["architectures"] = ["GPT2LMHeadModel"]
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(CheckpointError, match="unknown architecture 'GPT2LMHeadModel'"):
        LLM(d, device="cpu")
    d = _copy(llama, tmp_path / "noweights")
    os.remove(os.path.join(d, "model.safetensors"))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        LLM(d, device="cpu")
    open(os.path.join(d, "pytorch_model.bin"), "wb").write(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="pickle"):
        LLM(d, device="cpu")
    d = _copy(llama, tmp_path / "truncated")
    f = os.path.join(d, "model.safetensors")
    data = open(f, "rb").read()
    open(f, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        LLM(d, device="cpu")
    d = _copy(llama, tmp_path / "shape")
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["intermediate_size"] = 96
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(
        CheckpointError,
        match=r"shape mismatch for tensor 'model.layers.0.mlp.(down|gate|up)_proj.weight': checkpoint has",
    ):
        LLM(d, device="cpu")


def test_sharded_checkpoint_errors(sharded, tmp_path):
    def index_of(d):
        return os.path.join(d, "model.safetensors.index.json")

    d = _copy(sharded, tmp_path / "badjson")
    with open(index_of(d), "w") as f:
        f.write('{"weight_map": {')
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json is not a valid safetensors index: JSON"):
        LLM(d, device="cpu")
    d = _copy(sharded, tmp_path / "nomap")
    with open(index_of(d), "w") as f:
        json.dump({"metadata": {}}, f)
    with pytest.raises(CheckpointError, match=r"is not a valid safetensors index: KeyError\('weight_map'\)"):
        LLM(d, device="cpu")
    d = _copy(sharded, tmp_path / "noshard")
    with open(index_of(d)) as f:
        shard = sorted(set(json.load(f)["weight_map"].values()))[-1]
    os.remove(os.path.join(d, shard))
    with pytest.raises(CheckpointError, match=f"shard {shard} listed in .*index.json is missing"):
        LLM(d, device="cpu")


def test_unsupported_activation(llama, tmp_path):
    d = _copy(llama, tmp_path / "gelu")
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    cfg["hidden_act"] = "gelu"
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(CheckpointError, match=r"unsupported hidden_act 'gelu' in .*config.json; only 'silu'"):
        LLM(d, device="cpu")


def test_missing_and_unexpected_tensors(llama, tmp_path):
    from safetensors.torch import load_file, save_file

    w = load_file(os.path.join(llama, "model.safetensors"))
    d = _copy(llama, tmp_path / "missing")
    save_file({k: v for k, v in w.items() if "layers.1.mlp.up_proj" not in k}, os.path.join(d, "model.safetensors"))
    with pytest.raises(CheckpointError, match="lacks tensors: model.layers.1.mlp.up_proj.weight"):
        LLM(d, device="cpu")
    d = _copy(llama, tmp_path / "extra")
    save_file({**w, "model.layers.9.foo.weight": torch.randn(2)}, os.path.join(d, "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.9.foo.weight'"):
        LLM(d, device="cpu")


def test_request_errors(llama, tmp_path):
    llm = LLM(llama, dtype="float32", device="cpu", max_model_len=64, num_kv_blocks=3)
    with pytest.raises(RequestError, match="longer than the context"):
        llm.generate([list(range(3, 70))], SamplingParams(), use_tqdm=False)
    with pytest.raises(RequestError, match="whole cache"):
        llm.generate([list(range(3, 60))], SamplingParams(), use_tqdm=False)
    with pytest.raises(RequestError, match="outside the vocabulary"):
        llm.generate([[5, 100000]], SamplingParams(), use_tqdm=False)
    with pytest.raises(RequestError, match="empty prompt"):
        llm.generate([[]], SamplingParams(), use_tqdm=False)
    eng = llm.engine
    eng.add_request("same", [5, 6, 7], SamplingParams(max_tokens=2))
    with pytest.raises(RequestError, match="duplicate request id 'same'"):
        eng.add_request("same", [8, 9], SamplingParams(max_tokens=2))
    eng.abort_request("same")
    assert not eng.has_unfinished_requests() and eng.block_manager.num_used == 0
    # a bad prompt rejects the call and leaves the engine usable
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
    for bad in [
        dict(temperature=-1),
        dict(top_p=0),
        dict(top_p=1.5),
        dict(top_k=-5),
        dict(min_p=2),
        dict(max_tokens=0),
        dict(n=0),
        dict(min_tokens=50, max_tokens=10),
        dict(logprobs=-2),  # (-1: the whole vocabulary, as vLLM)
        dict(temperature=float("nan")),
        dict(stop=[""]),
        dict(repetition_penalty=0),
        dict(repetition_penalty=float("inf")),
        dict(presence_penalty=2.5),
        dict(frequency_penalty=-3),
        dict(prompt_logprobs=-2),
        dict(min_tokens=-1, max_tokens=None),
    ]:
        with pytest.raises(RequestError, match="invalid sampling value " + next(iter(bad))):
            SamplingParams(**bad)
    nt = _copy(llama, tmp_path / "notok")
    os.remove(os.path.join(nt, "tokenizer.json"))
    with pytest.raises(RequestError, match="needs a tokenizer"):
        LLM(nt, device="cpu").generate(["hello"], use_tqdm=False)
    with pytest.raises(RequestError, match="unsupported dtype"):
        LLM(llama, dtype="float8", device="cpu")


def test_cli_generate(llama, tmp_path):
    from click.testing import CliRunner

    from bstar.cli import main

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "Janet has 3 apples"}) + "\n" + json.dumps({"prompt_token_ids": [5, 6, 7]}) + "\n"
    )
    out = tmp_path / "o.jsonl"
    r = CliRunner().invoke(
        main,
        [
            "generate",
            "--model",
            llama,
            "--prompts",
            str(prompts),
            "--out",
            str(out),
            "--n",
            "3",
            "--max-tokens",
            "5",
            "--temperature",
            "0.8",
            "--device",
            "cpu",
            "--logprobs",
            "1",
        ],
    )
    assert r.exit_code == 0, r.output
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(recs) == 2 and all(len(x["outputs"]) == 3 for x in recs)
    lps = recs[0]["outputs"][0]["logprobs"]  # Logprob objects written as their float values
    assert len(lps) == 5 and all(isinstance(v, float) and v <= 0 for d in lps for v in d.values())
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{not json\n')
    r = CliRunner().invoke(main, ["generate", "--model", llama, "--prompts", str(bad), "--device", "cpu"])
    assert r.exit_code == 1 and "bad.jsonl:2: malformed JSON" in r.output
    r = CliRunner().invoke(main, ["generate", "--model", str(tmp_path / "none"), "--prompts", str(prompts)])
    assert r.exit_code == 1 and "does not exist" in r.output
