"""The prefix cache serves a block only when it holds the very tokens (and the very prefix) asked for:
a hash collision, forced here, must fall back to computing the K/V, never reuse another prompt's."""

import pytest
import torch

from bstar.engine import LLM, SamplingParams
from bstar.engine.core.block_manager import BlockManager
from bstar.engine.core.sequence import Sequence
from bstar.testing.model_factory import make_model


def _seq(tokens):
    return Sequence("r", tokens, SamplingParams(max_tokens=1))


def _computed(bm, seq):
    bm.match_prefix(seq)
    bm.allocate(seq, len(seq.token_ids) - seq.num_computed)
    seq.num_computed = len(seq.token_ids)
    bm.register_full_blocks([seq])


def test_the_chain_hash_is_sha256_of_the_previous_digest_and_the_tokens():
    bm = BlockManager(8, 4)
    h1 = bm.hash_block(None, [1, 2, 3, 4])
    assert isinstance(h1, bytes) and len(h1) == 32
    assert bm.hash_block(None, [1, 2, 3, 4]) == h1 != bm.hash_block(None, [1, 2, 3, 5])
    assert bm.hash_block(h1, [5, 6, 7, 8]) != bm.hash_block(bm.hash_block(None, [0, 2, 3, 4]), [5, 6, 7, 8])
    # a cache salt (the sequence's hash_root) keeps otherwise equal blocks apart
    assert bm.hash_block(12345, [1, 2, 3, 4]) != h1


@pytest.mark.parametrize("collide", ["every block", "same prefix digest"])
def test_a_forced_collision_is_never_served(monkeypatch, collide):
    """Every block hashes alike: a prompt with other tokens gets no cached block (and the prompt that
    registered them still gets its own); only the block's own tokens after the same prefix are a hit."""
    bm = BlockManager(16, 4)
    if collide == "every block":
        monkeypatch.setattr(bm, "hash_block", lambda prev, tokens: b"x" * 32)
    else:  # the tokens still count, the previous block's digest does not
        monkeypatch.setattr(bm, "hash_block", lambda prev, tokens: bytes(tuple(tokens)[:1]) * 32)
    a = _seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    _computed(bm, a)
    assert len(bm.hash_to_block) >= 1
    b = _seq([1, 9, 9, 9, 5, 6, 7, 8, 9])  # same first token: collides under both forced hashes
    bm.match_prefix(b)
    assert b.block_table == [] and b.num_computed == 0 and bm.prefix_hits == 0
    c = _seq([1, 2, 3, 4, 5, 6, 7, 8, 0])
    bm.match_prefix(c)
    assert c.block_table[:1] == a.block_table[:1] and bm.prefix_hits >= 4  # a true hit is still served


def test_an_engine_with_colliding_block_hashes_gives_the_tokens_of_one_without_a_prefix_cache(tmp_path, monkeypatch):
    """End to end: with every block hash equal, a second prompt that shares no block with the first still
    generates what an engine without a prefix cache generates (before, it reused the first's K/V)."""
    path = make_model(str(tmp_path / "llama"), "llama", seed=3, tokenizer=False)
    monkeypatch.setattr(BlockManager, "hash_block", lambda self, prev, tokens: b"x" * 32)
    g = torch.Generator().manual_seed(11)
    a, b = (torch.randint(3, 300, (40,), generator=g).tolist() for _ in range(2))
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    llm = LLM(path, dtype="float32", device="cpu", block_size=16)
    llm.generate([a], sp, use_tqdm=False)
    hits = llm.engine.block_manager.prefix_hits
    got = llm.generate([b], sp, use_tqdm=False)[0].outputs[0].token_ids
    assert llm.engine.block_manager.prefix_hits == hits
    fresh = LLM(path, dtype="float32", device="cpu", block_size=16, enable_prefix_caching=False)
    assert got == fresh.generate([b], sp, use_tqdm=False)[0].outputs[0].token_ids
