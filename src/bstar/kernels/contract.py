"""What an op's torch reference and its Triton kernel must agree on, kept apart so that neither module imports
the other (the reference dispatches to the kernel; the kernel needs only these)."""

import torch

AGGREGATES = ("min", "last", "prod", "mean")  # PRM step-score aggregates; the kernel's codes are their indices

# Split-KV decode attention: the partials the memory plan sizes depend on these too
MAX_SPLITS = 64  # choose_num_splits never returns more; mid_lse's split stride
MIN_TOKENS_PER_SPLIT = 256
CTAS_PER_SM = 3  # resident decode programs per SM (registers, see _config): one wave is SMs x this
FULL_WAVES = 4  # from this many waves on the last one's idle share (<= 1/4) is left alone; splits stay within
SPLIT_FIXED_TOKENS = 64  # a program's fixed cost (q load, epilogue, its share of the merge), in key tokens


def wave_splits(
    programs: int,
    context: int,
    sms: int,
    *,
    ctas_per_sm: int = CTAS_PER_SM,
    min_tokens_per_split: int = MIN_TOKENS_PER_SPLIT,
    max_splits: int = MAX_SPLITS,
) -> int:
    """The split count that fills whole waves of resident programs: of the counts that keep splits at least
    min_tokens_per_split tokens long and programs x splits within FULL_WAVES waves, the one with the least
    estimated time, waves x one program's work (ceil(programs x s / (sms x ctas_per_sm)) x (context / s +
    SPLIT_FIXED_TOKENS)); a tie keeps fewer splits. So 512 programs on 132 SMs (1.3 waves, the last one
    mostly idle) take 3 splits (3.9 waves), and a few programs split until they fill one wave."""
    slots = sms * ctas_per_sm
    cap = max(1, min(-(-context // min_tokens_per_split), max_splits))
    if programs <= 0 or programs >= FULL_WAVES * slots:
        return 1
    best, best_time = 1, None
    for s in range(1, cap + 1):
        if s > 1 and programs * s > FULL_WAVES * slots:
            break
        t = -(-programs * s // slots) * (-(-context // s) + SPLIT_FIXED_TOKENS)
        if best_time is None or t < best_time:
            best, best_time = s, t
    return best


def gate_width(x: torch.Tensor) -> int:
    """I for x [..., 2 * I] (gate in the first half, up in the second); one clear line otherwise."""
    if x.dim() == 0 or x.shape[-1] % 2 or not x.is_floating_point():
        raise ValueError(
            f"silu_and_mul needs a floating-point [..., 2 * I] tensor (gate, up), got {x.dtype} {tuple(x.shape)}"
        )
    return x.shape[-1] // 2
