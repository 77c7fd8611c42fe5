"""How a decoder's attention layers run, chosen once when the engine is built (the runner sets it:
`CausalLM.set_backend`): what happens between the qkv projection and the output projection.

- `TorchAttention`: the torch references. Rotary (Qwen3: q/k norm first), then the new tokens' K/V
  stored, unless the CPU decode path keeps them in its cascade buffers for now (a write-back step:
  engine/runner/cpu/decode_state.py); decode rows read shared prefixes once per group when the step
  carries a cascade plan.
- `TritonAttention`: the Triton kernels. One kernel rotates q and k and stores k and v (k and v then
  live only in the cache); the decode and prefill kernels read everything from it.

Both run decode rows [0, num_decode) and prefill rows after them, as AttnMetadata describes. The
other kernels of the model (norms, activation) follow the same backend's `triton`.
"""

import torch

from bstar import kernels
from bstar.kernels.cascade_attention import cascade_decode_attention


class AttentionBackend:
    triton: bool  # the kernel wrappers' backend (kernels.dispatch)

    def forward(self, layer, q, k, v, positions, cos_sin, kv_cache, meta) -> torch.Tensor:
        """Attention output [T, Hq, D] of q, k, v ([T, H, D]) for `layer` (decoder.Attention)."""
        raise NotImplementedError

    def decode(self, layer, q, k, v, k_cache, v_cache, meta) -> torch.Tensor:
        """Decode rows: each reads its block table's pages."""
        nd = q.shape[0]
        tables, lens = meta.block_tables[:nd], meta.seq_lens[:nd]
        return kernels.paged_decode_attention(
            q, k_cache, v_cache, tables, lens, layer.scale, max_context=meta.max_seq_len, triton=self.triton
        )

    def attend(self, layer, q, k, v, k_cache, v_cache, meta) -> torch.Tensor:
        """Decode rows, then prefill rows, once the new K/V is where the kernels read it. k, v: the rows'
        own new K/V, read by the cascade path only (None once they live only in the cache)."""
        nd, T = meta.num_decode, q.shape[0]
        if nd == T:
            return self.decode(layer, q, k, v, k_cache, v_cache, meta)
        o = torch.empty_like(q)
        if nd:
            kv_new = (None, None) if k is None else (k[:nd], v[:nd])
            o[:nd] = self.decode(layer, q[:nd], *kv_new, k_cache, v_cache, meta)
        o[nd:] = kernels.paged_prefill_attention(
            q[nd:],
            k_cache,
            v_cache,
            meta.block_tables[nd:],
            meta.cu_seqlens_q,
            meta.seq_lens[nd:],
            layer.scale,
            max_seqlen_q=meta.max_seqlen_q,
            triton=self.triton,
        )
        return o


class TorchAttention(AttentionBackend):
    triton = False

    def forward(self, layer, q, k, v, positions, cos_sin, kv_cache, meta):
        k_cache, v_cache = kv_cache
        if layer.qk_norm:
            q, k = kernels.qk_norm_rope(q, k, *layer.qk_norm_args(), positions, cos_sin, triton=False)
        else:
            q, k = kernels.apply_rotary(q, k, positions, cos_sin, triton=False)
        if meta.cascade is None or not meta.cascade.write_back:
            kernels.store_kv(k, v, k_cache, v_cache, meta.slot_mapping, triton=False)  # slot -1: skipped
        return self.attend(layer, q, k, v, k_cache, v_cache, meta)

    def decode(self, layer, q, k, v, k_cache, v_cache, meta):
        """Sibling candidates read their shared prefix once per group (the CPU runner's cascade plan)."""
        plan = meta.cascade
        if plan is None:
            return super().decode(layer, q, k, v, k_cache, v_cache, meta)
        bufs = plan.buffers[layer.layer_idx] if plan.buffers is not None else None
        return cascade_decode_attention(q, k_cache, v_cache, plan, layer.scale, bufs, (k, v))


class TritonAttention(AttentionBackend):
    triton = True

    def forward(self, layer, q, k, v, positions, cos_sin, kv_cache, meta):
        k_cache, v_cache = kv_cache
        norm = layer.qk_norm_args() if layer.qk_norm else ()
        # (slot -1, graph padding: skipped)
        q = kernels.rope_store_kv(q, k, v, k_cache, v_cache, meta.slot_mapping, positions, cos_sin, *norm, triton=True)
        return self.attend(layer, q, None, None, k_cache, v_cache, meta)


def attention_backend(triton: bool) -> AttentionBackend:
    return TritonAttention() if triton else TorchAttention()
