"""SFTConfig (every option of a fine-tuning run) and the learning-rate schedule. Light to import (no torch):
the command line derives `sft`'s options from SFTConfig before anything heavy loads."""

import math
from dataclasses import dataclass

from bstar.engine.choices import CPU_GEMMS, DTYPE_NAMES
from bstar.errors import BStarError
from bstar.utils.settings import check_settings, setting

VARLEN = "bstar_varlen"  # our packed attention (bstar.train.varlen_attention)
SCHEDULES = ("cosine", "constant")  # both after a linear warmup
PRECISIONS = ("auto", "fp32", "bf16")
BAD_DATA = ("skip", "refuse")  # refuse raises DataError
SAVE_DTYPES = ("auto", *DTYPE_NAMES)


@dataclass
class SFTConfig:
    """Every option of a fine-tuning run. Each field's help is its `bstar-engine sft` option's (bstar.cli.options)."""

    lr: float = setting(1e-5, "Peak learning rate.")
    epochs: int = setting(1, "Passes over the data.", low=1)
    max_steps: int | None = setting(None, "Stop after this many optimizer steps (after --epochs).", unset="none", low=1)
    steps: int | None = setting(
        None,
        "Exactly this many optimizer steps, the data reshuffled and cycled as often as needed (--epochs and "
        "--max-steps are then ignored): a fixed budget whatever the data size.",
        unset="none",
        low=1,
    )
    # Longer than one call when several calls continue one schedule (SFTTrainer.train(continue_from=...)): a
    # B-STaR run's iterations share one cosine, as in the reference.
    schedule_steps: int | None = setting(
        None, "Length of the LR schedule in optimizer steps.", unset="this run's steps", low=1
    )
    # Global batch per optimizer step, across all ranks: set one; batch_examples wins when both are set.
    batch_tokens: int | None = setting(16384, "Global batch per optimizer step, in input tokens (at most).", low=1)
    batch_examples: int | None = setting(
        None, "Global batch per optimizer step, in examples (overrides --batch-tokens).", unset="none", low=1
    )
    micro_batch_tokens: int = setting(
        4096, "Tokens per forward per device: a packed row's length or a padded batch's budget.", low=1
    )
    max_seq_len: int = setting(2048, "Longest example in tokens; longer ones are bad data.", low=2)
    pack: bool = setting(True, "Pack examples into rows (--no-pack: length-bucketed padded batches).")
    schedule: str = setting("cosine", "LR schedule after the linear warmup.", choices=SCHEDULES)
    warmup_steps: int = setting(0, "Linear warmup in optimizer steps.", low=0)
    warmup_ratio: float = setting(
        0.0, "Linear warmup as a fraction of the schedule (when --warmup-steps is 0).", low=0, high=1
    )
    min_lr_ratio: float = setting(0.0, "The cosine's floor, as a fraction of --lr.", low=0, high=1)
    weight_decay: float = setting(0.0, "AdamW weight decay.")
    betas: tuple[float, float] = setting((0.9, 0.95), "AdamW betas.")
    eps: float = setting(1e-8, "AdamW epsilon.")
    max_grad_norm: float | None = setting(  # the norm is logged also when not clipping
        1.0, "Clip the gradient norm to this; 0 disables clipping.", unset="no clipping"
    )
    seed: int = setting(0, "Seed of the data order and shuffles.")
    precision: str = setting(
        "auto", "auto: bf16 compute with fp32 master weights on GPU, fp32 on CPU.", choices=PRECISIONS
    )
    # activations of a 7B model at a few thousand tokens do not fit beside the weights otherwise
    grad_checkpointing: bool | None = setting(
        None, "Recompute each decoder layer's activations in backward (less memory).", unset="on for CUDA, off on CPU"
    )
    ce_chunk: int | None = setting(  # bstar.train.loss
        1024,
        "Cross-entropy over this many rows at a time (no [tokens, vocab] float32 logits); 0: the plain loss.",
        low=0,
    )
    # Never foreach: a second copy of the parameters in temporaries.
    fused_optimizer: bool = setting(
        True, "AdamW's fused kernel where the device has one (CUDA, CPU), else its for-loop implementation."
    )
    # CPU float32 without FSDP, chosen as the engine's (engine/model/linear.py; see bstar/train/cpu_gemm.py)
    cpu_gemm: str = setting(
        "auto",
        "The Linear layers' GEMM library on CPU: auto takes oneDNN except on Intel CPUs, onednn forces it, "
        "mkl and aten keep ATen's F.linear.",
        choices=CPU_GEMMS,
    )
    # FSDP2 CPUOffloadPolicy, a one-rank process group when not under torchrun
    offload_optimizer: bool = setting(
        False,
        "Weights, gradients and AdamW state in host memory, the optimizer step on the CPU (fine-tunes a 7B model "
        "on one 80 GB GPU; needs ~16 bytes/param of host memory).",
    )
    # (transformers' own implementations all handle packed rows correctly)
    attn_implementation: str = setting(
        VARLEN, f"{VARLEN}: per-example causal SDPA on packed rows; or sdpa, eager, flash_attention_2."
    )
    on_bad_data: str = setting("skip", "An unusable example: skip it, or refuse the data.", choices=BAD_DATA)
    add_eos: bool = setting(True, "End every completion with the EOS token.")
    prompt_field: str = setting("prompt", "The data's prompt field.")
    completion_field: str = setting("completion", "The data's completion field.")
    # a bf16 base saves bf16, so a resumed run serves what it started with
    save_dtype: str = setting(
        "auto", "Checkpoint dtype; auto: the base checkpoint's; float32 makes a resume exact.", choices=SAVE_DTYPES
    )
    metrics_path: str | None = setting(None, "Per-step metrics, JSONL (rank 0).", unset="none")
    progress: bool = setting(True, "A progress bar.")
    device: str | None = setting(None, "cpu, cuda or cuda:N.", unset="cuda (LOCAL_RANK) if available, else cpu")

    def __post_init__(self):
        check_settings(self)  # each field's choices and bounds, as its option checks them
        if self.batch_tokens is None and self.batch_examples is None:
            raise BStarError("set batch_tokens or batch_examples")
        if self.batch_examples is not None:
            self.batch_tokens = None
        if self.micro_batch_tokens < self.max_seq_len:
            raise BStarError(f"micro_batch_tokens {self.micro_batch_tokens} < max_seq_len {self.max_seq_len}")
        if self.lr <= 0:
            raise BStarError(f"lr must be > 0, got {self.lr}")
        self.betas = tuple(self.betas)


def resolve_grad_checkpointing(value: bool | None, device_type: str) -> bool:
    """SFTConfig.grad_checkpointing on a device: None means on for CUDA (activations of a 7B model at a few
    thousand tokens do not fit beside the weights otherwise) and off elsewhere (CPU runs are tiny, and
    recomputing costs time)."""
    return value if value is not None else device_type == "cuda"


def adamw_options(fused: bool, device_types: set[str], fused_devices: list[str] | set[str]) -> dict:
    """AdamW's implementation switch for parameters on `device_types`: fused=True when asked for and every
    device has the fused kernel (`fused_devices`, torch's list), else the single-tensor loop (foreach=False):
    foreach would copy every parameter into temporaries, a second model's worth of memory."""
    if fused and device_types and device_types <= set(fused_devices):
        return {"fused": True}
    return {"foreach": False}


def lr_at(step: int, total: int, cfg: SFTConfig) -> float:
    """LR for 0-based optimizer step `step` of `total`: linear warmup, then cosine or constant."""
    warm = cfg.warmup_steps or int(cfg.warmup_ratio * total)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - warm) / max(1, total - warm)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
