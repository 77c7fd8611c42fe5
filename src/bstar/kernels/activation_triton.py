"""Triton silu_and_mul: one pass over the fused gate_up output [T, 2 * I], writing [T, I].

Torch's `F.silu(gate) * up` is two elementwise kernels and a [T, I] temporary between them; here
each program reads a block of gate and up columns of one row and writes their product. The grid is
rows x column blocks (I reaches 18,944 for 7B models, 29,568 for 72B), so a decode step of a few
rows still spreads over many programs. Rounding follows the reference: float32 math (libdevice's
expf and an IEEE division, as torch's kernel), silu rounded to the activation dtype, then the
product rounded again, so outputs agree to the last bit or so.
"""

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from bstar.kernels.contract import gate_width
from bstar.kernels.launch import gpu_configs, interpreting, launch, traced

GPU_BLOCK = 1024  # columns per program on a GPU: 4 warps x 32 threads x 8 values (16-byte loads in bf16)
INTERPRET_BLOCK = 8192  # the interpreter runs programs one by one in Python: fewer, wider ones


@triton.jit
def _silu_and_mul_kernel(X, OUT, I, stride_x, stride_o, BLOCK: tl.constexpr, PRECISE_EXP: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    x = X + row * stride_x
    gate = tl.load(x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x + I + cols, mask=mask, other=0.0).to(tl.float32)
    dt = OUT.dtype.element_ty
    # tl.exp is ex2.approx on a GPU (several ulps off in float32 for |gate| ~ 10); torch's kernel
    # uses libdevice's expf. (The interpreter has no libdevice; its numpy exp is exact enough.)
    if PRECISE_EXP:
        e = libdevice.exp(-gate)
    else:
        e = tl.exp(-gate)
    # IEEE division as torch's kernel (Triton's "/" is div.full, off by up to 2 ulps); rounded like F.silu's output
    silu = tl.math.div_rn(gate, 1.0 + e).to(dt).to(tl.float32)
    tl.store(OUT + row * stride_o + cols, (silu * up).to(dt), mask=mask)


@traced
def silu_and_mul_triton(x, block: int | None = None):
    """Same contract as kernels.activation.silu_and_mul_ref: x [..., 2 * I] -> new [..., I] in x.dtype.

    `block` (a power of two) overrides the columns per program (tests use small ones to cross
    block edges)."""
    I = gate_width(x)
    x2 = x.reshape(-1, 2 * I)  # a view for the engine's [T, 2 * I] GEMM output and row-strided slices
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    rows = x2.shape[0]
    out = torch.empty(rows, I, dtype=x.dtype, device=x.device)
    if rows and I:
        cap = GPU_BLOCK if gpu_configs(x) else INTERPRET_BLOCK
        BLOCK = block or min(cap, triton.next_power_of_2(I))
        launch(
            _silu_and_mul_kernel,
            (rows, triton.cdiv(I, BLOCK)),
            x2,
            out,
            I,
            x2.stride(0),
            out.stride(0),
            BLOCK=BLOCK,
            PRECISE_EXP=not interpreting(),
            num_warps=4,
        )
    return out.view(*x.shape[:-1], I)


__all__ = ["silu_and_mul_triton"]
