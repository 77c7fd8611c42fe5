"""Rotary (with Qwen3's per-head q/k RMSNorm first, when given its weights) fused with the K/V store:
what attention does between the qkv GEMM and the attention kernel, in one pass on the Triton path.

Rotated k goes straight into the paged cache instead of out to memory and back in for the store. A
negative slot (a padded CUDA-graph row) is not written, as in kernels.kv_store.
"""

from bstar.kernels.dispatch import use_triton
from bstar.kernels.kv_store import store_kv_ref
from bstar.kernels.norm_rope import apply_rotary_ref, qk_norm_rope_ref


def rope_store_kv_ref(
    q, k, v, k_cache, v_cache, slot_mapping, positions, cos_sin_cache, q_weight=None, k_weight=None, eps=1e-6
):
    """Torch reference: apply_rotary_ref (qk_norm_rope_ref when q_weight/k_weight are given), then
    store_kv_ref of the rotated k and of v. Returns the rotated q.

    q [T, Hq, D], k and v [T, Hkv, D] (views of a fused projection are fine), k_cache / v_cache
    [num_blocks, block_size, Hkv, D] written in place, slot_mapping int64 [T] (negative: skipped),
    positions int64 [T], cos_sin_cache float32 [max_pos, D]; q_weight, k_weight [D] or None."""
    if (q_weight is None) != (k_weight is None):
        raise ValueError("rope_store_kv needs both q/k norm weights or neither")
    if q_weight is None:
        q, k = apply_rotary_ref(q, k, positions, cos_sin_cache)
    else:
        q, k = qk_norm_rope_ref(q, k, q_weight, k_weight, eps, positions, cos_sin_cache)
    store_kv_ref(k, v, k_cache, v_cache, slot_mapping)
    return q


def rope_store_kv(
    q,
    k,
    v,
    k_cache,
    v_cache,
    slot_mapping,
    positions,
    cos_sin_cache,
    q_weight=None,
    k_weight=None,
    eps=1e-6,
    *,
    triton=None,
):
    if use_triton(q, triton):
        from bstar.kernels.rope_store_triton import rope_store_kv_triton

        return rope_store_kv_triton(
            q, k, v, k_cache, v_cache, slot_mapping, positions, cos_sin_cache, q_weight, k_weight, eps
        )
    return rope_store_kv_ref(q, k, v, k_cache, v_cache, slot_mapping, positions, cos_sin_cache, q_weight, k_weight, eps)
