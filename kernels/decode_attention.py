"""Paged decode attention: one query token per sequence against its paged KV cache."""

import torch

from kernels.dispatch import use_triton


def paged_decode_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, scale=None):
    """Torch reference.

    q            [B, Hq, D]
    k_cache      [num_blocks, block_size, Hkv, D]   (v_cache alike)
    block_tables int32 [B, max_blocks]  (entries past a sequence's last block are ignored)
    seq_lens     int32 [B]              (tokens in the cache for each sequence, >= 1)
    returns      [B, Hq, D] in q's dtype; softmax and accumulation in float32.
    """
    B, Hq, D = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    max_len = int(seq_lens.max().item()) if B else 0
    nblk = (max_len + block_size - 1) // block_size
    tables = block_tables[:, :nblk].long().clamp(min=0)
    k = k_cache[tables].reshape(B, nblk * block_size, Hkv, D).float()  # [B, L, Hkv, D]
    v = v_cache[tables].reshape(B, nblk * block_size, Hkv, D).float()
    qf = q.float().view(B, Hkv, G, D)
    scores = torch.einsum("bhgd,blhd->bhgl", qf, k) * scale  # [B, Hkv, G, L]
    pos = torch.arange(nblk * block_size, device=q.device)
    mask = pos[None, :] >= seq_lens.long()[:, None]  # [B, L]
    scores.masked_fill_(mask[:, None, None, :], float("-inf"))
    p = torch.softmax(scores, dim=-1)
    out = torch.einsum("bhgl,blhd->bhgd", p, v)
    return out.reshape(B, Hq, D).to(q.dtype)


def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale=None):
    if use_triton(q):
        from kernels.decode_attention_triton import paged_decode_attention_triton

        return paged_decode_attention_triton(q, k_cache, v_cache, block_tables, seq_lens, scale)
    return paged_decode_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, scale)
