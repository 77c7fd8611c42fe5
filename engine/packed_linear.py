"""Linear layers that can keep an MKL-packed copy of their weight (CPU, float32).

A GEMM with few rows (a decode step has one row per sequence) spends a good share of its time
re-packing the weight matrix into MKL's internal layout on every call. MKL can pack once for a
given row count (`cblas_sgemm_pack`, exposed by ATen as `mkl::_mkl_reorder_linear_weight` and
`mkl::_mkl_linear`, the ops torch.compile's CPU freezing uses). The result is the same sgemm
kernel, bit for bit; calls with another row count take the plain path. Packed copies are large
(MKL pads each to several MiB), so the engine packs for the steady decode batch only, under a
byte budget, and drops the copies whenever the weights change.
"""

import torch
import torch.nn.functional as F
from torch import nn


def packing_available() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


class Linear(nn.Linear):
    packed: tuple[int, torch.Tensor] | None = None  # (rows it was packed for, MKL-packed weight)

    def forward(self, x):
        p = self.packed
        if p is not None and x.dim() == 2 and x.shape[0] == p[0]:
            return torch.ops.mkl._mkl_linear(x, p[1], self.weight, self.bias, p[0])
        return F.linear(x, self.weight, self.bias)


def packable(model: nn.Module) -> list[Linear]:
    return [
        m
        for m in model.modules()
        if isinstance(m, Linear) and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32
    ]


def pack_linears(model: nn.Module, rows: int, budget_bytes: int) -> int:
    """Pack every float32 CPU Linear of `model` for `rows` rows, in module order, until the packed
    copies would pass `budget_bytes`. Returns the bytes used. Earlier packs are replaced."""
    unpack_linears(model)
    if not packing_available() or budget_bytes <= 0:
        return 0
    used = 0
    for m in packable(model):
        with torch.no_grad():
            p = torch.ops.mkl._mkl_reorder_linear_weight(m.weight.detach(), rows)
        size = p.numel() * p.element_size()
        if used + size > budget_bytes:
            break
        m.packed, used = (rows, p), used + size
    return used


def unpack_linears(model: nn.Module):
    for m in model.modules():
        if isinstance(m, Linear):
            m.packed = None
