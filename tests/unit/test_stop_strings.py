"""Stop strings on incrementally decoded text (core.output_processor.StopTextState): at every step the
same decision, stop_reason and cut text as decoding the whole output again (the old way, kept here as the
reference), on random token streams with characters split over byte-level tokens and special tokens."""

import random

import pytest

from bstar.engine.core.output_processor import OutputProcessor
from bstar.engine.core.sequence import Sequence
from bstar.engine.entrypoints.sampling_params import SamplingParams
from bstar.engine.model.tokenizer import Tokenizer
from bstar.testing.model_factory import build_tokenizer

TEXT = "naïve café — 東京 ✓ the quick brown fox, über straße. ¿Qué? 😀 done"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    build_tokenizer(str(path))
    return Tokenizer(str(path))


def _reference(tok, out, params):
    """The first step (outputs count) at which the whole output's decode holds a stop string (the first
    one, in params' order, that it holds), with the cut text; None when none does."""
    for m in range(1, len(out) + 1):
        text = tok.decode(out[:m], params.skip_special_tokens)
        for stop in params.stop_strings:
            k = text.find(stop)
            if k >= 0:
                return m, stop, text[: k + len(stop)] if params.include_stop_str_in_output else text[:k]
    return None


def _run(tok, prompt, out, params):
    proc = OutputProcessor(tok, eos_ids=set(), max_model_len=1 << 20)
    s = Sequence("r", prompt, params)
    for m, t in enumerate(out, 1):
        s.token_ids.append(t)
        if proc.finish_reason(s) == "stop":
            return m, s.stop_reason, s.stop_text
    return None


@pytest.mark.parametrize("seed", range(6))
def test_incremental_stop_strings_decide_as_a_full_decode(tokenizer, seed):
    rng = random.Random(seed)
    out = tokenizer.encode(TEXT * 3, add_special_tokens=False)
    if seed % 2:  # random ids too: byte tokens that split or break UTF-8 characters, special tokens
        out = [rng.randrange(0, tokenizer.vocab_size) if rng.random() < 0.3 else t for t in out]
    full = tokenizer.decode(out)
    found = 0
    for trial in range(8):
        a = rng.randrange(1, len(full) - 4)
        # (not a U+FFFD of a broken character: text ending in one waits for the next token, as in vLLM)
        stops = [full[a : a + rng.randrange(1, 4)].replace("\ufffd", "") or "x", "".join(rng.sample(TEXT, 3))]
        rng.shuffle(stops)
        params = SamplingParams(
            stop=stops, include_stop_str_in_output=bool(trial % 2), skip_special_tokens=bool(trial % 3)
        )
        ref = _reference(tokenizer, out, params)
        assert _run(tokenizer, [5, 6, 7], out, params) == ref
        found += ref is not None
    assert found >= 4  # (most trials stop)


def test_a_stop_string_split_over_tokens_and_characters(tokenizer):
    """A stop string whose characters span several byte tokens is found at the token that completes it."""
    out = tokenizer.encode(TEXT, add_special_tokens=False)
    params = SamplingParams(stop=["東京 ✓"])
    m, stop, text = _run(tokenizer, [3], out, params)
    assert stop == "東京 ✓" and text == TEXT[: TEXT.index("東京")]
    assert "東京 ✓" in tokenizer.decode(out[:m]) and "東京 ✓" not in tokenizer.decode(out[: m - 1])
