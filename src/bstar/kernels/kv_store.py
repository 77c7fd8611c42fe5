"""Writing the new tokens' K and V into the paged cache.

A slot is block * block_size + offset. A negative slot is skipped: the padded rows of a CUDA-graph
bucket (bstar/engine/runner/gpu/cuda_graphs.py) carry slot -1, so they write nowhere.
"""

from bstar.kernels.dispatch import use_triton


def store_kv_ref(k, v, k_cache, v_cache, slot_mapping):
    """Torch reference.

    k, v         [T, Hkv, D] (any strides; cast to the cache dtype)
    k_cache      [num_blocks, block_size, Hkv, D] (v_cache alike), written in place
    slot_mapping int64 [T]; rows with a negative slot are not written
    """
    if slot_mapping.numel() and bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    h, d = k_cache.shape[2:]
    k_cache.view(-1, h, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, h, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def store_kv(k, v, k_cache, v_cache, slot_mapping, *, triton=None):
    if use_triton(k, triton):
        from bstar.kernels.kv_store_triton import store_kv_triton

        return store_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    return store_kv_ref(k, v, k_cache, v_cache, slot_mapping)
