"""Continuous batching: which sequences run this step, and how many tokens each.

Every step, running sequences go first (oldest first): a decode takes one token, an unfinished
prefill takes its next chunk. Waiting sequences are then admitted in arrival order while the token
budget, the sequence cap and free blocks allow. When blocks run out the newest running sequences
are preempted: their blocks are freed and they rejoin the front of the queue to be recomputed
(prefix-cache hits make that cheap). Outputs are never corrupted, only delayed.

After the forward, `advance` counts the computed tokens and forks the n - 1 siblings of every
prompt whose prefill just ended: they share its KV blocks and draw from its logits row.

Prompt-only sequences (Sequence.prompt_only: PRM scoring and compute_logits, core.prompt_forward) follow
the same rules but draw nothing: `advance` finishes them when their prefill ends.

Each sequence's status (SequenceStatus) says which queue holds it: waiting or preempted (self.waiting),
running (self.running), finished (neither).
"""

from collections import deque
from dataclasses import dataclass, field

from bstar.engine.config import EngineConfig
from bstar.engine.core.block_manager import BlockManager
from bstar.engine.core.sequence import Sequence, SequenceStatus


@dataclass
class Batch:
    seqs: list[Sequence] = field(default_factory=list)  # single-token rows first
    num_new: list[int] = field(default_factory=list)  # tokens computed this step, per sequence
    num_decode: int = 0
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst) blocks
    sampled: list[int] = field(default_factory=list)  # sequences that draw (their last token is computed this step)
    # Async scheduling: decode rows whose input is a pending token, still on the device: row
    # feed_rows[k] reads feed_tokens[feed_src[k]] (the draw of the step in flight).
    feed_rows: list[int] = field(default_factory=list)
    feed_src: list[int] = field(default_factory=list)
    feed_tokens: object = None  # torch.Tensor int64

    def __len__(self):
        return len(self.seqs)

    def flat_tokens(self, block_size: int):
        """The step's new tokens as flat host lists, decode rows (one token each) first, then prefill chunks:
        (token ids, positions, cache slots, per-sequence lengths after the step, the row of each sequence's
        last token, cumulative query lengths of the prefill chunks). Both runner paths build on these."""
        bs, nd, seqs = block_size, self.num_decode, self.seqs
        pos = [s.num_computed for s in seqs[:nd]]
        ids = [s.token_ids[p] for s, p in zip(seqs, pos)]
        slots = [s.block_table[p // bs] * bs + p % bs for s, p in zip(seqs, pos)]
        lens = [p + 1 for p in pos]
        last_rows = list(range(nd))
        cu = [0]
        for seq, n in zip(seqs[nd:], self.num_new[nd:]):
            start, end = seq.num_computed, seq.num_computed + n
            ids += seq.token_ids[start:end]
            pos += range(start, end)
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(start, end)]
            lens.append(end)
            last_rows.append(len(ids) - 1)
            cu.append(cu[-1] + n)
        return ids, pos, slots, lens, last_rows, cu


class Scheduler:
    def __init__(self, cfg: EngineConfig, block_manager: BlockManager):
        self.cfg = cfg
        self.bm = block_manager
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.focus: set[str] | None = None  # request ids: schedule only their sequences (LLMEngine's isolation)
        # A waiting prompt_logprobs sequence's prefix hits (PromptLogprobs.match); False: it waits a step.
        self.match_scored_prefix = lambda seq, may_wait: True

    def add(self, seq: Sequence):
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _preempt(self, seq: Sequence):
        self.bm.free_seq(seq)
        seq.status = SequenceStatus.PREEMPTED
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def preempt_all(self):
        """Preempt every running sequence (newest first, so the oldest ends up first in the queue): they
        are recomputed from their tokens. After a failed step nothing it wrote into the cache is trusted."""
        while self.running:
            self._preempt(self.running.pop())

    def schedule(self) -> Batch:
        if self.focus is None:
            return self._schedule()
        # Only the focused requests' sequences (the others wait, in order, behind them).
        others = [s for s in self.waiting if s.request_id not in self.focus]
        self.waiting = deque(s for s in self.waiting if s.request_id in self.focus)
        try:
            return self._schedule()
        finally:
            self.waiting.extend(others)

    def _schedule(self) -> Batch:
        budget = self.cfg.max_num_batched_tokens
        picked: list[tuple[Sequence, int]] = []
        copies: list[tuple[int, int]] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if seq.ends_at_pending or (self.focus is not None and seq.request_id not in self.focus):
                i += 1  # (async scheduling: its pending token is its last; or another request has the focus)
                continue
            n = min(len(seq.token_ids) - seq.num_computed, budget)
            if n == 1 and self.bm.fits_in_place(seq):  # no block to take or copy
                picked.append((seq, 1))
                budget -= 1
                i += 1
                continue
            while self.bm.blocks_needed(seq, n) > self.bm.num_free:
                victim = self.running.pop()  # newest first
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                copies += self.bm.allocate(seq, n)
                picked.append((seq, n))
                budget -= n
                i += 1
        # Admit new work only when nothing was preempted: otherwise it would be evicted again.
        in_flight = sum(1 + s.fork_count for s in self.running) if self.waiting else 0
        later: list[Sequence] = []  # scoring prompts whose head another one computes now: next step
        while self.waiting and budget > 0 and not preempted:
            seq = self.waiting[0]
            if in_flight + 1 + seq.fork_count > self.cfg.max_num_seqs and self.running:
                break
            if not seq.block_table and not seq.prompt_logprobs_pending:  # (a cached prefix has no logits)
                self.bm.match_prefix(seq, seq.prefix_limit)
            elif not seq.block_table and not self.match_scored_prefix(seq, self.focus is None):
                later.append(self.waiting.popleft())
                continue
            n = min(len(seq) - seq.num_computed, budget)
            if self.bm.blocks_needed(seq, n) > self.bm.num_free:
                # Give back its prefix hits: held by a waiting sequence, nothing could preempt them, and
                # the running ones could wait on each other forever. (They match again next time.)
                self.bm.release_prefix(seq)
                break
            self.waiting.popleft()
            copies += self.bm.allocate(seq, n)
            self.running.append(seq)
            seq.status = SequenceStatus.RUNNING
            picked.append((seq, n))
            budget -= n
            in_flight += 1 + seq.fork_count
        self.waiting.extendleft(reversed(later))
        num_new = [n for _, n in picked]
        num_decode = num_new.count(1)
        if num_decode < len(picked):  # single-token rows first (a stable sort)
            picked.sort(key=lambda p: p[1] != 1)
            num_new = [n for _, n in picked]
        batch = Batch([s for s, _ in picked], num_new, num_decode, copies)
        batch.sampled = [
            i for i, (s, n) in enumerate(picked) if s.num_computed + n == len(s.token_ids) and not s.prompt_only
        ]
        return batch

    def advance(self, batch: Batch) -> tuple[list[Sequence], list[int]]:
        """After the batch's forward: count its computed tokens, register the blocks they filled,
        finish the prompt-only sequences whose prefill ended, and fork the siblings of each prompt
        whose prefill just ended. Returns the sequences to sample, siblings right after their
        parent, and for each its row of the logits (the row of batch.sampled it comes from: a
        parent's row serves its siblings)."""
        for s, n in zip(batch.seqs, batch.num_new):
            s.num_computed += n
        self.bm.register_full_blocks(batch.seqs)
        for s in batch.seqs:
            if s.prompt_only and s.num_computed == len(s.token_ids):
                self.finish(s, "prompt")
        seqs, rows = [], []
        for row, i in enumerate(batch.sampled):
            s = batch.seqs[i]
            seqs.append(s)
            rows.append(row)
            if s.fork_count:
                children = self._fork(s)
                seqs += children
                rows += [row] * len(children)
        return seqs, rows

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """The parent's fork_count siblings, sharing its blocks. They join the running set right
        away (their KV is already there), right after their parent: a request's candidates stay
        adjacent, so decode rows come group-major (no shuffles in cascade attention) and preemption
        still takes the newest request's first."""
        children = [parent.fork(c) for c in range(1, parent.fork_count + 1)]
        for c in children:
            self.bm.fork(c)
            c.status = SequenceStatus.RUNNING
        i = self.running.index(parent)
        self.running[i + 1 : i + 1] = children
        parent.fork_count = 0
        return children

    def finish(self, seq: Sequence, reason: str):
        """A running sequence stopped (or, with async scheduling, one preempted after its last draw)."""
        if seq.status not in (SequenceStatus.RUNNING, SequenceStatus.PREEMPTED):
            raise ValueError(f"cannot finish a {seq.status.value} sequence")
        (self.running if seq.status is SequenceStatus.RUNNING else self.waiting).remove(seq)
        seq.finish_reason = reason
        seq.status = SequenceStatus.FINISHED
        self.bm.free_seq(seq)

    def abort(self, request_id: str) -> list[Sequence]:
        gone = [s for s in list(self.waiting) + self.running if s.request_id == request_id]
        for s in gone:
            (self.running if s.status is SequenceStatus.RUNNING else self.waiting).remove(s)
            self.bm.free_seq(s)
            s.finish_reason = "abort"
            s.status = SequenceStatus.FINISHED
        return gone
