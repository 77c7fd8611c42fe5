"""Host lists to tensors, fast: per-step metadata is built from Python lists every decode step.

`torch.tensor(list)` converts element by element (~50 ns each); going through `array` is ~3x
faster, which matters for the few thousand block ids a step can carry.
"""

from array import array

import torch


def long_tensor(values, device=None) -> torch.Tensor:
    """int64 tensor [len(values)] from a list of Python ints."""
    if not values:
        return torch.empty(0, dtype=torch.long, device=device)
    t = torch.frombuffer(array("q", values), dtype=torch.long)
    return t if device is None or torch.device(device).type == "cpu" else t.to(device)
