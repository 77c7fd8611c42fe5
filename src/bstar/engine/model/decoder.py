"""Llama / Qwen2 / Mistral / Qwen3 decoder over a paged KV cache.

One module tree serves the four families: they differ only in q/k/v bias (Qwen2), Qwen3's per-head
RMSNorm of q and k before rotary (q_norm / k_norm, with an explicit head_dim), tied embeddings and
rope settings. Q/K/V and gate/up projections are fused into one matmul each; `load_weights`
maps Hugging Face tensor names onto the fused slices.
"""

from dataclasses import dataclass

import torch
from torch import nn

from bstar import kernels
from bstar.engine.config import ModelConfig
from bstar.engine.errors import CheckpointError
from bstar.engine.model.attention_backend import AttentionBackend, TorchAttention, attention_backend
from bstar.engine.model.linear import Linear, unpack_linears
from bstar.kernels.cascade_attention import CascadePlan


@dataclass
class AttnMetadata:
    """How the packed tokens of one step map onto sequences and cache slots.

    Rows [0, num_decode) are single-token steps (decode kernel); the rest are prefill/extend
    chunks (prefill kernel), sequence b owning rows num_decode + cu_seqlens_q[b] : ... [b+1].
    """

    slot_mapping: torch.Tensor  # int64 [T]   cache slot (block * block_size + offset) of each new token
    block_tables: torch.Tensor  # int32 [B, max_blocks]   decode sequences first
    seq_lens: torch.Tensor  # int32 [B]   tokens in the cache after this step
    num_decode: int
    cu_seqlens_q: torch.Tensor  # int32 [B - num_decode + 1]
    # Host ints, so kernels need no device read: the longest prefill chunk (the prefill kernel's
    # grid), and an upper bound of the decode rows' seq_lens (caps the decode split count; None:
    # the block table's width, as in a CUDA graph, which serves any length).
    max_seqlen_q: int | None = None
    max_seq_len: int | None = None
    # Decode rows grouped by shared leading blocks (sibling candidates), built once per step for the
    # torch path; None: the decode kernel reads block_tables itself.
    cascade: CascadePlan | None = None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx  # picks this layer's kept buffers (AttnMetadata.cascade.buffers)
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, (self.nh + 2 * self.nkv) * self.hd, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.nh * self.hd, cfg.hidden_size, bias=cfg.o_bias)
        self.scale = self.hd**-0.5
        if cfg.qk_norm:  # Qwen3: one [head_dim] weight each, shared by the heads
            self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm
        self.backend: AttentionBackend = TorchAttention()  # the engine's choice: CausalLM.set_backend

    def qk_norm_args(self) -> tuple:
        """Qwen3's q/k norm weights and eps, as the rotary kernels take them."""
        return self.q_norm.weight, self.k_norm.weight, self.q_norm.eps

    def forward(self, x, positions, cos_sin, kv_cache, meta: AttnMetadata):
        T = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.nh * self.hd, self.nkv * self.hd, self.nkv * self.hd], dim=-1)
        q, k, v = q.view(T, self.nh, self.hd), k.view(T, self.nkv, self.hd), v.view(T, self.nkv, self.hd)
        o = self.backend.forward(self, q, k, v, positions, cos_sin, kv_cache, meta)
        return self.o_proj(o.view(T, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.triton = False  # the engine's kernel backend: CausalLM.set_backend

    def forward(self, x):
        return self.down_proj(kernels.silu_and_mul(self.gate_up_proj(x), triton=self.triton))


class RMSNorm(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps
        self.triton = False  # the engine's kernel backend: CausalLM.set_backend

    def forward(self, x, residual=None):
        return kernels.rms_norm(x, self.weight, self.eps, residual, triton=self.triton)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h, residual, positions, cos_sin, kv_cache, meta):
        if residual is None:
            x, residual = self.input_layernorm(h), h
        else:
            x, residual = self.input_layernorm(h, residual)
        h = self.self_attn(x, positions, cos_sin, kv_cache, meta)
        x, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(x), residual


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.head == "lm":
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
            if cfg.tie_word_embeddings:
                self.lm_head.weight = self.model.embed_tokens.weight
        elif cfg.head == "token_cls":
            self.score = nn.Linear(cfg.hidden_size, cfg.num_labels)
        else:  # prm_mlp: Linear -> ReLU -> Linear, as Qwen2.5-Math-PRM
            self.score = nn.Sequential(
                nn.Linear(cfg.hidden_size, cfg.hidden_size), nn.ReLU(), nn.Linear(cfg.hidden_size, cfg.num_labels)
            )

    def set_backend(self, backend: AttentionBackend):
        """Run every layer on `backend` (chosen once, when the engine is built: the runner sets it)."""
        for m in self.modules():
            if isinstance(m, Attention):
                m.backend = backend
            elif isinstance(m, (MLP, RMSNorm)):
                m.triton = backend.triton

    @property
    def backend(self) -> AttentionBackend:
        return self.model.layers[0].self_attn.backend

    def forward(self, input_ids, positions, cos_sin, kv_caches, meta: AttnMetadata):
        """input_ids, positions int64 [T] -> final normed hidden states [T, hidden]."""
        h = self.model.embed_tokens(input_ids)
        residual = None
        for layer, kv in zip(self.model.layers, kv_caches):
            h, residual = layer(h, residual, positions, cos_sin, kv, meta)
        h, _ = self.model.norm(h, residual)
        return h

    def compute_logits(self, hidden):
        """The head on hidden rows: vocabulary logits (LM head) or class logits (reward heads)."""
        return self.lm_head(hidden) if self.cfg.head == "lm" else self.score(hidden)

    # -- weights ------------------------------------------------------------------------------
    def weight_map(self) -> dict[str, tuple[torch.Tensor, slice | None]]:
        """HF tensor name -> (our parameter, row slice of it or None for the whole)."""
        cfg, out = self.cfg, {}
        params = dict(self.named_parameters(remove_duplicate=False))
        q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
        for name, p in params.items():
            if ".qkv_proj." in name:
                for part, sl in (
                    ("q_proj", slice(0, q)),
                    ("k_proj", slice(q, q + kv)),
                    ("v_proj", slice(q + kv, q + 2 * kv)),
                ):
                    out[name.replace("qkv_proj", part)] = (p, sl)
            elif ".gate_up_proj." in name:
                out[name.replace("gate_up_proj", "gate_proj")] = (p, slice(0, inter))
                out[name.replace("gate_up_proj", "up_proj")] = (p, slice(inter, 2 * inter))
            else:
                out[name] = (p, None)
        return out

    def required_weight_names(self) -> set[str]:
        """The HF tensor names a full checkpoint provides (a tied lm_head is the embeddings)."""
        required = set(self.weight_map())
        if self.cfg.tie_word_embeddings and self.cfg.head == "lm":
            required.discard("lm_head.weight")
        return required

    @torch.no_grad()
    def load_weights(self, named_tensors, strict: bool = True) -> set[str]:
        """Copy (HF name, tensor) pairs into the model. Returns the names loaded.

        Shapes are checked; unknown names are an error (rotary inv_freq buffers are skipped)."""
        unpack_linears(self)  # packed copies would go stale
        wmap = self.weight_map()
        loaded = set()
        for name, t in named_tensors:
            if name.endswith("rotary_emb.inv_freq"):
                continue
            if name not in wmap:
                raise CheckpointError(f"unexpected tensor {name!r} for {self.cfg.architecture}")
            p, sl = wmap[name]
            dst = p if sl is None else p[sl]
            if tuple(t.shape) != tuple(dst.shape):
                raise CheckpointError(
                    f"shape mismatch for tensor {name!r}: checkpoint has {tuple(t.shape)}, "
                    f"config expects {tuple(dst.shape)}"
                )
            dst.copy_(t)  # casts on the source's side of a host-to-device copy: no device temporary
            loaded.add(name)
        if strict:
            missing = sorted(self.required_weight_names() - loaded)
            if missing:
                more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
                raise CheckpointError(f"checkpoint lacks tensors: {', '.join(missing[:5])}{more}")
        return loaded


def build_model(mcfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> CausalLM:
    """The decoder with unset weights, materialised once on `device` directly in `dtype` (built and cast on
    the meta device: no float32 copy of a bf16 model ever exists). load_weights then streams the
    checkpoint in, one tensor at a time."""
    with torch.device("meta"):
        net = CausalLM(mcfg)
    net = net.to(dtype).to_empty(device=device)
    if mcfg.tie_word_embeddings and mcfg.head == "lm":  # to_empty unties
        net.lm_head.weight = net.model.embed_tokens.weight
    net.set_backend(attention_backend(device.type == "cuda"))  # the device's default; the runner sets the engine's
    return net
