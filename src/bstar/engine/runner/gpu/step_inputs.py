"""The GPU path's step inputs: persistent buffers filled in place, no host synchronisation.

On the GPU runner (CUDA, or BSTAR_KERNELS=triton on CPU under the interpreter) a step's token ids,
positions, cache slots, sequence lengths and block tables go into device buffers allocated once:

- a captured CUDA graph (bstar/engine/runner/gpu/cuda_graphs.py) reads the same addresses at every replay, and
  the eager path uses the same buffers (a replay is the same forward on the same tensors);
- the host builds flat lists only. All values of a step are staged in one pinned host buffer as named
  segments (kernels.host.to_device_segments), copied with non_blocking=True, then spread on the device
  into the persistent buffers: one host-to-device copy per step, which does not make the host wait;
- block tables stay on the device (`BlockTables`): one row per sequence, written only where the
  sequence's table changed, then gathered into batch order by one index_select.

Rows past the batch up to a CUDA-graph bucket (`pad_to`) are padding that writes and reads
nothing: token 0 at position 0, slot -1 (kernels.store_kv skips it), length 0 (the decode kernel
reads no key), the table's reserved all-zero row 0.
"""

import torch

from bstar.engine.core.scheduler import Batch
from bstar.engine.core.sequence import Sequence
from bstar.engine.model.decoder import AttnMetadata
from bstar.kernels.host import to_device_segments

PAD_SLOT = -1


class BlockTables:
    """Block tables on the device, keyed by sequence: row r holds the blocks of the sequence that
    owns it (int32 [rows, width]; entries past a sequence's blocks are stale and never read).

    `sync` finds, for each sequence of a step, the entries that changed since its row was last
    written. What can change (bstar/engine/core/block_manager.py): blocks are appended; the block at index
    num_computed // block_size is replaced by copy-on-write in the step that writes into it; a
    preempted sequence is freed (its table becomes a new, empty list) and allocated again; a new
    sequence (a fork, a request, a prompt forward) brings a new list. So for the list object a row
    last wrote, entries below num_computed // block_size never change and only the tail is
    compared with a host mirror; any other list is written in full. Rows of sequences that were not
    in the step are reclaimed when rows run out (one that comes back is written in full again);
    row 0 stays all zeros, for padded batch rows.
    """

    def __init__(self, width: int, block_size: int, device: torch.device, rows: int = 64):
        self.width, self.block_size, self.device = width, block_size, device
        self.table = torch.zeros(rows, width, dtype=torch.int32, device=device)
        self.row_of: dict[int, int] = {}  # seq_id -> row
        self._owner: list[int | None] = [None] * rows
        self._list: list[list[int] | None] = [None] * rows  # the table list last written (kept alive)
        self._mirror: list[list[int] | None] = [None] * rows  # host copy of the row's written entries
        self._stamp = [0] * rows  # the step that last used the row
        self._free = list(range(rows - 1, 0, -1))  # row 0 is reserved
        self._step = 0
        self.entries_written = 0  # (statistics, tests)

    def sync(self, seqs: list[Sequence]) -> tuple[list[int], list[int], list[int]]:
        """The rows of `seqs` (in order) and the (flat index, block id) entries that bring them up
        to date; the caller writes those (`write`) before reading the table."""
        self._step += 1
        step, W, bs = self._step, self.width, self.block_size
        rows, idx, val = [], [], []
        for s in seqs:
            t = s.block_table
            r = self.row_of.get(s.seq_id)
            if r is None:
                r = self._assign(s.seq_id)
            m = self._mirror[r]
            base = r * W
            if self._list[r] is t and len(t) >= len(m):
                n = len(m)
                for i in range(min(n, s.num_computed // bs), n):  # copy-on-write lands here
                    if t[i] != m[i]:
                        m[i] = t[i]
                        idx.append(base + i)
                        val.append(t[i])
                if len(t) > n:  # new blocks
                    new = t[n:]
                    m += new
                    idx += range(base + n, base + len(t))
                    val += new
            else:
                if len(t) > W:
                    raise ValueError(f"sequence {s.seq_id} holds {len(t)} blocks, the tables' width is {W}")
                self._list[r], self._mirror[r] = t, list(t)
                idx += range(base, base + len(t))
                val += t
            self._stamp[r] = step
            rows.append(r)
        self.entries_written += len(idx)
        return rows, idx, val

    def write(self, idx: torch.Tensor, val: torch.Tensor):
        """Apply `sync`'s entries (device tensors: int64 flat indices, int32 block ids)."""
        if idx.numel():
            self.table.view(-1).index_copy_(0, idx, val)

    def _assign(self, seq_id: int) -> int:
        if not self._free:
            self._reclaim()
        r = self._free.pop()
        self._owner[r], self._list[r], self._mirror[r] = seq_id, None, None
        self.row_of[seq_id] = r
        return r

    def _reclaim(self):
        """Free the rows not used by the current step; grow the table when every row is in use."""
        for r in range(1, len(self._owner)):
            if self._owner[r] is not None and self._stamp[r] < self._step:
                del self.row_of[self._owner[r]]
                self._owner[r] = self._list[r] = self._mirror[r] = None
                self._free.append(r)
        if not self._free:
            old = self.table.shape[0]
            table = torch.zeros(2 * old, self.width, dtype=torch.int32, device=self.device)
            table[:old] = self.table
            self.table = table
            self._owner += [None] * old
            self._list += [None] * old
            self._mirror += [None] * old
            self._stamp += [0] * old
            self._free = list(range(2 * old - 1, old - 1, -1))


class StepInputs:
    """Persistent buffers of one engine's steps on the Triton path, and `prepare` to fill them."""

    def __init__(self, max_tokens: int, max_table_rows: int, width: int, block_size: int, device: torch.device):
        self.device, self.block_size, self.width = device, block_size, width
        self.max_tokens = max_tokens
        z = dict(device=device)
        # What a decode graph reads (slices [:bucket] of these, at fixed addresses). Token ids,
        # positions and slots are the rows of one buffer, so one copy fills all three; rows start
        # 128-byte aligned, as a buffer of their own would (Triton specialises on the alignment).
        self.token_rows = torch.zeros(3, -(-max_tokens // 16) * 16, dtype=torch.int64, **z)
        self.input_ids, self.positions, self.slot_mapping = self.token_rows[:, :max_tokens]
        self.slot_mapping.fill_(PAD_SLOT)
        self.seq_lens = torch.zeros(max_tokens, dtype=torch.int32, **z)
        self.block_tables = torch.zeros(max_table_rows, width, dtype=torch.int32, **z)
        self.tables = BlockTables(width, block_size, device)
        self._empty_cu = torch.zeros(1, dtype=torch.int32, **z)

    def bucket_meta(self, bs: int) -> tuple[torch.Tensor, torch.Tensor, AttnMetadata]:
        """(ids, positions, metadata) of a decode-only step of `bs` rows, as views of the buffers:
        what a graph of bucket `bs` is captured on and replayed with."""
        meta = AttnMetadata(
            slot_mapping=self.slot_mapping[:bs],
            block_tables=self.block_tables[:bs],
            seq_lens=self.seq_lens[:bs],
            num_decode=bs,
            cu_seqlens_q=self._empty_cu,
            max_seqlen_q=1,
        )
        return self.input_ids[:bs], self.positions[:bs], meta

    def fill_padding(self, bs: int):
        """Every row [0, bs) a padded row (before a capture: the graph then runs on safe values)."""
        self.input_ids[:bs].zero_()
        self.positions[:bs].zero_()
        self.slot_mapping[:bs].fill_(PAD_SLOT)
        self.seq_lens[:bs].zero_()
        self.block_tables[:bs].zero_()

    def prepare(self, batch: Batch, pad_to: int | None = None):
        """Fill the buffers for `batch` (decode rows first, then prefill chunks).

        pad_to (a decode-only batch): the row count of the graph bucket; rows past the batch are
        padding. Returns (ids, positions, metadata, sample) where sample is an int64 device tensor
        of the hidden-state rows of batch.sampled, or None when those are rows 0..len-1 in order.
        """
        seqs, nd = batch.seqs, batch.num_decode
        B = len(seqs)
        ids, pos, slots, lens, last_rows, cu = batch.flat_tokens(self.block_size)
        T = len(ids)
        rows, upd_idx, upd_val = self.tables.sync(seqs)
        pad = 0
        if pad_to is not None:
            if nd != B or pad_to < B:
                raise ValueError(f"padding is for decode-only batches up to the bucket, got {nd}/{B} rows to {pad_to}")
            pad = pad_to - B
            ids += [0] * pad
            pos += [0] * pad
            slots += [PAD_SLOT] * pad
            lens += [0] * pad
            rows += [0] * pad
        if T + pad > self.max_tokens:
            raise ValueError(f"{T + pad} tokens in a step; the buffers hold {self.max_tokens}")
        sample = [last_rows[r] for r in batch.sampled]
        if sample == list(range(len(sample))):  # rows 0..len-1: no gather needed
            sample = []
        Tp, Bp = T + pad, B + pad

        # One host-to-device copy, then the persistent buffers are filled on the device.
        seg = to_device_segments(
            {
                "tokens": (ids + pos + slots, torch.int64),  # token_rows' three rows: one device copy fills them
                "table_rows": (rows, torch.int64),  # each batch row's BlockTables row
                "entry_index": (upd_idx, torch.int64),  # BlockTables.sync's changed entries: flat index...
                "entry_block": (upd_val, torch.int32),  # ...and block id
                "sample": (sample, torch.int64),
                "feed_rows": (batch.feed_rows, torch.int64),  # async scheduling: rows whose input the step
                "feed_src": (batch.feed_src, torch.int64),  # in flight draws, and their rows in its draw
                "seq_lens": (lens, torch.int32),
                "cu_seqlens_q": (cu, torch.int32),
            },
            self.device,
        )
        self.token_rows[:, :Tp].copy_(seg["tokens"].view(3, Tp), non_blocking=True)
        if batch.feed_rows:  # (read on the device)
            src = batch.feed_tokens.index_select(0, seg["feed_src"])
            self.input_ids.index_copy_(0, seg["feed_rows"], src)
        self.seq_lens[:Bp].copy_(seg["seq_lens"], non_blocking=True)
        self.tables.write(seg["entry_index"], seg["entry_block"])
        rows_d, sample_d = seg["table_rows"], seg["sample"] if sample else None
        if Bp <= self.block_tables.shape[0]:
            block_tables = self.block_tables[:Bp]
            torch.index_select(self.tables.table, 0, rows_d, out=block_tables)
        else:  # more rows than any decode graph has (a wide prefill batch): a fresh gather
            block_tables = self.tables.table.index_select(0, rows_d)
        meta = AttnMetadata(
            slot_mapping=self.slot_mapping[:Tp],
            block_tables=block_tables,
            seq_lens=self.seq_lens[:Bp],
            num_decode=nd + pad,
            cu_seqlens_q=seg["cu_seqlens_q"],
            max_seqlen_q=max(batch.num_new[nd:], default=1),
            max_seq_len=None if pad_to is not None else max(lens[:nd], default=1),
        )
        return self.input_ids[:Tp], self.positions[:Tp], meta, sample_d
