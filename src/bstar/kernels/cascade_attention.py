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
then `cascade_decode_attention(q, k_cache, v_cache, plan, scale, buffers)` in every layer. With
`CascadeBuffers` kept across steps (bstar/engine/runner/cpu/decode_state.py does this), a step copies each row's
newest token into them instead of re-gathering every row's own blocks, and reuses the gathered
group prefixes: decode is then bound by reading each row's own keys once, the shared prefix once
per group. The own parts run in `dense_decode_attention` (a C kernel on CPU float32), the group
prefixes in ATen's CPU flash attention (S*G queries per key: small GEMMs suit it).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bstar.kernels.dense_decode_attention import attend, dense_decode_attention
from bstar.kernels.host import long_tensor

_NEG_INF = float("-inf")


@dataclass
class CascadeBuffers:
    """One layer's K/V copies, kept by the caller across decode steps."""

    own_k: torch.Tensor  # [>= B, cap, Hkv, D] each row's own keys, contiguous, zero-initialised
    own_v: torch.Tensor
    pre_k: torch.Tensor | None = None  # [Gr, P*bs, Hkv, D] the group prefixes of the last fresh gather
    pre_v: torch.Tensor | None = None


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
    own_blocks: torch.Tensor  # int64 [B, O]   the blocks holding each row's own part (0-padded)
    own_lens_t: torch.Tensor | None  # int64 [B] each row's own key count (None: every row has Lk)
    own_len: int  # Lk: the most own keys of any row (the own part reads no whole trailing block)
    own_empty: bool  # some row has all its keys in its group's prefix (no own key)
    own_tables: list[list[int]]  # host copy of each row's own blocks (unpadded), for step-to-step reuse
    own_lens: list[int]  # host copy of each row's own key count
    own_offsets: list[int]  # where each row's own part starts in its first own block
    own_offsets_t: torch.Tensor | None  # int64 [B] the same (None: all 0)
    rows_in_order: bool  # row_of_slot is arange(B): rows are already group-major (no shuffles needed)
    new_pos: torch.Tensor  # int64 [B]   own-part position of each row's newest token (seq_len - 1 - prefix)
    new_slots: torch.Tensor  # int64 [B]   cache slot of that token
    new_pos_same: int | None  # that position when it is the same for every row (a strided write), else None
    # With CascadeBuffers (see cascade_decode_attention): own_fresh is True when the own copies must
    # be refilled from the cache, False when they hold every own key but each row's newest token;
    # prefix_fresh is True when the group prefixes must be gathered again.
    own_fresh: bool = True
    prefix_fresh: bool = True
    buffers: list | None = None  # per layer CascadeBuffers, attached by the caller that keeps them
    write_idx: tuple | None = None  # (flat own-buffer index of each row's newest token, buffer capacity)
    # With own_fresh False: rows whose own K/V the buffers do not hold (None: all hold theirs), gathered
    # from the cache this step; the caller has moved every other row's K/V to its row of the buffers.
    fresh_rows: torch.Tensor | None = None
    # Set by a caller that kept this step's newest K/V out of the paged cache (they are only in
    # new_kv and, after the call, in the buffers); it writes them back later.
    write_back: bool = False

    @property
    def num_prefix_blocks(self) -> int:
        return self.prefix_blocks.shape[1]


def build_cascade_plan(
    block_tables, seq_lens, block_size: int, device=None, shared_lens=None, share_ids=None
) -> CascadePlan:
    """Group decode rows by shared leading blocks.

    block_tables: per row, a list of block ids (or an int [B, max_blocks] tensor; entries past a
                  row's last block are ignored)
    seq_lens:     per row, tokens in the cache (>= 1)
    shared_lens, share_ids: optional, per row. Rows with the same share id hold bitwise-identical
                  K/V for their first shared_lens tokens, wherever they are stored (sibling
                  candidates: the prompt, whose partial last block each copied on write).
    Rows whose first block is the same form a group; its prefix is the longest run of leading
    blocks all rows share, cut to the blocks that are full for every row. When all of a group's
    rows have one share id, the prefix also takes their common tokens of the next block, read from
    the group's first row: each row's own part then holds only what differs (its generated
    tokens), and rows with own parts of one length need no mask. Groups of one row, or with
    nothing to share, take no prefix.
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
    groups, prefix, plen = [], [], []  # rows of each group, its prefix blocks and tokens
    for rows in by_first.values():
        if len(rows) < 2:
            continue
        shortest = min(seq_lens[b] for b in rows)
        p = 0
        for column in zip(*(block_tables[b][: shortest // bs] for b in rows)):  # blocks full for every row
            if column.count(column[0]) != len(column):
                break
            p += 1
        extra = 0  # tokens of block p common to the group (same share id: same K/V)
        if shared_lens is not None and len({share_ids[b] for b in rows}) == 1:
            extra = max(0, min(min(shared_lens[b] for b in rows), shortest, (p + 1) * bs - 1) - p * bs)
        if p or extra:
            groups.append(rows)
            prefix.append(block_tables[rows[0]][: p + (extra > 0)])
            plen.append(p * bs + extra)
    P = max(map(len, prefix), default=0)
    S = max(map(len, groups), default=0)
    Gr = len(groups)
    pre_tokens = [0] * B
    slot_of_row = [Gr * S] * B  # the extra slot past the layout stands for "no prefix"
    row_of_slot = [0] * (Gr * S)
    for g, rows in enumerate(groups):
        for s, b in enumerate(rows):
            slot_of_row[b] = g * S + s
            row_of_slot[g * S + s] = b
            pre_tokens[b] = plen[g]
    # A row's own part: its tokens from pre_tokens on, stored from block pre_tokens // bs at offset
    # pre_tokens % bs.
    offsets = [t % bs for t in pre_tokens]
    own = [block_tables[b][pre_tokens[b] // bs : nblk[b]] for b in range(B)]
    O = max(map(len, own), default=0)
    own_keys = [L - t for L, t in zip(seq_lens, pre_tokens)]  # keys in each row's own part
    Lk = max(own_keys, default=0)
    # A row whose keys all lie in its group's prefix has no own keys: its buffer write goes to its
    # own masked position 0, never to a neighbour's.
    new_pos = [max(0, k - 1) for k in own_keys]
    new_slots = [block_tables[b][(L - 1) // bs] * bs + (L - 1) % bs for b, L in enumerate(seq_lens)]
    # Every integer field in one host->tensor conversion (this runs once per decode step).
    flat = [x for t in prefix for x in t + [0] * (P - len(t))] + slot_of_row + row_of_slot
    flat += [x for t in own for x in t + [0] * (O - len(t))]
    flat += own_keys + new_pos + new_slots + plen + offsets
    ints = long_tensor(flat, device)
    (prefix_blocks, slot_t, row_t, own_blocks, keys_t, new_pos_t, new_slots_t, plen_t, offsets_t) = ints.split(
        [Gr * P, B, Gr * S, B * O, B, B, B, Gr, B]
    )
    prefix_bias = torch.zeros(Gr, P * bs, dtype=torch.float32, device=device).masked_fill_(
        torch.arange(P * bs, device=device) >= plen_t[:, None], _NEG_INF
    )
    return CascadePlan(
        prefix_blocks=prefix_blocks.view(Gr, P),
        prefix_bias=prefix_bias.view(Gr, 1, 1, P * bs),
        slot_of_row=slot_t,
        row_of_slot=row_t,
        group_size=S,
        all_grouped=Gr * S not in slot_of_row,
        own_blocks=own_blocks.view(B, O),
        own_lens_t=keys_t if min(own_keys, default=Lk) != Lk else None,  # one length: no mask
        own_len=Lk,
        own_empty=0 in own_keys,
        own_tables=own,
        own_lens=own_keys,
        own_offsets=offsets,
        own_offsets_t=offsets_t if any(offsets) else None,
        rows_in_order=Gr * S == B and row_of_slot == list(range(B)),
        new_pos=new_pos_t,
        new_pos_same=new_pos[0] if new_pos and new_pos.count(new_pos[0]) == B else None,
        new_slots=new_slots_t,
    )


def _own_keys(cache, buf, plan: CascadePlan, B, O, bs, Hkv, D, write_idx, new):
    """Each row's own keys (or values) [B, Lk, Hkv, D]: gathered from the paged cache, or read
    from `buf`, a contiguous copy kept across steps, so that a decode step copies B new tokens
    (`new` [B, Hkv, D], or read back from the cache) instead of every row's whole history."""
    if buf is None or plan.own_fresh:
        own = _gather_own(cache, plan, None, O, bs, Hkv, D)
        if buf is None:
            return own[:, : plan.own_len]
        buf[:B, : own.shape[1]].copy_(own)
    else:
        if new is None:
            assert not plan.write_back, "write_back needs the newest K/V passed in (new_kv)"
            new = cache.view(-1, Hkv, D).index_select(0, plan.new_slots)
        if plan.new_pos_same is not None:  # siblings decoding in step: one strided copy
            buf[:B, plan.new_pos_same].copy_(new)
        else:
            buf.view(-1, Hkv, D)[: B * buf.shape[1]].index_copy_(0, write_idx, new.to(buf.dtype))
        if plan.fresh_rows is not None:  # rows the buffers do not hold yet (joined this step): from the cache
            own = _gather_own(cache, plan, plan.fresh_rows, O, bs, Hkv, D)
            buf[:, : own.shape[1]].index_copy_(0, plan.fresh_rows, own)
    return buf[:B, : plan.own_len]


def _gather_own(cache, plan: CascadePlan, rows, O, bs, Hkv, D):
    """The own parts of `rows` (int64 tensor; None: every row) gathered from the paged cache,
    [rows, >= own_len, Hkv, D], each starting at its row's first own key."""
    blocks = plan.own_blocks if rows is None else plan.own_blocks.index_select(0, rows)
    n = blocks.shape[0]
    own = cache.index_select(0, blocks.view(-1)).view(n, O * bs, Hkv, D)
    if plan.own_offsets_t is not None:  # own parts starting inside a block: shift each row
        offsets = plan.own_offsets_t if rows is None else plan.own_offsets_t.index_select(0, rows)
        pos = (offsets[:, None] + torch.arange(plan.own_len, device=own.device)).clamp_(max=O * bs - 1)
        own = own[torch.arange(n, device=own.device)[:, None], pos]
    return own


def cascade_decode_attention(
    q, k_cache, v_cache, plan: CascadePlan, scale=None, buffers: CascadeBuffers | None = None, new_kv=None
):
    """Decode attention of B single-token rows, equal to `paged_decode_attention_ref` on the same
    block tables and lengths the plan was built from.

    q        [B, Hq, D]
    k_cache  [num_blocks, block_size, Hkv, D]  (v_cache alike)
    buffers  optional CascadeBuffers the caller keeps for this layer across steps. The own copies
             are filled from the cache when plan.own_fresh, else only each row's newest token is
             copied in; the group prefixes are gathered when plan.prefix_fresh, else reused. The
             caller must only clear a flag when what it covers is unchanged since the last step:
             the same rows with the same own blocks, one token longer; the same prefix blocks.
    new_kv   optional (k, v) [B, Hkv, D]: each row's newest K/V (also already in the cache), copied
             into the own buffers directly instead of being read back from the cache.
    returns  [B, Hq, D] in q's dtype; softmax and accumulation in float32.
    """
    B, Hq, D = q.shape
    _, bs, Hkv, _ = k_cache.shape
    G = Hq // Hkv
    scale = D**-0.5 if scale is None else scale
    qf = q.float().view(B, Hkv, G, D)  # GQA: a KV head's G query heads are its query positions

    # Own part: each row against its blocks after the group prefix.  [B, Lk, Hkv, D] -> [B, Hkv, Lk, D]
    O = plan.own_blocks.shape[1]
    if O:
        kb, vb = (buffers.own_k, buffers.own_v) if buffers is not None else (None, None)
        nk, nv = new_kv if new_kv is not None else (None, None)
        write_idx = None  # flat [B*cap] buffer index of each row's newest token (same in every layer)
        if kb is not None and not plan.own_fresh:
            if plan.write_idx is None or plan.write_idx[1] != kb.shape[1]:
                plan.write_idx = (torch.arange(B, device=kb.device) * kb.shape[1] + plan.new_pos, kb.shape[1])
            write_idx = plan.write_idx[0]
        k = _own_keys(k_cache, kb, plan, B, O, bs, Hkv, D, write_idx, nk)
        v = _own_keys(v_cache, vb, plan, B, O, bs, Hkv, D, write_idx, nv)
        # [B, Hkv, G, D], [B, Hkv, G]; a row with no own keys gets lse -inf (its prefix weighs 1)
        o_own, lse_own = dense_decode_attention(qf, k, v, plan.own_lens_t, scale)
    P = plan.num_prefix_blocks
    if not P:
        return o_own.reshape(B, Hq, D).to(q.dtype)

    # Prefix part: a group's S rows become S*G query positions against the group's shared keys.
    Gr, S = plan.prefix_blocks.shape[0], plan.group_size
    if not plan.rows_in_order:
        qf = qf.index_select(0, plan.row_of_slot)
    qg = qf.view(Gr, S, Hkv, G, D).transpose(1, 2).reshape(Gr, Hkv, S * G, D)
    if buffers is not None and not plan.prefix_fresh and buffers.pre_k is not None:
        kp, vp = buffers.pre_k, buffers.pre_v
    else:
        flat = plan.prefix_blocks.view(-1)
        kp = k_cache.index_select(0, flat).view(Gr, P * bs, Hkv, D)
        vp = v_cache.index_select(0, flat).view(Gr, P * bs, Hkv, D)
        if buffers is not None:
            buffers.pre_k, buffers.pre_v = kp, vp
    o_pre, lse_pre = attend(qg, kp.transpose(1, 2).float(), vp.transpose(1, 2).float(), plan.prefix_bias, scale)
    # Back to rows: [Gr, Hkv, S*G, D] -> [Gr*S, Hkv, G, D] (a strided view when the rows are in group
    # order, else a gather; ungrouped rows read the extra slot: out 0, lse -inf).
    o_pre = o_pre.view(Gr, Hkv, S, G, D).transpose(1, 2)  # [Gr, S, Hkv, G, D]
    lse_pre = lse_pre.view(Gr, Hkv, S, G).transpose(1, 2)
    if not plan.rows_in_order:
        o_pre, lse_pre = o_pre.reshape(Gr * S, Hkv, G, D), lse_pre.reshape(Gr * S, Hkv, G)
        if not plan.all_grouped:
            o_pre, lse_pre = F.pad(o_pre, (0, 0, 0, 0, 0, 0, 0, 1)), F.pad(lse_pre, (0, 0, 0, 0, 0, 1), value=_NEG_INF)
        o_pre, lse_pre = o_pre.index_select(0, plan.slot_of_row), lse_pre.index_select(0, plan.slot_of_row)
    if not O:
        return o_pre.reshape(B, Hq, D).to(q.dtype)
    # The weight of the prefix part, exp(lse_pre - logaddexp(lse_pre, lse_own)); 0 or 1 exactly
    # when one side has no keys (its lse is -inf), and lerp returns that side's output exactly.
    shape = o_pre.shape  # [B, Hkv, G, D], or [Gr, S, Hkv, G, D] for rows in group order
    w = torch.sigmoid(lse_pre - lse_own.view(shape[:-1]))[..., None]
    return torch.lerp(o_own.view(shape), o_pre, w).reshape(B, Hq, D).to(q.dtype)
