"""Cheap sleep (TRL sleeps and wakes once per training step): no full gc.collect() per sleep, memory freed
exactly (the storages are empty after sleep without a collection), timed in a loop holding a large Python
heap, as a trainer's process does."""

import gc
import time

import pytest

from bstar.engine import LLM, SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_sleep_wake_loop_with_a_large_heap_collects_nothing(llama_dir, monkeypatch):
    llm = LLM(str(llama_dir), device="cpu", dtype="float32")
    greedy = SamplingParams(temperature=0, max_tokens=5)
    before = llm.generate([[1, 7, 9, 11]], greedy, use_tqdm=False)[0].outputs[0].token_ids
    heap = [{"k": [i, str(i)]} for i in range(1_000_000)]  # ~3M tracked objects: what a trainer holds
    calls = []
    real_collect = gc.collect
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append(a) or real_collect(*a))
    runner = llm.llm_engine.runner
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        llm.sleep(level=1)
        t1 = time.perf_counter()
        assert runner.kv.untyped_storage().nbytes() == 0  # freed by the sleep itself, not by a collection
        assert all(p.untyped_storage().nbytes() == 0 for p in llm.llm_engine.model.parameters())
        llm.wake_up()
        times.append((t1 - t0, time.perf_counter() - t1))
        assert llm.generate([[1, 7, 9, 11]], greedy, use_tqdm=False)[0].outputs[0].token_ids == before
    assert calls == []
    # a full collection of this heap alone takes longer than a whole sleep
    t0 = time.perf_counter()
    real_collect()
    full_gc = time.perf_counter() - t0
    sleep = max(s for s, _ in times)
    wake = max(w for _, w in times)
    print(f"sleep {sleep * 1e3:.1f} ms, wake {wake * 1e3:.1f} ms, gc.collect {full_gc * 1e3:.1f} ms")
    assert sleep < full_gc
    del heap
