"""Tiny local HF model directories (random weights + a small byte-level BPE tokenizer) for trainer tests.

Everything is built offline in a temp dir: no hub access, a couple of seconds at most.
"""

import json
import random
from pathlib import Path

import torch

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


def write_jsonl(path: Path, records) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def save_tokenizer(d: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(make_texts(200, seed=123) + ["Q: A: ####"] * 5, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(d)
    return fast


def make_model_dir(d: Path, arch: str = "llama", seed: int = 0, layers: int = 2, hidden: int = 64) -> Path:
    """A random-weight HF checkpoint dir loadable by AutoModelForCausalLM / AutoTokenizer (and the engine)."""
    import transformers

    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    tok = save_tokenizer(d)
    common = dict(
        # Room above len(tok): AutoTokenizer may map to an architecture's tokenizer class that adds a token.
        vocab_size=384,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        rms_norm_eps=1e-6,
    )
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=False)
        cls = transformers.LlamaForCausalLM
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=True)
        cls = transformers.Qwen2ForCausalLM
    elif arch == "mistral":
        cfg = transformers.MistralConfig(**common, tie_word_embeddings=False, sliding_window=None)
        cls = transformers.MistralForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(cfg).to(torch.float32)
    # Random init has tiny weights (std 0.02): scale up so logits are far from uniform and tests can fail.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" not in n:
                p.normal_(0, 0.08)
    model.save_pretrained(d)
    return d
