"""Tiny random Llama / Qwen2 / Mistral checkpoints built locally, with a small trained tokenizer."""

import json
import os

import torch

ARCHS = ("llama", "qwen2", "mistral")

_CORPUS = [
    "Janet has 3 apples and buys 5 more. How many apples does she have? 3 + 5 = 8. The answer is 8.",
    "A train travels 60 miles per hour for 2 hours. 60 * 2 = 120 miles.",
    "Step 1: add the numbers. Step 2: multiply by 4. Step 3: subtract 7.",
    "The quick brown fox jumps over the lazy dog while the cat sleeps.",
] * 20


def build_tokenizer(path: str, vocab_size: int = 256, extra_tokens=()):
    """A byte-level BPE tokenizer trained on a few sentences, saved as tokenizer.json + config."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    if extra_tokens:
        tok.add_tokens(list(extra_tokens))
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
    return tok


def make_config(arch: str = "llama", **overrides):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    base = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        rms_norm_eps=1e-6,
    )
    base.update(overrides)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch]
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
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

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
            elif "norm" in name:
                p.uniform_(0.8, 1.2)
            else:  # biases
                p.normal_(0, 0.05)
    model.to(dtype).save_pretrained(path)
    if tokenizer:
        build_tokenizer(path, vocab_size=min(cfg.vocab_size, 300) - len(extra_tokens), extra_tokens=extra_tokens)
    return path


def hf_model(path: str, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
