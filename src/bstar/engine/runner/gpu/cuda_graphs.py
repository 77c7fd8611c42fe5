"""Decode CUDA graphs per batch-size bucket, and the kernel warm-up that must come before them.

A decode step of a 28-layer model is ~330 kernel launches, each with Python and Triton launch
overhead; replaying a captured graph issues them all at once. As nano-vllm and vLLM do:

- buckets 1, 2, 4, 8, 16, then steps of 16 up to max_num_seqs; a decode-only batch of B rows runs
  the graph of the smallest bucket >= B, its rows past B padded (bstar/engine/runner/gpu/step_inputs.py: they write
  no cache slot and read no key). Prefill and mixed steps, and batches past the largest bucket,
  run eagerly;
- every graph reads slices [:bucket] of the same persistent buffers (bstar/engine/runner/gpu/step_inputs.py) and
  writes its hidden states into `hidden[:bucket]`; logits and sampling stay outside the graph;
- capture largest bucket first, each after an eager warm-up run at its size, into one memory pool
  shared by all graphs (they never run concurrently, so their intermediates may share memory);
- warm up and capture on a stream of this DecodeGraphs' own: cuBLAS keys its workspace by the capture
  stream, so graphs of two engines captured on one shared stream replay into one workspace, which
  dropping either engine's graphs can free under the other's (pytorch#193402);
- graphs hold raw addresses of the weights, the KV cache and the buffers: `GpuRunner.drop_graphs`
  before those are freed, `GpuRunner.recapture` after they are allocated again (a no-op when
  no address changed).

Without CUDA (BSTAR_KERNELS=triton on CPU, the CI path) nothing is captured and a "replay" calls
the same forward on the same padded buffers, so every piece of bookkeeping above runs in CI.
"""

import bisect
import math
from collections import Counter

import torch

from bstar import kernels


def pool_reserved_bytes(pool, device: torch.device) -> int:
    """The device memory a private memory pool holds: its segments in the allocator's snapshot (read per
    pool, so other threads' allocations meanwhile, a trainer's beside an AsyncLLM engine, do not count)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return sum(
        s["total_size"]
        for s in torch.cuda.memory_snapshot()
        if s["device"] == index and tuple(s["segment_pool_id"]) == tuple(pool)
    )


def bucket_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, 16, then steps of 16, up to the first size >= max_num_seqs."""
    sizes = []
    for b in [1, 2, 4, 8, *range(16, max_num_seqs + 16, 16)]:
        sizes.append(b)
        if b >= max_num_seqs:
            break
    return sizes


class DecodeGraphs:
    """The decode graphs of one GpuRunner (whose `inputs`, `model`, `kv_caches` and `cos_sin`
    they run on), or their stand-in without CUDA."""

    def __init__(self, runner, sizes: list[int], use_cuda_graphs: bool):
        self.runner = runner
        self.sizes = sizes
        self.use_cuda_graphs = use_cuda_graphs
        m = runner.mcfg
        self.hidden = torch.zeros(sizes[-1], m.hidden_size, dtype=runner.dtype, device=runner.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None
        self._fingerprint: tuple | None = None
        self.replays: Counter = Counter()  # bucket -> replays (statistics, tests)
        self.captures = 0  # capture passes so far
        self.pool_bytes = 0  # CUDA: the device memory the graphs' pool holds after the last capture pass
        self.stream = None  # CUDA: this object's own capture stream, made at the first capture

    def bucket(self, n: int) -> int | None:
        """The smallest bucket >= n rows, or None past the largest."""
        i = bisect.bisect_left(self.sizes, n)
        return self.sizes[i] if i < len(self.sizes) else None

    def _forward(self, bs: int):
        r = self.runner
        ids, pos, meta = r.inputs.bucket_meta(bs)
        self.hidden[:bs] = r.model(ids, pos, r.cos_sin, r.kv_caches, meta)

    def replay(self, bs: int) -> torch.Tensor:
        """Run bucket `bs` on what the step inputs hold; its hidden states [bs, hidden] (valid until
        the next replay)."""
        g = self.graphs.get(bs)
        if g is not None:
            g.replay()
        else:  # not captured (no CUDA): the same forward, eagerly
            self._forward(bs)
        self.replays[bs] += 1
        return self.hidden[:bs]

    def fingerprint(self) -> tuple:
        """Addresses a graph has baked in: weights, buffers, the KV cache, the rope table."""
        r = self.runner
        ptrs = [t.data_ptr() for kv in r.kv_caches for t in kv]
        ptrs += [p.data_ptr() for p in r.model.parameters()]
        ptrs += [b.data_ptr() for b in r.model.buffers()]
        ptrs.append(r.cos_sin.data_ptr())
        return tuple(ptrs)

    @property
    def captured(self) -> bool:
        return bool(self.graphs)

    def drop(self):
        """Forget the graphs and their memory pool."""
        self.graphs.clear()
        self.pool = None
        self._fingerprint = None

    @torch.inference_mode()
    def capture(self, force: bool = False):
        """Capture every bucket (CUDA), unless the graphs in hand still match every address."""
        if not self.use_cuda_graphs:
            return
        if self.graphs and not force and self._fingerprint == self.fingerprint():
            return
        self.drop()
        dev = self.runner.device
        inputs = self.runner.inputs
        pool = torch.cuda.graph_pool_handle()
        if self.stream is None:
            self.stream = torch.cuda.Stream(device=dev)
        for bs in reversed(self.sizes):  # largest first: smaller graphs reuse its pool's blocks
            inputs.fill_padding(bs)
            self.stream.wait_stream(torch.cuda.current_stream(dev))  # (the padding, filled on the current one)
            with torch.cuda.stream(self.stream):
                self._forward(bs)  # warm-up at this size, eagerly, on the stream it is captured on
            torch.cuda.synchronize(dev)
            g = torch.cuda.CUDAGraph()
            # thread_local: CUDA work of other threads (a trainer beside an AsyncLLM engine thread, during
            # a wake_up recapture) cannot invalidate this capture; only this thread's unsafe calls could
            with torch.cuda.graph(g, pool=pool, stream=self.stream, capture_error_mode="thread_local"):
                self._forward(bs)
            self.graphs[bs] = g
        torch.cuda.synchronize(dev)
        self.pool_bytes = pool_reserved_bytes(pool, dev)
        self.pool = pool
        self._fingerprint = self.fingerprint()
        self.captures += 1


@torch.inference_mode()
def warm_up_kernels(runner, sample_rows: int = 256):
    """Compile every Triton variant a step will launch, and autotune on realistic data (a GPU),
    before any graph is captured and before the first step: decode attention with one and with
    several splits (the merge kernel), prefill attention, both sampling kernels (split-vocabulary
    for small batches, one program per row for large ones), and one padded decode forward (norms,
    rotary, KV store). The cache's first blocks are filled with random values for the timings and
    zeroed again. Under the interpreter the shapes are tiny (nothing is timed there)."""
    from bstar.kernels.decode_attention_triton import paged_decode_attention_triton  # triton: the GPU path only
    from bstar.kernels.prefill_attention_triton import paged_prefill_attention_triton

    m, dev, dtype = runner.mcfg, runner.device, runner.dtype
    inputs = runner.inputs
    cuda = dev.type == "cuda"
    k_cache, v_cache = runner.kv_caches[0]
    num_blocks, page = k_cache.shape[0], k_cache.shape[1]
    Hq, D, W = m.num_heads, m.head_dim, inputs.width
    ctx = min(1024 if cuda else 24, W * page)
    B = 64 if cuda else 2
    per_seq = math.ceil(ctx / page)
    used = min(num_blocks, B * per_seq)
    g = torch.Generator(device=dev).manual_seed(0)
    k_cache[:used].normal_(generator=g)
    v_cache[:used].normal_(generator=g)
    tables = torch.zeros(B, W, dtype=torch.int32, device=dev)
    tables[:, :per_seq] = (torch.arange(B * per_seq, device=dev) % num_blocks).view(B, per_seq).int()
    lens = torch.full((B,), ctx, dtype=torch.int32, device=dev)
    q = torch.randn(B, Hq, D, generator=g, device=dev).to(dtype)
    scale = D**-0.5
    paged_decode_attention_triton(q, k_cache, v_cache, tables, lens, scale, max_context=ctx)  # autotunes (GPU)
    paged_decode_attention_triton(q[:1], k_cache, v_cache, tables[:1], lens[:1], scale, num_splits=2)
    n_new, nb = min(ctx, 512 if cuda else 8), 4 if cuda else 1
    qp = torch.randn(nb * n_new, Hq, D, generator=g, device=dev).to(dtype)
    cu = torch.arange(0, nb * n_new + 1, n_new, dtype=torch.int32, device=dev)
    paged_prefill_attention_triton(qp, k_cache, v_cache, tables[:nb], cu, lens[:nb], scale, max_seqlen_q=n_new)
    k_cache[:used].zero_()
    v_cache[:used].zero_()
    if m.head == "lm":
        from bstar.kernels.sampling_triton import SPLIT_VOCAB_MAX_ROWS

        for rows in (1, max(SPLIT_VOCAB_MAX_ROWS + 1, min(sample_rows, 2 * SPLIT_VOCAB_MAX_ROWS))):
            logits = torch.randn(rows, m.vocab_size, generator=g, device=dev)
            ones = torch.ones(rows, device=dev)
            kernels.sample(
                logits,
                ones,
                torch.zeros(rows, dtype=torch.int32, device=dev),
                ones,
                torch.zeros(rows, device=dev),
                torch.arange(rows, device=dev),
                triton=True,
            )
    inputs.fill_padding(1)
    ids, pos, meta = inputs.bucket_meta(1)
    runner.model(ids, pos, runner.cos_sin, runner.kv_caches, meta)
    if cuda:
        torch.cuda.synchronize(dev)


__all__ = ["DecodeGraphs", "bucket_sizes", "warm_up_kernels"]
