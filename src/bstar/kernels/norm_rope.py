"""RMSNorm (optionally fused with the residual add), rotary position embedding, and Qwen3's per-head
q/k RMSNorm fused with the rotary."""

import torch

from bstar.kernels.dispatch import use_triton


def rms_norm_ref(x, weight, eps, residual=None):
    """x [T, H]; weight [H]. Without residual returns norm(x); with it returns
    (norm(x + residual), x + residual). Matches transformers' LlamaRMSNorm rounding."""
    if residual is not None:
        x = x + residual
        residual = x
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(x.dtype)
    return out if residual is None else (out, residual)


def apply_rotary_ref(q, k, positions, cos_sin_cache):
    """Neox-style rotary, in place semantics not assumed: returns (q, k).

    q [T, Hq, D], k [T, Hkv, D], positions int64 [T], cos_sin_cache float32 [max_pos, D]
    holding cos in the first D/2 columns and sin in the last D/2.
    """
    T, Hq, D = q.shape
    half = D // 2
    cs = cos_sin_cache[positions].to(q.dtype)[:, None, :]  # [T, 1, D]
    cos, sin = cs[..., :half], cs[..., half:]

    def rot(x):
        # out = x * cos + rotate_half(x) * sin, written per half: the same products and sums,
        # rounded the same way, without building rotate_half(x) or full-width cos/sin.
        x1, x2 = x[..., :half], x[..., half:]
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        o1, o2 = out[..., :half], out[..., half:]
        torch.mul(x1, cos, out=o1).sub_(x2 * sin)
        torch.mul(x2, cos, out=o2).add_(x1 * sin)
        return out

    # q and k as neighbouring views of one fused projection (the engine's case): one pass for both.
    if (
        q.stride() == k.stride()
        and q.stride(-1) == 1
        and q.stride(1) == D
        and q.dtype == k.dtype
        and k.data_ptr() == q.data_ptr() + Hq * D * q.element_size()
    ):
        qk = rot(q.as_strided((T, Hq + k.shape[1], D), q.stride()))
        return qk[:, :Hq], qk[:, Hq:]
    return rot(q), rot(k)


def qk_norm_rope_ref(q, k, q_weight, k_weight, eps, positions, cos_sin_cache):
    """Qwen3 attention's q_norm / k_norm then rotary: RMSNorm of every head over head_dim (one
    weight [D] shared by the heads), then apply_rotary_ref. Returns new (q, k).

    q [T, Hq, D], k [T, Hkv, D] (views of a fused projection are fine); the norms round as
    transformers' Qwen3RMSNorm (fp32 statistics, cast to the input dtype, then times the weight)."""
    return apply_rotary_ref(rms_norm_ref(q, q_weight, eps), rms_norm_ref(k, k_weight, eps), positions, cos_sin_cache)


def rms_norm(x, weight, eps, residual=None, *, triton=None):
    if use_triton(x, triton):
        from bstar.kernels.norm_rope_triton import rms_norm_triton

        return rms_norm_triton(x, weight, eps, residual)
    return rms_norm_ref(x, weight, eps, residual)


def apply_rotary(q, k, positions, cos_sin_cache, *, triton=None):
    if use_triton(q, triton):
        from bstar.kernels.norm_rope_triton import apply_rotary_triton

        return apply_rotary_triton(q, k, positions, cos_sin_cache)
    return apply_rotary_ref(q, k, positions, cos_sin_cache)


def qk_norm_rope(q, k, q_weight, k_weight, eps, positions, cos_sin_cache, *, triton=None):
    if use_triton(q, triton):
        from bstar.kernels.norm_rope_triton import qk_norm_rope_triton

        return qk_norm_rope_triton(q, k, q_weight, k_weight, eps, positions, cos_sin_cache)
    return qk_norm_rope_ref(q, k, q_weight, k_weight, eps, positions, cos_sin_cache)
