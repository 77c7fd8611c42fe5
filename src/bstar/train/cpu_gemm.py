"""The trainer's Linear layers on oneDNN (CPU float32, one process, no FSDP).

The engine's GEMM choice (bstar.engine.model.linear.resolve_cpu_gemm) holds for training too: where it picks oneDNN
(every CPU but Intel's, whose MKL takes its AVX-512 path), the three GEMMs of a linear layer (forward
x W^T, input gradient g W, weight gradient g^T x) run 1.4-2.3x faster through oneDNN than through ATen's
MKL sgemm on the AMD EPYC development machine (the built-in model's shapes, 2,048 tokens). oneDNN's op has
no autograd formula, so `OneDnnLinearFunction` supplies it. Layers are switched by class (`route_linears`),
so state dicts, names and hooks stay those of nn.Linear.
"""

import torch
import torch.nn.functional as F
from torch import nn

from bstar.engine.model.linear import onednn_linear, resolve_cpu_gemm


class OneDnnLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        g = grad.reshape(-1, grad.shape[-1])  # [T, N]
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = onednn_linear(g, weight.t()).view(x.shape)  # g W: weight.t() [K, N] as oneDNN's [out, in]
        if ctx.needs_input_grad[1]:
            gw = onednn_linear(g.t(), x.reshape(-1, x.shape[-1]).t())  # g^T x  [N, K]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum(0)
        return gx, gw, gb


class OneDnnLinear(nn.Linear):
    """nn.Linear whose float32 CPU calls go through OneDnnLinearFunction."""

    def forward(self, x):
        if x.device.type == "cpu" and x.dtype == self.weight.dtype == torch.float32:
            return OneDnnLinearFunction.apply(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def route_linears(model: nn.Module) -> int:
    """Switch every float32 CPU nn.Linear of `model` to OneDnnLinear; returns how many were switched."""
    n = 0
    for m in model.modules():
        if type(m) is nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32:
            m.__class__ = OneDnnLinear
            n += 1
    return n


def apply_cpu_gemm(model: nn.Module, choice: str = "auto") -> str:
    """The training side of the engine's GEMM rule (bstar.engine.model.linear.resolve_cpu_gemm): where `choice` resolves
    to oneDNN, route `model`'s Linear layers to it. Returns "onednn", or "aten" (MKL's packed path is the
    engine's alone: training keeps ATen's F.linear there)."""
    if resolve_cpu_gemm(choice) != "onednn":
        return "aten"
    route_linears(model)
    return "onednn"
