"""State the CPU runner keeps across steps (on CPU; on CUDA only when the torch kernels were chosen).

The GPU runner needs none of this; `CpuRunner` (cpu/runner.py), its only user, asks this object for the
decode rows' cascade plan and calls `flush` before anything else touches the paged cache. It keeps:

- per layer, `CascadeBuffers` (kernels/cascade_attention.py): each decode row's own K/V kept
  contiguous across steps, and the gathered group prefixes, so a steady step copies one new token
  per row instead of re-gathering every row's history;
- the previous step as (seq ids, lengths, plan), to tell whether this step continues it;
- write-back: a decode-only step that continues the previous one keeps its new K/V only in the
  buffers (`_dirty` tokens per row so far), and `flush` writes them into the paged cache later;
- on CPU float32, the GEMM library of the Linear layers, and for MKL the streak of decode batch
  sizes that decides when to pack the linear weights (bstar/engine/model/linear.py).

Flush ordering. The buffers may hold K/V the paged cache lacks, so `flush` must run before anything
reads or writes the cache slots of those tokens, or changes what the bookkeeping describes:
- every forward that does not continue the write-back (CpuRunner.prepare: a batch without decode
  rows; `plan` itself when the step does not continue the previous one);
- every block copy (CpuRunner.copy_blocks), since a copied block may hold unwritten tokens;
- every read of the cache from outside the runner (CpuRunner.read_kv);
- before the buffers or the previous step's plan are replaced (`plan`, `reset`).
A slot whose sequence was freed meanwhile is at worst rewritten before its new owner writes it.
"""

import torch

from bstar.engine.config import EngineConfig, ModelConfig
from bstar.engine.core.scheduler import Batch
from bstar.engine.core.sequence import Sequence
from bstar.engine.model.linear import pack_linears, resolve_cpu_gemm, set_cpu_gemm, unpack_linears
from bstar.kernels.cascade_attention import CascadeBuffers, CascadePlan, build_cascade_plan
from bstar.kernels.host import long_tensor


class CpuDecodeState:
    def __init__(
        self,
        model: torch.nn.Module,
        mcfg: ModelConfig,
        ecfg: EngineConfig,
        kv: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
    ):
        self.model, self.mcfg, self.ecfg = model, mcfg, ecfg
        self.kv, self.kv_caches = kv, kv_caches  # the runner's paged cache, and its per-layer (K, V) views
        self.block_size = ecfg.block_size
        self._buffers: list[CascadeBuffers] | None = None
        self._prev: tuple[list[int], list[int], CascadePlan] | None = None
        self._dirty = 0  # each row's last `_dirty` own tokens are in the buffers, not in the paged cache
        self._rows_seen, self._rows_streak, self._packed_rows = 0, 0, None
        self.gemm = None  # CPU float32 only: "onednn", "mkl" or "aten" (bstar/engine/model/linear.py)
        if kv.device.type == "cpu" and kv.dtype == torch.float32:
            self.gemm = resolve_cpu_gemm(ecfg.cpu_gemm)
            set_cpu_gemm(model, self.gemm)

    def plan(self, seqs: list[Sequence], lens: list[int], decode_only: bool) -> CascadePlan:
        """The cascade plan of the step's decode rows (`lens`: their lengths after this step), with
        this object's buffers attached. Flushes first unless the step continues the write-back."""
        # Sibling candidates hold bit-identical prompt K/V (the partial last block is copied on
        # write); a preempted one recomputed its own, so it shares nothing beyond whole blocks.
        shared = [s.prompt_len if s.params.n > 1 and not s.num_preemptions else 0 for s in seqs]
        plan = build_cascade_plan(
            [s.block_table for s in seqs],
            lens,
            self.block_size,
            self.kv.device,
            shared_lens=shared,
            share_ids=[s.request_id for s in seqs],
        )
        self._attach_buffers(plan, seqs, lens, decode_only)
        return plan

    def _attach_buffers(self, plan: CascadePlan, seqs: list[Sequence], lens: list[int], decode_only: bool):
        """Give the plan the per-layer CascadeBuffers. When the previous step decoded the same
        sequences with the same group prefixes, the prefixes are reused; when, in addition, each
        row is one token longer and its own blocks were only extended (no copy-on-write, no
        preemption in between), each layer copies B new tokens instead of re-gathering every row's
        history from the paged cache, and in a decode-only step those tokens skip the paged cache
        (write-back: see flush). When rows left or joined (EOS, continuous batching), the rows that
        continue as above keep their own K/V (moved to their new buffer rows) and only the others are
        gathered from the paged cache; otherwise a batch that changes at every EOS would re-gather
        every row every step."""
        B, O = plan.own_blocks.shape
        m, bs = self.mcfg, self.block_size
        key = [s.seq_id for s in seqs]
        prev, bufs = self._prev, self._buffers
        same_rows, was_row = False, None  # per row: its buffer row in the previous step (-1: none)
        if prev is not None:
            prev_key, prev_lens, was = prev
            same_rows = (
                prev_key == key
                and torch.equal(was.prefix_blocks, plan.prefix_blocks)
                and torch.equal(was.slot_of_row, plan.slot_of_row)
                and was.own_offsets == plan.own_offsets
            )
            if prev_key == key:  # the steady case: every row where it was
                was_row = list(range(B))
            else:
                where = dict(zip(prev_key, range(len(prev_key))))
                was_row = [where.get(sid, -1) for sid in key]
            for b, i in enumerate(was_row):  # a row continues: one token longer, its own blocks only extended
                if i >= 0 and not (
                    lens[b] == prev_lens[i] + 1
                    and plan.own_offsets[b] == was.own_offsets[i]
                    and plan.own_tables[b][: len(was.own_tables[i])] == was.own_tables[i]
                ):
                    was_row[b] = -1
        extends = same_rows and -1 not in was_row
        fits = bufs is not None and bufs[0].own_k.shape[0] >= B and bufs[0].own_k.shape[1] >= O * bs
        # (a row with no own keys would have its newest token in a shared block: never written back)
        plan.write_back = extends and fits and decode_only and not plan.own_empty
        if not plan.write_back:
            self.flush()  # before the buffers or their bookkeeping change
        if fits and not extends and was_row and max(was_row) >= 0:
            # Rows left or joined (continuous batching): the continuing rows' own K/V move to their new
            # buffer rows, only the others are gathered from the paged cache.
            self._move_rows(was_row, max(was.own_lens))
            fresh = [b for b, i in enumerate(was_row) if i < 0]
            plan.fresh_rows = long_tensor(fresh, self.kv.device) if fresh else None
            extends = True
        self._prev = (key, lens, plan)
        if not fits:
            rows = max(B, bufs[0].own_k.shape[0] if bufs else 0)
            shape = (rows, (O + 8) * bs, m.num_kv_heads, m.head_dim)  # headroom: regrow every 8 blocks
            if 2 * m.num_layers * rows * shape[1] * shape[2] * shape[3] * self.kv.element_size() > self.kv.nbytes:
                self._buffers = self._prev = None  # never more memory than the KV cache itself
                return
            self._buffers = bufs = [
                CascadeBuffers(
                    torch.zeros(shape, dtype=self.kv.dtype, device=self.kv.device),
                    torch.zeros(shape, dtype=self.kv.dtype, device=self.kv.device),
                )
                for _ in range(m.num_layers)
            ]
            same_rows = extends = False
        plan.buffers = bufs
        plan.prefix_fresh = not same_rows
        plan.own_fresh = not extends
        self._dirty += plan.write_back

    def _move_rows(self, rows: list[int], own_len: int):
        """Every layer's buffers: row b takes the first `own_len` own K/V of previous row rows[b] (>= 0)."""
        moves = [(b, i) for b, i in enumerate(rows) if i >= 0 and i != b]
        if not moves or not own_len:
            return
        dst, src = (
            long_tensor([b for b, _ in moves], self.kv.device),
            long_tensor([i for _, i in moves], self.kv.device),
        )
        for bufs in self._buffers:
            for t in (bufs.own_k, bufs.own_v):
                part = t[:, :own_len]
                part.index_copy_(0, dst, part.index_select(0, src))

    def flush(self):
        """Write back into the paged cache the K/V that write-back steps left only in the buffers:
        each row's last `self._dirty` own tokens (see the module docstring for when to call it)."""
        if not self._dirty:
            return
        plan = self._prev[2]
        own_tables, own_lens, offsets = plan.own_tables, plan.own_lens, plan.own_offsets
        bs, n, cap = self.block_size, self._dirty, self._buffers[0].own_k.shape[1]
        slots, src = [], []
        for b, (table, own, off) in enumerate(zip(own_tables, own_lens, offsets)):
            for j in range(own - n, own):
                slots.append(table[(off + j) // bs] * bs + (off + j) % bs)
                src.append(b * cap + j)
        device = self.kv.device
        slots, src = long_tensor(slots, device), long_tensor(src, device)
        shape = (-1, self.mcfg.num_kv_heads, self.mcfg.head_dim)
        with torch.inference_mode():
            for (kc, vc), bufs in zip(self.kv_caches, self._buffers):
                kc.view(shape).index_copy_(0, slots, bufs.own_k.view(shape).index_select(0, src))
                vc.view(shape).index_copy_(0, slots, bufs.own_v.view(shape).index_select(0, src))
        self._dirty = 0

    def reset(self):
        """Forget the kept buffers' contents and the packed weights (new weights, or a changed cache)."""
        self.flush()
        self._prev = None
        self._packed_rows = None  # the model dropped its packed copies when its weights were loaded

    def release(self):
        """Drop everything kept (buffers, previous plan, packed weight copies) without writing back: the
        paged cache is being discarded (sleep)."""
        self._buffers = self._prev = None
        self._dirty = 0
        self._rows_seen, self._rows_streak, self._packed_rows = 0, 0, None
        unpack_linears(self.model)

    def maybe_pack(self, batch: Batch):
        """Pack the linear weights for the decode batch size once it has held for 3 steps: packing
        costs about one pass over the weights, repaid after a step or two at that size. (oneDNN's
        reordered copy serves every row count: it is made once, until the weights change.)"""
        budget = self.ecfg.cpu_packed_weights_bytes
        if self.gemm not in ("mkl", "onednn") or not budget:
            return
        rows = len(batch.seqs) if batch.num_decode == len(batch.seqs) else 0
        self._rows_streak = self._rows_streak + 1 if rows == self._rows_seen else 0
        self._rows_seen = rows
        repack = self._packed_rows is None if self.gemm == "onednn" else rows != self._packed_rows
        if rows and self._rows_streak == 2 and repack:
            pack_linears(self.model, rows, budget)
            self._packed_rows = rows
