"""Linear layers with the CPU GEMM that is fastest on this machine (inference, float32).

The decode step's GEMMs have few rows (one per sequence) and are most of a CPU step's time. Which
library runs them fastest depends on the CPU:
- oneDNN (`mkldnn::_linear_pointwise`, the op torch.compile's CPU freezing emits) picks its kernels from
  the CPU's instruction sets, whatever the vendor. On the AMD EPYC (Zen 5, AVX-512) development machine
  it runs the decode shapes 2.3x faster than ATen's MKL sgemm, and 1.5x with its ISA capped at AVX2
  (`ONEDNN_MAX_CPU_ISA=AVX2`, the AVX2-only kind): MKL does not take its AVX-512 path on AMD.
- MKL with the weight packed once for a given row count (`cblas_sgemm_pack`, exposed by ATen as
  `mkl::_mkl_reorder_linear_weight` / `mkl::_mkl_linear`): same kernel as ATen's sgemm, bit for bit, minus
  the per-call packing. This is the path measured at 3.0-3.2x transformers on the Intel machine; packed
  copies are large (MKL pads each to several MiB), so the engine packs for the steady decode batch only,
  under a byte budget, and drops the copies whenever the weights change.
`EngineConfig.cpu_gemm` chooses ("auto": oneDNN unless the CPU is Intel's, where MKL packing is the
measured path; "onednn", "mkl", "aten": plain F.linear). Only no-grad calls on float32 CPU weights take
oneDNN (it has no autograd); everything else is F.linear. See bench/RESULTS.md for the figures.
"""

import functools

import torch
import torch.nn.functional as F
from torch import nn

from bstar.engine.choices import CPU_GEMMS
from bstar.engine.errors import UnsupportedError


def packing_available() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def onednn_linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] @ w [N, K]^T (+ b) on oneDNN (no autograd; strided operands and a reordered w are fine)."""
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


@functools.cache
def cpu_vendor() -> str:
    """The CPU's vendor id ("GenuineIntel", "AuthenticAMD", ...; "" where /proc/cpuinfo says nothing)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def resolve_cpu_gemm(choice: str, vendor: str | None = None) -> str:
    """The GEMM ("onednn", "mkl" or "aten") that `choice` (one of CPU_GEMMS) means on this machine."""
    if choice not in CPU_GEMMS:
        raise UnsupportedError(f"cpu_gemm must be one of {', '.join(CPU_GEMMS)}, got {choice!r}")
    if choice == "auto":
        vendor = cpu_vendor() if vendor is None else vendor
        if onednn_available() and vendor != "GenuineIntel":
            return "onednn"
        return "mkl" if packing_available() else "aten"
    if (choice == "onednn" and not onednn_available()) or (choice == "mkl" and not packing_available()):
        raise UnsupportedError(f"cpu_gemm={choice!r}: this torch build has no {choice} linear op")
    return choice


class Linear(nn.Linear):
    gemm = "aten"  # set per layer by set_cpu_gemm: "onednn" routes no-grad calls to oneDNN
    packed: tuple[int, torch.Tensor] | None = None  # (rows it was packed for, MKL-packed or oneDNN-reordered weight)

    def forward(self, x):
        p = self.packed
        if self.gemm == "onednn":
            if torch.is_grad_enabled():  # oneDNN's op has no autograd
                return F.linear(x, self.weight, self.bias)
            w = self.weight if p is None else p[1]  # oneDNN takes its reordered copy for any row count
            return onednn_linear(x, w, self.bias)
        if p is not None and x.dim() == 2 and x.shape[0] == p[0]:
            return torch.ops.mkl._mkl_linear(x, p[1], self.weight, self.bias, p[0])
        return F.linear(x, self.weight, self.bias)


def packable(model: nn.Module) -> list[Linear]:
    return [
        m
        for m in model.modules()
        if isinstance(m, Linear) and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32
    ]


def set_cpu_gemm(model: nn.Module, gemm: str) -> None:
    """Route the float32 CPU Linear layers of `model` to `gemm` (a resolve_cpu_gemm result); "mkl" layers
    run plain until pack_linears packs them."""
    unpack_linears(model)
    for m in packable(model):
        m.gemm = gemm


def pack_linears(model: nn.Module, rows: int, budget_bytes: int) -> int:
    """Pack every float32 CPU Linear of `model` for `rows` rows, in module order, until the packed
    copies would pass `budget_bytes`: MKL's packed layout, or oneDNN's reordered one for layers routed
    to oneDNN (about 7% faster than its plain-weight call on the decode shapes, for any row count).
    Returns the bytes used. Earlier packs are replaced."""
    unpack_linears(model)
    if budget_bytes <= 0:
        return 0
    used = 0
    for m in packable(model):
        if m.gemm == "onednn":
            reorder = torch.ops.mkldnn._reorder_linear_weight
        elif packing_available():
            reorder = torch.ops.mkl._mkl_reorder_linear_weight
        else:
            break
        with torch.no_grad():
            p = reorder(m.weight.detach(), rows)
        size = p.numel() * p.element_size()
        if used + size > budget_bytes:
            break
        m.packed, used = (rows, p), used + size
    return used


def unpack_linears(model: nn.Module):
    for m in model.modules():
        if isinstance(m, Linear):
            m.packed = None
