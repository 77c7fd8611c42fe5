"""Owns the model and its paged KV cache; turns a scheduled batch into hidden states and logits.

Two paths, picked per step by kernels.dispatch.use_triton (CUDA, or BSTAR_KERNELS):
- the torch path (CPU by default): per-step tensors from host lists; its decode state across steps
  (cascade buffers, write-back, weight packing) lives in `engine.cpu_decode.CpuDecodeState`, which
  this runner asks for the decode rows' plan and flushes before anything else touches the cache;
- the Triton (GPU) path: persistent step inputs filled without host syncs and device block tables
  (engine/step_inputs.py), decode CUDA graphs per batch-size bucket (engine/cuda_graphs.py; on CPU
  the same padded buckets run eagerly), every kernel variant compiled and tuned at start-up.

A decode step on CUDA: scheduler batch -> StepInputs.prepare (flat host lists -> two pinned
staging tensors -> two non-blocking copies -> persistent buffers; changed block-table entries
written, tables gathered into batch order) -> graph replay of the batch's bucket (or the eager
forward) -> logits of the sampled rows -> the sampler (engine/sampler.py), whose tokens.tolist()
is the step's one synchronisation.
"""

import torch

from engine.config import EngineConfig, ModelConfig
from engine.cpu_decode import CpuDecodeState
from engine.cuda_graphs import DecodeGraphs, bucket_sizes, warm_up_kernels
from engine.model import AttnMetadata, CausalLM
from engine.scheduler import Batch
from engine.step_inputs import StepInputs
from kernels.dispatch import use_triton
from kernels.host import long_tensor, to_device


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
        self.max_model_len = max_model_len
        self.inputs: StepInputs | None = None  # the Triton path's persistent step inputs
        self.graphs: DecodeGraphs | None = None  # its decode graphs (None: enforce_eager, or no LM head)
        if use_triton(self.kv):
            self.init_gpu_path()

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

    # -- the Triton (GPU) path: buffers, warm-up, graphs --------------------------------------
    def init_gpu_path(self):
        """Persistent step inputs, every kernel variant compiled (and autotuned on a GPU), then the
        decode graphs captured (CUDA; on CPU the padded buckets run eagerly) unless enforce_eager."""
        e = self.ecfg
        sizes = bucket_sizes(e.max_num_seqs)
        width = -(-self.max_model_len // self.block_size)
        self.inputs = StepInputs(
            max(e.max_num_batched_tokens, sizes[-1]), sizes[-1], width, self.block_size, self.device
        )
        warm_up_kernels(self, sample_rows=e.max_num_seqs)
        if not e.enforce_eager and self.mcfg.head == "lm":
            self.graphs = DecodeGraphs(self, sizes, use_cuda_graphs=self.device.type == "cuda")
            self.graphs.capture()

    def drop_graphs(self):
        """Call before the weights or the KV cache are freed or moved (sleep): the captured graphs hold
        their addresses. Idempotent."""
        if self.graphs is not None:
            self.graphs.drop()

    def recapture(self):
        """Call after the weights or the KV cache were allocated again (wake_up), once self.kv_caches
        and the model's parameters are the new tensors: captures the decode graphs again when an address
        they read changed (or they were dropped); a no-op otherwise, so it is safe to call any time."""
        if self.graphs is not None:
            self.graphs.capture()

    def _gpu_path(self) -> bool:
        if not use_triton(self.kv):
            return False
        if self.inputs is None:  # BSTAR_KERNELS switched to triton after start-up
            self.init_gpu_path()
        return True

    @torch.inference_mode()
    def copy_blocks(self, copies: list[tuple[int, int]]):
        if copies:
            self.cpu_decode.flush()  # a copied block may hold K/V that is still only in the decode buffers
            idx = to_device([s for s, _ in copies] + [d for _, d in copies], torch.int64, self.device)
            src, dst = idx[: len(copies)], idx[len(copies) :]
            self.kv[:, :, dst] = self.kv[:, :, src]

    def prepare(self, batch: Batch):
        """The torch path's step tensors (per-step tensors from host lists; cascade plan for decodes)."""
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
            max_seqlen_q=max(batch.num_new[nd:], default=1),
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
        if self._gpu_path():
            self.cpu_decode.flush()  # (only ever dirty if BSTAR_KERNELS switched mid-run)
            ids, pos, meta, _ = self.inputs.prepare(batch)
            last, rows = -1, []
            for n in batch.num_new:
                last += n
                rows.append(last)
            return self.model(ids, pos, self.cos_sin, self.kv_caches, meta), rows
        ids, pos, meta, last_rows = self.prepare(batch)
        self.cpu_decode.maybe_pack(batch)
        return self.model(ids, pos, self.cos_sin, self.kv_caches, meta), last_rows

    @torch.inference_mode()
    def run(self, batch: Batch) -> torch.Tensor:
        """Logits [len(batch.sampled), vocab] (float32) at the last token of the sequences batch.sampled picks."""
        if not self._gpu_path():
            h, last_rows = self.hidden_states(batch)
            rows = batch.sampled
            if not rows:
                return torch.empty(0, self.mcfg.vocab_size, device=self.device)
            idx = torch.tensor([last_rows[r] for r in rows], device=self.device)
            return self.model.compute_logits(h[idx]).float()
        self.copy_blocks(batch.copies)
        self.cpu_decode.flush()
        B = len(batch.seqs)
        bs = self.graphs.bucket(B) if self.graphs is not None and batch.num_decode == B else None
        if bs is not None:
            _, _, _, sample = self.inputs.prepare(batch, pad_to=bs)
            h = self.graphs.replay(bs)
        else:
            ids, pos, meta, sample = self.inputs.prepare(batch)
            self.cpu_decode.maybe_pack(batch)
            h = self.model(ids, pos, self.cos_sin, self.kv_caches, meta)
        if not batch.sampled:
            return torch.empty(0, self.mcfg.vocab_size, device=self.device)
        h = h[sample] if sample is not None else h[: len(batch.sampled)]
        return self.model.compute_logits(h).float()
