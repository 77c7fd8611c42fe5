"""SFTConfig (every option of a fine-tuning run) and the learning-rate schedule."""

import math
from dataclasses import dataclass

from engine.config import DTYPES
from engine.errors import BStarError

VARLEN = "bstar_varlen"  # our packed attention (bstar.train.varlen_attention)


@dataclass
class SFTConfig:
    lr: float = 1e-5
    epochs: int = 1
    max_steps: int | None = None  # cap on optimizer steps (after epochs)
    # Exactly this many optimizer steps (the data re-shuffled and cycled as often as needed; epochs and
    # max_steps are then ignored): a fixed budget whatever the data size.
    steps: int | None = None
    # Length of the LR schedule in optimizer steps (None: this call's steps). Longer than one call when
    # several calls continue one schedule (SFTTrainer.train(continue_from=...)): a B-STaR run's iterations
    # share one cosine, as in the reference.
    schedule_steps: int | None = None
    # Global batch per optimizer step, across all ranks: at most batch_tokens input tokens, or
    # exactly batch_examples examples (set one; batch_examples wins when both are set).
    batch_tokens: int | None = 16384
    batch_examples: int | None = None
    micro_batch_tokens: int = 4096  # per rank per forward: a packed row length or padded-batch budget
    max_seq_len: int = 2048  # longer examples are bad data (skipped or refused)
    pack: bool = True  # False: length-bucketed padded batches
    schedule: str = "cosine"  # or "constant"; both after a linear warmup
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps == 0
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of lr
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0  # None or 0: no clipping (the norm is still logged)
    seed: int = 0
    precision: str = "auto"  # auto: bf16 compute with fp32 master weights on GPU, fp32 on CPU
    grad_checkpointing: bool = False
    # bstar_varlen: per-example causal SDPA on packed rows (no dense mask); or sdpa / eager /
    # flash_attention_2 (transformers' own; all handle packed rows correctly)
    attn_implementation: str = VARLEN
    on_bad_data: str = "skip"  # or "refuse" (raises DataError)
    add_eos: bool = True
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    save_dtype: str = "float32"  # checkpoint weights; float32 keeps resume exact
    metrics_path: str | None = None  # per-step JSONL (rank 0)
    progress: bool = True
    device: str | None = None  # default: cuda (LOCAL_RANK) if available, else cpu

    def __post_init__(self):
        if self.batch_tokens is None and self.batch_examples is None:
            raise BStarError("set batch_tokens or batch_examples")
        if self.batch_examples is not None:
            self.batch_tokens = None
        if self.schedule not in ("cosine", "constant"):
            raise BStarError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise BStarError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.save_dtype not in DTYPES:
            raise BStarError(f"save_dtype must be one of {list(DTYPES)}, got {self.save_dtype!r}")
        if self.micro_batch_tokens < self.max_seq_len:
            raise BStarError(f"micro_batch_tokens {self.micro_batch_tokens} < max_seq_len {self.max_seq_len}")
        if self.lr <= 0 or self.epochs < 1:
            raise BStarError("lr must be > 0 and epochs >= 1")
        for name in ("steps", "schedule_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise BStarError(f"{name} must be None or >= 1, got {getattr(self, name)}")
        self.betas = tuple(self.betas)


def lr_at(step: int, total: int, cfg: SFTConfig) -> float:
    """LR for 0-based optimizer step `step` of `total`: linear warmup, then cosine or constant."""
    warm = cfg.warmup_steps or int(cfg.warmup_ratio * total)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - warm) / max(1, total - warm)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
