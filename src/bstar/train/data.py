"""SFT data: (prompt, completion) records read and checked, tokenised into SFTExamples, and the batch plan.

The plan is a pure function of (example lengths, seed, epoch, batch size, world size), so every rank
computes the whole plan locally and no data is communicated; 1 process and N ranks see the same
global batches (only their split across ranks differs).

Labels: `targets[t]` is the token to predict at position t (already shifted), -100 where no loss is
taken: prompt positions, the last token of each example, padding.
"""

import hashlib
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from bstar.errors import DataError
from bstar.utils.jsonl import parse_jsonl

IGNORE = -100
_MAX_LISTED = 20  # problems spelled out in one error message


@dataclass(frozen=True)
class SFTExample:
    """One tokenised example: `input_ids` = prompt ids + completion ids (+ eos); loss on ids[prompt_len:]."""

    input_ids: tuple[int, ...]
    prompt_len: int
    line: int = 0  # 1-based source line (or record index) for error messages

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class Problem:
    line: int
    reason: str


def _report(problems: list[Problem], source: str, on_bad: str) -> None:
    if not problems:
        return
    listed = "; ".join(f"line {p.line}: {p.reason}" for p in problems[:_MAX_LISTED])
    more = f" (and {len(problems) - _MAX_LISTED} more)" if len(problems) > _MAX_LISTED else ""
    msg = f"{source}: {len(problems)} bad example(s): {listed}{more}"
    if on_bad == "refuse":
        raise DataError(msg)
    warnings.warn(f"skipping {msg}", stacklevel=3)


def _check_on_bad(on_bad: str) -> None:
    if on_bad not in ("skip", "refuse"):
        raise DataError(f"on_bad must be 'skip' or 'refuse', got {on_bad!r}")


def _read_file(path, prompt_field, completion_field):
    items, problems = [], []
    for lineno, rec, problem in parse_jsonl(path):
        if problem is not None:
            problems.append(Problem(lineno, problem))
            continue
        item = _check_record(rec, lineno, prompt_field, completion_field, problems)
        if item is not None:
            items.append(item)
    return items, problems


def _check_record(rec, lineno, prompt_field, completion_field, problems):
    if not isinstance(rec, dict):
        problems.append(Problem(lineno, f"expected a JSON object, got {type(rec).__name__}"))
        return None
    for f in (prompt_field, completion_field):
        if f not in rec:
            problems.append(Problem(lineno, f"missing field {f!r}"))
            return None
        if not isinstance(rec[f], str):
            problems.append(Problem(lineno, f"field {f!r} is not a string"))
            return None
    if not rec[completion_field].strip():
        problems.append(Problem(lineno, "empty completion"))
        return None
    return lineno, rec[prompt_field], rec[completion_field]


def _check_records(records, prompt_field, completion_field):
    out, problems = [], []
    for i, rec in enumerate(records, start=1):
        item = _check_record(rec, i, prompt_field, completion_field, problems)
        if item is not None:
            out.append(item)
    return out, problems


def _tokenize(items, tokenizer, max_seq_len, add_eos):
    if not items:
        return [], []
    prompts = tokenizer([p for _, p, _ in items], add_special_tokens=True)["input_ids"]
    comps = tokenizer([c for _, _, c in items], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id if add_eos else None
    out, problems = [], []
    for (line, _, _), p, c in zip(items, prompts, comps):
        c = list(c) + ([eos] if eos is not None and (not c or c[-1] != eos) else [])
        if not c:
            problems.append(Problem(line, "completion has no tokens"))
            continue
        n = len(p) + len(c)
        if n > max_seq_len:
            problems.append(Problem(line, f"{n} tokens > max_seq_len {max_seq_len}"))
            continue
        out.append(SFTExample(tuple(p) + tuple(c), len(p), line))
    return out, problems


def load_sft_examples(
    data,
    tokenizer,
    max_seq_len: int,
    *,
    prompt_field="prompt",
    completion_field="completion",
    add_eos=True,
    on_bad="skip",
) -> list[SFTExample]:
    """Tokenised training examples from `data`: a JSONL path, a list of {prompt, completion} dicts, or a
    list of SFTExample (used as is, e.g. token ids straight from generation; only the length check
    applies). The prompt is tokenised with the tokenizer's special tokens (BOS if it adds one), the
    completion without, then eos: tokenising the two parts separately keeps their boundary exact. Bad
    lines (non-UTF-8, invalid JSON, missing or non-string fields, empty or over-long completion) are
    reported by line number and skipped or refused (`on_bad`)."""
    _check_on_bad(on_bad)
    if isinstance(data, (str, Path)):
        items, problems = _read_file(data, prompt_field, completion_field)
        source = str(data)
    else:
        data = list(data)
        if data and all(isinstance(x, SFTExample) for x in data):
            problems = [
                Problem(x.line or i, f"{len(x)} tokens > max_seq_len {max_seq_len}")
                for i, x in enumerate(data, 1)
                if len(x) > max_seq_len
            ] + [
                Problem(x.line or i, "no completion tokens")
                for i, x in enumerate(data, 1)
                if not 0 <= x.prompt_len < len(x)
            ]
            _report(problems, "examples", on_bad)
            bad = {p.line for p in problems}
            return [x for i, x in enumerate(data, 1) if (x.line or i) not in bad]
        items, problems = _check_records(data, prompt_field, completion_field)
        source = "records"
    # all problems of both stages in one report, in line order
    ex, more = _tokenize(items, tokenizer, max_seq_len, add_eos)
    _report(sorted(problems + more, key=lambda p: p.line), source, on_bad)
    if not ex:
        raise DataError(f"{source}: no usable examples")
    return ex


def fingerprint(examples: Sequence[SFTExample]) -> str:
    """Identifies the data for resume: same ids and boundaries in the same order."""
    h = hashlib.sha256()
    for x in examples:
        h.update(len(x).to_bytes(4, "little") + x.prompt_len.to_bytes(4, "little"))
        h.update(torch.tensor(x.input_ids, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Batch plan: epoch order -> global batches (optimizer steps) -> per-rank shares -> micro-batches


def epoch_batches(
    lengths: Sequence[int], epoch: int, seed: int, batch_tokens: int | None, batch_examples: int | None
) -> list[list[int]]:
    """Shuffled example indices cut into global batches of <= batch_tokens tokens (at least one
    example each) or batch_examples examples. Depends on nothing rank-specific."""
    order = list(range(len(lengths)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    batches, cur, tok = [], [], 0
    for i in order:
        full = (batch_examples is not None and len(cur) >= batch_examples) or (
            batch_tokens is not None and tok + lengths[i] > batch_tokens
        )
        if cur and full:
            batches.append(cur)
            cur, tok = [], 0
        cur.append(i)
        tok += lengths[i]
    if cur:
        batches.append(cur)
    return batches


def split_ranks(indices: Sequence[int], lengths: Sequence[int], world_size: int) -> list[list[int]]:
    """Longest first to the least-loaded rank: balanced tokens, deterministic."""
    shares = [[] for _ in range(world_size)]
    load = [0] * world_size
    for i in sorted(indices, key=lambda i: (-lengths[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        shares[r].append(i)
        load[r] += lengths[i]
    return shares


def group_micro(indices: Sequence[int], lengths: Sequence[int], micro_batch_tokens: int, pack: bool) -> list[list[int]]:
    """Packing: first-fit decreasing into rows of <= micro_batch_tokens tokens.
    No packing: length bucketing, sorted by length so padding is small; rows*max_len <= micro_batch_tokens."""
    order = sorted(indices, key=lambda i: (-lengths[i], i))
    if pack:
        bins, room = [], []
        for i in order:
            for b in range(len(bins)):
                if room[b] >= lengths[i]:
                    bins[b].append(i)
                    room[b] -= lengths[i]
                    break
            else:
                bins.append([i])
                room.append(micro_batch_tokens - lengths[i])
        return bins
    groups, cur = [], []
    for i in order:  # descending, so cur[0] is the longest in the group
        if cur and (len(cur) + 1) * lengths[cur[0]] > micro_batch_tokens:
            groups.append(cur)
            cur = []
        cur.append(i)
    if cur:
        groups.append(cur)
    return groups


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [B, T] long
    targets: torch.Tensor  # [B, T] long, next-token labels, IGNORE where no loss
    position_ids: torch.Tensor | None  # [B, T], restarting at 0 per packed example
    attention_mask: torch.Tensor | None  # [B, T], 1 = real token (padded batches only)
    n_tokens: int  # real (non-pad) input tokens
    cu_seq_lens: torch.Tensor | None = None  # [n_examples + 1] int32 example bounds of a packed row
    max_len: int = 0  # longest example in a packed row

    def to(self, device):
        f = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return MicroBatch(
            f(self.input_ids),
            f(self.targets),
            f(self.position_ids),
            f(self.attention_mask),
            self.n_tokens,
            f(self.cu_seq_lens),
            self.max_len,
        )


def _targets(x: SFTExample) -> list[int]:
    ids = x.input_ids
    # position t predicts ids[t+1]; only completion tokens (index >= prompt_len) are predicted
    return [ids[t + 1] if t + 1 >= x.prompt_len else IGNORE for t in range(len(ids) - 1)] + [IGNORE]


def collate_packed(examples: Sequence[SFTExample]) -> MicroBatch:
    """One row [1, sum(len)], positions restarting at 0 per example; transformers turns restarting
    position_ids (with attention_mask=None) into a block-diagonal causal mask."""
    ids, tgt, pos = [], [], []
    for x in examples:
        ids += x.input_ids
        tgt += _targets(x)
        pos += range(len(x))
    t = lambda v: torch.tensor([v], dtype=torch.long)  # noqa: E731
    cu = torch.tensor([0] + [len(x) for x in examples], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return MicroBatch(t(ids), t(tgt), t(pos), None, len(ids), cu, max(len(x) for x in examples))


def collate_padded(examples: Sequence[SFTExample], pad_id: int) -> MicroBatch:
    """Right-padded [B, max_len] with an attention mask (the plain, unpacked layout)."""
    T = max(len(x) for x in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    tgt = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), T), dtype=torch.long)
    for b, x in enumerate(examples):
        n = len(x)
        ids[b, :n] = torch.tensor(x.input_ids)
        tgt[b, :n] = torch.tensor(_targets(x))
        mask[b, :n] = 1
    return MicroBatch(ids, tgt, None, mask, sum(len(x) for x in examples))


def dummy_micro(pad_id: int) -> MicroBatch:
    """A one-token batch with no targets: keeps ranks in lock-step (same number of forward/backward
    calls, which FSDP's collectives need) without adding to the loss."""
    z = torch.tensor([[pad_id]], dtype=torch.long)
    return MicroBatch(z, torch.full_like(z, IGNORE), torch.zeros_like(z), None, 0)


@dataclass
class StepPlan:
    micro: list[list[int]]  # this rank's micro-batches (example indices); [] entries are dummies
    global_targets: int  # loss tokens across all ranks: the loss denominator
    global_tokens: int  # input tokens across all ranks


def step_plan(
    batch: Sequence[int],
    examples: Sequence[SFTExample],
    rank: int,
    world_size: int,
    micro_batch_tokens: int,
    pack: bool,
) -> StepPlan:
    lengths = [len(x) for x in examples]
    shares = split_ranks(batch, lengths, world_size)
    micro = [group_micro(s, lengths, micro_batch_tokens, pack) for s in shares]
    n = max(1, max(len(m) for m in micro))
    mine = micro[rank] + [[] for _ in range(n - len(micro[rank]))]
    targets = sum(len(examples[i]) - max(examples[i].prompt_len, 1) for i in batch)
    return StepPlan(mine, targets, sum(lengths[i] for i in batch))
