"""bstar/engine/runner/sampler.py on random logits: penalties against transformers and a float64 statement,
logprobs_mode values and vLLM's per-position logprobs entries (Logprob, rank, order)."""

import dataclasses
import math
import os
import random

import numpy as np
import pytest
import torch

from bstar.engine.core.sequence import Sequence
from bstar.engine.entrypoints.sampling_params import SamplingParams
from bstar.engine.runner.sampler import apply_penalties, position_logprob_entries, position_logprob_tensors, sample_rows

V = 97


def _seqs(params_list, seed=0, prompt_lens=(5, 17, 1, 9), out_lens=(0, 6, 11, 3)):
    """Sequences with random prompts and outputs (repeated ids included), one per params."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i, p in enumerate(params_list):
        pl, ol = prompt_lens[i % len(prompt_lens)], out_lens[i % len(out_lens)]
        s = Sequence(f"r{i}", torch.randint(0, V // 3, (pl,), generator=g).tolist(), p)
        s.token_ids += torch.randint(0, V // 2, (ol,), generator=g).tolist()  # overlaps the prompt ids
        seqs.append(s)
    return seqs


def _logits(R, seed=1, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, V, generator=g) * scale
    x[:, ::7] = 0.0  # exact zeros: the > 0 / <= 0 boundary of the repetition penalty
    return x


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_transformers(penalty):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    seqs = _seqs([SamplingParams(repetition_penalty=penalty)] * 4)
    x = _logits(4)
    ours = x.clone()
    apply_penalties(ours, None, seqs)
    hf = RepetitionPenaltyLogitsProcessor(penalty)
    for r, s in enumerate(seqs):  # transformers' input_ids: prompt + output, one row (no padding)
        ref = hf(torch.tensor([s.token_ids]), x[r : r + 1].clone())[0]
        assert torch.equal(ours[r], ref)
    assert not torch.equal(ours, x)


def _penalties_f64(x, s):
    """Hand-written float64 statement of vLLM's penalties for one sequence."""
    p = s.params
    out = np.array(x, dtype=np.float64)
    counts = np.bincount(np.array(s.output_ids, dtype=np.int64), minlength=V).astype(np.float64)
    seen = counts > 0
    seen[s.token_ids[: s.prompt_len]] = True
    rep = p.repetition_penalty
    out = np.where(seen, np.where(out > 0, out / rep, out * rep), out)
    out = out - p.frequency_penalty * counts
    return out - p.presence_penalty * (counts > 0)


def test_presence_frequency_and_subset_rows_match_float64():
    params = [
        SamplingParams(presence_penalty=0.8, frequency_penalty=0.3),
        SamplingParams(),  # no penalty: its row must stay untouched
        SamplingParams(repetition_penalty=1.2, presence_penalty=-0.5, frequency_penalty=1.5),
        SamplingParams(frequency_penalty=-2.0),
        SamplingParams(presence_penalty=2.0),
    ]
    seqs = _seqs(params, seed=3, out_lens=(4, 6, 11, 3, 8))
    x = _logits(len(params), seed=4)
    ours = x.clone()
    rows = [r for r, p in enumerate(params) if p.has_penalties]
    apply_penalties(ours, torch.tensor(rows), [seqs[r] for r in rows])
    assert torch.equal(ours[1], x[1])
    for r in rows:
        ref = _penalties_f64(x[r].numpy(), seqs[r])
        np.testing.assert_allclose(ours[r].double().numpy(), ref, rtol=1e-6, atol=1e-5)
        assert not torch.equal(ours[r], x[r])
    # the first output token: counts are empty, only the prompt counts for repetition
    fresh = _seqs([SamplingParams(repetition_penalty=2.0, presence_penalty=1.0)], out_lens=(0,))
    y = x[:1].clone()
    apply_penalties(y, None, fresh)
    np.testing.assert_allclose(y[0].double().numpy(), _penalties_f64(x[0].numpy(), fresh[0]), rtol=1e-6)


def _mask_f64(x, T, top_k, top_p, min_p):
    """Allowed tokens of one row after temperature, in vLLM's order (min-p, top-k, top-p)."""
    x = np.asarray(x, dtype=np.float64) / T
    order = np.argsort(-x, kind="stable")
    keep = np.zeros(len(x), dtype=bool)
    keep[order[: (top_k if 0 < top_k < len(x) else len(x))]] = True
    if min_p > 0:
        keep &= x >= x.max() + math.log(min_p)
    if top_p < 1:
        p = np.exp(x - x.max()) * keep
        p /= p.sum()
        before = np.cumsum(p[order]) - p[order]
        drop = order[before >= top_p]
        keep[drop[drop != order[0]]] = False
    return keep


CASES = [  # temperature, top_k, top_p, min_p
    dict(temperature=0.7),
    dict(temperature=1.3, top_k=6),
    dict(temperature=0.9, top_p=0.8),
    dict(temperature=0.8, min_p=0.05, top_p=0.9),
    dict(temperature=1.0, top_k=20, top_p=0.7, min_p=0.02),
    dict(temperature=0.0),  # greedy: penalised logits, no temperature, no filter
]


def _case_params(logprobs=4):
    return [
        SamplingParams(logprobs=logprobs, repetition_penalty=1.25, frequency_penalty=0.2, presence_penalty=0.1, **c)
        for c in CASES
    ]


@pytest.mark.parametrize("mode", ["processed_logprobs", "processed_logits"])
def test_processed_values_are_the_penalised_scaled_masked_logits(mode):
    """processed_logprobs == log_softmax(penalised / T) with the filtered tokens at -inf (float64
    reference); processed_logits the same before log_softmax; the sampled token is allowed, its
    rank is 1 + the number of strictly larger values, the top-k entries follow in order."""
    params = _case_params()
    R = len(params) * 8
    params = [p for p in params for _ in range(8)]
    seqs = _seqs(params, seed=5)
    x = _logits(R, seed=6)
    seeds = list(range(100, 100 + R))
    tokens, values, entries = sample_rows(x.clone(), params, seeds, [[] for _ in range(R)], seqs, mode)
    for r, (p, s) in enumerate(zip(params, seqs)):
        pen = _penalties_f64(x[r].numpy(), s)
        greedy = p.temperature == 0
        T = 1.0 if greedy else p.temperature
        keep = np.ones(V, bool) if greedy else _mask_f64(pen, T, p.top_k, p.top_p, p.min_p)
        scaled = np.where(keep, pen / T, -np.inf)
        ref = scaled - (scaled.max() + np.log(np.exp(scaled - scaled.max()).sum()))
        if mode == "processed_logits":
            ref = scaled
        tok = tokens[r]
        assert keep[tok], (r, p)
        if greedy:
            assert tok == int(np.argmax(pen))
        e = entries[r]
        assert next(iter(e)) == tok
        assert abs(e[tok].logprob - ref[tok]) < 1e-4 and abs(values[r] - ref[tok]) < 1e-4
        order = np.argsort(-ref, kind="stable")[: p.logprobs]
        finite = [int(i) for i in order if np.isfinite(ref[i])]
        assert len(e) == p.logprobs + (tok not in e or e[tok].rank > p.logprobs)
        for j, i in enumerate(finite):
            assert abs(e[i].logprob - ref[i]) < 1e-4 and e[i].rank == j + 1, (r, j)
        # masked tokens fill the rest of the top-k list at -inf, as vLLM reports them
        assert sum(1 for x in e.values() if x.logprob == -math.inf) == p.logprobs - len(finite)
        if tok not in order:  # not in the top-k: its own rank
            assert e[tok].rank == 1 + int((ref > ref[tok]).sum())


def test_raw_modes_ignore_penalties_and_temperature():
    params = _case_params(logprobs=3)
    seqs = _seqs(params, seed=7)
    x = _logits(len(params), seed=8)
    args = (params, list(range(len(params))), [[] for _ in params], seqs)
    tok_lp, vals_lp, ent_lp = sample_rows(x.clone(), *args, "raw_logprobs")
    tok_lg, vals_lg, ent_lg = sample_rows(x.clone(), *args, "raw_logits")
    tok_pr, _, _ = sample_rows(x.clone(), *args, "processed_logprobs")
    assert tok_lp == tok_lg == tok_pr  # the mode changes what is reported, never what is drawn
    raw_lp = torch.log_softmax(x.double(), -1)
    for r, tok in enumerate(tok_lp):
        assert abs(vals_lp[r] - raw_lp[r, tok].item()) < 1e-5 and abs(vals_lg[r] - x[r, tok].item()) < 1e-6
        assert ent_lp[r][tok].rank == ent_lg[r][tok].rank == 1 + int((x[r] > x[r, tok]).sum())
        top = torch.topk(x[r], 3).indices.tolist()
        for ent in (ent_lp[r], ent_lg[r]):
            assert list(ent)[0] == tok and [i for i in ent if i != tok] == [i for i in top if i != tok]
    # without logprobs entries the values are still the raw logprobs of the drawn tokens
    no_lp = [SamplingParams(repetition_penalty=1.25, **c) for c in CASES]
    tok, vals, ent = sample_rows(x.clone(), no_lp, *args[1:], "raw_logprobs")
    assert ent == [None] * len(no_lp) and tok == tok_lp
    assert all(abs(v - raw_lp[r, t].item()) < 1e-5 for r, (t, v) in enumerate(zip(tok, vals)))


def test_penalties_change_the_draw_and_stay_seeded():
    """Same seed, same penalised draw; a row's draw does not depend on the other rows."""
    p = SamplingParams(temperature=1.0, repetition_penalty=3.0, presence_penalty=1.5)
    seqs = _seqs([p] * 6, seed=9)
    x = _logits(6, seed=10, scale=1.0)
    seeds = [11, 12, 13, 14, 15, 16]
    a = sample_rows(x.clone(), [p] * 6, seeds, [[]] * 6, seqs)[0]
    b = sample_rows(x.clone(), [p] * 6, seeds, [[]] * 6, seqs)[0]
    alone = sample_rows(x[2:3].clone(), [p], seeds[2:3], [[]], seqs[2:3])[0]
    assert a == b and alone[0] == a[2]
    greedy = SamplingParams(temperature=0, repetition_penalty=50.0)
    s = _seqs([greedy], seed=9)
    top = int(x[0].argmax())
    s[0].token_ids.append(top)  # the argmax was generated: a huge penalty moves the argmax elsewhere
    y = x[:1].clone()
    y[0, top] = abs(y[0, top]) + 1
    assert sample_rows(y.clone(), [greedy], [0], [[]], s)[0][0] != top


def position_logprobs(values, tokens, want):
    """Both halves, as the engine runs them (the device half, its lists, the host half)."""
    lists = [t.tolist() for t in position_logprob_tensors(values, tokens, want)]
    return position_logprob_entries(*lists, want)


def test_position_logprobs_entries():
    """vLLM's dict: the chosen token first with its rank (ties counted pessimistically), then the
    top-k with ranks 1..k; a chosen token inside the top-k keeps its key position and takes its
    top-k rank."""
    values = torch.tensor([[0.0, -1.0, -1.0, -3.0, -0.5], [-2.0, -1.0, -1.0, -3.0, -0.5]])
    tokens = torch.tensor([2, 2])
    vals, entries = position_logprobs(values, tokens, [2, 0])
    assert vals == [-1.0, -1.0]
    e = entries[0]
    assert list(e) == [2, 0, 4] and e[2].rank == 4 and e[0].rank == 1 and e[4].rank == 2
    assert entries[1] == {2: entries[1][2]} and entries[1][2].rank == 3  # both -1.0 tie: count(>=) = 3
    vals, entries = position_logprobs(values, torch.tensor([0, 4]), [1, None])
    assert list(entries[0]) == [0] and entries[0][0].rank == 1 and entries[1] is None
    _, entries = position_logprobs(values, tokens, [10, 7])  # more than the vocabulary: all of it
    assert [len(e) for e in entries] == [5, 5] and sorted(x.rank for x in entries[0].values()) == [1, 2, 3, 4, 5]


def test_filter_plan_from_host_values_equals_the_device_read():
    """The processed-logprobs modes give apply_filters a plan made from the host's parameter values
    (no wait for the device): it must equal the one read from the tensors, and filter the same."""
    from bstar.kernels.sampling import apply_filters, filter_plan

    g = torch.Generator().manual_seed(0)
    V = 50
    x = torch.randn(6, V, generator=g)
    cases = [
        ([1.0] * 3, [-1, 0, 60], [1.0] * 3, [0.0] * 3),  # nothing on (top_k beyond V is off)
        ([0.7, 1.0, 1.3], [5, -1, 50], [1.0, 0.9, 1.0], [0.0, 0.0, 0.1]),
        ([1.0, 2.0, 1.0], [3, 7, 0], [1.0] * 3, [0.0] * 3),  # top-k alone
    ]
    seen = set()
    for t, k, p, m in cases:
        t, k, p, m = t * 2, k * 2, p * 2, m * 2
        host = filter_plan(t, k, p, m, V)
        tensors = (torch.tensor(t), torch.tensor(k, dtype=torch.int32), torch.tensor(p), torch.tensor(m))
        assert host == filter_plan(*tensors, V)
        assert torch.equal(apply_filters(x, *tensors, plan=host), apply_filters(x, *tensors))
        seen.add(host)
    assert len(seen) == 3


_UNWRITTEN = 0xA5  # the byte that fills fresh pinned and device memory in _FakeCuda (no copy wrote it yet)


class _FakeStream:
    """One device's stream: operations queued in order, run only when something waits for them."""

    def __init__(self):
        self.pending, self.done = [], 0

    @property
    def queued(self) -> int:
        return self.done + len(self.pending)

    def run_until(self, count: int):
        while self.done < count:
            self.pending.pop(0)()
            self.done += 1


class _DeviceTensor(torch.Tensor):
    """A CPU tensor that plays one on a CUDA device (`device`, set per index by _FakeCuda): read on the host
    it raises (a real read would synchronise), and a copy_ to or from the host is queued on its device's
    stream (_FakeCuda.queue_copy). Views of it (slices, dtype views) stay on that device."""

    device: torch.device
    fake: "_FakeCuda"
    _HOST_READS = ("tolist", "item", "numpy", "__bool__", "__int__", "__float__", "__index__")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.copy_:
            return cls.fake.queue_copy(*args, **kwargs)
        if getattr(func, "__name__", None) in cls._HOST_READS:
            raise AssertionError(f"{func.__name__}() of a device tensor on the host (a synchronising read)")
        return super().__torch_function__(func, types, args, kwargs)


def _plain(t: torch.Tensor) -> torch.Tensor:
    """t as an ordinary CPU tensor (the same memory)."""
    with torch._C.DisableTorchFunctionSubclass():
        return t.as_subclass(torch.Tensor)


class _FakeCuda:
    """Just enough of CUDA's asynchrony to run kernels.host's CUDA staging (HostCopy, to_device_packed) on
    CPU: device tensors (`dev`, and torch.empty(..., device="cuda:N")) are _DeviceTensors; a copy_ between
    one and a host tensor must be non-blocking and from or to pinned memory (torch.empty(...,
    pin_memory=True), kept in `pinned`), and is queued on the current stream of the device tensor's device,
    to run only when an event recorded after it on that stream is synchronised (or the test synchronises
    the device). Fresh pinned and device memory holds _UNWRITTEN bytes, so a buffer read before its copy ran
    gives wrong values. The thread's PinnedRings are replaced by fresh ones, whose events are this fake's."""

    def __init__(self, monkeypatch, current_device: int):
        import threading

        import bstar.kernels.host as host

        self.current = current_device
        self.streams: dict[int, _FakeStream] = {}
        self.pinned: list[torch.Tensor] = []  # every pinned allocation (kept alive: their addresses stay unique)
        self.copies: list[tuple[str, int]] = []  # ("h2d" or "d2h", device index) per queued copy
        self.events: list = []
        self._classes: dict[int, type] = {}
        orig_empty = torch.empty

        def empty(*size, pin_memory=False, device=None, **kwargs):
            t = orig_empty(*size, **kwargs)
            t.reshape(-1).view(torch.uint8).fill_(_UNWRITTEN)
            if isinstance(device, int) or (device is not None and torch.device(device).type == "cuda"):
                return t.as_subclass(self._device_class(self._index(device)))
            if pin_memory:
                self.pinned.append(t)
            return t

        monkeypatch.setattr(torch, "empty", empty)
        monkeypatch.setattr(torch.cuda, "current_stream", self.stream)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "Event", self._event)
        monkeypatch.setattr(host, "_rings", threading.local())

    def _index(self, device) -> int:
        index = device if device is None or isinstance(device, int) else torch.device(device).index
        return self.current if index is None else index

    def _device_class(self, index: int) -> type:
        if index not in self._classes:
            attrs = dict(device=torch.device("cuda", index), fake=self)
            self._classes[index] = type(f"Cuda{index}Tensor", (_DeviceTensor,), attrs)
        return self._classes[index]

    def dev(self, t: torch.Tensor, index: int) -> torch.Tensor:
        """t's values in a tensor on cuda:index."""
        return t.clone().as_subclass(self._device_class(index))

    def stream(self, device=None) -> _FakeStream:
        """The current stream of `device` (the current device's when None): torch.cuda.current_stream."""
        return self.streams.setdefault(self._index(device), _FakeStream())

    def synchronize(self, index: int):
        s = self.stream(index)
        s.run_until(s.queued)

    def read(self, t: torch.Tensor) -> list:
        """A device tensor's values, after its device's queued work (a synchronising read)."""
        self.synchronize(t.device.index)
        return _plain(t).tolist()

    def queue_copy(self, dst, src, non_blocking=False):
        """dst.copy_(src), one of them a device tensor: queued on its device's current stream."""
        on_device = [t for t in (dst, src) if isinstance(t, _DeviceTensor)]
        assert len(on_device) == 1, "a copy between two device tensors (kernels.host stages host copies only)"
        assert non_blocking, "a blocking copy (the host would wait)"
        host_side = src if on_device[0] is dst else dst
        assert host_side.untyped_storage().data_ptr() in {p.untyped_storage().data_ptr() for p in self.pinned}, (
            "a copy to or from pageable memory (the host would wait)"
        )
        index = on_device[0].device.index
        d, s = _plain(dst), _plain(src)
        self.copies.append(("h2d" if on_device[0] is dst else "d2h", index))
        self.stream(index).pending.append(lambda: d.copy_(s))
        return dst

    def _event(self, **_):
        fake = self

        class Event:
            """torch.cuda.Event: done once the work queued on its stream before record() has run."""

            def __init__(self):
                self.stream, self.mark = None, 0
                fake.events.append(self)

            def record(self, stream=None):
                self.stream = fake.stream() if stream is None else stream
                self.mark = self.stream.queued

            def query(self):
                return self.stream is None or self.stream.done >= self.mark

            def synchronize(self):
                if self.stream is not None:
                    self.stream.run_until(self.mark)

        return Event()


@pytest.mark.parametrize("device", [0, 1])
def test_draw_on_cuda_waits_for_its_copies_on_their_device(monkeypatch, device):
    """Draw's CUDA branch (never run in CI otherwise), on a stand-in for CUDA's asynchrony: the tensors go
    by non-blocking copies into one pinned buffer (a slot of the thread's PinnedRing for their device),
    queued on their device's stream, and host() waits on an event recorded after those copies on that
    stream, even when the current device is another one (an engine on cuda:1 called outside its device
    guard); host() then reads them as lists. Read before its copy ran, the buffer holds no values of theirs."""
    from bstar.engine.runner.sampler import Draw

    fake = _FakeCuda(monkeypatch, current_device=0)
    tokens, values = torch.tensor([5, 3]), torch.tensor([-0.5, -1.25])
    vals, ids, ranks = torch.tensor([[-0.5, -0.5], [-1.25, -0.1]]), torch.tensor([[5, 5], [3, 9]]), torch.tensor([1, 2])
    dev = [fake.dev(t, device) for t in (tokens, values, vals, ids, ranks)]
    draw = Draw(dev[0], dev[1], [1, None], *dev[2:])
    draw.start_copy()
    assert fake.copies == [("d2h", device)] * 5 and len(fake.pinned) == 1  # one ring buffer for all five
    assert fake.stream(device).done == 0 and draw.tokens is dev[0]  # (not waited for; the next step reads it)
    got_tokens, got_values, entries = draw.host()
    assert got_tokens == [5, 3] and got_values == [-0.5, -1.25] and entries[1] is None
    assert list(entries[0]) == [5] and entries[0][5].rank == 1
    assert not fake.stream(device).pending


def test_uniform_filter_tensors_kept_between_steps():
    """A step whose rows share one SamplingParams reuses the filter tensors of the last such step when
    the values and the row count match (no device fills), makes new ones when either changed (a params
    object changed in place included), and draws exactly what it draws without the cache."""
    from bstar.engine.runner.sampler import draw_rows

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    p = SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, seed=1)
    cache = {}

    def draw(params, seeds, **kw):
        return draw_rows(logits[: len(params)], params, seeds, [[]] * len(params), **kw).host()

    first = draw([p] * 3, [1, 2, 3], filters=cache)
    (kept,) = cache.values()
    assert torch.allclose(kept[0], torch.full((3,), 0.7)) and kept[1].tolist() == [5] * 3
    assert draw([p] * 3, [1, 2, 3], filters=cache) == first == draw([p] * 3, [1, 2, 3])
    assert next(iter(cache.values())) is kept  # reused, not made again
    p.temperature = 1.3  # changed in place: new tensors with the new value
    assert draw([p] * 3, [4, 5, 6], filters=cache) == draw([p] * 3, [4, 5, 6])
    (now,) = cache.values()
    assert now is not kept and torch.allclose(now[0], torch.full((3,), 1.3))
    assert draw([p] * 2, [4, 5], filters=cache) == draw([p] * 2, [4, 5])  # another row count
    assert len(cache) == 1 and next(iter(cache.values()))[0].shape == (2,)


def test_filter_tensors_shared_by_rows_with_equal_values():
    """Rows with their own SamplingParams but equal filter values (one params object per prompt, seeds
    apart, as RL loops make them) take the shared-values path: the kept tensors are reused, and the draw
    equals the one-object draw. Rows with different values send them with the seeds in one packed copy
    and each row draws what it draws alone."""
    import bstar.engine.runner.sampler as sampler
    from bstar.engine.runner.sampler import draw_rows

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    one = SamplingParams(temperature=0.8, top_k=7, top_p=0.9, min_p=0.02)
    own = [SamplingParams(temperature=0.8, top_k=7, top_p=0.9, min_p=0.02, seed=s) for s in range(3)]
    cache = {}

    def draw(params, seeds, rows=slice(None), **kw):
        return draw_rows(logits[rows], params, seeds, [[]] * len(params), **kw).host()

    assert draw(own, [4, 5, 6], filters=cache) == draw([one] * 3, [4, 5, 6])
    (kept,) = cache.values()
    assert draw(own, [7, 8, 9], filters=cache) == draw([one] * 3, [7, 8, 9]) and next(iter(cache.values())) is kept

    packed = []
    real = sampler.to_device_segments
    mixed = [
        SamplingParams(temperature=0.5, top_k=3),
        SamplingParams(temperature=1.2, top_p=0.8, min_p=0.1),
        SamplingParams(temperature=0.0),
    ]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sampler, "to_device_segments", lambda layout, dev: packed.append(layout) or real(layout, dev))
        tokens, values, _ = draw(mixed, [11, 12, 13])
    columns = [[11, 12, 13], [0.5, 1.2, 0.0], [3, -1, -1], [1.0, 0.8, 1.0], [0.0, 0.1, 0.0]]
    assert len(packed) == 1 and [list(c) for c, _ in packed[0].values()] == columns
    for r, p in enumerate(mixed):  # each row as drawn alone (its own values, not a neighbour's)
        t, v, _ = draw([p], [11 + r], rows=slice(r, r + 1))
        assert t == tokens[r : r + 1] and v == pytest.approx(values[r : r + 1], abs=1e-6)
    assert tokens[2] == int(logits[2].argmax())  # the greedy row


def test_to_device_packed_one_copy_aligned_segments(monkeypatch):
    """to_device_packed: every column's values back exactly in its dtype, each a view of one buffer at a
    16-byte-aligned offset (the alignment Triton specialises on), empty columns included; on CUDA (a stand-in)
    one pinned staging buffer and one non-blocking copy for all of them, queued on the target device's stream
    with the ring slot's event recorded after it, the values there once that stream has run."""
    from bstar.kernels.host import to_device_packed

    cols = [
        ([2**40 + 1, -3], torch.int64),
        ([0.5, 1.25, -2.0], torch.float32),
        ([], torch.float32),
        ([7, 0, 9, 1, 5], torch.int32),
        ([0.1], torch.float64),
    ]
    dtypes = [d for _, d in cols]
    out = to_device_packed(cols, "cpu")
    assert [t.tolist() for t in out] == [list(v) for v, _ in cols] and [t.dtype for t in out] == dtypes
    assert len({t.untyped_storage().data_ptr() for t in out}) == 1
    assert all((t.data_ptr() - out[0].data_ptr()) % 16 == 0 for t in out)
    assert out[0].data_ptr() == out[0].untyped_storage().data_ptr()

    fake = _FakeCuda(monkeypatch, current_device=0)  # (cuda:1 outside its device guard)
    out = to_device_packed(cols, torch.device("cuda", 1))
    assert len(fake.pinned) == 1 and fake.copies == [("h2d", 1)]  # one staging buffer, one copy
    assert [t.device for t in out] == [torch.device("cuda", 1)] * len(cols) and [t.dtype for t in out] == dtypes
    assert len({t.untyped_storage().data_ptr() for t in out}) == 1
    assert all((t.data_ptr() - out[0].data_ptr()) % 16 == 0 for t in out)
    (ring_event,) = fake.events  # recorded after the copy on cuda:1's stream: the slot is busy until it ran
    assert fake.stream(1).done == 0 and ring_event.stream is fake.stream(1) and not ring_event.query()
    assert [fake.read(t) for t in out] == [list(v) for v, _ in cols] and ring_event.query()


def test_named_segments_and_index_pairs():
    """to_device_segments: each name's values back exactly, in its dtype, views of one buffer (to_device_packed's
    copy); index_pairs: two lists of one length as two tensors, and lists of two lengths refused."""
    from bstar.kernels.host import index_pairs, to_device_segments

    layout = {
        "tokens": ([3, 1, 4, 1, 5, 9], torch.int64),
        "empty": ([], torch.int64),
        "lens": ([2, 7, 1], torch.int32),
        "p": ([0.25, -1.5], torch.float32),
    }
    seg = to_device_segments(layout, "cpu")
    assert list(seg) == list(layout)
    assert {k: (t.tolist(), t.dtype) for k, t in seg.items()} == {k: (list(v), d) for k, (v, d) in layout.items()}
    assert len({t.untyped_storage().data_ptr() for t in seg.values()}) == 1
    rows, cols = index_pairs([0, 2, 2], [5, 1, 7], "cpu")
    assert rows.tolist() == [0, 2, 2] and cols.tolist() == [5, 1, 7] and rows.dtype == torch.int64
    assert [t.numel() for t in index_pairs([], [], "cpu")] == [0, 0]
    with pytest.raises(ValueError, match="index_pairs needs lists of one length, got 2 and 1"):
        index_pairs([1, 2], [3], "cpu")


@pytest.mark.parametrize("kernels_path", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["raw_logprobs", "processed_logprobs"])
def test_a_rows_draw_does_not_depend_on_its_batch_or_the_kept_filters(mode, kernels_path):
    """Random batches mixing the three ways rows carry their filter values (one shared SamplingParams,
    equal values in separate objects, values of their own), drawn with one filters cache across all of
    them: every row draws the token, value and logprobs entry it draws alone without the cache (on the
    torch path and on the Triton sampling kernels, under the interpreter on CPU)."""
    from bstar.engine.runner.sampler import draw_rows

    if kernels_path == "triton":
        if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
            pytest.skip("Triton kernels on CPU tensors need TRITON_INTERPRET=1")
    triton = kernels_path == "triton"

    rng = random.Random(7)
    V, cache = 64, {}

    def fresh():
        return SamplingParams(
            temperature=rng.choice([0.0, 0.6, 1.0, 1.4]),
            top_k=rng.choice([-1, 5]),
            top_p=rng.choice([1.0, 0.85]),
            min_p=rng.choice([0.0, 0.05]),
            logprobs=rng.choice([None, 2]),
        )

    for _ in range(25):
        R = rng.randint(1, 6)
        shared = fresh()
        kind = rng.choice(["same object", "equal values", "own values"])
        if kind == "same object":
            params = [shared] * R
        elif kind == "equal values":
            params = [dataclasses.replace(shared) for _ in range(R)]
        else:
            params = [fresh() for _ in range(R)]
        logits = torch.randn(R, V, generator=torch.Generator().manual_seed(rng.randrange(1 << 30))) * 3
        seeds = [rng.randrange(1 << 62) for _ in range(R)]
        draw = draw_rows(logits, params, seeds, [[]] * R, None, mode, filters=cache, triton=triton)
        tokens, values, entries = draw.host()
        for r in range(R):
            t, v, e = draw_rows(
                logits[r : r + 1], params[r : r + 1], seeds[r : r + 1], [[]], None, mode, triton=triton
            ).host()
            assert t == tokens[r : r + 1], (kind, r)
            assert v[0] == pytest.approx(values[r], abs=1e-5)
            assert (e[0] is None) == (entries[r] is None)
            if e[0] is not None:
                assert list(e[0]) == list(entries[r])


def test_penalty_counts_kept_between_steps_match_float64_at_every_step():
    """The PenaltyState's counts, updated with each step's new tokens only, give the float64 statement's
    logits at every step: tokens appended on the host, a pending token read from a device draw (async
    scheduling), sequences joining late (and more than one growth of the slots), a sequence gone (its slot
    taken again, counted afresh) and one whose outputs were cut below what was counted."""
    import gc

    from bstar.engine.runner.sampler import PenaltyState

    params = [
        SamplingParams(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.25),
        SamplingParams(frequency_penalty=-0.7),
        SamplingParams(repetition_penalty=0.8),
    ]
    seqs = _seqs(params * 7, seed=5, out_lens=(0, 3, 9, 1))  # 21 sequences: two growths of 16 slots
    state = PenaltyState(V, "cpu")
    g = torch.Generator().manual_seed(9)
    live = seqs[:5]
    for step in range(12):
        if step == 4:
            live += seqs[5:]
        if step == 6:
            dead = live.pop(2)
            seqs.remove(dead)
            dead_slot = dead.penalty_slot
            del dead
            gc.collect()
            assert dead_slot in state.free
        if step == 8:
            live[0].token_ids = live[0].token_ids[: live[0].prompt_len + 1]  # outputs cut (counts rebuilt)
        x = _logits(len(live), seed=20 + step)
        draw = torch.randint(0, V, (len(live),), generator=g)
        pending = [r for r in range(len(live)) if (r + step) % 3 == 0]
        for r in pending:  # a pending token: its value only on the device, in row r of the draw
            live[r].add_pending()
            live[r].pending_source = (draw, r)
        ours = x.clone()
        apply_penalties(ours, None, live, state)
        for r, s in enumerate(live):
            if s.num_pending:
                s.drop_pending()
                s.token_ids.append(int(draw[r]))  # as the engine resolves it
            ref = _penalties_f64(x[r].numpy(), s)  # (its outputs as they were, the pending one resolved)
            np.testing.assert_allclose(ours[r].double().numpy(), ref, rtol=1e-6, atol=1e-5)
        for r, s in enumerate(live):
            if r not in pending:
                s.token_ids.append(int(torch.randint(0, V, (1,), generator=g)))
    assert state.num_slots == 32 and len({s.penalty_slot for s in live}) == len(live)
