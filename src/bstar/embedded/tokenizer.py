"""The built-in task's tokenizer: byte-level BPE trained on the task text (`train_bpe` and `save_tokenizer`
also build the test suite's tokenizers, with the same special-token ids)."""

import json
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from bstar.errors import BStarError
from bstar.loop.rewards import grade
from bstar.loop.tasks import Example, format_prompt

SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")  # ids 0, 1, 2
BOS, EOS, PAD = 0, 1, 2
STEP_TAG, GOOD, BAD = "ки", "+", "-"  # bstar.PRM's LM-style (Math-Shepherd) defaults


def _corpus(examples: list[Example]):
    for e in examples:
        yield format_prompt(e) + e.gold_solution


def train_bpe(texts: Iterable[str], vocab_size: int, *, split_digits: bool = False, extra_tokens=()) -> Tokenizer:
    """Byte-level BPE (lossless decode) trained on `texts`: <s>, </s>, <pad> are ids 0, 1, 2 and <s> is
    prepended to every encoding with special tokens; `split_digits` makes every digit its own token;
    `extra_tokens` are added whole after training."""
    tok = Tokenizer(models.BPE(unk_token=None))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    if extra_tokens:
        tok.add_tokens(list(extra_tokens))
    return tok


def save_tokenizer(tok: Tokenizer, path: str | os.PathLike) -> None:
    """tokenizer.json plus tokenizer_config.json naming bos/eos/pad, so that both engine.Tokenizer and
    transformers' AutoTokenizer load it."""
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "pad_token": "<pad>",
                "model_max_length": 4096,
            },
            f,
        )


def build_tokenizer(path: Path, examples: list[Example], vocab_size: int) -> Tokenizer:
    """The task's tokenizer: digits one per token (so arithmetic is learnable), "ки" (the PRM step tag)
    added, and "+", "-", "*", "=", "#", newline one token each; saved in `path`."""
    tok = train_bpe(_corpus(examples), vocab_size, split_digits=True, extra_tokens=[STEP_TAG])
    for s, i in zip(SPECIAL_TOKENS, (BOS, EOS, PAD)):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    for s in (STEP_TAG, "+", "-", "*", "=", "#", "\n"):
        if len(tok.encode(s, add_special_tokens=False).ids) != 1:
            raise BStarError(f"embedded tokenizer: {s!r} is not a single token")
    save_tokenizer(tok, path)
    return tok


def check_round_trip(tok, examples: list[Example]) -> None:
    """Decoded solutions must still grade as correct (and decode must be lossless)."""
    for e in examples:
        text = e.gold_solution
        back = tok.decode(tok.encode(text, add_special_tokens=False).ids)
        if back != text or not grade(back, e.gold_answer, e.task):
            raise BStarError(f"embedded tokenizer does not round-trip {text!r} (got {back!r})")
