"""Paged prefill / extend attention: new tokens attend causally to themselves and their cached prefix."""

import torch
import torch.nn.functional as F

from bstar.kernels.dispatch import use_triton


def paged_prefill_attention_ref(
    q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale=None, max_seqlen_q=None
):
    """Torch reference.

    q            [T, Hq, D]  new tokens of B sequences, packed: sequence b owns rows
                             cu_seqlens_q[b] : cu_seqlens_q[b+1]
    k_cache      [num_blocks, block_size, Hkv, D]  (v_cache alike); the new tokens' K/V are
                             already written to the cache
    block_tables int32 [B, max_blocks]
    cu_seqlens_q int32 [B+1]
    seq_lens     int32 [B]   total tokens of each sequence (cached prefix + new); the new tokens of
                             sequence b sit at positions seq_lens[b]-q_len_b .. seq_lens[b]-1
    max_seqlen_q the longest q_len_b, from the host (the Triton kernel's grid; unused here)
    returns      [T, Hq, D]; a query at position p attends keys 0..p.
    """
    T, Hq, D = q.shape
    _, block_size, Hkv, _ = k_cache.shape
    scale = D**-0.5 if scale is None else scale
    out = torch.empty_like(q)
    cu = cu_seqlens_q.tolist()
    lens = seq_lens.tolist()
    for b in range(len(lens)):
        s, e, L = cu[b], cu[b + 1], lens[b]
        n = e - s
        if n == 0:
            continue
        nblk = -(-L // block_size)
        table = block_tables[b, :nblk].long()
        k = k_cache.index_select(0, table).view(nblk * block_size, Hkv, D)[:L].transpose(0, 1).float()  # [Hkv, L, D]
        v = v_cache.index_select(0, table).view(nblk * block_size, Hkv, D)[:L].transpose(0, 1).float()
        qb = q[s:e].float().transpose(0, 1)  # [Hq, n, D]
        if _FLASH_CPU is not None and q.device.type == "cpu":
            o = _prefix_then_causal(qb, k, v, L - n, scale)
        else:
            qpos = torch.arange(L - n, L, device=q.device)
            causal = torch.arange(L, device=q.device)[None, :] <= qpos[:, None]  # [n, L]
            o = F.scaled_dot_product_attention(qb, k, v, attn_mask=causal, scale=scale, enable_gqa=True)
        out[s:e] = o.transpose(0, 1).to(q.dtype)  # [Hq, n, D] -> [n, Hq, D]
    return out


_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _prefix_then_causal(q, k, v, p, scale):
    """q [Hq, n, D] at positions p..p+n-1 against k/v [Hkv, p+n, D]: the new tokens attend all p
    prefix keys and causally to each other. ATen's CPU flash kernel only aligns a causal mask at
    the top left, so the two parts run without a mask and merge by log-sum-exp (as in
    kernels/cascade_attention.py): no [n, L] mask is built and no masked scores are computed."""
    o, lse = _FLASH_CPU(q[None], k[None, :, p:], v[None, :, p:], is_causal=True, scale=scale)
    if p:
        o_pre, lse_pre = _FLASH_CPU(q[None], k[None, :, :p], v[None, :, :p], scale=scale)
        o = torch.lerp(o, o_pre, torch.sigmoid(lse_pre - lse)[..., None])
    return o[0]


def paged_prefill_attention(
    q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale=None, max_seqlen_q=None, *, triton=None
):
    if use_triton(q, triton):
        from bstar.kernels.prefill_attention_triton import paged_prefill_attention_triton

        return paged_prefill_attention_triton(
            q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, max_seqlen_q=max_seqlen_q
        )
    return paged_prefill_attention_ref(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale)
