"""The CPU runner (torch references): per-step tensors from host lists, and the decode state it keeps
across steps (decode_state.py: cascade buffers, write-back, weight packing).

Write-back means the paged cache may lack the newest decode tokens' K/V for a while; this runner is the
only code that knows, so it flushes before anything reads or copies the cache: a forward that does not
continue the write-back (`prepare`), a block copy (`copy_blocks`), a read from outside (`read_kv`), new
weights (`invalidate_buffers`). The engine never flushes.
"""

import torch

from bstar.engine.core.scheduler import Batch
from bstar.engine.model.decoder import AttnMetadata
from bstar.engine.runner.cpu.decode_state import CpuDecodeState
from bstar.engine.runner.model_runner import ModelRunner
from bstar.kernels.host import long_tensor


class CpuRunner(ModelRunner):
    triton = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cpu_decode = CpuDecodeState(self.model, self.mcfg, self.ecfg, self.kv, self.kv_caches)

    def copy_blocks(self, copies: list[tuple[int, int]]):
        if copies:
            self.cpu_decode.flush()  # a copied block may hold K/V that is still only in the decode buffers
        super().copy_blocks(copies)

    def read_kv(self) -> torch.Tensor:
        self.cpu_decode.flush()
        return self.kv

    def invalidate_buffers(self):
        """Forget the kept decode buffers and packed weights (new weights, or a changed cache)."""
        self.cpu_decode.reset()

    def release_decode_state(self):
        self.cpu_decode.release()

    def prepare(self, batch: Batch):
        """The step's tensors (per-step tensors from host lists; cascade plan for decodes)."""
        nd = batch.num_decode
        ids, pos, slots, lens, last_rows, cu = batch.flat_tokens(self.block_size)
        dev = self.device
        cascade = None
        if nd:  # decode rows read shared prefixes once per group
            cascade = self.cpu_decode.plan(batch.seqs[:nd], lens[:nd], decode_only=nd == len(batch.seqs))
        else:
            self.cpu_decode.flush()  # this forward reads and writes the paged cache itself
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
            max_seqlen_q=max(batch.num_new[nd:], default=1),
            cascade=cascade,
        )
        ids_t = long_tensor(ids, dev)
        if batch.feed_rows:  # inputs drawn by the step in flight (async scheduling)
            ids_t[long_tensor(batch.feed_rows, dev)] = batch.feed_tokens[long_tensor(batch.feed_src, dev)]
        return ids_t, long_tensor(pos, dev), meta, last_rows

    @torch.inference_mode()
    def hidden_states(self, batch: Batch):
        self.copy_blocks(batch.copies)
        ids, pos, meta, last_rows = self.prepare(batch)
        self.cpu_decode.maybe_pack(batch)
        return self.model(ids, pos, self.cos_sin, self.kv_caches, meta), last_rows

    @torch.inference_mode()
    def run(self, batch: Batch) -> torch.Tensor:
        h, last_rows = self.hidden_states(batch)
        if not batch.sampled:
            return self.no_logits()
        idx = torch.tensor([last_rows[r] for r in batch.sampled], device=self.device)
        return self.model.compute_logits(h[idx]).float()
