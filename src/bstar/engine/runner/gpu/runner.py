"""The GPU runner (Triton kernels): persistent step inputs filled without host syncs and device block
tables (step_inputs.py), decode CUDA graphs per batch-size bucket (cuda_graphs.py), every kernel variant
compiled (and autotuned on a GPU) at start-up. On CPU tensors (TRITON_INTERPRET=1, how CI tests this
path) the same padded buckets run eagerly.

A decode step on CUDA: scheduler batch -> StepInputs.prepare (flat host lists -> one packed pinned
staging buffer -> one non-blocking copy -> persistent buffers; changed block-table entries written,
tables gathered into batch order) -> graph replay of the batch's bucket (or the eager forward) ->
logits of the sampled rows -> the sampler (runner/sampler.py), whose tokens.tolist() is the step's one
synchronisation.
"""

import warnings

import torch

from bstar.engine.core.scheduler import Batch
from bstar.engine.runner.gpu.cuda_graphs import DecodeGraphs, bucket_sizes, warm_up_kernels
from bstar.engine.runner.gpu.step_inputs import StepInputs
from bstar.engine.runner.model_runner import ModelRunner


class GpuRunner(ModelRunner):
    triton = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        e = self.ecfg
        sizes = bucket_sizes(e.max_num_seqs)
        width = -(-self.max_model_len // self.block_size)
        self.graphs: DecodeGraphs | None = None  # None: enforce_eager, or no LM head
        with self.guard():
            self.inputs = StepInputs(
                max(e.max_num_batched_tokens, sizes[-1]), sizes[-1], width, self.block_size, self.device
            )
            warm_up_kernels(self, sample_rows=e.max_num_seqs)
            if self._captures_graphs():
                self.graphs = DecodeGraphs(self, sizes, use_cuda_graphs=self.device.type == "cuda")
                self._capture()

    # -- graphs: dropped while their addresses are gone, captured again after ----------------------
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
            self._capture()

    def _capture(self):
        """Capture the decode graphs (unless those in hand still match every address); warn when their pool
        came out bigger than what was set aside for it when the KV cache was sized."""
        before = self.graphs.captures
        self.graphs.capture()
        over = self.graphs.pool_bytes - self.graph_pool_budget
        if self.graphs.captures > before and self.graph_pool_budget and over > 0:
            warnings.warn(
                f"the decode graphs' memory pool holds {self.graphs.pool_bytes / 2**20:.0f} MiB, {over / 2**20:.0f} "
                f"MiB more than was set aside for it: this engine uses that much more than gpu_memory_utilization "
                f"allows (set kv_cache_memory_bytes lower, or enforce_eager=True; PYTORCH_CUDA_ALLOC_CONF settings "
                f"such as expandable_segments or max_split_size_mb change how the pool rounds its blocks)",
                stacklevel=2,
            )

    def invalidate_buffers(self):
        """The decode graphs are captured again if an address they read changed (not while asleep: wake_up
        does it)."""
        if not self.asleep:
            self.recapture()

    def before_sleep(self):
        self.drop_graphs()

    def after_wake_up(self):
        self.recapture()

    # -- steps ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def hidden_states(self, batch: Batch):
        self.copy_blocks(batch.copies)
        ids, pos, meta, _ = self.inputs.prepare(batch)
        last, rows = -1, []
        for n in batch.num_new:
            last += n
            rows.append(last)
        return self.model(ids, pos, self.cos_sin, self.kv_caches, meta), rows

    @torch.inference_mode()
    def run(self, batch: Batch) -> torch.Tensor:
        self.copy_blocks(batch.copies)
        B = len(batch.seqs)
        bs = self.graphs.bucket(B) if self.graphs is not None and batch.num_decode == B else None
        if bs is not None:
            _, _, _, sample = self.inputs.prepare(batch, pad_to=bs)
            h = self.graphs.replay(bs)
        else:
            ids, pos, meta, sample = self.inputs.prepare(batch)
            h = self.model(ids, pos, self.cos_sin, self.kv_caches, meta)
        if not batch.sampled:
            return self.no_logits()
        h = h[sample] if sample is not None else h[: len(batch.sampled)]
        return self.model.compute_logits(h).float()
