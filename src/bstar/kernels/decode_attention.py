"""Paged decode attention: one query token per sequence against its paged KV cache."""

import torch
import torch.nn.functional as F

from bstar.kernels.dispatch import use_triton


def paged_decode_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, scale=None, max_context=None):
    """Torch reference.

    q            [B, Hq, D]
    k_cache      [num_blocks, block_size, Hkv, D]   (v_cache alike)
    block_tables int32 [B, max_blocks]  (entries past a sequence's last block are ignored)
    seq_lens     int32 [B]              (tokens in the cache for each sequence; 0: a padded row, zeros)
    max_context  host upper bound of seq_lens (the Triton kernel's split count; unused here)
    returns      [B, Hq, D] in q's dtype; softmax and accumulation in float32.
    """
    B, Hq, D = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    scale = D**-0.5 if scale is None else scale
    nblk = -(-int(seq_lens.max()) // block_size) if B else 0
    L = nblk * block_size
    # -1 padding is never read (masked by seq_lens) but must be a valid index for the gather.
    flat = block_tables[:, :nblk].reshape(-1).long().clamp(min=0)
    # Gather each sequence's blocks (index_select: whole-block copies, about twice as fast as
    # advanced indexing): [B, L, Hkv, D] -> [B, Hkv, L, D] (a view, no second copy).
    k = k_cache.index_select(0, flat).view(B, L, Hkv, D).transpose(1, 2).float()
    v = v_cache.index_select(0, flat).view(B, L, Hkv, D).transpose(1, 2).float()
    valid = (torch.arange(L, device=q.device)[None, :] < seq_lens.long()[:, None])[:, None, None, :]
    # GQA: the G query heads of a KV head become G "query positions" against that head.
    qf = q.float().view(B, Hkv, Hq // Hkv, D)
    out = F.scaled_dot_product_attention(qf, k, v, attn_mask=valid, scale=scale)  # [B, Hkv, G, D]
    out = torch.where((seq_lens > 0)[:, None, None, None], out, 0.0)  # no key at all: zeros, not NaN
    return out.reshape(B, Hq, D).to(q.dtype)


def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale=None, max_context=None, *, triton=None):
    if use_triton(q, triton):
        from bstar.kernels.decode_attention_triton import paged_decode_attention_triton

        return paged_decode_attention_triton(
            q, k_cache, v_cache, block_tables, seq_lens, scale, max_context=max_context
        )
    return paged_decode_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, scale)
