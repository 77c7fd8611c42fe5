"""Owns the model and its KV cache; turns a scheduled batch into logits."""

import torch

from engine.config import EngineConfig, ModelConfig
from engine.model import AttnMetadata, CausalLM
from engine.packed_linear import pack_linears
from engine.scheduler import Batch
from kernels.cascade_attention import CascadeBuffers, CascadePlan, build_cascade_plan
from kernels.dispatch import use_triton
from kernels.host import long_tensor


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        mcfg: ModelConfig,
        ecfg: EngineConfig,
        max_model_len: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.model, self.mcfg, self.ecfg = model, mcfg, ecfg
        self.device, self.dtype = device, dtype
        self.block_size = ecfg.block_size
        self.cos_sin = mcfg.rope_cos_sin(max_model_len, device)
        self.num_blocks = ecfg.num_kv_blocks or self._auto_num_blocks()
        # [layers, K/V, blocks, block_size, kv_heads, head_dim]: a layer's K (or V) is one contiguous view.
        # Zeroed, not empty: masked-out slots still meet a 0 weight, and 0 * NaN garbage would be NaN.
        self.kv = torch.zeros(
            mcfg.num_layers,
            2,
            self.num_blocks,
            self.block_size,
            mcfg.num_kv_heads,
            mcfg.head_dim,
            dtype=dtype,
            device=device,
        )
        self.kv_caches = [(self.kv[i, 0], self.kv[i, 1]) for i in range(mcfg.num_layers)]
        # Torch decode path: per layer, each decode row's own K/V kept contiguous across steps and the
        # gathered group prefixes, and the step they mirror (seq ids, lengths, plan); see _attach_buffers.
        self._buffers: list[CascadeBuffers] | None = None
        self._prev: tuple[list[int], list[int], CascadePlan] | None = None
        # Write-back: each row's last `_dirty` own tokens are in the buffers but not yet in the
        # paged cache; see flush.
        self._dirty = 0
        # CPU float32: weights packed for the decode batch size once it holds for a few steps.
        self._rows_seen, self._rows_streak, self._packed_rows = 0, 0, None

    def block_bytes(self) -> int:
        m = self.mcfg
        return 2 * m.num_layers * self.block_size * m.num_kv_heads * m.head_dim * torch.finfo(self.dtype).bits // 8

    def _auto_num_blocks(self) -> int:
        if self.device.type != "cuda":
            return max(1, self.ecfg.cpu_kv_cache_bytes // self.block_bytes())
        # Measure the activation peak of a full-budget prefill, then give the rest to the cache.
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        n = min(self.ecfg.max_num_batched_tokens, self.cos_sin.shape[0])
        nblk = -(-n // self.block_size)
        saved_kv = getattr(self, "kv_caches", None)
        kv = torch.empty(
            self.mcfg.num_layers,
            2,
            nblk,
            self.block_size,
            self.mcfg.num_kv_heads,
            self.mcfg.head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        self.kv_caches = [(kv[i, 0], kv[i, 1]) for i in range(self.mcfg.num_layers)]
        ids = torch.randint(0, self.mcfg.vocab_size, (n,), device=self.device)
        meta = AttnMetadata(
            slot_mapping=torch.arange(n, device=self.device),
            block_tables=torch.arange(nblk, dtype=torch.int32, device=self.device)[None],
            seq_lens=torch.tensor([n], dtype=torch.int32, device=self.device),
            num_decode=0,
            cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32, device=self.device),
        )
        with torch.inference_mode():
            h = self.model(ids, torch.arange(n, device=self.device), self.cos_sin, self.kv_caches, meta)
            self.model.compute_logits(h[-min(n, self.ecfg.max_num_seqs) :])
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        del kv, h
        self.kv_caches = saved_kv
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(self.device).total_memory
        free_for_kv = total * self.ecfg.gpu_memory_utilization - peak
        blocks = int(free_for_kv // self.block_bytes())
        if blocks < 1:
            raise RuntimeError(
                f"no GPU memory left for the KV cache (peak {peak / 2**30:.1f} GiB of "
                f"{total / 2**30:.1f} GiB at gpu_memory_utilization={self.ecfg.gpu_memory_utilization})"
            )
        return blocks

    @torch.inference_mode()
    def copy_blocks(self, copies: list[tuple[int, int]]):
        if copies:
            self.flush()
            src = torch.tensor([s for s, _ in copies], device=self.device)
            dst = torch.tensor([d for _, d in copies], device=self.device)
            self.kv[:, :, dst] = self.kv[:, :, src]

    def prepare(self, batch: Batch):
        bs = self.block_size
        nd = batch.num_decode
        # Decode rows (first, one token each), then prefill chunks.
        pos = [s.num_computed for s in batch.seqs[:nd]]
        ids = [s.token_ids[p] for s, p in zip(batch.seqs, pos)]
        slots = [s.block_table[p // bs] * bs + p % bs for s, p in zip(batch.seqs, pos)]
        lens = [p + 1 for p in pos]
        last_rows = list(range(nd))
        cu = [0]
        for seq, n in zip(batch.seqs[nd:], batch.num_new[nd:]):
            start, end = seq.num_computed, seq.num_computed + n
            ids += seq.token_ids[start:end]
            pos += range(start, end)
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            lens.append(end)
            last_rows.append(len(ids) - 1)
            cu.append(cu[-1] + n)
        dev = self.device
        cascade = None
        if nd and not use_triton(self.kv):  # the torch path reads shared prefixes once per group
            seqs = batch.seqs[:nd]
            # Sibling candidates hold bit-identical prompt K/V (the partial last block is copied on
            # write); a preempted one recomputed its own, so it shares nothing beyond whole blocks.
            shared = [s.prompt_len if s.params.n > 1 and not s.num_preemptions else 0 for s in seqs]
            cascade = build_cascade_plan(
                [s.block_table for s in seqs],
                lens[:nd],
                bs,
                dev,
                shared_lens=shared,
                share_ids=[s.request_id for s in seqs],
            )
            self._attach_buffers(cascade, batch.seqs[:nd], lens[:nd], decode_only=nd == len(batch.seqs))
        else:
            self.flush()
        # Block tables for the kernels that read them (the cascade path has its own plan for decodes).
        need = batch.seqs if cascade is None else batch.seqs[nd:]
        width = max((len(s.block_table) for s in need), default=0)
        tables = [s.block_table + [0] * (width - len(s.block_table)) for s in need]
        if cascade is not None:
            tables = [[0] * width] * nd + tables  # decode rows' entries are never read
        meta = AttnMetadata(
            slot_mapping=long_tensor(slots, dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev).view(len(batch.seqs), width),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
            num_decode=batch.num_decode,
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
            cascade=cascade,
        )
        return long_tensor(ids, dev), long_tensor(pos, dev), meta, last_rows

    def invalidate_buffers(self):
        """Forget the kept decode buffers and packed weights (new weights, or a changed cache)."""
        self.flush()
        self._prev = None
        self._packed_rows = None  # the model dropped its packed copies when its weights were loaded

    def _maybe_pack(self, batch: Batch):
        """Pack the linear weights for the decode batch size once it has held for 3 steps: packing
        costs about one pass over the weights, repaid after a step or two at that size."""
        budget = self.ecfg.cpu_packed_weights_bytes
        if self.device.type != "cpu" or self.dtype != torch.float32 or not budget:
            return
        rows = len(batch.seqs) if batch.num_decode == len(batch.seqs) else 0
        self._rows_streak = self._rows_streak + 1 if rows == self._rows_seen else 0
        self._rows_seen = rows
        if rows and self._rows_streak == 2 and rows != self._packed_rows:
            pack_linears(self.model, rows, budget)
            self._packed_rows = rows

    def _attach_buffers(self, plan, seqs, lens, decode_only: bool):
        """Give the plan this runner's per-layer CascadeBuffers. When the previous step decoded the
        same sequences with the same group prefixes, the prefixes are reused; when, in addition,
        each row is one token longer and its own blocks were only extended (no copy-on-write, no
        preemption in between), each layer copies B new tokens instead of re-gathering every row's
        history from the paged cache, and in a decode-only step those tokens skip the paged cache
        (write-back: see flush)."""
        B, O = plan.own_blocks.shape
        m, bs = self.mcfg, self.block_size
        key = [s.seq_id for s in seqs]
        prev, bufs = self._prev, self._buffers
        same_rows = False
        if prev is not None:
            prev_key, prev_lens, was = prev
            same_rows = (
                prev_key == key
                and torch.equal(was.prefix_blocks, plan.prefix_blocks)
                and torch.equal(was.slot_of_row, plan.slot_of_row)
                and was.own_offsets == plan.own_offsets
            )
        extends = same_rows and all(
            n == p + 1 and t[: len(pt)] == pt for n, p, t, pt in zip(lens, prev_lens, plan.own_tables, was.own_tables)
        )
        fits = bufs is not None and bufs[0].own_k.shape[0] >= B and bufs[0].own_k.shape[1] >= O * bs
        # (a row with no own keys would have its newest token in a shared block: never written back)
        plan.write_back = extends and fits and decode_only and plan.own_empty is None
        if not plan.write_back:
            self.flush()  # before the buffers or their bookkeeping change
        self._prev = (key, lens, plan)
        if not fits:
            rows = max(B, bufs[0].own_k.shape[0] if bufs else 0)
            shape = (rows, (O + 8) * bs, m.num_kv_heads, m.head_dim)  # headroom: regrow every 8 blocks
            if 2 * m.num_layers * rows * shape[1] * shape[2] * shape[3] * self.kv.element_size() > self.kv.nbytes:
                self._buffers = self._prev = None  # never more memory than the KV cache itself
                return
            self._buffers = bufs = [
                CascadeBuffers(
                    torch.zeros(shape, dtype=self.dtype, device=self.device),
                    torch.zeros(shape, dtype=self.dtype, device=self.device),
                )
                for _ in range(m.num_layers)
            ]
            same_rows = extends = False
        plan.buffers = bufs
        plan.prefix_fresh = not same_rows
        plan.own_fresh = not extends
        self._dirty += plan.write_back

    def flush(self):
        """Write back into the paged cache the K/V that write-back steps left only in the buffers:
        each row's last `self._dirty` own tokens.

        Every forward and block copy runs after this (prepare and copy_blocks call it unless the
        step continues the write-back), so nothing reads those slots before they are written; a
        slot whose sequence was freed meanwhile is at worst rewritten before its new owner writes it."""
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
        slots, src = long_tensor(slots, self.device), long_tensor(src, self.device)
        shape = (-1, self.mcfg.num_kv_heads, self.mcfg.head_dim)
        with torch.inference_mode():
            for (kc, vc), bufs in zip(self.kv_caches, self._buffers):
                kc.view(shape).index_copy_(0, slots, bufs.own_k.view(shape).index_select(0, src))
                vc.view(shape).index_copy_(0, slots, bufs.own_v.view(shape).index_select(0, src))
        self._dirty = 0

    @torch.inference_mode()
    def hidden_states(self, batch: Batch):
        """Final hidden states [T, hidden] of every new token, and the row of each sequence's last token."""
        self.copy_blocks(batch.copies)
        ids, pos, meta, last_rows = self.prepare(batch)
        self._maybe_pack(batch)
        return self.model(ids, pos, self.cos_sin, self.kv_caches, meta), last_rows

    @torch.inference_mode()
    def run(self, batch: Batch) -> torch.Tensor:
        """Logits [len(batch.sampled), vocab] (float32) at the last token of the sequences batch.sampled picks."""
        h, last_rows = self.hidden_states(batch)
        rows = batch.sampled
        if not rows:
            return torch.empty(0, self.mcfg.vocab_size, device=self.device)
        idx = torch.tensor([last_rows[r] for r in rows], device=self.device)
        return self.model.compute_logits(h[idx]).float()
