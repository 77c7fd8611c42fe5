"""Model and engine configuration, as plain dataclasses."""

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

import torch

from bstar.engine.choices import DTYPE_NAMES
from bstar.engine.errors import CheckpointError, RequestError
from bstar.engine.model.linear import CPU_GEMMS
from bstar.kernels.dispatch import KERNEL_CHOICES

MAX_CONTEXT = 1 << 24  # max_position_embeddings above this (16M tokens) is a broken config.json
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "Qwen3ForCausalLM")
# Reward-model heads on the same decoders (read by bstar.PRM): a token-classification head
# (transformers' *ForTokenClassification) or Qwen2.5-Math-PRM's two-layer head.
HEAD_ARCHITECTURES = {
    **{a: "lm" for a in SUPPORTED_ARCHITECTURES},
    **{f"{f}ForTokenClassification": "token_cls" for f in ("Llama", "Qwen2", "Mistral", "Qwen3")},
    "Qwen2ForProcessRewardModel": "prm_mlp",
}
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def resolve_dtype(dtype: "str | torch.dtype", mcfg: "ModelConfig", device: torch.device) -> torch.dtype:
    """The dtype an engine serves `mcfg` in on `device` (a torch.device; no CUDA call unless CUDA is there).

    "auto": float32 on CPU. On CUDA the checkpoint's dtype when it is bfloat16 or float16, and bfloat16 for a
    float32 (or unrecorded) checkpoint, as vLLM does: a trainer saves float32, and serving that in float32
    doubles the weights and the KV cache and keeps the kernels off tensor cores (float16 on a GPU without
    bfloat16)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise RequestError(f"unsupported dtype {dtype}; use one of {', '.join(DTYPES)} or 'auto'")
        return dtype
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        stored = DTYPES.get(mcfg.torch_dtype or "")
        if stored in (torch.bfloat16, torch.float16):
            return stored
        bf16_ok = not torch.cuda.is_available() or torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16_ok else torch.float16
    if dtype not in DTYPES:
        raise RequestError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)} or 'auto'")
    return DTYPES[dtype]


@dataclass
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    sliding_window: int | None
    eos_token_ids: list[int] = field(default_factory=list)
    torch_dtype: str | None = None
    head: str = "lm"  # "lm" (causal LM), "token_cls" or "prm_mlp" (reward heads, see HEAD_ARCHITECTURES)
    num_labels: int = 2
    qk_norm: bool = False  # Qwen3: per-head RMSNorm of q and k (over head_dim) before rotary

    @classmethod
    def from_dir(cls, path: str) -> "ModelConfig":
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise CheckpointError(f"no config.json in model directory {path}")
        try:
            with open(cfg_path) as f:
                c = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from None
        return cls.from_dict(c, where=cfg_path)

    @classmethod
    def from_dict(cls, c: dict, where: str = "config") -> "ModelConfig":
        if not isinstance(c, dict):
            raise CheckpointError(f"{where} must hold a JSON object, not a {type(c).__name__}")
        try:
            m = cls._from_dict(c, where)
        except (TypeError, ValueError, ZeroDivisionError, OverflowError) as e:
            raise CheckpointError(f"{where} has a malformed field: {e}") from None
        m._check_sizes(where)
        return m

    def _check_sizes(self, where: str):
        """Sizes a model can have: positive, heads that divide, a context that fits a table in memory."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, name) < 1:
                raise CheckpointError(f"{where}: {name} must be >= 1, got {getattr(self, name)}")
        if self.head_dim < 2 or self.head_dim % 2:
            raise CheckpointError(f"{where}: head_dim must be an even number >= 2, got {self.head_dim}")
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(
                f"{where}: num_attention_heads {self.num_heads} is not a multiple of num_key_value_heads "
                f"{self.num_kv_heads}"
            )
        if not 1 <= self.max_position_embeddings <= MAX_CONTEXT:
            raise CheckpointError(
                f"{where}: max_position_embeddings must be in [1, {MAX_CONTEXT}], got {self.max_position_embeddings}"
            )
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)) or not self.rms_norm_eps >= 0:
            raise CheckpointError(f"{where}: rope_theta must be > 0 and rms_norm_eps >= 0")

    @classmethod
    def _from_dict(cls, c: dict, where: str) -> "ModelConfig":
        archs = c.get("architectures") or []
        if not isinstance(archs, list):
            raise CheckpointError(f"{where}: architectures must be a list of names")
        arch = archs[0] if archs else None
        if arch is None:
            arch = {
                "llama": "LlamaForCausalLM",
                "qwen2": "Qwen2ForCausalLM",
                "mistral": "MistralForCausalLM",
                "qwen3": "Qwen3ForCausalLM",
            }.get(c.get("model_type", ""))
        if arch not in HEAD_ARCHITECTURES:
            raise CheckpointError(
                f"unknown architecture {arch or c.get('model_type')!r} in {where}; "
                f"supported: {', '.join(HEAD_ARCHITECTURES)}"
            )
        head = HEAD_ARCHITECTURES[arch]
        arch = arch.replace("ForTokenClassification", "ForCausalLM").replace("ForProcessRewardModel", "ForCausalLM")
        act = c.get("hidden_act", "silu")
        if act != "silu":
            raise CheckpointError(f"unsupported hidden_act {act!r} in {where}; only 'silu' is supported")
        try:
            hidden, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
            # transformers 5 writes rope settings under rope_parameters; 4.x used rope_theta/rope_scaling.
            rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
            theta = float(rope.get("rope_theta", c.get("rope_theta", 10000.0)))
            rtype = rope.get("rope_type", rope.get("type", "default"))
            if rtype not in ("default", "llama3"):
                raise CheckpointError(f"unsupported rope_type {rtype!r} in {where}; supported: default, llama3")
            window = None
            if arch == "MistralForCausalLM":
                window = c.get("sliding_window")
            elif arch == "Qwen2ForCausalLM" and c.get("use_sliding_window"):
                window = c.get("sliding_window")
            elif arch == "Qwen3ForCausalLM" and c.get("use_sliding_window"):
                # transformers' layer_types say which layers slide (those >= max_window_layers)
                types = c.get("layer_types") or ["sliding_attention"]
                window = c.get("sliding_window") if "sliding_attention" in types else None
            eos = c.get("eos_token_id")
            eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
            return cls(
                architecture=arch,
                vocab_size=int(c["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(c["intermediate_size"]),
                num_layers=int(c["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(c.get("num_key_value_heads") or heads),
                head_dim=int(c.get("head_dim") or hidden // heads),
                rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                rope_scaling=rope if rtype == "llama3" else None,
                max_position_embeddings=int(c.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
                qkv_bias=arch == "Qwen2ForCausalLM" or bool(c.get("attention_bias", False)),
                o_bias=arch != "Qwen2ForCausalLM" and bool(c.get("attention_bias", False)),
                mlp_bias=bool(c.get("mlp_bias", False)),
                sliding_window=int(window) if window else None,
                eos_token_ids=eos,
                torch_dtype=c.get("torch_dtype") or c.get("dtype"),
                head=head,
                num_labels=int(c.get("num_labels") or len(c.get("id2label") or {}) or 2),
                qk_norm=arch == "Qwen3ForCausalLM",
            )
        except KeyError as e:
            raise CheckpointError(f"{where} lacks required field {e.args[0]!r}") from None

    def rope_cos_sin(self, max_len: int, device) -> torch.Tensor:
        """float32 [max_len, head_dim]: cos in the first half, sin in the second (neox layout)."""
        d = self.head_dim
        inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
        if self.rope_scaling is not None:
            inv_freq = _llama3_inv_freq(inv_freq, self.rope_scaling)
        t = torch.arange(max_len, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)
        return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(device)


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3.1 frequency scaling, as transformers' _compute_llama3_parameters."""
    factor = float(s["factor"])
    low, high = float(s.get("low_freq_factor", 1.0)), float(s.get("high_freq_factor", 4.0))
    old_len = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


LOGPROBS_MODES = ("raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits")  # vLLM's


@dataclass
class EngineConfig:
    """Knobs of the paged KV cache and the scheduler."""

    block_size: int = 16
    num_kv_blocks: int | None = None  # explicit KV budget in blocks; wins over the three below
    kv_cache_memory_bytes: int | None = None  # explicit KV budget in bytes (any device); wins over the two below
    # CUDA: the fraction of the device this engine may use for its own weights + activation peak + KV cache
    # (other engines' and the trainer's memory does not count against it)
    gpu_memory_utilization: float = 0.90
    cpu_kv_cache_bytes: int = 256 << 20  # CPU: bytes of KV cache
    max_num_seqs: int = 256  # running sequences per step
    max_num_batched_tokens: int = 4096  # tokens per step (prefill chunks + decodes)
    max_model_len: int | None = None  # defaults to the model's max_position_embeddings
    enable_prefix_caching: bool = True
    # CPU float32: the GEMM library of the Linear layers ("auto", "onednn", "mkl", "aten"; see
    # bstar/engine/model/linear.py), and for "mkl" the bytes of packed weight copies for the steady decode batch
    # (0: never pack).
    cpu_gemm: str = "auto"
    cpu_packed_weights_bytes: int = 1 << 30
    # What Logprob.logprob (and cumulative_logprob) hold, as vLLM's logprobs_mode: "raw_logprobs"
    # (log_softmax of the model's logits), "raw_logits", "processed_logprobs" (after penalties,
    # temperature and the min-p / top-k / top-p masks), "processed_logits". See bstar/engine/runner/sampler.py.
    logprobs_mode: str = "raw_logprobs"
    # Decode CUDA graphs per batch-size bucket (bstar/engine/runner/gpu/cuda_graphs.py); True runs every step eagerly.
    enforce_eager: bool = False
    # The kernel backend, chosen once when the engine is built (bstar.kernels.dispatch.triton_on): "triton"
    # (Triton kernels and decode CUDA graphs; on CPU tensors only under TRITON_INTERPRET=1), "torch" (the torch
    # references and the CPU decode path), or "auto": the BSTAR_KERNELS environment variable when set, else
    # Triton on CUDA and torch elsewhere.
    kernels: str = "auto"
    # The most logprobs / prompt_logprobs a request may ask for, as vLLM's max_logprobs (-1: no cap).
    max_logprobs: int = 20
    # As vLLM's async_scheduling: each step is scheduled and launched before the previous step's tokens
    # reach the host, so the host's work (scheduling, inputs, stop checks, outputs) overlaps the device's
    # step instead of adding to it. Outputs are the same; a candidate that stops computes one more token,
    # which is discarded. (bstar/engine/core/async_step.py.)
    async_scheduling: bool = False

    @classmethod
    def split_kwargs(cls, kwargs: dict) -> "tuple[EngineConfig, dict]":
        """An EngineConfig from the keywords that name its fields (LLM's, PRM's and AsyncEngineArgs' keywords are
        these fields: one source for their names and defaults), and the other keywords, for the caller to check."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in kwargs.items() if k in names}), {
            k: v for k, v in kwargs.items() if k not in names
        }

    def validate(self):
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise RequestError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise RequestError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes < 1:
            raise RequestError(f"kv_cache_memory_bytes must be >= 1, got {self.kv_cache_memory_bytes}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise RequestError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise RequestError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.cpu_gemm not in CPU_GEMMS:
            raise RequestError(f"cpu_gemm must be one of {', '.join(CPU_GEMMS)}, got {self.cpu_gemm!r}")
        if self.cpu_packed_weights_bytes < 0:
            raise RequestError(f"cpu_packed_weights_bytes must be >= 0, got {self.cpu_packed_weights_bytes}")
        if not isinstance(self.max_logprobs, int) or self.max_logprobs < -1:
            raise RequestError(f"max_logprobs must be an integer >= -1 (-1: no cap), got {self.max_logprobs!r}")
        if self.kernels not in KERNEL_CHOICES:
            raise RequestError(f"kernels must be one of {', '.join(KERNEL_CHOICES)}, got {self.kernels!r}")
        if self.logprobs_mode not in LOGPROBS_MODES:
            raise RequestError(f"logprobs_mode must be one of {', '.join(LOGPROBS_MODES)}, got {self.logprobs_mode!r}")


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise RequestError(f"unsupported device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RequestError("device 'cuda' requested but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise RequestError(f"unsupported device {device!r}; use 'cpu' or 'cuda'")
    if dev.type == "cuda":
        if dev.index is None:  # pin it: the device guard, KV and profiling all name this one
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise RequestError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    return dev
