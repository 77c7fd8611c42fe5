"""The MLP's activation: silu(gate) * up on the fused gate_up projection's output (vLLM's SiluAndMul)."""

import torch
import torch.nn.functional as F

from bstar.kernels.dispatch import use_triton


def gate_width(x: torch.Tensor) -> int:
    """I for x [..., 2 * I] (gate in the first half, up in the second); one clear line otherwise."""
    if x.dim() == 0 or x.shape[-1] % 2 or not x.is_floating_point():
        raise ValueError(
            f"silu_and_mul needs a floating-point [..., 2 * I] tensor (gate, up), got {x.dtype} {tuple(x.shape)}"
        )
    return x.shape[-1] // 2


def silu_and_mul_ref(x):
    """x [..., 2 * I] -> [..., I]: F.silu(x[..., :I]) * x[..., I:], silu rounded to x.dtype before the product (as
    transformers' MLP computes)."""
    gate_width(x)
    gate, up = x.chunk(2, dim=-1)  # (chunk: the cheapest pair of views, this runs per layer per step)
    return F.silu(gate) * up


def silu_and_mul(x):
    if use_triton(x):
        from bstar.kernels.activation_triton import silu_and_mul_triton

        return silu_and_mul_triton(x)
    return silu_and_mul_ref(x)
