"""bstar/testing/gpu_timing.py: the rotation plan and the call order on any machine; graph replays against
stream launches on CUDA (skipped without it)."""

import pytest
import torch

from bstar.testing.gpu_timing import Timing, call_order, device_time, device_times, rotation_count

L2 = 50 << 20  # an H100's


@pytest.mark.parametrize("nbytes", [300_000, 2 << 20, 64 << 20, 150 << 20, 199 << 20])
def test_rotation_count_puts_enough_bytes_between_two_uses_of_a_set(nbytes):
    n = rotation_count(nbytes, L2, factor=4, max_sets=10_000)
    assert n > 1
    assert (n - 1) * nbytes >= 4 * L2  # the other sets, touched before this one comes round again
    assert (n - 2) * nbytes < 4 * L2  # and no more sets than that needs


def test_rotation_count_one_set_when_large_and_capped_when_tiny():
    assert rotation_count(200 << 20, L2, factor=4) == 1
    assert rotation_count(2 << 30, L2) == 1
    assert rotation_count(1, L2, max_sets=256) == 256


@pytest.mark.parametrize("n_sets,min_calls", [(1, 10), (3, 10), (10, 10), (64, 10), (4, 1), (7, 30)])
def test_call_order_is_round_robin_with_every_set_equally_often(n_sets, min_calls):
    order = call_order(n_sets, min_calls)
    assert len(order) >= max(min_calls, n_sets)
    assert order[:n_sets] == list(range(n_sets))
    assert all(order[i] == i % n_sets for i in range(len(order)))
    counts = [order.count(i) for i in range(n_sets)]
    assert len(set(counts)) == 1  # equal work for every input set
    assert len(order) - n_sets < max(min_calls, n_sets)  # no more rounds than needed


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the callables run once, at capture")
def test_device_times_calls_every_set_in_rotation_after_one_warm_up_call():
    calls = {"a": [], "b": []}
    fns = {name: [lambda name=name, i=i: calls[name].append(i) for i in range(n)] for name, n in (("a", 3), ("b", 1))}
    times = device_times(fns, reps=2, min_calls=4)
    assert set(times) == {"a", "b"} and all(isinstance(t, Timing) and t.method == "host" for t in times.values())
    assert all(t.seconds > 0 for t in times.values())
    # warm-up: each set once; then 2 repetitions of call_order(3, 4) = 0 1 2 0 1 2
    assert calls["a"] == [0, 1, 2] + [0, 1, 2, 0, 1, 2] * 2
    assert calls["b"] == [0] + [0, 0, 0, 0] * 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_replays_time_the_device_and_a_sync_falls_back_to_the_stream():
    x = torch.randn(1 << 24, device="cuda")
    y = torch.empty_like(x)
    graph = device_time(lambda: y.copy_(x), reps=3)
    assert graph.method == "graph" and graph.seconds > 0
    torch.testing.assert_close(y, x)  # the replays really ran the copy
    # .item() waits for the host: no candidate can be captured, so both are timed on the stream
    times = device_times({"ok": [lambda: y.copy_(x)], "sync": [lambda: y.copy_(x).sum().item()]}, reps=3)
    assert {t.method for t in times.values()} == {"stream"}
