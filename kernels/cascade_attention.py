"""Cascade (shared-prefix) decode attention: the torch path for sibling candidates on CPU.

The n candidates of a prompt share the prompt's leading KV blocks. The plain decode reference
gathers those blocks once per candidate; here each group of rows that shares leading blocks attends
to them once (one attention call whose query rows are all the group's heads), every row attends
to its remaining blocks on its own, and the two partial softmaxes are merged by log-sum-exp:

    out = o_pre * exp(lse_pre - lse) + o_own * exp(lse_own - lse),  lse = logaddexp(lse_pre, lse_own)
        = lerp(o_own, o_pre, sigmoid(lse_pre - lse_own))

This is exact (float rounding aside) for any block tables: the prefix of a group is only the run
of leading blocks that every row of it references and that lies wholly below every row's length,
so every key is counted exactly once, whatever else the rows share.

Usage: `plan = build_cascade_plan(tables, lens, block_size, device)` once per step (host lists),
then `cascade_decode_attention(q, k_cache, v_cache, plan, scale, own_kv)` in every layer. With
`own_kv` buffers kept across steps (the engine's ModelRunner does this), a step copies each row's
newest token into them instead of re-gathering every row's own blocks: decode is then bound by
reading each row's own keys once, the shared prefix once per group.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

_NEG_INF = float("-inf")


@dataclass
class CascadePlan:
    """Which keys of the paged cache each decode row reads, split into group prefix and own part.

    B rows (decode sequences), Gr groups of at most S rows each, P prefix blocks, O own blocks.
    """

    prefix_blocks: torch.Tensor  # int64 [Gr, P]   leading blocks shared by a group (0-padded)
    prefix_bias: torch.Tensor  # float32 [Gr, 1, 1, P*bs]   0 for a shared key, -inf for padding
    slot_of_row: torch.Tensor  # int64 [B]   row's slot in the group-major layout [Gr*S]; Gr*S if ungrouped
    row_of_slot: torch.Tensor  # int64 [Gr*S]   the row in each slot (0 for an empty slot; never read back)
    group_size: int  # S
    all_grouped: bool  # every row has a prefix (no row reads the extra slot)
    own_blocks: torch.Tensor  # int64 [B, O]   each row's blocks after its group prefix (0-padded)
    own_bias: torch.Tensor  # float32 [B, 1, 1, Lk]   0 for a key below the row's length, else -inf
    own_len: int  # Lk: the most own keys of any row (the own part reads no whole trailing block)
    own_empty: torch.Tensor | None  # bool [B, 1, 1]: rows whose keys are all in the prefix (None: no such row)
    own_tables: list[list[int]]  # host copy of each row's own blocks (unpadded), for step-to-step reuse
    new_pos: torch.Tensor  # int64 [B]   own-part position of each row's newest token (seq_len - 1 - prefix)
    new_slots: torch.Tensor  # int64 [B]   cache slot of that token
    # With own_kv buffers (see cascade_decode_attention): True when they must be refilled from the cache,
    # False when they already hold every own key but each row's newest token.
    own_fresh: bool = True
    own_kv: list | None = None  # per layer (k_buf, v_buf), attached by the caller that keeps them

    @property
    def num_prefix_blocks(self) -> int:
        return self.prefix_blocks.shape[1]


def build_cascade_plan(block_tables, seq_lens, block_size: int, device=None) -> CascadePlan:
    """Group decode rows by shared leading blocks.

    block_tables: per row, a list of block ids (or an int [B, max_blocks] tensor; entries past a
                  row's last block are ignored)
    seq_lens:     per row, tokens in the cache (>= 1)
    Rows whose first block is the same form a group; its prefix is the longest run of leading
    blocks all rows share, cut to the blocks that are full for every row. Groups of one row, or
    without a full shared block, take no prefix.
    """
    if isinstance(block_tables, torch.Tensor):
        block_tables = block_tables.tolist()
    if isinstance(seq_lens, torch.Tensor):
        seq_lens = seq_lens.tolist()
    bs = block_size
    B = len(seq_lens)
    if len(block_tables) != B:
        raise ValueError(f"{len(block_tables)} block tables but {B} sequence lengths")
    nblk = [-(-L // bs) for L in seq_lens]
    for b, (t, n, L) in enumerate(zip(block_tables, nblk, seq_lens)):
        if L < 1 or len(t) < n:
            raise ValueError(f"row {b}: seq_len {L} needs {n} blocks, table has {len(t)}")
    by_first: dict[int, list[int]] = {}
    for b, t in enumerate(block_tables):
        by_first.setdefault(t[0], []).append(b)
    groups, prefix = [], []  # rows of each group, its shared leading blocks
    for rows in by_first.values():
        if len(rows) < 2:
            continue
        limit = min(seq_lens[b] for b in rows) // bs  # blocks full for every row
        first = block_tables[rows[0]]
        p = 0
        while p < limit and all(block_tables[b][p] == first[p] for b in rows):
            p += 1
        if p:
            groups.append(rows)
            prefix.append(first[:p])
    P = max(map(len, prefix), default=0)
    S = max(map(len, groups), default=0)
    Gr = len(groups)
    pre_len = [0] * B
    slot_of_row = [Gr * S] * B  # the extra slot past the layout stands for "no prefix"
    row_of_slot = [0] * (Gr * S)
    for g, rows in enumerate(groups):
        for s, b in enumerate(rows):
            slot_of_row[b] = g * S + s
            row_of_slot[g * S + s] = b
            pre_len[b] = len(prefix[g])
    O = max(n - p for n, p in zip(nblk, pre_len))
    own = [block_tables[b][pre_len[b]:nblk[b]] for b in range(B)]
    own_blocks = [t + [0] * (O - len(t)) for t in own]
    own_keys = torch.tensor([L - p * bs for L, p in zip(seq_lens, pre_len)])  # keys in the own part
    Lk = int(own_keys.max()) if B else 0
    own_bias = torch.zeros(B, Lk).masked_fill_(torch.arange(Lk)[None, :] >= own_keys[:, None], _NEG_INF)
    own_empty = own_keys == 0
    ppos = torch.arange(P * bs)
    plen = torch.tensor([len(x) * bs for x in prefix], dtype=torch.long)
    prefix_bias = torch.zeros(Gr, P * bs).masked_fill_(ppos[None, :] >= plen[:, None], _NEG_INF)
    # A row whose newest token closes a shared prefix block has no own keys: its buffer write goes to
    # its own masked position 0, never to a neighbour's.
    new_pos = [max(0, L - 1 - p * bs) for L, p in zip(seq_lens, pre_len)]
    new_slots = [block_tables[b][(L - 1) // bs] * bs + (L - 1) % bs for b, L in enumerate(seq_lens)]
    as_long = dict(dtype=torch.long, device=device)
    return CascadePlan(
        prefix_blocks=torch.tensor([x + [0] * (P - len(x)) for x in prefix], **as_long).view(Gr, P),
        prefix_bias=prefix_bias.view(Gr, 1, 1, P * bs).to(device),
        slot_of_row=torch.tensor(slot_of_row, **as_long),
        row_of_slot=torch.tensor(row_of_slot, **as_long),
        group_size=S,
        all_grouped=Gr * S not in slot_of_row,
        own_blocks=torch.tensor(own_blocks, **as_long).view(B, O),
        own_bias=own_bias.view(B, 1, 1, Lk).to(device),
        own_len=Lk,
        own_empty=own_empty.view(B, 1, 1).to(device) if bool(own_empty.any()) else None,
        own_tables=own,
        new_pos=torch.tensor(new_pos, **as_long),
        new_slots=torch.tensor(new_slots, **as_long),
    )


def _attend(q, k, v, bias, scale):
    """Softmax attention that also returns the log-sum-exp of the scores.

    q [N, H, M, D], k/v [N, H, L, D] (any strides), bias float [N, 1, 1, L] additive.
    Returns (out [N, H, M, D], lse [N, H, M]); a row whose keys are all masked gets out 0 and an
    lse the caller must overwrite with -inf.
    """
    flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if flash is not None and q.device.type == "cpu":
        # ATen's CPU flash kernel: one pass over K/V, and it hands back the lse we need to merge.
        out, lse = flash(q, k, v, attn_mask=bias, scale=scale)
        return out, lse
    s = (q @ k.transpose(-1, -2)) * scale + bias
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.nan_to_num(neginf=0.0)[..., None])
    return p @ v, lse


def _own_keys(cache, buf, plan: CascadePlan, B, O, bs, Hkv, D, write_idx):
    """Each row's own keys (or values) [B, Lk, Hkv, D]: gathered from the paged cache, or read
    from `buf`, a contiguous copy kept across steps, so that a decode step copies B new tokens
    instead of every row's whole history."""
    if buf is None or plan.own_fresh:
        own = cache.index_select(0, plan.own_blocks.view(-1)).view(B, O * bs, Hkv, D)
        if buf is None:
            return own[:, :plan.own_len]
        buf[:B, :O * bs].copy_(own)
    else:
        new = cache.view(-1, Hkv, D).index_select(0, plan.new_slots)  # [B, Hkv, D]
        buf.view(-1, Hkv, D)[:B * buf.shape[1]].index_copy_(0, write_idx, new)
    return buf[:B, :plan.own_len]


def cascade_decode_attention(q, k_cache, v_cache, plan: CascadePlan, scale=None, own_kv=None):
    """Decode attention of B single-token rows, equal to `paged_decode_attention_ref` on the same
    block tables and lengths the plan was built from.

    q        [B, Hq, D]
    k_cache  [num_blocks, block_size, Hkv, D]  (v_cache alike)
    own_kv   optional (k_buf, v_buf), each [>= B, >= O*bs, Hkv, D] in the cache dtype, zero-initialised,
             kept by the caller for this layer across steps: filled from the cache when
             plan.own_fresh, else only each row's newest token (already in the cache) is copied in.
             The caller must only clear own_fresh when every row's own blocks and tokens, bar the
             newest, are unchanged since the buffers were last used.
    returns  [B, Hq, D] in q's dtype; softmax and accumulation in float32.
    """
    B, Hq, D = q.shape
    _, bs, Hkv, _ = k_cache.shape
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    qf = q.float().view(B, Hkv, G, D)  # GQA: a KV head's G query heads are its query positions

    # Own part: each row against its blocks after the group prefix.  [B, Lk, Hkv, D] -> [B, Hkv, Lk, D]
    O = plan.own_blocks.shape[1]
    if O:
        kb, vb = own_kv if own_kv is not None else (None, None)
        write_idx = None  # flat [B*cap] buffer index of each row's newest token
        if kb is not None and not plan.own_fresh:
            write_idx = torch.arange(B, device=kb.device) * kb.shape[1] + plan.new_pos
        k = _own_keys(k_cache, kb, plan, B, O, bs, Hkv, D, write_idx).transpose(1, 2).float()
        v = _own_keys(v_cache, vb, plan, B, O, bs, Hkv, D, write_idx).transpose(1, 2).float()
        o_own, lse_own = _attend(qf, k, v, plan.own_bias, scale)  # [B, Hkv, G, D], [B, Hkv, G]
        if plan.own_empty is not None:
            lse_own = lse_own.masked_fill(plan.own_empty, _NEG_INF)
    P = plan.num_prefix_blocks
    if not P:
        return o_own.reshape(B, Hq, D).to(q.dtype)

    # Prefix part: a group's S rows become S*G query positions against the group's shared keys.
    Gr, S = plan.prefix_blocks.shape[0], plan.group_size
    qg = qf.index_select(0, plan.row_of_slot).view(Gr, S, Hkv, G, D).transpose(1, 2).reshape(Gr, Hkv, S * G, D)
    flat = plan.prefix_blocks.view(-1)
    k = k_cache.index_select(0, flat).view(Gr, P * bs, Hkv, D).transpose(1, 2).float()
    v = v_cache.index_select(0, flat).view(Gr, P * bs, Hkv, D).transpose(1, 2).float()
    o_pre, lse_pre = _attend(qg, k, v, plan.prefix_bias, scale)  # [Gr, Hkv, S*G, D], [Gr, Hkv, S*G]
    # Back to rows; ungrouped rows read the extra slot (out 0, lse -inf).
    o_pre = o_pre.view(Gr, Hkv, S, G, D).transpose(1, 2).reshape(Gr * S, Hkv, G, D)
    lse_pre = lse_pre.view(Gr, Hkv, S, G).transpose(1, 2).reshape(Gr * S, Hkv, G)
    if not plan.all_grouped:
        o_pre, lse_pre = F.pad(o_pre, (0, 0, 0, 0, 0, 0, 0, 1)), F.pad(lse_pre, (0, 0, 0, 0, 0, 1), value=_NEG_INF)
    o_pre, lse_pre = o_pre.index_select(0, plan.slot_of_row), lse_pre.index_select(0, plan.slot_of_row)
    if not O:
        return o_pre.reshape(B, Hq, D).to(q.dtype)
    # The weight of the prefix part, exp(lse_pre - logaddexp(lse_pre, lse_own)); 0 or 1 exactly
    # when one side has no keys (its lse is -inf), and lerp returns that side's output exactly.
    w = torch.sigmoid(lse_pre - lse_own)[..., None]
    return torch.lerp(o_own, o_pre, w).reshape(B, Hq, D).to(q.dtype)
