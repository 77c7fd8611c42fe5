"""SFTConfig (every option of a fine-tuning run) and the learning-rate schedule."""

import math
from dataclasses import dataclass

from bstar.engine.config import DTYPES
from bstar.engine.model.linear import CPU_GEMMS
from bstar.errors import BStarError

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
    # Activation checkpointing (recompute each decoder layer in backward). None: on for CUDA, off on CPU.
    grad_checkpointing: bool | None = None
    # Cross-entropy over this many rows at a time (no [tokens, vocab] float32 logits; bstar.train.loss);
    # None or 0: the plain full-logits loss.
    ce_chunk: int | None = 1024
    # AdamW's fused kernel where the parameters' device has one (CUDA, CPU); otherwise the for-loop
    # implementation. Never foreach (a second copy of the parameters in temporaries).
    fused_optimizer: bool = True
    # CPU float32 without FSDP: the GEMM library of the Linear layers, chosen as the engine's (engine/model/linear.py:
    # "auto" takes oneDNN except on Intel CPUs; "onednn" forces it; "mkl" and "aten" keep ATen's F.linear).
    # See bstar/train/cpu_gemm.py.
    cpu_gemm: str = "auto"
    # FSDP2 CPUOffloadPolicy: parameters, gradients and AdamW state in host memory, the optimizer step on the
    # CPU, each layer's weights copied to the device for its forward/backward (a one-rank process group
    # when not under torchrun). What lets one 80 GB GPU fine-tune a 7B model.
    offload_optimizer: bool = False
    # bstar_varlen: per-example causal SDPA on packed rows (no dense mask); or sdpa / eager /
    # flash_attention_2 (transformers' own; all handle packed rows correctly)
    attn_implementation: str = VARLEN
    on_bad_data: str = "skip"  # or "refuse" (raises DataError)
    add_eos: bool = True
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    # Checkpoint weights: "auto" keeps the dtype of the checkpoint the trainer loaded (a bf16 base saves
    # bf16, so a resumed run serves what it started with); float32 makes a resume exact.
    save_dtype: str = "auto"
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
        if self.cpu_gemm not in CPU_GEMMS:
            raise BStarError(f"cpu_gemm must be one of {', '.join(CPU_GEMMS)}, got {self.cpu_gemm!r}")
        if self.save_dtype != "auto" and self.save_dtype not in DTYPES:
            raise BStarError(f"save_dtype must be 'auto' or one of {list(DTYPES)}, got {self.save_dtype!r}")
        if self.ce_chunk is not None and self.ce_chunk < 0:
            raise BStarError(f"ce_chunk must be None, 0 or >= 1, got {self.ce_chunk}")
        if self.micro_batch_tokens < self.max_seq_len:
            raise BStarError(f"micro_batch_tokens {self.micro_batch_tokens} < max_seq_len {self.max_seq_len}")
        if self.lr <= 0 or self.epochs < 1:
            raise BStarError("lr must be > 0 and epochs >= 1")
        for name in ("steps", "schedule_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise BStarError(f"{name} must be None or >= 1, got {getattr(self, name)}")
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
