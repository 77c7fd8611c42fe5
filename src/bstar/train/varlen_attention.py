"""Packed-row attention for SFT, registered with transformers as "bstar_varlen".

With restarting position_ids and no mask, transformers' sdpa/eager build a dense [T, T] block-diagonal
mask over the whole packed row: T^2 work and memory. "bstar_varlen" instead runs causal SDPA on each
example's block (sum of L_i^2), the CPU/any-device analogue of flash-attention's varlen kernels; it
takes the same cu_seq_lens_q kwarg (so flash_attention_2 can be swapped in) and falls back to plain
SDPA for padded batches. `register_varlen_attention()` makes the name known to transformers (the
trainer calls it before loading a model; calling it again is harmless).
"""

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from bstar.errors import BStarError
from bstar.train.config import VARLEN


def _segments(n: int, cu_seq_lens, position_ids, b: int) -> list[int]:
    if cu_seq_lens is not None:
        return [int(x) for x in cu_seq_lens.tolist()]
    if position_ids is None:
        return [0, n]
    pos = position_ids[min(b, position_ids.shape[0] - 1)]
    starts = (torch.diff(pos, prepend=pos[:1] - 1) != 1).nonzero().flatten().tolist()
    return sorted(set([0] + starts)) + [n]


def varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """query [B, H, T, D], key/value [B, KVH, T, D] -> ([B, T, H, D], None)."""
    if attention_mask is not None or query.shape[2] != key.shape[2]:  # padded batch: the mask says it all
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    cu, pos = kwargs.get("cu_seq_lens_q"), kwargs.get("position_ids")
    gqa = query.shape[1] != key.shape[1]
    p = dropout if module.training else 0.0
    rows = []
    for b in range(query.shape[0]):
        bounds = _segments(query.shape[2], cu if query.shape[0] == 1 else None, pos, b)
        sw = kwargs.get("sliding_window")
        if sw is not None and max(e - s for s, e in zip(bounds[:-1], bounds[1:])) > sw:
            raise BStarError(
                f"{VARLEN} has no sliding window: example longer than {sw}; use attn_implementation='sdpa'"
            )
        outs = [
            F.scaled_dot_product_attention(
                query[b : b + 1, :, s:e],
                key[b : b + 1, :, s:e],
                value[b : b + 1, :, s:e],
                dropout_p=p,
                is_causal=True,
                scale=scaling,
                enable_gqa=gqa,
            )
            for s, e in zip(bounds[:-1], bounds[1:])
            if e > s
        ]
        rows.append(torch.cat(outs, dim=2) if len(outs) > 1 else outs[0])
    out = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
    return out.transpose(1, 2).contiguous(), None


def _varlen_mask(*args, attention_mask=None, **kwargs):
    # no dense mask for packed rows (the attention splits them); padded batches get sdpa's mask
    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register_varlen_attention() -> None:
    """Registers "bstar_varlen" with transformers' attention and mask interfaces."""
    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionMaskInterface.register(VARLEN, _varlen_mask)
