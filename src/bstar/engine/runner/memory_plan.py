"""An engine's device memory arithmetic: weights, KV bytes per token, the activation peak, the decode graphs'
pool, and how many KV blocks the engine gets (`kv_cap_blocks`, `engine_kv_blocks`: never more than it can use).

Pure functions of shapes (bstar.engine.config.ModelConfig), dtypes and explicit figures: nothing touches a
device, so all of it is tested on CPU. The engine (ModelRunner) sizes its cache with them from what it measured
on the device; the trainer's estimate (bstar.train.memory_estimate) and a run's per-phase plan
(bstar.loop.memory_plan) build on them. The activation figures are upper-bound style formulas; the engine's real
peak is measured on CUDA.
"""

import math
import os

import torch

from bstar.engine.config import ModelConfig
from bstar.engine.errors import MemoryPlanError
from bstar.engine.runner.gpu.cuda_graphs import bucket_sizes
from bstar.kernels.contract import CTAS_PER_SM, FULL_WAVES, MAX_SPLITS, MIN_TOKENS_PER_SPLIT

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
    at capture (DecodeGraphs.pool_bytes), and GpuRunner warns when it exceeds this estimate."""
    if not (m.qkv_bias or m.o_bias or m.mlp_bias) or env.get("TORCH_CUBLASLT_UNIFIED_WORKSPACE") == "1":
        return 0
    kib = env.get("CUBLASLT_WORKSPACE_SIZE", "")
    return int(kib) << 10 if kib.isdigit() else CUBLAS_WORKSPACE_BYTES


def gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


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
    """Estimated private memory pool of an LM engine's decode CUDA graphs (gpu/cuda_graphs.py; 0 for a reward
    head, which captures none). The graphs share one pool and never run at once, so it holds about one decode
    forward of the largest bucket B: one layer's intermediates for each of its rows, and the split-KV partials
    (float32 [b, Hq, splits, D] and [b, Hq, MAX_SPLITS]; for every bucket b, b x splits <= max(b, FULL_WAVES x
    CTAS_PER_SM x SMs / Hkv), as wave_splits splits within that many waves, and <= b x the splits a context
    allows), plus the allocator's rounding and the capture stream's cuBLAS workspace, and its cuBLASLt one
    where it applies (cublaslt_workspace_bytes). The engine sets this aside when it sizes its own KV
    cache; DecodeGraphs.capture measures the real pool, and GpuRunner warns when it came out bigger."""
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
