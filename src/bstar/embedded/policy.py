"""The built-in task's policy: a random tiny Llama, warm-started by SFT on a seed set so that it starts weak
but not at zero, and its greedy accuracy measured with the engine."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bstar.embedded.config import EmbeddedConfig
from bstar.embedded.tokenizer import BOS, EOS, PAD
from bstar.engine import LLM, SamplingParams
from bstar.loop.metrics import greedy_accuracy
from bstar.loop.rewards import grade
from bstar.loop.tasks import Example, format_prompt
from bstar.train import SFTConfig, SFTExample, SFTTrainer


def save_random_policy(cfg: EmbeddedConfig, tok_dir: Path, path: Path, n_vocab: int) -> None:
    """A randomly initialised tiny Llama with the tokenizer and generation config beside it."""
    mc = LlamaConfig(
        vocab_size=n_vocab,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(mc)
    model.save_pretrained(path)
    for f in tok_dir.iterdir():
        shutil.copy2(f, path / f.name)
    (path / "generation_config.json").write_text(
        json.dumps({"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD})
    )


def sft_config(cfg: EmbeddedConfig, lr: float, epochs: int, batch: int, progress: bool) -> SFTConfig:
    """The trainer settings of both builds on the task (warm start and PRM), on the CPU."""
    return SFTConfig(
        lr=lr,
        epochs=epochs,
        batch_examples=batch,
        max_seq_len=cfg.max_position_embeddings,
        micro_batch_tokens=max(4096, cfg.max_position_embeddings),
        warmup_ratio=0.05,
        min_lr_ratio=0.1,
        weight_decay=0.0,
        seed=cfg.seed,
        progress=progress,
        device="cpu",
    )


def warm_start(cfg: EmbeddedConfig, init_dir: Path, tok, seed_set: list[Example], out: Path, progress: bool) -> float:
    """SFT of the random policy on the seed set (loss on solution + eos); returns the last loss."""
    data = []
    for i, e in enumerate(seed_set, 1):
        p = tok.encode(format_prompt(e)).ids
        c = tok.encode(e.gold_solution, add_special_tokens=False).ids + [EOS]
        data.append(SFTExample(tuple(p + c), len(p), i))
    trainer = SFTTrainer(init_dir, sft_config(cfg, cfg.warm_lr, cfg.warm_epochs, cfg.warm_batch, progress))
    res = trainer.train(data)
    trainer.save(out, trainer_state=False)
    return res.losses[-1]


def engine_llm(path: Path, cfg: EmbeddedConfig) -> LLM:
    """The engine on a built model, as every build phase runs it (CPU, the build's seed)."""
    return LLM(str(path), device="cpu", seed=cfg.seed, max_model_len=cfg.max_position_embeddings)


def measure_greedy_accuracy(policy: Path, examples: list[Example], cfg: EmbeddedConfig, progress: bool) -> float:
    """Generates a greedy answer to each of `examples` with the engine and grades it: the fraction right."""
    llm = engine_llm(policy, cfg)
    outs = llm.generate(
        [format_prompt(e) for e in examples],
        SamplingParams(temperature=0.0, max_tokens=cfg.max_new_tokens),
        use_tqdm=progress,
    )
    return greedy_accuracy([grade(o.outputs[0].text, e.gold_answer, e.task) for o, e in zip(outs, examples)])
