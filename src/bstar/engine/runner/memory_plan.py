"""Device memory arithmetic: how much KV cache each engine gets, and whether each phase of a run fits.

Everything here is a pure function of shapes (engine.config.ModelConfig), dtypes and explicit figures: nothing
touches a device, so all of it is tested on CPU. Two users:

- `plan_memory`, before a run starts: from the device's total and free memory, the engines (policy, PRM) and
  the trainer, it decides each engine's KV bytes and returns a `MemoryPlan` whose `table()` prints weights, KV,
  activations and the trainer's estimate per phase (generate / score / train). A phase that cannot fit is
  refused with one line (MemoryPlanError, which carries the plan so its table can still be printed).
  Hand each engine its `plan.kv_cache_memory_bytes(name)` (LLM(..., kv_cache_memory_bytes=...)).
- The engine itself (ModelRunner): `kv_cap_blocks` and `engine_kv_blocks` size its cache from what it
  measured on the device (its own weights and activation peak), never more than it can use.

Phases. An iteration of the loop runs generate (policy engine), score (PRM engine) and train (trainer) one after
another. With sleep mode (LLM.sleep / wake_up) only the phase's own engines hold device memory; without it every
engine stays resident in every phase, the trainer's included (`default_phases`).

The estimates (activations, the trainer's working set) are upper-bound style formulas written out below so the
trainer can be checked against them; the engine's real activation peak is measured on CUDA (ModelRunner).
"""

import math
import os
from dataclasses import dataclass, field

import torch

from bstar.engine.config import ModelConfig
from bstar.engine.errors import MemoryPlanError, RequestError
from bstar.engine.runner.gpu.cuda_graphs import bucket_sizes
from bstar.kernels.decode_attention_triton import CTAS_PER_SM, FULL_WAVES, MAX_SPLITS, MIN_TOKENS_PER_SPLIT
from bstar.kernels.host import pinned_request_bytes

GiB = 1 << 30
PREFIX_CACHE_SLACK = 0.1  # extra KV blocks, as a fraction of the cap, to keep freed prefixes cached
SAMPLER_BYTES_PER_LOGIT = 16  # sampling temporaries per float32 logit: probabilities 4 + sorted 4 + sort index 8
DEFAULT_RESERVE_BYTES = 1 << 30  # CUDA context, cuBLAS/NCCL workspaces, allocator fragmentation
SLEEP_TAGS = ("weights", "kv_cache")
# The caching allocator rounds a graph pool's blocks up to segments (2 MiB for blocks under 1 MiB, 20 MiB for
# blocks of 1-10 MiB), so the pool reserves more than its tensors' peak: about one segment of each kind.
GRAPH_POOL_SLACK_BYTES = 24 << 20
# A capture runs on its own stream, and cuBLAS gets a workspace per stream from the capture's pool: PyTorch's
# default on Hopper is 32 MiB (less on older GPUs).
CUBLAS_WORKSPACE_BYTES = 32 << 20
H100_SMS = 132  # (H200 too) the split-KV partials' bound below


def cublaslt_workspace_bytes(m: ModelConfig, env=os.environ) -> int:
    """The capture stream's second (cuBLASLt) workspace in a decode graph pool: a GEMM with a bias (qkv_bias,
    o_bias, mlp_bias) on more than one row takes addmm's cuBLASLt path, whose workspace PyTorch allocates apart
    from cuBLAS's (CUBLASLT_WORKSPACE_SIZE KiB, 32 MiB by default on Hopper) unless the build is told to share
    cuBLAS's (TORCH_CUBLASLT_UNIFIED_WORKSPACE=1). 0 for a model without biases. The pool is also measured
    at capture (DecodeGraphs.pool_bytes), and ModelRunner warns when it exceeds this estimate."""
    if not (m.qkv_bias or m.o_bias or m.mlp_bias) or env.get("TORCH_CUBLASLT_UNIFIED_WORKSPACE") == "1":
        return 0
    kib = env.get("CUBLASLT_WORKSPACE_SIZE", "")
    return int(kib) << 10 if kib.isdigit() else CUBLAS_WORKSPACE_BYTES


def gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def _cell(n: int) -> str:
    return gib(n) if n else "-"


def dtype_bytes(dtype: torch.dtype) -> int:
    return dtype.itemsize


# -- one model ----------------------------------------------------------------------------------------------------


def layer_param_count(m: ModelConfig) -> int:
    """Parameters of one decoder layer: q/k/v/o (+ biases), gate/up/down (+ biases), two RMSNorms."""
    h, q, kv, inter = m.hidden_size, m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim, m.intermediate_size
    attn = h * (q + 2 * kv) + q * h + (q + 2 * kv if m.qkv_bias else 0) + (h if m.o_bias else 0)
    mlp = 3 * h * inter + (2 * inter + h if m.mlp_bias else 0)
    return attn + mlp + 2 * h


def head_param_count(m: ModelConfig) -> int:
    """The head's own parameters: lm_head (0 when tied to the embeddings: one tensor, counted once), a
    token-classification Linear, or Qwen2.5-Math-PRM's Linear -> ReLU -> Linear."""
    h, labels = m.hidden_size, m.num_labels
    if m.head == "lm":
        return 0 if m.tie_word_embeddings else m.vocab_size * h
    if m.head == "token_cls":
        return h * labels + labels
    return h * h + h + h * labels + labels  # prm_mlp


def root_param_count(m: ModelConfig) -> int:
    """Everything outside the decoder layers: embeddings, final norm, head (FSDP's root unit)."""
    return m.vocab_size * m.hidden_size + m.hidden_size + head_param_count(m)


def param_count(m: ModelConfig) -> int:
    return root_param_count(m) + m.num_layers * layer_param_count(m)


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


def offload_host_bytes(spec: "TrainerSpec") -> int:
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


def weight_bytes(m: ModelConfig, dtype: torch.dtype) -> int:
    """An engine's weights: every tensor in the serving dtype (tied embeddings once)."""
    return param_count(m) * dtype_bytes(dtype)


def kv_bytes_per_token(m: ModelConfig, dtype: torch.dtype) -> int:
    return 2 * m.num_layers * m.num_kv_heads * m.head_dim * dtype_bytes(dtype)


def layer_activation_bytes_per_token(m: ModelConfig, dtype: torch.dtype) -> int:
    """One token's intermediates in one decoder layer: norm in/out (2h), q/k/v (q + 2kv), attention output
    (q), post-norm in/out (2h), gate and up (2I), silu(gate) and its product with up (2I). Training saves all
    of them for backward; inference holds at most one layer's worth at a time."""
    h, q, kv, inter = m.hidden_size, m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim, m.intermediate_size
    return (4 * h + 2 * q + 2 * kv + 4 * inter) * dtype_bytes(dtype)


def engine_max_model_len(m: ModelConfig, max_model_len: int | None = None) -> int:
    """The context an engine serves: max_model_len or the model's, within a sliding window (as LLMEngine)."""
    n = max_model_len or m.max_position_embeddings
    return min(n, m.sliding_window) if m.sliding_window else n


def engine_activation_bytes(
    m: ModelConfig, dtype: torch.dtype, max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int
) -> int:
    """Estimated peak of the biggest step: a prefill of min(max_num_batched_tokens, max_model_len) tokens
    (one layer's intermediates) plus its head on the rows it reads, min(tokens, max_num_seqs): for an LM head
    the logits in the serving dtype, their float32 copy and the sampler's temporaries; for a reward head
    its small outputs. (On CUDA the engine measures this peak instead.)"""
    t = min(max_num_batched_tokens, max_model_len)
    rows = min(t, max_num_seqs)
    e = dtype_bytes(dtype)
    if m.head == "lm":
        head = rows * m.vocab_size * (e + 4 + SAMPLER_BYTES_PER_LOGIT)
    else:
        head = rows * ((m.hidden_size if m.head == "prm_mlp" else 0) + m.num_labels) * e
    return t * layer_activation_bytes_per_token(m, dtype) + head


def decode_graph_pool_bytes(
    m: ModelConfig, dtype: torch.dtype, max_num_seqs: int, max_model_len: int, sms: int = H100_SMS
) -> int:
    """Estimated private memory pool of an LM engine's decode CUDA graphs (engine/cuda_graphs.py; 0 for a reward
    head, which captures none). The graphs share one pool and never run at once, so it holds about one decode
    forward of the largest bucket B: one layer's intermediates for each of its rows, and the split-KV partials
    (float32 [b, Hq, splits, D] and [b, Hq, MAX_SPLITS]; for every bucket b, b x splits <= max(b, FULL_WAVES x
    CTAS_PER_SM x SMs / Hkv), as wave_splits splits within that many waves, and <= b x the splits a context
    allows), plus the allocator's rounding and the capture stream's cuBLAS workspace, and its cuBLASLt one
    where it applies (cublaslt_workspace_bytes). The engine sets this aside when it sizes its own KV
    cache; DecodeGraphs.capture measures the real pool, and ModelRunner warns when it came out bigger."""
    if m.head != "lm":
        return 0
    b = bucket_sizes(max_num_seqs)[-1]
    rows = b * layer_activation_bytes_per_token(m, dtype)
    by_len = min(MAX_SPLITS, -(-max_model_len // MIN_TOKENS_PER_SPLIT))
    waves = FULL_WAVES * CTAS_PER_SM * sms // m.num_kv_heads
    splits = min(max(b, waves), b * by_len)  # the most of b x splits over the buckets
    partials = 4 * m.num_heads * (m.head_dim * splits + MAX_SPLITS * b)
    return rows + partials + GRAPH_POOL_SLACK_BYTES + CUBLAS_WORKSPACE_BYTES + cublaslt_workspace_bytes(m)


def kv_cap_blocks(
    max_num_seqs: int,
    max_model_len: int,
    block_size: int,
    enable_prefix_caching: bool = True,
    slack: float = PREFIX_CACHE_SLACK,
) -> int:
    """The most KV blocks an engine can use: max_num_seqs sequences of max_model_len tokens, plus `slack` of
    that for freed prefixes the prefix cache keeps. More would never be touched."""
    blocks = max_num_seqs * -(-max_model_len // block_size)
    return blocks + (math.ceil(blocks * slack) if enable_prefix_caching else 0)


def engine_kv_blocks(
    *,
    block_bytes: int,
    cap_blocks: int,
    kv_cache_memory_bytes: int | None = None,
    total_bytes: int | None = None,
    gpu_memory_utilization: float | None = None,
    weights_bytes: int = 0,
    activation_bytes: int = 0,
    graph_pool_bytes: int = 0,
    free_bytes: int | None = None,
    device: str = "cuda",
) -> int:
    """KV blocks of one engine: kv_cache_memory_bytes when given, else gpu_memory_utilization x total minus
    this engine's own weights, activation peak and decode graphs' pool (what it allocates itself, not what else
    the process holds); never more than cap_blocks. With free_bytes (the device's free memory now, after the
    weights are loaded), a cache that would not fit beside the activation peak and the graphs' pool is refused
    here rather than by an OOM later."""
    if kv_cache_memory_bytes is not None:
        if kv_cache_memory_bytes < block_bytes:
            raise MemoryPlanError(
                f"kv_cache_memory_bytes={kv_cache_memory_bytes} is less than one KV block ({block_bytes} bytes)"
            )
        blocks = min(cap_blocks, kv_cache_memory_bytes // block_bytes)
    else:
        if total_bytes is None or gpu_memory_utilization is None:
            raise ValueError("engine_kv_blocks needs kv_cache_memory_bytes or total_bytes and gpu_memory_utilization")
        share = int(total_bytes * gpu_memory_utilization)
        budget = share - weights_bytes - activation_bytes - graph_pool_bytes
        if budget < block_bytes:
            graphs = f", decode graphs {gib(graph_pool_bytes)}" if graph_pool_bytes else ""
            raise MemoryPlanError(
                f"no memory left for the KV cache on {device}: gpu_memory_utilization={gpu_memory_utilization} of "
                f"{gib(total_bytes)} is {gib(share)}, and this engine's weights take {gib(weights_bytes)}, its "
                f"activation peak {gib(activation_bytes)}{graphs}; raise gpu_memory_utilization or set "
                f"kv_cache_memory_bytes"
            )
        blocks = min(cap_blocks, budget // block_bytes)
    if free_bytes is not None and blocks * block_bytes + activation_bytes + graph_pool_bytes > free_bytes:
        graphs = f" and the decode graphs' {gib(graph_pool_bytes)}" if graph_pool_bytes else ""
        raise MemoryPlanError(
            f"a KV cache of {gib(blocks * block_bytes)} plus an activation peak of {gib(activation_bytes)}{graphs} "
            f"does not fit in the {gib(free_bytes)} free on {device} (other engines, the trainer or other processes "
            f"hold the rest); lower gpu_memory_utilization, set kv_cache_memory_bytes, or sleep the other engine first"
        )
    return int(blocks)


def unique_storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (tied or viewed tensors count once): what a model's
    weights really hold on their device."""
    seen, total = set(), 0
    for t in tensors:
        s = t.untyped_storage()
        if s.nbytes() and s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def activation_peak_bytes(allocated_before: int, peak_allocated: int) -> int:
    """An engine's activation peak from allocator readings around its profiling step (CUDA: memory_allocated
    before, max_memory_allocated after a reset): the growth caused by this engine's own step only."""
    return max(0, peak_allocated - allocated_before)


# -- the trainer --------------------------------------------------------------------------------------------------


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


# -- the plan ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceMemory:
    total: int  # the device's memory
    free: int  # free before this run loads anything (others' use already subtracted)
    name: str = "cuda:0"

    @classmethod
    def of(cls, device: torch.device) -> "DeviceMemory":
        """Read a CUDA device now (torch.cuda.mem_get_info)."""
        free, total = torch.cuda.mem_get_info(device)
        return cls(total=total, free=free, name=str(device))


@dataclass(frozen=True)
class EngineSpec:
    """One engine as it will be built: LLM/PRM(..., dtype, max_num_seqs, max_model_len, ...)."""

    name: str  # "policy", "prm"
    mcfg: ModelConfig
    dtype: torch.dtype = torch.bfloat16
    max_num_seqs: int = 256
    max_model_len: int | None = None  # None: the model's (engine_max_model_len)
    max_num_batched_tokens: int = 4096
    block_size: int = 16
    enable_prefix_caching: bool = True
    kv_cache_memory_bytes: int | None = None  # explicit (still capped); None: the plan splits what is left
    sleep_level: int = 1  # while asleep: 1 keeps the weights in host memory, 2 discards them
    cuda_graphs: bool = True  # decode CUDA graphs (an LM head, not enforce_eager): their pool is budgeted

    @property
    def context(self) -> int:
        return engine_max_model_len(self.mcfg, self.max_model_len)

    @property
    def block_bytes(self) -> int:
        return kv_bytes_per_token(self.mcfg, self.dtype) * self.block_size

    @property
    def cap_blocks(self) -> int:
        return kv_cap_blocks(self.max_num_seqs, self.context, self.block_size, self.enable_prefix_caching)

    @property
    def min_blocks(self) -> int:
        """One sequence of the full context."""
        return -(-self.context // self.block_size)


@dataclass(frozen=True)
class Phase:
    name: str  # "generate", "score", "train"
    engines: tuple[str, ...]  # engines awake (holding weights and KV on the device)
    train: bool = False  # the trainer runs


def default_phases(engines: list[str], sleep: bool = True, train: bool = True) -> list[Phase]:
    """The loop's phases for engines ["policy"] or ["policy", "prm"]: with sleep, each phase wakes its own
    engine only; without, every engine is resident in every phase."""
    names = tuple(engines)
    gen = ("policy",) if sleep else names
    out = [Phase("generate", gen)]
    if "prm" in names:
        out.append(Phase("score", ("prm",) if sleep else names))
    if train:
        out.append(Phase("train", () if sleep else names, train=True))
    return out


@dataclass
class EnginePlan:
    spec: EngineSpec
    weights: int
    activations: int
    kv_cap: int  # bytes of cap_blocks
    graph_pool: int = 0  # the decode CUDA graphs' memory pool
    num_blocks: int = 0

    @property
    def working(self) -> int:
        """What the engine holds beside its weights and KV cache: the biggest step's activations and the pool."""
        return self.activations + self.graph_pool

    @property
    def kv(self) -> int:
        return self.num_blocks * self.spec.block_bytes

    @property
    def kv_tokens(self) -> int:
        return self.num_blocks * self.spec.block_size


@dataclass
class PhasePlan:
    phase: Phase
    weights: int = 0
    kv: int = 0
    activations: int = 0  # the awake engines' activations and decode graph pools
    trainer: int = 0
    host: int = 0  # sleeping engines' level-1 weights + the offloaded trainer state

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.activations + self.trainer


@dataclass
class MemoryPlan:
    device: DeviceMemory
    budget: int  # min(free, total x gpu_memory_utilization) - reserve
    gpu_memory_utilization: float
    reserve: int
    engines: dict[str, EnginePlan]
    trainer_spec: TrainerSpec | None
    trainer: TrainerEstimate | None
    phases: list[PhasePlan] = field(default_factory=list)
    host_memory: int | None = None

    def kv_cache_memory_bytes(self, name: str) -> int:
        """The KV bytes to build engine `name` with: LLM/PRM(..., kv_cache_memory_bytes=...)."""
        return self.engines[name].kv

    def table(self) -> str:
        d = self.device
        lines = [
            f"memory plan on {d.name}: {gib(d.total)} total, {gib(d.free)} free; budget {gib(self.budget)} "
            f"(gpu_memory_utilization {self.gpu_memory_utilization}, {gib(self.reserve)} reserved)",
            f"{'bstar.engine':<8} {'model':<34} {'dtype':<9} {'weights':>10} {'activ.':>10} {'graphs':>10} {'KV':>10} "
            f"{'KV tokens':>10} {'(cap)':>10}",
        ]
        for name, e in self.engines.items():
            m, s = e.spec.mcfg, e.spec
            model = f"{m.architecture.replace('ForCausalLM', '')}/{m.head} {param_count(m) / 1e9:.2f}B"
            lines.append(
                f"{name:<8} {model:<34} {str(s.dtype).replace('torch.', ''):<9} {_cell(e.weights):>10} "
                f"{_cell(e.activations):>10} {_cell(e.graph_pool):>10} {_cell(e.kv):>10} {e.kv_tokens:>10} "
                f"{gib(e.kv_cap):>10}"
            )
        if self.trainer is not None:
            t, s = self.trainer, self.trainer_spec
            lines.append(
                f"trainer  {t.params / 1e9:.2f}B params, {s.world_size} rank(s), offload {'on' if s.offload else 'off'}"
                f", activation checkpointing {'on' if s.activation_checkpointing else 'off'}, CE chunk "
                f"{s.ce_chunk or 'off'}, {s.micro_batch_tokens} tokens/micro-batch: GPU state {gib(t.gpu_state)}, "
                f"unsharded {gib(t.unsharded)}, grads {gib(t.grad_transient)}, activations {gib(t.activations)}, "
                f"logits {gib(t.logits)} = {gib(t.gpu_total)}; host state {gib(t.host_state)}"
            )
        lines.append(
            f"{'phase':<9} {'awake':<14} {'weights':>10} {'KV':>10} {'activ.':>10} {'trainer':>10} {'total':>10} "
            f"{'left':>10} {'host':>10}"
        )
        for p in self.phases:
            awake = ", ".join(p.phase.engines + (("trainer",) if p.phase.train else ())) or "-"
            lines.append(
                f"{p.phase.name:<9} {awake:<14} {_cell(p.weights):>10} {_cell(p.kv):>10} {_cell(p.activations):>10} "
                f"{_cell(p.trainer):>10} {gib(p.total):>10} {gib(self.budget - p.total):>10} {_cell(p.host):>10}"
            )
        return "\n".join(lines)


def _water_fill(amount: int, caps: dict[str, int]) -> dict[str, int]:
    """Split `amount` equally among the keys, none above its cap; what a capped one leaves goes to the rest."""
    out, left, todo = {}, max(0, amount), dict(caps)
    while todo:
        share = left // len(todo)
        capped = {k: c for k, c in todo.items() if c <= share}
        if not capped:
            out.update({k: share for k in todo})
            break
        for k, c in capped.items():
            out[k] = c
            left -= c
            del todo[k]
    return out


def plan_memory(
    device: DeviceMemory,
    engines: list[EngineSpec],
    trainer: TrainerSpec | None = None,
    phases: list[Phase] | None = None,
    *,
    sleep: bool = True,
    gpu_memory_utilization: float = 0.9,
    reserve_bytes: int = DEFAULT_RESERVE_BYTES,
    host_memory_bytes: int | None = None,
    check: bool = True,
) -> MemoryPlan:
    """Each engine's KV bytes, and each phase's device (and host) memory. Budget: min(free, total x
    gpu_memory_utilization) - reserve_bytes. In every phase the awake engines' weights and activation
    estimates and the trainer's estimate come first; engines with an explicit kv_cache_memory_bytes take it
    (capped); the others split what is left equally, each capped at what it can use (kv_cap_blocks). An engine
    awake in several phases keeps the smallest of its shares.

    Refuses (MemoryPlanError, one line; `.plan` holds the plan for printing) when the trainer does not fit
    its phase, when an engine's KV cache would not hold one sequence of its full context, or when a phase
    needs more host memory than host_memory_bytes. check=False returns the plan without refusing."""
    names = [e.name for e in engines]
    if len(set(names)) != len(names):
        raise RequestError(f"engine names must be distinct, got {names}")
    phases = phases if phases is not None else default_phases(names, sleep, train=trainer is not None)
    for ph in phases:
        unknown = [n for n in ph.engines if n not in names]
        if unknown:
            raise RequestError(f"phase {ph.name!r} names unknown engine(s) {unknown}; engines are {names}")
        if ph.train and trainer is None:
            raise RequestError(f"phase {ph.name!r} trains but no TrainerSpec was given")
    budget = min(device.free, int(device.total * gpu_memory_utilization)) - reserve_bytes
    specs = {e.name: e for e in engines}
    plans = {
        e.name: EnginePlan(
            spec=e,
            weights=weight_bytes(e.mcfg, e.dtype),
            activations=engine_activation_bytes(e.mcfg, e.dtype, e.max_num_batched_tokens, e.max_num_seqs, e.context),
            kv_cap=e.cap_blocks * e.block_bytes,
            graph_pool=decode_graph_pool_bytes(e.mcfg, e.dtype, e.max_num_seqs, e.context) if e.cuda_graphs else 0,
        )
        for e in engines
    }
    est = trainer_estimate(trainer) if trainer is not None else None
    # Each engine's share of each phase it is awake in; it keeps the smallest.
    share: dict[str, int] = {}
    for ph in phases:
        fixed = sum(plans[n].weights + plans[n].working for n in ph.engines)
        fixed += est.gpu_total if ph.train else 0
        explicit = {
            n: min(specs[n].kv_cache_memory_bytes, plans[n].kv_cap)
            for n in ph.engines
            if specs[n].kv_cache_memory_bytes is not None
        }
        auto = {n: plans[n].kv_cap for n in ph.engines if n not in explicit}
        fill = _water_fill(budget - fixed - sum(explicit.values()), auto)
        for n, b in {**explicit, **fill}.items():
            share[n] = min(share.get(n, b), b)
    for n, p in plans.items():
        p.num_blocks = share.get(n, 0) // p.spec.block_bytes
    plan = MemoryPlan(
        device=device,
        budget=budget,
        gpu_memory_utilization=gpu_memory_utilization,
        reserve=reserve_bytes,
        engines=plans,
        trainer_spec=trainer,
        trainer=est,
        host_memory=host_memory_bytes,
    )
    level1_sleepers = [n for n in names if specs[n].sleep_level == 1 and any(n not in ph.engines for ph in phases)]
    for ph in phases:
        pp = PhasePlan(ph)
        for n in ph.engines:
            pp.weights += plans[n].weights
            pp.kv += plans[n].kv
            pp.activations += plans[n].working
        # (a level-1 sleeper's flat host buffer, exactly its weights, is kept while it is awake: every phase)
        pp.host = sum(plans[n].weights for n in level1_sleepers)
        if ph.train:
            pp.trainer = est.gpu_total
            pp.host += est.host_state
        plan.phases.append(pp)
    if check:
        problem = _first_problem(plan)
        if problem:
            err = MemoryPlanError(problem)
            err.plan = plan
            raise err
    return plan


def _first_problem(plan: MemoryPlan) -> str | None:
    for pp in plan.phases:
        ph = pp.phase
        if ph.train:
            others = (
                pp.weights
                + pp.activations
                + sum(plan.engines[n].spec.min_blocks * plan.engines[n].spec.block_bytes for n in ph.engines)
            )
            available = plan.budget - others
            if plan.trainer.gpu_total > available:
                where = f" beside {', '.join(ph.engines)}" if ph.engines else ""
                return f"phase {ph.name}{where}: " + trainer_refusal(plan.trainer_spec, plan.trainer, available)
        for n in ph.engines:
            e = plan.engines[n]
            s = e.spec
            if e.num_blocks < s.min_blocks:
                return (
                    f"phase {ph.name}: the {n} engine's KV cache would get {gib(e.kv)} but one {s.context}-token "
                    f"sequence needs {gib(s.min_blocks * s.block_bytes)} (its weights take {gib(e.weights)}, "
                    f"activations and graphs {gib(e.working)}, the budget is {gib(plan.budget)}); lower max_model_len "
                    f"or max_num_batched_tokens, sleep the other engines in this phase, or use a bigger GPU"
                )
        if plan.host_memory is not None and pp.host > plan.host_memory:
            return (
                f"phase {ph.name} needs ~{gib(pp.host)} of host memory (sleeping engines' weights and offloaded "
                f"trainer state) but the host has {gib(plan.host_memory)}; sleep engines at level 2 "
                f"(reload their weights) or train on more GPUs"
            )
    return None
