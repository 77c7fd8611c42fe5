"""Owns the model and its paged KV cache; turns a scheduled batch into hidden states and logits.

The torch decode path's state across steps (cascade buffers, write-back, weight packing) lives in
`engine.cpu_decode.CpuDecodeState`; this runner asks it for the decode rows' plan and flushes it
before anything else touches the cache.
"""

import torch

from engine.config import EngineConfig, ModelConfig
from engine.cpu_decode import CpuDecodeState
from engine.model import AttnMetadata, CausalLM
from engine.scheduler import Batch
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
        self.cpu_decode = CpuDecodeState(model, mcfg, ecfg, self.kv, self.kv_caches)

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
            self.cpu_decode.flush()  # a copied block may hold K/V that is still only in the decode buffers
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
            cascade=cascade,
        )
        return long_tensor(ids, dev), long_tensor(pos, dev), meta, last_rows

    def invalidate_buffers(self):
        """Forget the kept decode buffers and packed weights (new weights, or a changed cache)."""
        self.cpu_decode.reset()

    @torch.inference_mode()
    def hidden_states(self, batch: Batch):
        """Final hidden states [T, hidden] of every new token, and the row of each sequence's last token."""
        self.copy_blocks(batch.copies)
        ids, pos, meta, last_rows = self.prepare(batch)
        self.cpu_decode.maybe_pack(batch)
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

    @torch.inference_mode()
    def run_with_prompt_hidden(self, batch: Batch, prompt_rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """As `run`, plus the final hidden states [len(prompt_rows), hidden] of the token rows
        prompt_rows (rows in the order `prepare` packs the batch's new tokens): the engine turns them
        into prompt_logprobs in slices, so a long prompt never holds [tokens, vocab] logits at once."""
        h, last_rows = self.hidden_states(batch)
        rows = batch.sampled
        if rows:
            logits = self.model.compute_logits(h[torch.tensor([last_rows[r] for r in rows], device=self.device)])
            logits = logits.float()
        else:
            logits = torch.empty(0, self.mcfg.vocab_size, device=self.device)
        return logits, h[torch.tensor(prompt_rows, dtype=torch.long, device=self.device)]
