"""The trainer's device memory per rank, estimated from shapes before anything is built (pure functions; the
trainer is checked against it, and a run's plan counts it per phase)."""

import math
from dataclasses import dataclass

import torch

from bstar.engine.config import ModelConfig
from bstar.engine.errors import RequestError
from bstar.engine.runner.memory_plan import (
    dtype_bytes,
    gib,
    layer_activation_bytes_per_token,
    layer_param_count,
    param_count,
    root_param_count,
)
from bstar.kernels.host import pinned_request_bytes


@dataclass(frozen=True)
class TrainerSpec:
    """What the trainer's memory depends on. Defaults: FSDP2 with float32 master weights and gradients and
    AdamW's two float32 states (4 + 4 + 8 = 16 bytes per parameter), bf16 compute, activation checkpointing on,
    cross-entropy in chunks of 1024 rows."""

    mcfg: ModelConfig
    world_size: int = 1  # FSDP ranks sharing the parameters, gradients and optimizer state
    offload: bool = False  # CPUOffloadPolicy: parameters, gradients and optimizer state live on the host
    micro_batch_tokens: int = 4096  # tokens per forward/backward on one rank
    loss_tokens: int | None = None  # rows the loss reads (completion tokens); None: all micro_batch_tokens
    activation_checkpointing: bool = True
    ce_chunk: int | None = 1024  # chunked cross-entropy rows; None: full [loss_tokens, vocab] float32 logits
    compute_dtype: torch.dtype = torch.bfloat16  # MixedPrecisionPolicy param_dtype
    master_bytes: int = 4  # sharded parameters (FSDP's master copy)
    grad_bytes: int = 4  # sharded gradients (reduce dtype)
    optim_bytes: int = 8  # AdamW exp_avg + exp_avg_sq

    @property
    def state_bytes_per_param(self) -> int:
        return self.master_bytes + self.grad_bytes + self.optim_bytes


@dataclass(frozen=True)
class TrainerEstimate:
    """Per rank. gpu_total = gpu_state + unsharded + grad_transient + activations + logits."""

    params: int
    state_bytes: int  # weights + gradients + optimizer state of the whole model (all ranks together)
    gpu_state: int  # this rank's shard of it on the GPU (0 when offloaded)
    host_state: int  # this rank's shard of it on the host (offload)
    unsharded: int  # compute-dtype copies of the root unit and two decoder layers (current + prefetched)
    grad_transient: int  # the biggest unit's unsharded gradient before reduce-scatter
    activations: int
    logits: int

    @property
    def working(self) -> int:
        """What does not shrink with more ranks."""
        return self.unsharded + self.grad_transient + self.activations + self.logits

    @property
    def gpu_total(self) -> int:
        return self.gpu_state + self.working


def trainer_estimate(spec: TrainerSpec) -> TrainerEstimate:
    """The trainer's memory per rank, each term an explicit formula (m = spec.mcfg, T = micro_batch_tokens,
    R = loss_tokens, c = compute dtype bytes, P = param_count(m), N = world_size):
    - state: P x (master + grad + optim) bytes, / N per rank; on the host when offloaded;
    - unsharded: (root + 2 x layer params) x c, plus the same in master bytes when offloaded (the shard is copied
      to the GPU before the all-gather);
    - grad_transient: max(root, layer params) x (c + grad bytes);
    - activations: without checkpointing T x L x layer_activation_bytes_per_token; with it T x L x h x c (the
      saved layer inputs) + 2 x T x layer_activation_bytes_per_token (one layer recomputed, and its gradients);
    - logits (LM head): full R x V x (c + 4 + 4) (logits, their float32 copy, log-softmax); chunked
      2 x min(chunk, R) x V x 4 + V x h x 4 (a chunk's float32 logits and softmax, the float32 head-gradient
      accumulator). Reward heads: R x labels x (c + 8)."""
    m, n = spec.mcfg, spec.world_size
    if n < 1:
        raise RequestError(f"world_size must be >= 1, got {n}")
    p = param_count(m)
    state = p * spec.state_bytes_per_param
    shard = -(-state // n)
    c = dtype_bytes(spec.compute_dtype)
    root, layer = root_param_count(m), layer_param_count(m)
    unsharded = (root + 2 * layer) * (c + (spec.master_bytes if spec.offload else 0))
    grad_transient = max(root, layer) * (c + spec.grad_bytes)
    t = spec.micro_batch_tokens
    per_layer = layer_activation_bytes_per_token(m, spec.compute_dtype)
    if spec.activation_checkpointing:
        activations = t * m.num_layers * m.hidden_size * c + 2 * t * per_layer
    else:
        activations = t * m.num_layers * per_layer
    r = t if spec.loss_tokens is None else min(spec.loss_tokens, t)
    if m.head != "lm":
        logits = r * m.num_labels * (c + 8)
    elif spec.ce_chunk is None:
        logits = r * m.vocab_size * (c + 4 + 4)
    else:
        logits = 2 * min(spec.ce_chunk, r) * m.vocab_size * 4 + m.vocab_size * m.hidden_size * 4
    return TrainerEstimate(
        params=p,
        state_bytes=state,
        gpu_state=0 if spec.offload else shard,
        host_state=offload_host_bytes(spec) if spec.offload else 0,
        unsharded=unsharded,
        grad_transient=grad_transient,
        activations=activations,
        logits=logits,
    )


def trainer_refusal(spec: TrainerSpec, est: TrainerEstimate, available: int) -> str:
    """The one line that says why the trainer does not fit in `available` GPU bytes, and what would."""
    if not spec.offload and est.working < available:
        need = max(spec.world_size + 1, -(-est.state_bytes // (available - est.working)))
        per_gpu = f", {gib(est.gpu_state)} per GPU on {spec.world_size}" if spec.world_size > 1 else ""
        return (
            f"full fine-tuning of {est.params / 1e9:.1f}B params needs ~{gib(est.state_bytes)} for weights, "
            f"gradients and AdamW state ({spec.state_bytes_per_param} B/param{per_gpu}) plus {gib(est.working)} "
            f"of working memory, but the train phase has {gib(available)} of GPU memory; use {need} GPUs under "
            f"torchrun or --offload-optimizer"
        )
    return (
        f"the trainer's working memory needs ~{gib(est.working)} (activations {gib(est.activations)}, logits "
        f"{gib(est.logits)}, unsharded weights {gib(est.unsharded)}, gradients {gib(est.grad_transient)}) beside "
        f"{gib(est.gpu_state)} of sharded state, but the train phase has {gib(available)} of GPU memory; lower "
        f"micro_batch_tokens, keep activation checkpointing on and the cross-entropy chunked"
    )


def param_shapes(m: ModelConfig) -> list[tuple[int, ...]]:
    """Every parameter tensor's shape (those param_count counts; tied embeddings once): FSDP shards and
    offloads each on its own, so what its host copies hold depends on the tensors, not only their sum."""
    h, q, kv, inter = m.hidden_size, m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim, m.intermediate_size
    layer = [(q, h), (kv, h), (kv, h), (h, q), (inter, h), (inter, h), (h, inter), (h,), (h,)]
    layer += [(q,), (kv,), (kv,)] if m.qkv_bias else []
    layer += [(h,)] if m.o_bias else []
    layer += [(inter,), (inter,), (h,)] if m.mlp_bias else []
    root = [(m.vocab_size, h), (h,)]
    labels = m.num_labels
    if m.head == "lm":
        root += [] if m.tie_word_embeddings else [(m.vocab_size, h)]
    elif m.head == "token_cls":
        root += [(labels, h), (labels,)]
    else:
        root += [(h, h), (h,), (labels, h), (labels,)]
    return root + layer * m.num_layers


def offload_host_bytes(spec: TrainerSpec) -> int:
    """One rank's host memory under FSDP's CPU offload: each parameter's shard (dim 0 cut in world_size
    pieces, padded) as master weights and as gradients, both pinned, each request rounded up to a power of
    two by the caching host allocator (kernels.host.pinned_request_bytes); the optimizer state beside them
    in plain memory (torch.optim's zeros_like of a pinned tensor is not pinned)."""
    n, total = spec.world_size, 0
    for shape in param_shapes(spec.mcfg):
        shard = -(-shape[0] // n) * math.prod(shape[1:])
        total += pinned_request_bytes(shard * spec.master_bytes) + pinned_request_bytes(shard * spec.grad_bytes)
        total += shard * spec.optim_bytes
    return total
