"""Paged KV cache bookkeeping: fixed-size blocks, reference counts, prefix cache, copy-on-write.

Blocks hold `block_size` tokens of K and V for every layer. A block may be referenced by several
sequences (the n candidates of a prompt, or requests with a common prefix); it is only written by a
sequence that holds the sole reference, so a shared partial block is copied before a write.
Full blocks are hashed by a sha256 chain (previous block's digest, their tokens), as vLLM does: the
digest stands for the whole prefix, and Python's 64-bit `hash` of a tuple can collide. A hit is also
checked against the block's own tokens and previous digest (as nano-vllm compares tokens), so even a
collision never serves another prompt's K/V. A freed hashed block stays in the cache, reusable by a
later request with the same prefix, until its slot is needed.
"""

import hashlib
from array import array
from collections import OrderedDict

from bstar.engine.core.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.reset()
        self.prefix_hits = 0  # tokens served from the prefix cache

    def reset(self):
        """Every block free, nothing cached (the KV cache was discarded: sleep). Only for an idle engine."""
        num_blocks = self.num_blocks
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        # what a hashed block holds, checked on every hit: (previous block's digest, its tokens)
        self.block_key: list[tuple | None] = [None] * num_blocks
        self.hash_to_block: dict[bytes, int] = {}
        # Free blocks in eviction order: never-hashed first would be nicer, LRU is what matters.
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))

    # -- accounting -------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Fresh blocks that scheduling `num_new_tokens` more tokens of `seq` takes (CoW included)."""
        total = seq.num_computed + num_new_tokens
        need = max(0, -(-total // self.block_size) - len(seq.block_table))
        if self._needs_cow(seq):
            need += 1
        return need

    def fits_in_place(self, seq: Sequence) -> bool:
        """The next single token lands in a block the sequence holds alone: nothing to allocate or
        copy (the common decode step)."""
        i = seq.num_computed // self.block_size
        return (
            seq.num_computed % self.block_size != 0
            and i < len(seq.block_table)
            and self.ref_counts[seq.block_table[i]] == 1
        )

    def _needs_cow(self, seq: Sequence) -> bool:
        """The next token lands in a partial block that another sequence also references."""
        if seq.num_computed % self.block_size == 0 or not seq.block_table:
            return False
        last = seq.num_computed // self.block_size
        return last < len(seq.block_table) and self.ref_counts[seq.block_table[last]] > 1

    # -- allocation -------------------------------------------------------------------------
    def _take(self) -> int:
        block, _ = self.free.popitem(last=False)
        h = self.block_hash[block]
        if h is not None:  # evict from the prefix cache
            if self.hash_to_block.get(h) == block:
                del self.hash_to_block[h]
            self.block_hash[block] = None
            self.block_key[block] = None
        self.ref_counts[block] = 1
        return block

    def _ref(self, block: int):
        if self.ref_counts[block] == 0:
            del self.free[block]
        self.ref_counts[block] += 1

    def _unref(self, block: int):
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free[block] = None

    def hash_block(self, prev: bytes | int | None, tokens) -> bytes:
        """sha256 of (the previous block's digest, or the sequence's hash_root, then the tokens as int64)."""
        h = hashlib.sha256(prev if isinstance(prev, bytes) else repr(prev).encode())
        h.update(array("q", tokens).tobytes())
        return h.digest()

    def match_prefix(self, seq: Sequence, limit: int | None = None):
        """Give a fresh sequence the cached blocks of its longest cached prefix (of at most `limit` tokens).

        At least one token is always left to compute: its logits are needed to sample."""
        if not self.enable_prefix_caching or seq.block_table:
            return
        bs = self.block_size
        prev = seq.hash_root  # a cache_salt keeps the request's blocks apart from unsalted ones
        usable = len(seq.token_ids) - 1 if limit is None else min(limit, len(seq.token_ids) - 1)
        for i in range(usable // bs):
            tokens = seq.token_ids[i * bs : (i + 1) * bs]
            h = self.hash_block(prev, tokens)
            block = self.hash_to_block.get(h)
            if block is None or self.block_key[block] != (prev, tuple(tokens)):  # (a collision: not ours)
                break
            self._ref(block)
            seq.block_table.append(block)
            prev = h
        n = len(seq.block_table)
        seq.num_computed = n * bs
        seq.num_hashed_blocks = n
        seq.last_hash = prev
        self.prefix_hits += n * bs

    def release_prefix(self, seq: Sequence):
        """Undo match_prefix for a sequence that was not admitted after all."""
        if seq.block_table:
            self.prefix_hits -= len(seq.block_table) * self.block_size
            self.free_seq(seq)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]]:
        """Reserve blocks for the next `num_new_tokens` tokens. Returns copy-on-write (src, dst) pairs."""
        copies = []
        if self._needs_cow(seq):
            i = seq.num_computed // self.block_size
            src = seq.block_table[i]
            dst = self._take()
            copies.append((src, dst))
            self._unref(src)
            seq.block_table[i] = dst
        total = seq.num_computed + num_new_tokens
        while len(seq.block_table) * self.block_size < total:
            seq.block_table.append(self._take())
        return copies

    def fork(self, child: Sequence):
        """A child made by Sequence.fork (its table a copy of the parent's) shares every block of it."""
        for b in child.block_table:
            self._ref(b)

    def free_seq(self, seq: Sequence):
        # Release in reverse so a prefix's head blocks are evicted last.
        for b in reversed(seq.block_table):
            self._unref(b)
        seq.block_table = []
        seq.num_computed = 0
        seq.num_hashed_blocks = 0
        seq.last_hash = seq.hash_root

    def register_full_blocks(self, seqs: list[Sequence]):
        """Hash the blocks of `seqs` that became full and computed, so later requests can reuse them (not
        before their tokens are known on the host: a pending token's block waits)."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for seq in seqs:
            full = min(seq.num_computed, len(seq.token_ids) - seq.num_pending) // bs
            while seq.num_hashed_blocks < full:  # (the common case, a decode within a block: nothing new)
                i = seq.num_hashed_blocks
                tokens = seq.token_ids[i * bs : (i + 1) * bs]
                h = self.hash_block(seq.last_hash, tokens)
                block = seq.block_table[i]
                if h not in self.hash_to_block and self.block_hash[block] is None:
                    self.hash_to_block[h] = block
                    self.block_hash[block] = h
                    self.block_key[block] = (seq.last_hash, tuple(tokens))
                seq.last_hash = h
                seq.num_hashed_blocks += 1

    def reset_prefix_cache(self):
        """Forget every cached prefix (after a weight update the cached K/V are stale)."""
        self.hash_to_block.clear()
        self.block_hash = [None] * self.num_blocks
        self.block_key = [None] * self.num_blocks
