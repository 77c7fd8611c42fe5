"""Shared pytest set-up. Other fixtures may be added here by others.

Without CUDA, Triton kernels run under the interpreter on CPU tensors; the variable must be set
before triton is first imported, which is why it lives here (conftest loads before test modules).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
