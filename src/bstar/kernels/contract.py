"""What an op's torch reference and its Triton kernel must agree on, kept apart so that neither module imports
the other (the reference dispatches to the kernel; the kernel needs only these)."""

import torch

AGGREGATES = ("min", "last", "prod", "mean")  # PRM step-score aggregates; the kernel's codes are their indices

# Split-KV decode attention: the partials the memory plan sizes depend on these too
MAX_SPLITS = 64  # choose_num_splits never returns more; mid_lse's split stride
MIN_TOKENS_PER_SPLIT = 256


def gate_width(x: torch.Tensor) -> int:
    """I for x [..., 2 * I] (gate in the first half, up in the second); one clear line otherwise."""
    if x.dim() == 0 or x.shape[-1] % 2 or not x.is_floating_point():
        raise ValueError(
            f"silu_and_mul needs a floating-point [..., 2 * I] tensor (gate, up), got {x.dtype} {tuple(x.shape)}"
        )
    return x.shape[-1] // 2
