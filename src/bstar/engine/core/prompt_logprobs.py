"""prompt_logprobs (vLLM's): which sequences' prefill fills them, their values computed from the prompt
positions' hidden states on the device and on their way to the host, and putting them in their requests
before any output of those requests is returned.

Scoring requests that share a prompt head (lm-eval sends each context with several continuations) compute
it once: the entries of every full prompt block are kept, keyed by the block's prefix-cache hash, and a later
request with the same head takes them and the cached KV, and computes only from its last shared block on
(`match`). vLLM computes every such request in full (it skips the prefix cache for prompt_logprobs)."""

from collections import OrderedDict

import torch

from bstar.engine.core.block_manager import BlockManager
from bstar.engine.core.sequence import Request, Sequence
from bstar.engine.runner.sampler import flat_logprob_entries, prompt_logprob_tensors, whole_vocabulary
from bstar.kernels.host import HostCopy, to_device
from bstar.kernels.logprob_rows import logprob_rows

MAX_STORED_BLOCKS = 4096  # prompt blocks whose entries are kept (Python objects: ~5 KB a block at top-1)


class _Copy:
    """Prompt logprobs computed on the device and on their way to the host (kernels.host.HostCopy): row r
    is prompt_logprobs[rows[r][1]] of request rows[r][0]; `want`: the entries each row asks for; `width`:
    values per row in the flat copy (sampler.prompt_logprob_tensors)."""

    def __init__(self, rows: list[tuple[Request, int]], want: list[int], copy: HostCopy, width: int):
        self.rows, self.want, self.copy, self.width = rows, want, copy, width


class PromptLogprobs:
    """The engine's prompt-logprob work in flight: `seqs`, the sequences whose prefill fills their request's
    prompt_logprobs; `copies`, values launched on the device and not yet in their requests; `blocks`, the
    entries of finished prompts' full blocks by (prefix-cache hash, top-k asked), as many as the KV cache has
    blocks (at most MAX_STORED_BLOCKS), least recently used out first."""

    def __init__(self, vocab_size: int, device: torch.device, bm: BlockManager, requests: dict[str, Request]):
        self.vocab_size, self.device, self.bm, self.requests = vocab_size, device, bm, requests
        self.seqs: set[Sequence] = set()
        self.copies: list[_Copy] = []
        self.blocks: OrderedDict[tuple[bytes, int], list] = OrderedDict()
        self.launched = self.taken = 0  # copies launched / taken, ever
        self.ending: list[Sequence] = []  # prefill ended this step: its entries are launched by now
        self.storing: dict[Sequence, int] = {}  # ... and in its request once `taken` reaches this
        self.heads: dict[Sequence, tuple] = {}  # admitted scoring sequences: (first block's hash, top-k)

    def _want(self, seq: Sequence) -> int:
        return whole_vocabulary([seq.params.prompt_logprobs], self.vocab_size)[0]

    def match(self, seq: Sequence, may_wait: bool = True) -> bool:
        """Admit waiting scoring sequence `seq` (no blocks yet): take the stored entries and cached KV of its
        longest stored prompt head, all but the last of those blocks (whose last token's logits give the
        entry after it), so it computes only the rest. False (only when `may_wait`): wait, another sequence is
        scoring the same first block right now (its entries are there next step)."""
        bm, bs = self.bm, self.bm.block_size
        full = seq.prompt_len // bs
        if not bm.enable_prefix_caching or full < 2:
            return True
        want, prev, keys, ids = self._want(seq), seq.hash_root, [], seq.token_ids
        for i in range(full):
            h = bm.hash_block(prev, ids[i * bs : (i + 1) * bs])
            if not keys:
                head = (h, want)
            if (h, want) not in self.blocks:
                break
            keys.append((h, want))
            prev = h
        if len(keys) < 2 and may_wait and self._busy(seq, head):
            return False
        self.heads[seq] = head
        if len(keys) >= 2:
            bm.match_prefix(seq, (len(keys) - 1) * bs)
            n = len(seq.block_table) * bs  # tokens from the cache: entries 0..n are stored
            entries = self.requests[seq.request_id].prompt_logprobs
            for j, key in enumerate(keys[: n // bs + 1]):
                self.blocks.move_to_end(key)
                block = self.blocks[key]
                for at in range(min(bs, n + 1 - j * bs)):
                    e = block[at]
                    entries[j * bs + at] = None if e is None else dict(e)  # (Logprob objects shared)
        return True

    def _busy(self, seq: Sequence, head: tuple) -> bool:
        """Another admitted sequence is computing entries for prompt head `head` (forgets the finished)."""
        busy = False
        for s, h in list(self.heads.items()):
            if s not in self.seqs and s not in self.storing and s not in self.ending:
                del self.heads[s]
            elif h == head and s is not seq and (s.block_table or s not in self.seqs):
                busy = True
        return busy

    def forget(self):
        """Drop the stored entries (the prefix cache was reset: new weights, or a failed step)."""
        self.blocks.clear()
        self.storing.clear()
        self.ending.clear()
        self.heads.clear()
        self.taken = self.launched - len(self.copies)

    def spans(self, batch):
        """For the batch's sequences that fill prompt_logprobs: (seq, first position, end position,
        token rows) of the prompt positions computed this step whose next token is a prompt token.
        A sequence whose prefill ends this step is done with them."""
        spans, row = [], 0
        for s, n in zip(batch.seqs, batch.num_new):
            if s.prompt_logprobs_pending:
                start = s.num_computed
                end = min(start + n, s.prompt_len - 1)
                if end > start:
                    spans.append((s, start, end, range(row, row + end - start)))
                if start + n >= s.prompt_len:
                    s.prompt_logprobs_pending = False
                    self.seqs.discard(s)
                    self.ending.append(s)
            row += n
        return spans

    def launch(self, spans, hidden: torch.Tensor, model, requests: dict[str, Request]):
        """Raw logprobs (no penalty, temperature or filter, as vLLM) of each span's next prompt tokens
        from their hidden states, a slice of rows at a time (never [tokens, vocab] at once), launched on
        the device and on their way to the host (`take` puts them in their requests).
        On the CPU the slices are small enough for a slice's logits to stay in cache through the
        logsumexp, top-k and rank passes (256 rows: 1.5-1.8x faster than 4096 here)."""
        rows = [(s, p) for s, start, end, _ in spans for p in range(start, end)]
        V = self.vocab_size
        step = 256 if self.device.type == "cpu" else max(1, (1 << 24) // V)
        for i in range(0, len(rows), step):
            part = rows[i : i + step]
            logits = model.compute_logits(hidden[i : i + step]).float()
            targets = to_device([s.token_ids[p + 1] for s, p in part], torch.int64, logits.device)
            want = whole_vocabulary([s.params.prompt_logprobs for s, _ in part], V)
            flat = logprob_rows(logits, targets) if max(want) <= 1 else None  # (lm-eval's: the C kernel)
            *tensors, width = flat or prompt_logprob_tensors(logits, targets, want)
            dest = [(requests[s.request_id], p + 1) for s, p in part]
            self.copies.append(_Copy(dest, want, HostCopy(tensors), width))
            self.launched += 1

    def take(self, requests: dict[str, Request], upto: int | None = None):
        """Put the first `upto` launched prompt-logprob copies (all: None) in their requests, waiting
        for each copy to reach the host; a request aborted meanwhile is left as its output returned it."""
        for s in self.ending:  # (called after the step's launch: its copies are counted)
            self.storing[s] = self.launched
        self.ending = []
        upto = len(self.copies) if upto is None else upto
        taken, self.copies = self.copies[:upto], self.copies[upto:]
        for c in taken:
            entries = flat_logprob_entries(*c.copy.lists(), c.want, c.width)
            for (req, i), e in zip(c.rows, entries):
                if requests.get(req.request_id) is req:
                    req.prompt_logprobs[i] = e
            self.taken += 1
        for s, after in list(self.storing.items()):
            if after <= self.taken:
                del self.storing[s]
                req = requests.get(s.request_id)
                if req is not None and req.prompt_logprobs is not None:
                    self._store(s, req.prompt_logprobs)

    def _store(self, seq: Sequence, entries: list):
        """Keep the entries of the full blocks of `seq`'s prompt (complete: its prefill's copies are taken)."""
        if not self.bm.enable_prefix_caching:
            return
        bs, want, prev, ids = self.bm.block_size, self._want(seq), seq.hash_root, seq.token_ids
        for i in range(seq.prompt_len // bs):
            prev = self.bm.hash_block(prev, ids[i * bs : (i + 1) * bs])
            if (prev, want) not in self.blocks:
                self.blocks[prev, want] = entries[i * bs : (i + 1) * bs]
        while len(self.blocks) > min(self.bm.num_blocks, MAX_STORED_BLOCKS):
            self.blocks.popitem(last=False)
