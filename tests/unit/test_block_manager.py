"""BlockManager on its own: random allocate / fork / copy-on-write / free / prefix-cache sequences checked
against a plain model of who holds which block, and the prefix cache's reuse and eviction by hand."""

import random

import pytest

from bstar.engine.core.block_manager import BlockManager
from bstar.engine.core.sequence import Sequence
from bstar.engine.entrypoints.sampling_params import SamplingParams

SP = SamplingParams(max_tokens=8)


def _seq(tokens) -> Sequence:
    return Sequence("r", list(tokens), SP)


def _check(bm: BlockManager, live: list[Sequence]):
    """Reference counts are exactly the live sequences' references; the free list is the unreferenced blocks;
    a block a sequence writes next is its own (after allocate: copy-on-write made it so)."""
    refs = [0] * bm.num_blocks
    for s in live:
        for b in s.block_table:
            refs[b] += 1
    assert bm.ref_counts == refs
    assert set(bm.free) == {b for b in range(bm.num_blocks) if refs[b] == 0}
    assert bm.num_free + bm.num_used == bm.num_blocks


@pytest.mark.parametrize("seed", range(5))
def test_random_operations_keep_reference_counts_exact(seed):
    rng = random.Random(seed)
    bs = rng.choice([1, 2, 4])
    bm = BlockManager(num_blocks=64, block_size=bs)
    live: list[Sequence] = []
    for _ in range(300):
        op = rng.random()
        if op < 0.3 or not live:  # a new prompt, maybe sharing a cached prefix
            s = _seq(rng.choices(range(5), k=rng.randint(1, 12)))
            bm.match_prefix(s)
            assert s.num_computed < len(s.token_ids)  # one token always left to compute
            need = bm.blocks_needed(s, len(s.token_ids) - s.num_computed)
            if need > bm.num_free:
                bm.release_prefix(s)
                continue
            free_before = bm.num_free
            copies = bm.allocate(s, len(s.token_ids) - s.num_computed)
            assert copies == [] and free_before - bm.num_free <= need
            s.num_computed = len(s.token_ids)
            live.append(s)
        elif op < 0.5:  # a sibling shares every block
            parent = rng.choice(live)
            child = parent.fork(index=1)
            bm.fork(child)
            assert child.block_table == parent.block_table
            live.append(child)
        elif op < 0.8:  # one more token: copy-on-write if its block is shared
            s = rng.choice(live)
            need = bm.blocks_needed(s, 1)
            if need > bm.num_free:
                continue
            shared = bm._needs_cow(s)
            last = s.num_computed // bs
            old = s.block_table[last] if shared else None
            copies = bm.allocate(s, 1)
            if shared:
                assert copies == [(old, s.block_table[last])] and bm.ref_counts[s.block_table[last]] == 1
            else:
                assert copies == []
            s.token_ids.append(rng.randrange(5))
            s.num_computed += 1
            assert bm.ref_counts[s.block_table[(s.num_computed - 1) // bs]] == 1  # written alone
        elif op < 0.9:
            bm.register_full_blocks(live)
        else:
            s = live.pop(rng.randrange(len(live)))
            bm.free_seq(s)
            assert s.block_table == [] and s.num_computed == 0
        _check(bm, live)


def test_prefix_cache_reuses_registered_blocks_and_evicts_lru():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = _seq([1, 2, 3, 4, 5])
    bm.allocate(a, 5)
    a.num_computed = 5
    bm.register_full_blocks([a])  # [1, 2] and [3, 4] are full
    bm.free_seq(a)  # freed, still cached
    assert bm.num_free == 4
    b = _seq([1, 2, 3, 4, 9])
    bm.match_prefix(b)
    assert b.num_computed == 4 and bm.prefix_hits == 4 and bm.num_free == 2
    c = _seq([1, 2, 7, 7, 7])  # shares only the first block
    bm.match_prefix(c)
    assert c.num_computed == 2 and c.block_table == b.block_table[:1]
    bm.free_seq(b)
    bm.free_seq(c)
    # Taking every block evicts the cached ones: a later match finds nothing
    d = _seq([8] * 8)
    bm.allocate(d, 8)
    e = _seq([1, 2, 3, 4, 5])
    bm.free_seq(d)
    bm.match_prefix(e)
    assert e.num_computed == 0


def test_a_prefix_match_leaves_one_token_and_respects_the_limit():
    bm = BlockManager(num_blocks=8, block_size=2)
    a = _seq([1, 2, 3, 4])
    bm.allocate(a, 4)
    a.num_computed = 4
    bm.register_full_blocks([a])
    whole = _seq([1, 2, 3, 4])
    bm.match_prefix(whole)
    assert whole.num_computed == 2  # the last block would leave no token to sample from
    limited = _seq([1, 2, 3, 4, 5])
    bm.match_prefix(limited, limit=1)
    assert limited.num_computed == 0


def test_reset_prefix_cache_forgets_every_prefix():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = _seq([1, 2, 3])
    bm.allocate(a, 3)
    a.num_computed = 3
    bm.register_full_blocks([a])
    bm.reset_prefix_cache()
    b = _seq([1, 2, 3])
    bm.match_prefix(b)
    assert b.num_computed == 0


def test_prefix_caching_off_matches_nothing():
    bm = BlockManager(num_blocks=4, block_size=2, enable_prefix_caching=False)
    a = _seq([1, 2, 3])
    bm.allocate(a, 3)
    a.num_computed = 3
    bm.register_full_blocks([a])
    b = _seq([1, 2, 3])
    bm.match_prefix(b)
    assert b.num_computed == 0 and bm.prefix_hits == 0
