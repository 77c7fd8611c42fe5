"""Which implementation a kernel call takes.

The backend is chosen once, when an engine is built (`triton_on`: EngineConfig.kernels, else the
``BSTAR_KERNELS`` override, else the device: CUDA takes Triton, anything else the torch reference),
and handed to every kernel call by the object that made the choice (the engine's runner, its model's
attention backend, its sampler). A kernel wrapper called without a choice follows its tensor's device;
it never reads the environment. ``BSTAR_KERNELS=triton`` with ``TRITON_INTERPRET=1`` runs the Triton
path on CPU tensors, which is how CI tests the engine's GPU path.
"""

import os

import torch

KERNEL_CHOICES = ("auto", "triton", "torch")


def triton_on(device: torch.device | str, kernels: str = "auto") -> bool:
    """Whether an engine on `device` takes the Triton path: `kernels` ("triton" / "torch"; EngineConfig.kernels)
    when not "auto", else BSTAR_KERNELS when set, else whether `device` is CUDA. The one place the choice is
    made: call it once, when the engine is built."""
    choice = kernels if kernels != "auto" else os.environ.get("BSTAR_KERNELS", "").strip().lower() or "auto"
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"BSTAR_KERNELS must be 'triton', 'torch' or 'auto', got {choice!r}")
    if choice == "auto":
        return torch.device(device).type == "cuda"
    return choice == "triton"


def use_triton(t: torch.Tensor, triton: bool | None) -> bool:
    """A kernel wrapper's path: the caller's choice, or without one whether `t` is on CUDA."""
    return t.is_cuda if triton is None else triton
