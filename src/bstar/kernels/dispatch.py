"""Which implementation a kernel call takes.

CUDA tensors use Triton, CPU tensors use the torch reference. ``BSTAR_KERNELS=triton`` or
``BSTAR_KERNELS=torch`` forces one path (with ``TRITON_INTERPRET=1`` the Triton path runs on
CPU tensors, which is how CI tests the kernels).
"""

import os

import torch


def triton_on(device: torch.device | str) -> bool:
    """Whether kernel calls on tensors on `device` take the Triton path."""
    forced = os.environ.get("BSTAR_KERNELS", "").strip().lower()
    if forced == "torch":
        return False
    if forced == "triton":
        return True
    if forced not in ("", "auto"):
        raise ValueError(f"BSTAR_KERNELS must be 'triton', 'torch' or 'auto', got {forced!r}")
    return torch.device(device).type == "cuda"


def use_triton(t: torch.Tensor) -> bool:
    return triton_on(t.device)
