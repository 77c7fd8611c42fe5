"""The host side of a step: pinned staging buffers reused through a ring guarded by events
(kernels.host.PinnedRing, with stand-in events and allocations on CPU), and autotuned kernels whose config
is resolved once per tuning key, then launched directly (kernels.launch.launch)."""

import os

import pytest
import torch

from bstar.kernels.host import PinnedRing


class FakeEvent:
    """A CUDA event's stand-in: done once the test says its copy has run."""

    def __init__(self):
        self.done, self.records = True, 0

    def record(self, stream):
        self.done = False
        self.records += 1

    def query(self):
        return self.done


def _ring(slots=3):
    allocs, events = [], []

    def alloc(n):
        allocs.append(n)
        return torch.zeros(n, dtype=torch.uint8)

    def event():
        events.append(FakeEvent())
        return events[-1]

    return PinnedRing(slots, alloc=alloc, event=event), allocs, events


def test_slots_are_reused_once_their_copy_has_run():
    r, allocs, events = _ring(3)
    taken = []
    for _ in range(3):
        slot, buf = r.take(100)
        r.used(slot, stream=None)
        taken.append((slot, buf.data_ptr()))
    assert [s for s, _ in taken] == [0, 1, 2] and allocs == [4096] * 3
    for e in events:
        e.done = True  # the copies ran
    again = []
    for _ in range(3):
        slot, buf = r.take(200)
        r.used(slot, stream=None)
        again.append((slot, buf.data_ptr()))
    assert again == taken and allocs == [4096] * 3 and r.fresh == 0  # the same buffers: no allocation
    assert len(events) == 3 and all(e.records == 2 for e in events)  # one event per slot, recorded per copy


def test_a_busy_slot_is_never_waited_for_and_a_small_one_grows():
    r, allocs, events = _ring(2)
    s0, _ = r.take(10)
    r.used(s0, None)
    s1, _ = r.take(10)
    r.used(s1, None)
    slot, buf = r.take(50)  # slot 0's copy has not run: a fresh buffer, not a wait
    assert slot is None and buf.numel() == 50 and r.fresh == 1 and allocs[-1] == 50
    events[1].done = True
    slot, buf = r.take(10_000)  # slot 1 (the ring moved on), too small: grown to a power of two
    assert slot == 1 and buf.numel() == 10_000 and r.buffers[1].numel() == 16384


def test_a_held_device_to_host_slot_waits_for_its_reader():
    r, _, events = _ring(1)
    slot, _ = r.take(8)
    r.hold(slot)
    r.used(slot, None)
    events[0].done = True  # the copy landed, but the host has not read it yet
    assert r.take(8)[0] is None
    r.release(slot)
    assert r.take(8)[0] == 0


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU tensors needs the interpreter")
def test_an_autotuned_kernel_goes_through_the_autotuner_once_per_tuning_key(monkeypatch):
    from bstar.kernels.launch import times_a_lone_candidate

    if times_a_lone_candidate():
        pytest.skip("Triton < 3.8 under the interpreter: launch() runs the one pruned candidate, not the autotuner")
    """The first launch of a tuning key (head dim, group, page size, dtypes) runs Autotuner.run; later ones
    launch the chosen config directly, with the reference's output; a new key tunes again."""
    from triton.runtime.autotuner import Autotuner

    from bstar.kernels import launch as launch_mod
    from bstar.kernels.decode_attention import paged_decode_attention_ref
    from bstar.kernels.decode_attention_triton import paged_decode_attention_triton

    runs = []
    real = Autotuner.run

    def counted(self, *args, **kwargs):
        runs.append(self.base_fn.__name__)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Autotuner, "run", counted)
    monkeypatch.setattr(launch_mod, "_tuned", {})
    g = torch.Generator().manual_seed(0)
    for D, n in ((16, 3), (32, 2)):
        kc, vc = torch.randn(8, 8, 2, D, generator=g), torch.randn(8, 8, 2, D, generator=g)
        tables = torch.randperm(8, generator=g).int().view(2, 4)
        lens = torch.tensor([27, 9], dtype=torch.int32)
        for _ in range(n):
            q = torch.randn(2, 4, D, generator=g)
            got = paged_decode_attention_triton(q, kc, vc, tables, lens)
            torch.testing.assert_close(got, paged_decode_attention_ref(q, kc, vc, tables, lens), atol=1e-5, rtol=1e-5)
    assert runs == ["_decode_split_kernel"] * 2  # once per head dim
