"""vLLM's SamplingParams fields, each against its definition on random inputs: logit_bias is the bias added
before temperature and the filters, allowed_token_ids only ever draws those ids, bad_words never completes
a word (vLLM's tokenization and prefix rule), logprobs=-1 is the whole vocabulary, structured outputs
(JSON schema, regex, choice, grammar) parse and match; no-op fields are accepted, the others refused in
one line. References are float64 over the same logits (sampler level) or the engine's own outputs."""

import json
import re

import pytest
import torch

from bstar.engine import LLM, RequestError, SamplingParams
from bstar.engine.core.sequence import Sequence
from bstar.engine.entrypoints.sampling_params import StructuredOutputsParams
from bstar.engine.runner.logit_masks import LogitMasks, bad_words_token_ids, banned_by_bad_words
from bstar.engine.runner.sampler import Sampler

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = dict(device="cpu", dtype="float32")
EOS = {1}


def _seqs(params_list, outputs=None, seed=0):
    seqs = []
    for i, p in enumerate(params_list):
        s = Sequence(f"r{i}", [0, 5, 6], p, index=0, seed=seed + i)
        for t in (outputs or {}).get(i, []):
            s.append_token(t, 0.0, None)
        seqs.append(s)
    return seqs


def _draw(params_list, logits, outputs=None, seed=0, mode="processed_logprobs", prepare=True):
    sampler = Sampler(EOS, mode)
    sampler.masks = LogitMasks(lambda: None, logits.shape[1], EOS)
    for p in params_list if prepare else ():
        sampler.masks.prepare(p)
    seqs = _seqs(params_list, outputs, seed)
    return sampler(logits.clone(), list(range(len(seqs))), seqs).host()


def _entries_tensor(entry, V):
    out = torch.full((V,), float("-inf"), dtype=torch.float64)
    for t, lp in entry.items():
        out[t] = lp.logprob
    return out


def test_logit_bias_is_added_before_temperature_and_filters():
    g = torch.Generator().manual_seed(0)
    V, R = 97, 6
    for trial in range(4):
        logits = torch.randn(R, V, generator=g) * 3
        params, ref = [], []
        for r in range(R):
            ids = torch.randperm(V, generator=g)[:7].tolist()
            bias = {t: float(torch.randn((), generator=g) * 5) for t in ids}
            T = float(torch.rand((), generator=g)) + 0.3
            params.append(SamplingParams(temperature=T, logit_bias=bias, logprobs=-1, max_tokens=4, seed=r))
            x = logits[r].double().clone()
            for t, b in bias.items():
                x[t] += b
            ref.append(torch.log_softmax(x / T, -1))
        tokens, values, entries = _draw(params, logits, seed=trial)
        for r in range(R):
            assert len(entries[r]) == V  # logprobs=-1: the whole vocabulary
            torch.testing.assert_close(_entries_tensor(entries[r], V), ref[r], atol=2e-5, rtol=0)
            assert abs(values[r] - ref[r][tokens[r]].item()) < 2e-5
    # raw_logprobs are the model's, before the bias (as vLLM's)
    p = SamplingParams(temperature=1.0, logit_bias={3: 50.0}, logprobs=2, seed=1)
    tokens, values, _ = _draw([p], logits[:1], mode="raw_logprobs")
    assert tokens == [3]
    assert abs(values[0] - torch.log_softmax(logits[0].double(), -1)[3].item()) < 1e-5


def test_allowed_token_ids_only_ever_draws_those():
    g = torch.Generator().manual_seed(1)
    V = 64
    for trial in range(30):
        allowed = torch.randperm(V, generator=g)[: int(torch.randint(1, 6, (1,), generator=g))].tolist()
        logits = torch.randn(4, V, generator=g) * 4
        params = [SamplingParams(temperature=1.5, allowed_token_ids=allowed, logprobs=-1, seed=trial)] * 3
        params.append(SamplingParams(temperature=1.5, logprobs=-1, seed=trial))  # a row without the mask
        tokens, _, entries = _draw(params, logits, seed=trial * 7)
        assert all(t in allowed for t in tokens[:3])
        for r in range(3):
            x = torch.full((V,), float("-inf"), dtype=torch.float64)
            x[allowed] = logits[r, allowed].double() / 1.5
            torch.testing.assert_close(_entries_tensor(entries[r], V), torch.log_softmax(x, -1), atol=2e-5, rtol=0)
        assert torch.isfinite(_entries_tensor(entries[3], V)).all()  # (the unmasked row keeps every token)


def test_bad_words_follow_vllms_prefix_rule():
    # the rule itself, against a brute-force reading of its definition
    g = torch.Generator().manual_seed(2)
    for _ in range(200):
        words = [torch.randint(0, 5, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist()]
        words.append(torch.randint(0, 5, (2,), generator=g).tolist())
        outs = torch.randint(0, 5, (int(torch.randint(0, 5, (1,), generator=g)),), generator=g).tolist()
        want = {w[-1] for w in words if len(w) - 1 <= len(outs) and outs[len(outs) - len(w) + 1 :] == w[:-1]}
        assert set(banned_by_bad_words(words, outs)) == want
    # vLLM's tokenization: as written, and with a leading space when that is another sequence of equal length
    enc = {"cat": [10, 11], " cat": [12, 11], "dog": [20], " dog": [21, 22]}.__getitem__
    assert bad_words_token_ids(["cat", "dog"], enc) == [[10, 11], [12, 11], [20]]
    # in the sampler: the word's last token is -inf exactly when the outputs end with its prefix
    V = 40
    logits = torch.randn(2, V, generator=g)
    p = SamplingParams(temperature=1.0, bad_words=["x"], logprobs=-1, seed=0)
    p.bad_words_token_ids = [[7, 8, 9], [5]]  # (as if tokenized: this test has no tokenizer)
    _, _, entries = _draw([p, p], logits, outputs={0: [3, 7, 8], 1: [7, 3]}, prepare=False)
    e0, e1 = _entries_tensor(entries[0], V), _entries_tensor(entries[1], V)
    assert e0[9] == float("-inf") and e0[5] == float("-inf")
    assert torch.isfinite(e0[[t for t in range(V) if t not in (5, 9)]]).all()
    assert torch.isfinite(e1[9]) and e1[5] == float("-inf")


def _contains(seq, sub):
    return any(seq[i : i + len(sub)] == sub for i in range(len(seq) - len(sub) + 1))


def test_bad_words_in_the_engine(llama_dir):
    """A bias pushes a word's tokens; with bad_words the outputs never contain the word's token sequences
    (vLLM's: as written, plus the spaced form when it has the same length), without it they do."""
    llm = LLM(str(llama_dir), **CPU)
    tok = llm.get_tokenizer()
    words = ["the", "he"]
    banned = bad_words_token_ids(words, lambda s: tok.encode(s, add_special_tokens=False))
    bias = {t: 8.0 for ids in banned for t in ids}
    prompts = [[0, 40, 41, 42], [0, 50, 60]]
    base = dict(temperature=1.0, max_tokens=24, ignore_eos=True, logit_bias=bias, n=4, seed=3)
    free = [c.token_ids for o in llm.generate(prompts, SamplingParams(**base), use_tqdm=False) for c in o.outputs]
    assert all(any(_contains(t, ids) for t in free) for ids in banned)
    p = SamplingParams(**base, bad_words=words)
    outs = [c.token_ids for o in llm.generate(prompts, p, use_tqdm=False) for c in o.outputs]
    assert p.bad_words_token_ids == banned
    assert all(len(t) == 24 and not any(_contains(t, ids) for ids in banned) for t in outs)


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "enum": ["ann", "bob", "cy"]},
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "enum": [1, 22, 333]},
    },
    "required": ["name", "ok", "n"],
    "additionalProperties": False,
}


def _valid(obj) -> bool:
    return (
        isinstance(obj, dict)
        and set(obj) == {"name", "ok", "n"}
        and obj["name"] in ("ann", "bob", "cy")
        and isinstance(obj["ok"], bool)
        and obj["n"] in (1, 22, 333)
    )


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_structured_outputs_parse_and_match(llama_dir, async_scheduling):
    llm = LLM(str(llama_dir), **CPU, async_scheduling=async_scheduling)
    prompts = [[0, 40, 41, 42], [0, 50, 60, 61, 70]]

    def gen(so, n=4, **kw):
        p = SamplingParams(temperature=1.0, max_tokens=60, n=n, seed=5, structured_outputs=so, **kw)
        return [c for o in llm.generate(prompts, p, use_tqdm=False) for c in o.outputs]

    for c in gen(StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)):
        assert c.finish_reason == "stop", c
        assert _valid(json.loads(c.text)), c.text
    for c in gen(StructuredOutputsParams(regex=r"[a-c]{2,4}-[0-9]{2}")):
        assert re.fullmatch(r"[a-c]{2,4}-[0-9]{2}", c.text), c.text
    choices = ["yes", "no", "maybe so"]
    texts = {c.text for c in gen(StructuredOutputsParams(choice=choices), n=6)}
    assert texts <= set(choices)
    for c in gen(StructuredOutputsParams(grammar='root ::= ("up" | "down") " " [0-9] [0-9]?')):
        assert re.fullmatch(r"(up|down) [0-9][0-9]?", c.text), c.text
    # TRL's form: a dict in generation_kwargs; greedy too
    for c in gen({"regex": "[0-9]{3}"}, n=1, logprobs=1):
        assert re.fullmatch("[0-9]{3}", c.text)
    # the mask is not vacuous: unconstrained outputs of the same requests do not parse
    outs = llm.generate(prompts, SamplingParams(max_tokens=20, n=4, seed=5), use_tqdm=False)
    free = [c for o in outs for c in o.outputs]
    assert not any(re.fullmatch(r"[a-c]{2,4}-[0-9]{2}", c.text) for c in free)


def test_structured_outputs_same_with_async_scheduling(llama_dir):
    so = StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)
    p = SamplingParams(temperature=1.0, max_tokens=60, n=3, seed=9, structured_outputs=so)
    prompts = [[0, 40, 41, 42], [0, 50, 60, 61, 70]]
    a = LLM(str(llama_dir), **CPU).generate(prompts, p, use_tqdm=False)
    b = LLM(str(llama_dir), **CPU, async_scheduling=True).generate(prompts, p, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in a] == [[c.token_ids for c in o.outputs] for o in b]


def test_no_op_fields_accepted_and_others_refused_in_one_line(llama_dir):
    from bstar.engine.entrypoints.vllm_sampling import RequestOutputKind

    SamplingParams(
        spaces_between_special_tokens=False,
        extra_args={"x": 1},
        output_kind=RequestOutputKind.FINAL_ONLY,
        skip_clone=True,
        flat_logprobs=False,
        best_of=None,
    )
    cases = [
        (dict(logits_processors=[lambda ids, x: x]), "logits_processors"),
        (dict(truncate_prompt_tokens=8), "truncate_prompt_tokens"),
        (dict(guided_decoding=object()), "guided_decoding"),
        (dict(best_of=3), "best_of"),
        (dict(output_kind=5), "output_kind"),
        (dict(logit_bias={"a": 1}), "logit_bias"),
        (dict(allowed_token_ids=[]), "allowed_token_ids"),
        (dict(bad_words=[""]), "bad_words"),
        (dict(structured_outputs=dict(regex="a", choice=["b"])), "exactly one"),
        (dict(structured_outputs=dict(json="{not json")), "not valid JSON"),
        (dict(logprobs=-2), "logprobs"),
    ]
    for kw, why in cases:
        with pytest.raises(RequestError, match=why) as e:
            SamplingParams(**kw)
        assert "\n" not in str(e.value)
    llm = LLM(str(llama_dir), **CPU)
    V = llm.llm_engine.mcfg.vocab_size
    for kw, why in [
        (dict(allowed_token_ids=[V]), "outside the vocabulary"),
        (dict(structured_outputs=StructuredOutputsParams(regex="(unclosed")), "does not compile"),
        (dict(structured_outputs=StructuredOutputsParams(regex="a+"), min_tokens=2), "min_tokens"),
        (dict(logprobs=-1), "max_logprobs"),  # the whole vocabulary is more than the default cap, as vLLM's
        (dict(allowed_token_ids=[1], min_tokens=2), "min_tokens bans every allowed id"),  # (1: EOS)
        (dict(allowed_token_ids=[1, 3], min_tokens=2, stop_token_ids=[3]), "min_tokens bans every allowed id"),
    ]:
        with pytest.raises(RequestError, match=why) as e:
            llm.generate([[0, 5]], SamplingParams(**kw), use_tqdm=False)
        assert "\n" not in str(e.value)
    assert llm.llm_engine.get_num_unfinished_requests() == 0
    full = LLM(str(llama_dir), **CPU, max_logprobs=-1)
    out = full.generate([[0, 5, 6]], SamplingParams(logprobs=-1, prompt_logprobs=-1, max_tokens=2), use_tqdm=False)[0]
    assert all(len(e) == V for e in out.outputs[0].logprobs)
    assert all(len(e) == V for e in out.prompt_logprobs[1:])


def test_masks_and_bias_in_vllms_order():
    """grammar / allowed ids / bad words, then the min_tokens bans, then logit_bias, then the penalties and
    temperature: a biased banned or disallowed token stays at -inf, and the repetition penalty acts on the
    biased logits (float64 reference of that order)."""
    g = torch.Generator().manual_seed(4)
    V, T, rep = 50, 0.7, 1.3
    logits = torch.randn(1, V, generator=g) * 2
    allowed = list(range(0, 40))
    bias = {1: 30.0, 45: 30.0, 6: 2.5, 7: -1.5, 8: 4.0}  # 1: EOS (banned by min_tokens), 45: not allowed
    p = SamplingParams(
        temperature=T, logit_bias=bias, allowed_token_ids=allowed, min_tokens=3, repetition_penalty=rep, logprobs=-1
    )
    outputs = [8, 9]  # (prompt [0, 5, 6]: tokens 0, 5, 6, 8, 9 are penalised)
    _, _, entries = _draw([p], logits, outputs={0: outputs})
    x = logits[0].double().clone()
    keep = torch.zeros(V, dtype=torch.bool)
    keep[allowed] = True
    x[~keep] = float("-inf")
    x[1] = float("-inf")  # min_tokens bans EOS
    for t, b in bias.items():
        x[t] += b
    seen = torch.zeros(V, dtype=torch.bool)
    seen[[0, 5, 6, *outputs]] = True
    x = torch.where(seen & (x > 0), x / rep, torch.where(seen, x * rep, x))
    ref = torch.log_softmax(x / T, -1)
    got = _entries_tensor(entries[0], V)
    assert got[1] == float("-inf") and got[45] == float("-inf")
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=0)
