"""The runner interface: owns the model and its paged KV cache; turns a scheduled batch into hidden
states and logits. One of two runners serves an engine, chosen once when it is built
(`bstar.engine.runner.runners.build_runner`: EngineConfig.kernels, else BSTAR_KERNELS, else the device):

- `CpuRunner` (runner/cpu/runner.py; CPU by default): torch references, per-step tensors from host
  lists, and the decode state kept across steps (cascade buffers, write-back, weight packing:
  runner/cpu/decode_state.py), which it alone flushes before the paged cache is read or copied;
- `GpuRunner` (runner/gpu/runner.py; CUDA by default): Triton kernels, persistent step inputs filled
  without host syncs and device block tables (gpu/step_inputs.py), decode CUDA graphs per batch-size
  bucket (gpu/cuda_graphs.py; on CPU under the interpreter the same padded buckets run eagerly), every
  kernel variant compiled and tuned at start-up.

Both share what this base class holds: the KV layout ([layers, K/V, blocks, block_size, kv_heads,
head_dim]) and its sizing, block copies, sleep / wake, and the head on hidden rows. The model's attention
runs on the runner's backend (`CausalLM.set_backend`), as does every kernel call the engine makes.

KV sizing (`_auto_num_blocks`): `num_kv_blocks` when given; else `kv_cache_memory_bytes`, or on CUDA
`gpu_memory_utilization` x the device's memory minus this engine's own weights, measured activation
peak and decode graphs' pool (estimated before capture, measured after), or on CPU `cpu_kv_cache_bytes`;
never more than the engine can use (bstar.engine.runner.memory_plan).

Sleep / wake (`sleep`, `wake_up`): the weights' and the KV cache's storages are resized to nothing and
back, so every tensor object and view (tied weights, per-layer K/V views) stays valid and needs no
rebuilding; only addresses change, so whatever holds them (the GPU runner's decode graphs, the CPU
runner's kept buffers) is dropped before (`before_sleep`) and made again after (`after_wake_up`).
"""

import contextlib

import torch

from bstar.engine.config import EngineConfig, ModelConfig
from bstar.engine.core.scheduler import Batch
from bstar.engine.entrypoints.sampling_params import SamplingParams
from bstar.engine.model.attention_backend import attention_backend
from bstar.engine.model.decoder import AttnMetadata, CausalLM
from bstar.engine.runner.memory_plan import (
    SLEEP_TAGS,
    activation_peak_bytes,
    decode_graph_pool_bytes,
    engine_kv_blocks,
    kv_cap_blocks,
    unique_storage_bytes,
)
from bstar.engine.runner.sampler import sample_rows
from bstar.kernels.host import HostBuffer, index_pairs, to_device_segments


def device_guard(device: torch.device):
    """The current-device guard for `device`: Triton launches kernels on the current CUDA device, not on
    their tensors', so every model forward, sampling and head call of an engine on cuda:N runs inside it.
    A no-op context elsewhere."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


SLEEP_ALIGN = 512  # bytes: each storage's copy in the sleep buffer starts at a multiple (as CUDA allocations do)


def _as_bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    """A uint8 tensor over a whole storage (to copy it whatever its tensors' dtypes)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


class ModelRunner:
    """What the engine asks of a runner (the CPU and the GPU runner subclass it): `hidden_states`, `run`
    and `run_with_prompt_hidden` turn a batch into hidden states / logits; `kv`, `kv_caches`, `num_blocks`
    and `read_kv` give the paged cache; `sleep` / `wake_up` free and restore the device memory."""

    triton: bool  # the kernel backend of every call this engine makes (kernels.dispatch)

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
        model.set_backend(attention_backend(self.triton))  # before the profiling forward that sizes the cache
        self.device, self.dtype = device, dtype
        self.block_size = ecfg.block_size
        self.max_model_len = max_model_len
        self.cos_sin = mcfg.rope_cos_sin(max_model_len, device)
        self.asleep: set[str] = set()  # of SLEEP_TAGS
        self._slept_weights: list[tuple[torch.UntypedStorage, int, torch.Tensor | None]] | None = None
        self.sleep_buffer: HostBuffer | None = None  # level-1 sleep's weights, kept for the next sleep
        self.activation_bytes = 0  # CUDA: the measured activation peak of the biggest step
        self.graph_pool_budget = 0  # CUDA: the memory set aside for the decode graphs' pool (when sized here)
        with self.guard():
            self.num_blocks = ecfg.num_kv_blocks or self._auto_num_blocks()
            # [layers, K/V, blocks, block_size, kv_heads, head_dim]: a layer's K (or V) is one contiguous view.
            # Zeroed, not empty: masked-out slots still meet a 0 weight, and 0 * NaN garbage would be NaN.
            self.kv = self._new_kv(self.num_blocks)
        self.kv_caches = [(self.kv[i, 0], self.kv[i, 1]) for i in range(mcfg.num_layers)]

    def guard(self):
        return device_guard(self.device)

    def _new_kv(self, num_blocks: int) -> torch.Tensor:
        m = self.mcfg
        shape = (m.num_layers, 2, num_blocks, self.block_size, m.num_kv_heads, m.head_dim)
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def block_bytes(self) -> int:
        m = self.mcfg
        return 2 * m.num_layers * self.block_size * m.num_kv_heads * m.head_dim * torch.finfo(self.dtype).bits // 8

    def weight_tensors(self) -> list[torch.Tensor]:
        return [*self.model.parameters(), *self.model.buffers()]

    def _auto_num_blocks(self) -> int:
        e = self.ecfg
        cap = kv_cap_blocks(e.max_num_seqs, self.max_model_len, self.block_size, e.enable_prefix_caching)
        if self.device.type != "cuda":
            if e.kv_cache_memory_bytes is None:
                return min(cap, max(1, e.cpu_kv_cache_bytes // self.block_bytes()))
            return engine_kv_blocks(
                block_bytes=self.block_bytes(),
                cap_blocks=cap,
                kv_cache_memory_bytes=e.kv_cache_memory_bytes,
                device=str(self.device),
            )
        self.activation_bytes = activations = self._profile_activation_peak()
        if self._captures_graphs():
            # (estimated, not profiled: a decode forward now, before warm_up_kernels, would autotune the decode
            # kernel on an empty cache; DecodeGraphs.capture measures the real pool and _capture checks it)
            sms = torch.cuda.get_device_properties(self.device).multi_processor_count
            self.graph_pool_budget = decode_graph_pool_bytes(
                self.mcfg, self.dtype, e.max_num_seqs, self.max_model_len, sms=sms
            )
        free, total = torch.cuda.mem_get_info(self.device)
        return engine_kv_blocks(
            block_bytes=self.block_bytes(),
            cap_blocks=cap,
            kv_cache_memory_bytes=e.kv_cache_memory_bytes,
            total_bytes=total,
            gpu_memory_utilization=e.gpu_memory_utilization,
            weights_bytes=unique_storage_bytes(self.weight_tensors()),
            activation_bytes=activations,
            graph_pool_bytes=self.graph_pool_budget,
            free_bytes=free,
            device=str(self.device),
        )

    def _profile_activation_peak(self) -> int:
        """CUDA: how far this engine's biggest step raises the allocator's peak (other engines' memory,
        already allocated, does not count). Resets the device's peak-memory statistics. The step runs
        twice and its peak is read the second time: the first compiles and autotunes the prefill kernel,
        whose benchmark allocates Triton's 256 MB L2-flush buffer for a while (not an activation). What
        the first run left allocated for good (the stream's cuBLAS workspace, on a process's first GEMM)
        counts too."""
        n = min(self.ecfg.max_num_batched_tokens, self.max_model_len)
        kv = self._new_kv(-(-n // self.block_size))  # a step writes the real cache: its KV is not activations
        torch.cuda.synchronize(self.device)
        start = torch.cuda.memory_allocated(self.device)
        self.profile_step(n, kv)
        torch.cuda.synchronize(self.device)
        before = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.profile_step(n, kv)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        del kv
        torch.cuda.empty_cache()
        return activation_peak_bytes(before, peak) + max(0, before - start)

    def _captures_graphs(self) -> bool:
        """Decode graphs will be captured: an LM head on the Triton path, not enforce_eager."""
        return self.triton and not self.ecfg.enforce_eager and self.mcfg.head == "lm"

    @torch.inference_mode()
    def profile_step(self, n: int, kv: torch.Tensor) -> torch.Tensor:
        """The biggest step's work on any device: a prefill of n random tokens into `kv` (a cache of at least
        n tokens), the head on the rows a step reads (min(n, max_num_seqs)) and, for an LM head, sampling
        them with top-p (the sorting path). Works for every head kind; returns the head's output."""
        dev, blocks = self.device, kv.shape[2]
        kv_caches = [(kv[i, 0], kv[i, 1]) for i in range(self.mcfg.num_layers)]
        ids = torch.randint(0, self.mcfg.vocab_size, (n,), device=dev)
        meta = AttnMetadata(
            slot_mapping=torch.arange(n, device=dev),
            block_tables=torch.arange(blocks, dtype=torch.int32, device=dev)[None],
            seq_lens=torch.tensor([n], dtype=torch.int32, device=dev),
            num_decode=0,
            cu_seqlens_q=torch.tensor([0, n], dtype=torch.int32, device=dev),
        )
        h = self.model(ids, torch.arange(n, device=dev), self.cos_sin, kv_caches, meta)
        rows = min(n, self.ecfg.max_num_seqs)
        out = self.model.compute_logits(h[-rows:])
        if self.mcfg.head == "lm":
            out = out.float()
            sample_rows(out, [SamplingParams(top_p=0.95)] * rows, list(range(rows)), [[]] * rows, triton=self.triton)
        return out

    @torch.inference_mode()
    def copy_blocks(self, copies: list[tuple[int, int]]):
        """Copy whole blocks (src, dst) of every layer's K and V (copy-on-write)."""
        if copies:
            src, dst = index_pairs([s for s, _ in copies], [d for _, d in copies], self.device)
            self.kv[:, :, dst] = self.kv[:, :, src]

    def read_kv(self) -> torch.Tensor:
        """The paged cache with every token's K/V in it (the CPU runner writes back what it kept first)."""
        return self.kv

    def invalidate_buffers(self):
        """Call after the weights changed (load_weights): forget whatever was derived from them."""

    def release_decode_state(self):
        """Call when every sequence's K/V is discarded (all preempted): drop what was kept across steps
        without writing it back."""

    # -- sleep / wake (LLMEngine.sleep, LLMEngine.wake_up) --------------------------------------------
    def before_sleep(self):
        """Hook: runs before the weights or the KV cache leave the device. Drop here whatever holds their
        addresses (CUDA graphs and their pool, persistent decode buffers)."""

    def after_wake_up(self):
        """Hook: runs once the weights and the KV cache are both back on the device after a sleep (KV zeroed;
        weights restored, or allocated for load_weights after level 2). Their addresses have changed."""

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def sleep(self, level: int):
        """Free the device memory of the KV cache (contents discarded) and of the weights: level 1 copies them
        to host memory first (pinned on CUDA), level 2 discards them. Asleep weights stay asleep; level 2 then
        drops their host copy. Tied or viewed tensors share a storage and are handled once."""
        with self.guard():
            self._sync()
            self.before_sleep()
            if "kv_cache" not in self.asleep:
                self.release_decode_state()
                self.kv.untyped_storage().resize_(0)
            if "weights" not in self.asleep:
                self._slept_weights = self._offload_weights(keep=level == 1)
            elif level == 2:
                self._slept_weights = [(s, n, None) for s, n, _ in self._slept_weights]
            if level == 2 and self.sleep_buffer is not None:  # (no host copy at level 2: its memory goes back)
                self.sleep_buffer.close()
                self.sleep_buffer = None
            self.asleep = set(SLEEP_TAGS)
            # No gc.collect(): every storage above is freed by resize_ at once, and a full collection costs
            # 0.35-0.6 s a sleep in a process holding a trainer's Python heap (TRL sleeps once per step).
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def _offload_weights(self, keep: bool):
        """Each distinct weight storage, and with keep its bytes copied into one flat host buffer
        (self.sleep_buffer, pinned on CUDA: kernels.host.HostBuffer, exactly its size), made at the first
        level-1 sleep and reused by the next ones; the storages are then freed."""
        storages, seen = [], set()
        for t in self.weight_tensors():
            s = t.untyped_storage()
            if not s.nbytes() or s.data_ptr() in seen:
                continue
            seen.add(s.data_ptr())
            storages.append(s)
        backups = [None] * len(storages)
        if keep:
            offsets, total = [], 0
            for s in storages:
                offsets.append(total)
                total += -(-s.nbytes() // SLEEP_ALIGN) * SLEEP_ALIGN
            if self.sleep_buffer is None or self.sleep_buffer.tensor.numel() < total:
                if self.sleep_buffer is not None:
                    self.sleep_buffer.close()
                self.sleep_buffer = HostBuffer(total, pin=self.device.type == "cuda")
            flat = self.sleep_buffer.tensor
            for i, (s, at) in enumerate(zip(storages, offsets)):
                backups[i] = flat[at : at + s.nbytes()]
                backups[i].copy_(_as_bytes(s), non_blocking=True)
        slept = [(s, s.nbytes(), b) for s, b in zip(storages, backups)]
        self._sync()  # the copies are done before the storages go
        for s, _, _ in slept:
            s.resize_(0)
        return slept

    def host_bytes(self) -> int:
        """Host memory this engine holds for its weights: the sleep buffer, once a level-1 sleep made it."""
        return self.sleep_buffer.host_bytes if self.sleep_buffer is not None else 0

    def wake_up(self, tags) -> bool:
        """Bring back the tags (of SLEEP_TAGS) that are asleep: weights from their host copy or, after level 2,
        allocated but unset (returns True then: the caller must load_weights); the KV cache zeroed.
        Runs after_wake_up once both are back."""
        discarded, woke = False, False
        with self.guard():
            if "weights" in tags and "weights" in self.asleep:
                for s, n, backup in self._slept_weights:
                    s.resize_(n)
                    if backup is None:
                        discarded = True
                    else:
                        _as_bytes(s).copy_(backup, non_blocking=True)
                self._sync()
                self._slept_weights = None
                self.asleep.discard("weights")
                woke = True
            if "kv_cache" in tags and "kv_cache" in self.asleep:
                self.kv.untyped_storage().resize_(self.kv.numel() * self.kv.element_size())
                self.kv.zero_()
                self.asleep.discard("kv_cache")
                woke = True
            if woke and not self.asleep:
                self.after_wake_up()
        return discarded

    def hidden_states(self, batch: Batch) -> tuple[torch.Tensor, list[int]]:
        """Final hidden states [T, hidden] of every new token, and the row of each sequence's last token."""
        raise NotImplementedError

    def run(self, batch: Batch) -> torch.Tensor:
        """Logits [len(batch.sampled), vocab] (float32) at the last token of the sequences batch.sampled picks."""
        raise NotImplementedError

    def no_logits(self) -> torch.Tensor:
        return torch.empty(0, self.mcfg.vocab_size, device=self.device)

    @torch.inference_mode()
    def run_with_prompt_hidden(self, batch: Batch, prompt_rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """As `run`, plus the final hidden states [len(prompt_rows), hidden] of the token rows
        prompt_rows (rows in the order `prepare` packs the batch's new tokens): the engine turns them
        into prompt_logprobs in slices, so a long prompt never holds [tokens, vocab] logits at once."""
        h, last_rows = self.hidden_states(batch)
        sampled = [last_rows[r] for r in batch.sampled]
        rows = to_device_segments(
            {"sampled": (sampled, torch.int64), "prompt": (prompt_rows, torch.int64)}, self.device
        )
        logits = self.model.compute_logits(h[rows["sampled"]]).float() if sampled else self.no_logits()
        return logits, h[rows["prompt"]]
