"""vLLM's output_kind on AsyncLLM's streams: DELTA pieces concatenate to the CUMULATIVE result (token ids, text
with characters split across tokens, logprobs; prompt_logprobs once), FINAL_ONLY yields one output, and LLM.generate
returns final outputs whatever the kind (as vLLM's)."""

import asyncio
import random

import pytest

from bstar.engine import LLM, AsyncLLM, SamplingParams
from bstar.engine.core.output_processor import DeltaOutputs
from bstar.engine.entrypoints.outputs import CompletionOutput, RequestOutput
from bstar.engine.entrypoints.vllm_sampling import RequestOutputKind
from bstar.engine.model.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = dict(device="cpu", dtype="float32")
TEXT = "é€ 😀ab"  # 2-, 3- and 4-byte characters: byte-level BPE splits them over several tokens


def _params(tok: Tokenizer, kind: RequestOutputKind, **kw) -> SamplingParams:
    """Random draws restricted to the bytes of TEXT (so characters are split across tokens, and some byte runs
    are not UTF-8 at all), with logprobs and prompt logprobs."""
    allowed = sorted(set(tok.encode(TEXT, add_special_tokens=False)))
    kw = dict(temperature=1.0, seed=3, max_tokens=40, ignore_eos=True, logprobs=2, prompt_logprobs=1) | kw
    return SamplingParams(n=2, allowed_token_ids=allowed, output_kind=kind, **kw)


def _stream(engine: AsyncLLM, prompts, params) -> list[list[RequestOutput]]:
    async def one(p, rid):
        return [out async for out in engine.generate(p, params, rid)]

    async def main():
        return await asyncio.gather(*[one(p, f"r{i}") for i, p in enumerate(prompts)])

    return asyncio.run(main())


def _joined(pieces: list[RequestOutput]) -> dict[int, tuple]:
    """Per candidate index: (token ids, text, logprobs, finish_reason) concatenated over DELTA outputs."""
    got: dict[int, list] = {}
    for out in pieces:
        for c in out.outputs:
            ids, text, lps, _ = got.setdefault(c.index, [[], "", [], None])
            got[c.index] = [ids + c.token_ids, text + c.text, lps + c.logprobs, c.finish_reason]
    return {i: tuple(v) for i, v in got.items()}


def _as_tuples(out: RequestOutput) -> dict[int, tuple]:
    return {c.index: (c.token_ids, c.text, c.logprobs, c.finish_reason) for c in out.outputs}


def _same(a: dict[int, tuple], b: dict[int, tuple]):
    """Equal token ids, text and finish reason; logprob entries with the same ids and ranks, values to float32
    precision (runs with other batches may differ in the last bits)."""
    assert a.keys() == b.keys()
    for i in a:
        (ids, text, lps, reason), (ids2, text2, lps2, reason2) = a[i], b[i]
        assert (ids, text, reason) == (ids2, text2, reason2)
        assert [{t: lp.rank for t, lp in e.items()} for e in lps] == [{t: lp.rank for t, lp in e.items()} for e in lps2]
        flat = [lp.logprob for e in lps for lp in e.values()]
        assert flat == pytest.approx([lp.logprob for e in lps2 for lp in e.values()], rel=1e-5, abs=1e-5)


@pytest.mark.parametrize(
    "stops",
    [{}, dict(stop=["ab", "b b"]), dict(stop=["ab"], include_stop_str_in_output=True)],
    ids=["no-stop", "stop-strings", "stop-kept"],
)
def test_delta_pieces_concatenate_to_the_cumulative_output(llama_dir, stops):
    engine = AsyncLLM(str(llama_dir), **CPU)
    tok = engine.llm_engine.tokenizer
    assert all(len(tok.encode(ch, add_special_tokens=False)) > 1 for ch in "€😀")  # split across tokens
    prompts = [tok.encode(t) for t in ("a cat sat", "the dog ran far", "x")]
    try:
        cumulative = _stream(engine, prompts, _params(tok, RequestOutputKind.CUMULATIVE, **stops))
        delta = _stream(engine, prompts, _params(tok, RequestOutputKind.DELTA, **stops))
        final_only = _stream(engine, prompts, _params(tok, RequestOutputKind.FINAL_ONLY, **stops))
    finally:
        engine.shutdown()
    final = LLM(str(llama_dir), **CPU).generate(prompts, _params(tok, RequestOutputKind.DELTA, **stops), use_tqdm=False)
    if stops:  # some candidates did end at a stop string
        assert any(c.stop_reason in stops["stop"] for o in final for c in o.outputs)
    split = False
    for cum, pieces, last, whole in zip(cumulative, delta, final_only, final):
        _same(_joined(pieces), _as_tuples(cum[-1]))
        _same(_joined(pieces), _as_tuples(last[0]))
        _same(_joined(pieces), _as_tuples(whole))
        assert [o.finished for o in pieces] == [False] * (len(pieces) - 1) + [True]
        assert pieces[0].prompt_logprobs == whole.prompt_logprobs and len(whole.prompt_logprobs) > 1
        assert all(o.prompt_logprobs is None for o in pieces[1:])
        assert all(c.token_ids or c.text or c.finish_reason for o in pieces for c in o.outputs)  # no empty piece
        for c in pieces[-1].outputs:  # (another run, other batches: float32 sums may differ in the last bits)
            assert c.cumulative_logprob == pytest.approx(cum[-1].outputs[c.index].cumulative_logprob, rel=1e-6)
        assert len(last) == 1 and last[0].finished
        split |= len(pieces) > 2
    assert split  # the streams did come in several pieces
    texts = "".join(c.text for o in final for c in o.outputs)
    assert {ch for ch in texts if ord(ch) > 127} - {"\ufffd"}  # characters whose bytes came in several tokens


def _cumulative_steps(tok: Tokenizer, ids: list[int], stop: str | None = None) -> list[RequestOutput]:
    """The cumulative outputs of one candidate that gains one token a step, its text decoded from all its
    tokens (a split character shows as U+FFFD until its last byte); it ends at the last token or, as the
    engine's stop rule, at the first one that completes `stop`, its text cut before the stop string."""
    outs = []
    for n in range(1, len(ids) + 1):
        text = tok.decode(ids[:n])
        done = n == len(ids) or (stop is not None and stop in text)
        if stop is not None and stop in text:
            text = text[: text.index(stop)]
        c = CompletionOutput(0, text, ids[:n], 0.0, None, "stop" if done else None)
        outs.append(RequestOutput("r", None, [0], [c], finished=done))
        if done:
            return outs


def test_delta_holds_back_split_characters_and_a_stop_string_in_the_making(llama_dir):
    tok = Tokenizer(str(llama_dir))
    rng = random.Random(0)
    for _ in range(20):
        text = "".join(rng.choice("aé€😀 b") for _ in range(12))
        ids = tok.encode(text, add_special_tokens=False)
        for stop in (None, "ab", "€😀"):
            params = SamplingParams(stop=[stop] if stop else None)
            delta = DeltaOutputs(params)
            steps = _cumulative_steps(tok, ids, stop)
            pieces = [d for d in map(delta.next, steps) if d is not None]
            assert "".join(p.outputs[0].text for p in pieces if p.outputs) == steps[-1].outputs[0].text
            assert [t for p in pieces for c in p.outputs for t in c.token_ids] == steps[-1].outputs[0].token_ids
            assert "\ufffd" not in "".join(p.outputs[0].text for p in pieces if p.outputs)  # never a half character


def test_output_kind_checked_in_one_line():
    from bstar.engine.errors import RequestError

    SamplingParams(output_kind=RequestOutputKind.DELTA)
    with pytest.raises(RequestError, match="output_kind"):
        SamplingParams(output_kind=7)


def test_delta_stream_aborted_midway_ends_with_the_rest(llama_dir):
    """abort() ends a DELTA stream with what was not yet sent and finish_reason "abort"; the pieces are a
    prefix of the uninterrupted greedy output."""
    engine = AsyncLLM(str(llama_dir), **CPU)
    tok = engine.llm_engine.tokenizer
    prompt = tok.encode("the dog ran far")
    sp = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, output_kind=RequestOutputKind.DELTA)

    async def main():
        pieces = []
        async for out in engine.generate(prompt, sp, "a"):
            pieces.append(out)
            if len(pieces) == 2:
                await engine.abort("a")
        return pieces

    try:
        pieces = asyncio.run(main())
    finally:
        engine.shutdown()
    whole = LLM(str(llama_dir), **CPU).generate([prompt], sp, use_tqdm=False)[0].outputs[0]
    ids = [t for o in pieces for c in o.outputs for t in c.token_ids]
    assert pieces[-1].finished and pieces[-1].outputs[0].finish_reason == "abort"
    assert 2 <= len(ids) < 40 and ids == whole.token_ids[: len(ids)]
    assert "".join(c.text for o in pieces for c in o.outputs) == tok.decode(ids)
