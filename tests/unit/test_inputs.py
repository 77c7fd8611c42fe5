"""bstar/engine/entrypoints/inputs.py: the prompt forms LLM.generate and LLMEngine.add_request accept (vLLM's)."""

import numpy as np
import pytest
import torch

from bstar.engine import LLM, RequestError, SamplingParams
from bstar.engine.entrypoints.inputs import ParsedPrompt, TextPrompt, TokensPrompt, parse_prompt, prompt_list


def test_parse_prompt_forms():
    assert parse_prompt("hi") == ParsedPrompt("hi", None)
    assert parse_prompt([5, 6]) == ParsedPrompt(None, [5, 6])
    assert parse_prompt((5, np.int64(6))) == ParsedPrompt(None, [5, 6])
    assert TokensPrompt(prompt_token_ids=[1, 2]) == {"prompt_token_ids": [1, 2]}  # a plain dict, as vLLM's
    assert parse_prompt(TokensPrompt(prompt_token_ids=[1, 2])) == ParsedPrompt(None, [1, 2])
    assert parse_prompt(TokensPrompt(prompt_token_ids=[1], prompt="a")) == ParsedPrompt("a", [1])
    assert parse_prompt(TextPrompt(prompt="x")) == ParsedPrompt("x", None)
    # verl passes multi_modal_data={} and TRL may pass None: empty optional fields are fine
    assert parse_prompt({"prompt_token_ids": [3], "multi_modal_data": {}, "mm_processor_kwargs": None}).token_ids == [3]
    assert parse_prompt({"prompt": "x", "cache_salt": "s"}) == ParsedPrompt("x", None, "s")


@pytest.mark.parametrize(
    "bad, msg",
    [
        (3, "unsupported prompt of type int"),
        (torch.tensor([1, 2]), "unsupported prompt of type Tensor"),
        ([1, "a"], "unsupported prompt of type list"),
        ([True, 2], "unsupported prompt of type list"),
        ({"prompt_token_ids": [1], "images": 1}, "unsupported prompt field 'images'"),
        ({"prompt_token_ids": [1], "multi_modal_data": {"image": 1}}, "'multi_modal_data' is not supported"),
        ({"prompt_token_ids": [1], "token_type_ids": [0]}, "'token_type_ids' is not supported"),
        ({"prompt_token_ids": "1 2"}, "prompt_token_ids must be a list of ints"),
        ({"prompt": 5}, "'prompt' must be a string"),
        ({}, "needs 'prompt_token_ids'"),
        ({"prompt": "x", "cache_salt": 3}, "cache_salt must be a string"),
    ],
)
def test_parse_prompt_refuses_with_one_line(bad, msg):
    with pytest.raises(RequestError, match=msg) as e:
        parse_prompt(bad)
    assert "\n" not in str(e.value)


def test_prompt_list():
    assert prompt_list("a") == ["a"]
    assert prompt_list([1, 2]) == [[1, 2]]
    assert prompt_list({"prompt_token_ids": [1]}) == [{"prompt_token_ids": [1]}]
    assert prompt_list([[1, 2], [3]]) == [[1, 2], [3]]
    assert prompt_list(["a", {"prompt": "b"}, [4]]) == ["a", {"prompt": "b"}, [4]]
    assert prompt_list([]) == []
    with pytest.raises(RequestError, match="unsupported prompts of type int"):
        prompt_list(7)


def test_generate_and_add_request_accept_every_form(llama_dir):
    llm = LLM(str(llama_dir), dtype="float32", device="cpu")
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    tok = llm.get_tokenizer()
    text = "Janet has 3 apples"
    ids = tok.encode(text)
    want = llm.generate([ids], sp, use_tqdm=False)[0].outputs[0].token_ids
    forms = [
        text,
        ids,
        TextPrompt(prompt=text),
        TokensPrompt(prompt_token_ids=ids),
        {"prompt_token_ids": ids, "prompt": text, "multi_modal_data": None},
    ]
    for form in forms:  # one prompt alone
        (out,) = llm.generate(form, sp, use_tqdm=False)
        assert out.prompt_token_ids == ids and out.outputs[0].token_ids == want
    outs = llm.generate(forms, sp, use_tqdm=False)  # all of them in one batch, in input order
    assert [o.outputs[0].token_ids for o in outs] == [want] * len(forms)
    assert [o.prompt for o in outs] == [text, None, text, None, text]  # None for bare token prompts, as vLLM
    eng = llm.engine
    eng.add_request("a", TokensPrompt(prompt_token_ids=ids), sp)
    eng.add_request("b", {"prompt": text}, sp)
    done = {}
    while eng.has_unfinished_requests():
        done.update({o.request_id: o for o in eng.step()})
    assert done["a"].outputs[0].token_ids == done["b"].outputs[0].token_ids == want
    # a bad prompt anywhere in the list rejects the whole call and leaves the engine clean
    with pytest.raises(RequestError, match="unsupported prompt of type float"):
        llm.generate([ids, 1.5], sp, use_tqdm=False)
    assert not eng.has_unfinished_requests() and eng.block_manager.num_used == 0


def test_cache_salt_separates_prefix_cache(llama_dir):
    llm = LLM(str(llama_dir), dtype="float32", device="cpu")
    bm = llm.engine.block_manager
    ids = list(range(3, 60))  # 3 full blocks + a partial one
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)

    def hits(prompt):
        before = bm.prefix_hits
        out = llm.generate(prompt, sp, use_tqdm=False)[0].outputs[0].token_ids
        return bm.prefix_hits - before, out

    first = hits({"prompt_token_ids": ids, "cache_salt": "a"})
    assert first[0] == 0
    assert hits({"prompt_token_ids": ids, "cache_salt": "a"}) == (48, first[1])  # same salt: shared
    assert hits({"prompt_token_ids": ids, "cache_salt": "b"}) == (0, first[1])  # other salt: recomputed
    assert hits(ids) == (0, first[1])  # no salt: its own namespace
    assert hits(ids) == (48, first[1])
