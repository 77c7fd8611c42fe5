"""Hot paths of the engine: Triton kernels beside torch references with the same signatures.

Each `<name>.py` holds the torch reference and the dispatching function the engine calls;
`<name>_triton.py` beside it holds the Triton kernel with the same contract. In the order a step
meets them:

    norm_rope.py            rms_norm (fused residual add), apply_rotary, qk_norm_rope (Qwen3's
                            per-head q/k norm + rotary)                       (engine/model/decoder.py)
    kv_store.py             store_kv: the new tokens' K/V into their cache slots (slot -1: skipped)
    rope_store.py           rope_store_kv: apply_rotary / qk_norm_rope and store_kv in one kernel,
                            the Triton path's form of the two above (engine/model/decoder.py)
    prefill_attention.py    paged_prefill_attention: new tokens against their cached prefix
    decode_attention.py     paged_decode_attention: one token per sequence against its pages
    cascade_attention.py    the torch decode path for sibling candidates: shared prompt blocks
                            read once per group (no Triton twin; engine/runner/cpu/decode_state.py keeps its buffers)
    dense_decode_attention.py  its own part: each row against its own contiguous K/V, in C on CPU
                            (dense_decode_attention_cpu.c) beside the torch reference
    activation.py           silu_and_mul: the MLP's silu(gate) * up on the fused gate_up output
                            (engine/model/decoder.py)
    sampling.py             sample: temperature, top-k, top-p, min-p, seeded draw (engine/runner/sampler.py)
    prm_scoring.py          prm_step_scores: P(good) at step tags, per-candidate aggregate (engine/entrypoints/prm.py)
    paged_triton.py         paged-KV addressing shared by the Triton attention kernels
    contract.py             what a reference and its kernel agree on (PRM aggregates, split-KV limits,
                            the MLP gate width), so neither imports the other
    dispatch.py             triton_on: the backend, chosen once when an engine is built (EngineConfig.kernels,
                            else BSTAR_KERNELS=triton|torch, else the device); every wrapper takes it as triton=
    launch.py               every Triton launch goes through it: records the compiled variants a
                            run needs (tests), counts compiles (GPU)
    host.py                 long_tensor: host lists to int64 tensors, fast; to_device: the same
                            without a stream sync (pinned staging, non-blocking copy)
    native.py               builds and loads the `<name>_cpu.c` kernels (gcc, ctypes, cached on disk);
                            None without a compiler or with BSTAR_CPU_NATIVE=0: the torch path runs

The `_triton` modules are imported on first use of the Triton path, so CPU-only use never imports
triton (not installed off Linux).
"""

from bstar.kernels.activation import silu_and_mul, silu_and_mul_ref
from bstar.kernels.decode_attention import paged_decode_attention, paged_decode_attention_ref
from bstar.kernels.kv_store import store_kv, store_kv_ref
from bstar.kernels.norm_rope import (
    apply_rotary,
    apply_rotary_ref,
    qk_norm_rope,
    qk_norm_rope_ref,
    rms_norm,
    rms_norm_ref,
)
from bstar.kernels.prefill_attention import paged_prefill_attention, paged_prefill_attention_ref
from bstar.kernels.prm_scoring import prm_step_scores, prm_step_scores_ref
from bstar.kernels.rope_store import rope_store_kv, rope_store_kv_ref
from bstar.kernels.sampling import sample, sample_ref

__all__ = [
    "paged_decode_attention",
    "paged_decode_attention_ref",
    "paged_prefill_attention",
    "paged_prefill_attention_ref",
    "sample",
    "sample_ref",
    "prm_step_scores",
    "prm_step_scores_ref",
    "rms_norm",
    "rms_norm_ref",
    "apply_rotary",
    "apply_rotary_ref",
    "qk_norm_rope",
    "qk_norm_rope_ref",
    "store_kv",
    "store_kv_ref",
    "rope_store_kv",
    "rope_store_kv_ref",
    "silu_and_mul",
    "silu_and_mul_ref",
]
