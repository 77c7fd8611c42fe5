"""PRM step scoring: P(good) at step-tag positions from a two-row head, and per-candidate aggregates."""

import torch

from bstar.kernels.contract import AGGREGATES
from bstar.kernels.dispatch import use_triton


def prm_step_scores_ref(hidden, tag_index, head_weight, head_bias, step_candidate, num_candidates, agg="min"):
    """Torch reference.

    hidden         [T, H]   final (normed) hidden states of packed candidate tokens
    tag_index      int64 [S]  rows of `hidden` that hold a step tag
    head_weight    [2, H]   row 0 = "good", row 1 = "bad" (e.g. two rows of an LM head)
    head_bias      [2] or None
    step_candidate int64 [S]  candidate index of each step, non-decreasing, in [0, num_candidates)
    agg            "min" | "last" | "prod" | "mean"
    returns (p_good float32 [S], aggregate float32 [num_candidates]); a candidate with no step gets 0.
    """
    if agg not in AGGREGATES:
        raise ValueError(f"unknown PRM aggregate {agg!r}; choose one of {AGGREGATES}")
    h = hidden[tag_index].float()
    logits = h @ head_weight.float().t()
    if head_bias is not None:
        logits = logits + head_bias.float()
    p_good = torch.softmax(logits, dim=-1)[:, 0]
    out = torch.zeros(num_candidates, dtype=torch.float32, device=hidden.device)
    cand = step_candidate.long()
    count = torch.zeros_like(out).index_add_(0, cand, torch.ones_like(p_good))
    if agg == "min":
        out = torch.full_like(out, float("inf")).scatter_reduce(0, cand, p_good, "amin")
    elif agg == "prod":
        out = torch.ones_like(out).scatter_reduce(0, cand, p_good, "prod")
    elif agg == "mean":
        out = out.index_add(0, cand, p_good) / count.clamp(min=1)
    else:  # last: steps are ordered within a candidate, so the last write wins
        last = torch.full_like(out, -1, dtype=torch.long).scatter_reduce(
            0, cand, torch.arange(len(cand), device=cand.device), "amax"
        )
        out = torch.where(last >= 0, p_good[last.clamp(min=0)] if len(cand) else out, out)
    return p_good, torch.where(count > 0, out, torch.zeros_like(out))


def prm_step_scores(
    hidden, tag_index, head_weight, head_bias, step_candidate, num_candidates, agg="min", *, triton=None
):
    if use_triton(hidden, triton):
        from bstar.kernels.prm_scoring_triton import prm_step_scores_triton

        return prm_step_scores_triton(hidden, tag_index, head_weight, head_bias, step_candidate, num_candidates, agg)
    return prm_step_scores_ref(hidden, tag_index, head_weight, head_bias, step_candidate, num_candidates, agg)
