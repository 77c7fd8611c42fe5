"""The test suite's one factory (benchmarks use it too): tiny random Llama / Qwen2 / Mistral (make_model)
and Qwen3 (make_qwen3_model) checkpoints built locally with a small trained tokenizer, and (prompt,
completion) records for SFT.

Tokenizers come from the built-in task's code (bstar.embedded.tokenizer), so every checkpoint here and
the built-in models share the special-token ids <s> = 0, </s> = 1, <pad> = 2. Shared checkpoints of the
suite are session fixtures in tests/conftest.py.
"""

import json
import os
import random
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForTokenClassification,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from bstar.embedded.tokenizer import BOS, EOS, PAD, save_tokenizer, train_bpe

ARCHS = ("llama", "qwen2", "mistral")
# Qwen2.5-0.5B's shapes (its config.json; context cut to 4,096) for random-weight models of a real size
QWEN25_05B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    tie_word_embeddings=True,
    max_position_embeddings=4096,
)
QWEN25_7B = dict(  # Qwen2.5-7B shapes (the memory plan's figures are worked out by hand for these)
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    tie_word_embeddings=False,
    max_position_embeddings=4096,
)

_CORPUS = [
    "Janet has 3 apples and buys 5 more. How many apples does she have? 3 + 5 = 8. The answer is 8.",
    "A train travels 60 miles per hour for 2 hours. 60 * 2 = 120 miles.",
    "Step 1: add the numbers. Step 2: multiply by 4. Step 3: subtract 7.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps.",
] * 20


def build_tokenizer(path: str, vocab_size: int = 256, extra_tokens=()):
    """A byte-level BPE tokenizer trained on a few sentences, saved as tokenizer.json + config: the built-in
    task's tokenizer code (<s>, </s>, <pad> = ids 0, 1, 2, <s> prepended), on other text."""
    tok = train_bpe(_CORPUS, vocab_size, extra_tokens=extra_tokens)
    save_tokenizer(tok, path)
    return tok


def make_config(arch: str = "llama", **overrides):
    base = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        rms_norm_eps=1e-6,
    )
    if arch == "qwen3":
        base["head_dim"] = 24  # heads * head_dim (96) != hidden_size (64), as Qwen3 allows
    base.update(overrides)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig, "qwen3": Qwen3Config}[arch]
    return cls(**base)


def make_model(
    path: str,
    arch: str = "llama",
    seed: int = 0,
    tokenizer: bool = True,
    dtype=torch.float32,
    head: str = "lm",
    extra_tokens=(),
    **overrides,
) -> str:
    """Save a random model (and tokenizer) to `path`; returns the path. Weights are scaled up from
    the default init so logits are far from uniform and greedy decoding is not tie-prone."""
    os.makedirs(path, exist_ok=True)
    cfg = make_config(arch, **overrides)
    torch.manual_seed(seed)
    if head == "token_cls":  # a classification-head reward model
        cfg.num_labels = 2
        model = AutoModelForTokenClassification.from_config(cfg, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
            elif "norm" in name:  # Qwen3's q_norm / k_norm far from 1, so a missing norm shows
                p.uniform_(*((0.5, 1.5) if arch == "qwen3" else (0.8, 1.2)))
            else:  # biases
                p.normal_(0, 0.05)
    model.to(dtype).save_pretrained(path)
    if tokenizer:
        build_tokenizer(path, vocab_size=min(cfg.vocab_size, 300) - len(extra_tokens), extra_tokens=extra_tokens)
    return path


def make_qwen3_model(path: str, seed: int = 0, **kw) -> str:
    """A random Qwen3 checkpoint (make_model's "qwen3"): q_norm / k_norm on every layer, and by default a
    head_dim of 24 with 4 heads, so heads * head_dim (96) differs from hidden_size (64)."""
    return make_model(path, "qwen3", seed, **kw)


def hf_model(path: str, dtype=torch.float32):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


# -- (prompt, completion) records for SFT ------------------------------------------------------------

WORDS = (
    "the a one two three four five six seven eight nine ten plus minus times equals answer is so we "
    "have add take left right apples pears cost each total step first then more less half double"
).split()


def make_texts(n: int, seed: int = 0, min_words: int = 2, max_words: int = 24) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(min_words, max_words))) for _ in range(n)]


def make_records(n: int, seed: int = 0, max_words: int = 24) -> list[dict]:
    rng = random.Random(seed + 1000)
    prompts = make_texts(n, seed, 2, max_words)
    comps = make_texts(n, seed + 1, 1, max_words)
    return [{"prompt": f"Q: {p}\nA:", "completion": f" {c} #### {rng.randint(0, 99)}"} for p, c in zip(prompts, comps)]


def write_lines(path: Path, records) -> Path:
    """One line per record: a dict as JSON, a str as it is (to write malformed lines on purpose)."""
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def main(argv=None):
    """`python -m bstar.testing.model_factory DIR [--arch A] [--seed S]`: a tiny random checkpoint to try
    the engine on (what CI's smoke run and the README's example use without a model hub)."""
    import argparse

    p = argparse.ArgumentParser(description=main.__doc__.split("\n")[0])
    p.add_argument("path")
    p.add_argument("--arch", default="llama", choices=(*ARCHS, "qwen3"))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(make_model(a.path, a.arch, seed=a.seed))


if __name__ == "__main__":
    main()
