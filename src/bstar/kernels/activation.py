"""The MLP's activation: silu(gate) * up on the fused gate_up projection's output (vLLM's SiluAndMul)."""

import torch.nn.functional as F

from bstar.kernels.contract import gate_width
from bstar.kernels.dispatch import use_triton


def silu_and_mul_ref(x):
    """x [..., 2 * I] -> [..., I]: F.silu(x[..., :I]) * x[..., I:], silu rounded to x.dtype before the product (as
    transformers' MLP computes)."""
    gate_width(x)
    gate, up = x.chunk(2, dim=-1)  # (chunk: the cheapest pair of views, this runs per layer per step)
    return F.silu(gate) * up


def silu_and_mul(x, *, triton=None):
    if use_triton(x, triton):
        from bstar.kernels.activation_triton import silu_and_mul_triton

        return silu_and_mul_triton(x)
    return silu_and_mul_ref(x)
