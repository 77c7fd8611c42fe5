"""Scheduler on its own (no model): each sequence's status against the queue that holds it, through
admission, chunked prefill, forks, preemption, finish and abort; and the prompt-only mode (PRM scoring,
compute_logits) under the same rules."""

import random

import pytest

from bstar.engine.config import EngineConfig
from bstar.engine.core.block_manager import BlockManager
from bstar.engine.core.scheduler import Scheduler
from bstar.engine.core.sequence import Sequence, SequenceStatus
from bstar.engine.entrypoints.sampling_params import SamplingParams

W, R, P, F = SequenceStatus.WAITING, SequenceStatus.RUNNING, SequenceStatus.PREEMPTED, SequenceStatus.FINISHED


def _sched(num_blocks=64, block_size=4, budget=64, max_seqs=16) -> Scheduler:
    cfg = EngineConfig(block_size=block_size, max_num_batched_tokens=budget, max_num_seqs=max_seqs)
    return Scheduler(cfg, BlockManager(num_blocks, block_size))


def _seq(rid, n, fork_count=0, tokens=None) -> Sequence:
    return Sequence(rid, tokens or list(range(1, n + 1)), SamplingParams(max_tokens=8), fork_count=fork_count)


def _check(sched: Scheduler, seqs: list[Sequence]):
    """Status says where a sequence is: running in self.running (holding blocks), waiting or preempted in
    self.waiting (preempted ones, and only they, were preempted), finished in neither (no blocks)."""
    waiting, running = list(sched.waiting), sched.running
    for s in seqs:
        assert (s.status is R) == (s in running), s.status
        assert (s.status in (W, P)) == (s in waiting), s.status
        assert (s.status is P) == (s.num_preemptions > 0 and s in waiting)
        if s.status is F:
            assert s.block_table == [] and s.finish_reason is not None
    assert len(set(map(id, waiting + running))) == len(waiting) + len(running)  # no sequence twice


def _step(sched: Scheduler, rng: random.Random | None = None):
    """A model step without a model: schedule, advance, and give every sampled sequence a token."""
    batch = sched.schedule()
    seqs, _ = sched.advance(batch)
    for s in seqs:
        s.append_token(rng.randrange(50) if rng else 7, 0.0, None)
    return batch, seqs


def test_admission_fork_and_finish():
    sched = _sched()
    a = _seq("a", 10, fork_count=2)
    sched.add(a)
    assert a.status is W
    _check(sched, [a])
    batch, drew = _step(sched)
    assert batch.seqs == [a] and a.status is R
    kids = drew[1:]
    assert len(kids) == 2 and all(k.status is R for k in kids)
    assert sched.running == [a, *kids]  # siblings right after their parent
    _check(sched, drew)
    sched.finish(kids[0], "stop")
    assert kids[0].status is F and kids[0] not in sched.running
    _check(sched, drew)
    with pytest.raises(ValueError, match="finished"):
        sched.finish(kids[0], "stop")


def test_a_waiting_sequence_cannot_finish():
    sched = _sched()
    a = _seq("a", 5)
    sched.add(a)
    with pytest.raises(ValueError, match="waiting"):
        sched.finish(a, "stop")
    _check(sched, [a])


def test_preemption_and_readmission():
    """Blocks run out: the newest running sequence is preempted (blocks freed, queue front); it runs again
    when blocks are free, and finishing it from the queue (async scheduling's late draw) takes it out."""
    sched = _sched(num_blocks=4, block_size=4, budget=64)
    a, b = _seq("a", 7), _seq("b", 7)
    sched.add(a)
    sched.add(b)
    _step(sched)  # both prefill: 2 blocks each, the cache is full
    assert a.status is R and b.status is R and sched.bm.num_free == 0
    a.token_ids += [1] * 2  # a's next chunk needs a third block
    _step(sched)
    assert b.status is P and list(sched.waiting) == [b] and b.block_table == [] and b.num_preemptions == 1
    assert a.status is R
    _check(sched, [a, b])
    sched.finish(a, "stop")
    _step(sched)
    assert b.status is R and sched.waiting == type(sched.waiting)()
    _check(sched, [a, b])
    sched.preempt_all()
    assert b.status is P
    sched.finish(b, "length")  # (async scheduling: preempted after its last draw)
    assert b.status is F and not sched.has_work()
    _check(sched, [a, b])


def test_preempt_all_keeps_the_oldest_first():
    sched = _sched()
    seqs = [_seq(str(i), 5) for i in range(3)]
    for s in seqs:
        sched.add(s)
    _step(sched)
    sched.preempt_all()
    assert list(sched.waiting) == seqs and all(s.status is P for s in seqs)
    _check(sched, seqs)


def test_abort_from_either_queue():
    sched = _sched(num_blocks=3, block_size=4)
    a, b = _seq("a", 8), _seq("b", 8)
    sched.add(a)
    sched.add(b)
    _step(sched)  # a runs, b waits for blocks
    assert (a.status, b.status) == (R, W)
    assert sched.abort("b") == [b] and sched.abort("a") == [a]
    assert a.status is F and b.status is F and sched.bm.num_free == 3
    _check(sched, [a, b])


@pytest.mark.parametrize("seed", range(4))
def test_random_schedules_keep_status_and_queues_in_step(seed):
    rng = random.Random(seed)
    sched = _sched(num_blocks=rng.choice([6, 12]), block_size=rng.choice([2, 4]), budget=rng.choice([8, 32]))
    seqs = []
    for i in range(200):
        op = rng.random()
        if op < 0.15:
            s = _seq(f"r{i}", rng.randint(1, 9), fork_count=rng.choice([0, 0, 1, 2]))
            sched.add(s)
            seqs.append(s)
        elif op < 0.25 and sched.running:
            sched.finish(rng.choice(sched.running), "stop")
        elif op < 0.3 and seqs:
            sched.abort(rng.choice(seqs).request_id)
        elif op < 0.33:
            sched.preempt_all()
        else:
            _, drew = _step(sched, rng)
            seqs += [s for s in drew if s not in seqs]
        _check(sched, seqs)
        held = sum(len(s.block_table) for s in sched.running)
        assert sched.bm.num_used <= held  # only running sequences hold blocks
    assert sched.num_preemptions > 0  # (the cache is small enough to preempt)


def test_prompt_only_sequences_prefill_in_chunks_and_finish():
    """Prompt-only sequences share the budget (chunked), draw nothing, and finish when their prefill ends,
    their full blocks registered for the prefix cache and their blocks freed."""
    sched = _sched(num_blocks=16, block_size=4, budget=8)
    long, short = _seq("long", 13), _seq("short", 3)
    for s in (long, short):
        s.prompt_only = True
        sched.add(s)
    steps = []
    for _ in range(3):  # (bounded: a prompt-only sequence that never finished would spin forever)
        if not sched.has_work():
            break
        batch, drew = _step(sched)
        assert batch.sampled == [] and drew == []
        steps.append([(s.request_id, n) for s, n in zip(batch.seqs, batch.num_new)])
        _check(sched, [long, short])
    assert steps == [[("long", 8)], [("long", 5), ("short", 3)]]
    assert long.status is F and short.status is F and long.finish_reason == "prompt"
    assert sched.bm.num_free == 16 and len(sched.bm.hash_to_block) == 3  # long's three full blocks


@pytest.mark.parametrize("limit, want", [(None, 8), (6, 4), (0, 0)])
def test_prompt_only_prefix_limit(limit, want):
    """A prompt-only sequence takes at most prefix_limit tokens from the prefix cache (0: none)."""
    sched = _sched(block_size=4)
    ids = list(range(1, 13))
    first = _seq("a", 0, tokens=ids)
    first.prompt_only = True
    sched.add(first)
    _step(sched)
    again = _seq("b", 0, tokens=ids)
    again.prompt_only, again.prefix_limit = True, limit
    sched.add(again)
    batch, _ = _step(sched)
    assert batch.num_new == [12 - want] and again.status is F
