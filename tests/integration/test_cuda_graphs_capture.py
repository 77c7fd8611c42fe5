"""bstar/engine/runner/gpu/cuda_graphs.py's CUDA branch (capture and replay), run in CI on CPU with torch's graph API
replaced by a stand-in.

Without CUDA, DecodeGraphs never captures (its "replay" runs the forward on the current buffers),
so the capture code itself never ran in CI. The stand-in behaves as a CUDA graph where it matters:
capturing runs nothing and records the tensors the forward was given (a graph bakes in addresses,
and the host values in the metadata); a replay runs the forward on *those* tensors, whatever the
step inputs hold as attributes by then. So a step that rebound a buffer instead of filling it in
place, or metadata whose host values must change between replays, gives wrong tokens here as it
would on a GPU. Output is checked against the eager engine's.
"""

import contextlib
import os
import warnings

import pytest
import torch

from bstar.engine import LLM, SamplingParams
from bstar.engine.runner.gpu.cuda_graphs import DecodeGraphs
from bstar.testing.model_factory import make_model

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # numpy inf/nan in masked interpreter lanes
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU tensors needs the interpreter"),
]


class FakeGraph:
    """torch.cuda.CUDAGraph's stand-in: `replay` runs what was captured, on the captured tensors."""

    def __init__(self):
        self.run = None
        self.bs = None

    def replay(self):
        self.run()


class FakeStream:
    """torch.cuda.Stream's stand-in: an identity, and the streams it was told to wait for."""

    def __init__(self, device=None):
        self.waited: list = []

    def wait_stream(self, other):
        self.waited.append(other)


class FakeCuda:
    """Records what DecodeGraphs.capture does with torch.cuda's graph API."""

    def __init__(self):
        self.log: list[tuple] = []
        self.capturing: FakeGraph | None = None
        self.pools: list[tuple] = []
        # the allocator's segments: a capture of bucket bs adds one of bs MiB to its pool; another thread's
        # allocations meanwhile (1 GiB each, outside any pool) must not count
        self.segments = []
        self.capture_streams: list = []  # the `stream=` of each capture
        self.warm_up_streams: list = []  # the stream current at each eager forward

    def memory_snapshot(self):
        return self.segments

    def graph_pool_handle(self):
        pool = (0, len(self.pools) + 1)
        self.pools.append(pool)
        return pool

    @contextlib.contextmanager
    def graph(self, g, pool=None, stream=None, capture_error_mode="global"):
        assert self.capturing is None, "captures never nest"
        self.log.append(("capture", pool, capture_error_mode))
        self.capture_streams.append(stream)
        self.capturing = g
        try:
            yield
        finally:
            self.capturing = None
            self.segments.append(dict(device=0, total_size=g.bs << 20, segment_pool_id=pool))
            self.segments.append(dict(device=0, total_size=1 << 30, segment_pool_id=(0, 0)))


@pytest.fixture
def fake_cuda(monkeypatch):
    fake = FakeCuda()
    monkeypatch.setenv("BSTAR_KERNELS", "triton")
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", fake.graph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", fake.graph_pool_handle)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_snapshot", fake.memory_snapshot)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    default = FakeStream()
    current = [default]

    @contextlib.contextmanager
    def stream(s):
        current.append(s)
        try:
            yield
        finally:
            current.pop()

    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current[-1])
    init, forward = DecodeGraphs.__init__, DecodeGraphs._forward

    def cuda_init(self, runner, sizes, use_cuda_graphs):
        init(self, runner, sizes, True)  # as on a GPU

    def capturing_forward(self, bs):
        g = fake.capturing
        if g is None:  # eager (the warm-up before each capture)
            fake.log.append(("eager", bs))
            fake.warm_up_streams.append(torch.cuda.current_stream())
            return forward(self, bs)
        r = self.runner
        ids, pos, meta = r.inputs.bucket_meta(bs)  # what the graph bakes in
        out = self.hidden[:bs]

        def run():
            out.copy_(r.model(ids, pos, r.cos_sin, r.kv_caches, meta))

        g.run, g.bs = run, bs  # a capture runs nothing
        fake.log.append(("recorded", bs))

    monkeypatch.setattr(DecodeGraphs, "__init__", cuda_init)
    monkeypatch.setattr(DecodeGraphs, "_forward", capturing_forward)
    return fake


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory):
    root = tmp_path_factory.mktemp("graphs")
    return make_model(str(root / "qwen2"), "qwen2", seed=5, tokenizer=False, num_key_value_heads=1)


def _prompts(lengths, vocab=320):
    g = torch.Generator().manual_seed(7)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _tokens(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


def test_capture_order_pool_and_mode(fake_cuda, qwen2):
    """Largest bucket first, each captured right after an eager warm-up at its size, into one pool,
    with a capture mode that other threads' CUDA work (a trainer beside an AsyncLLM) cannot break."""
    llm = LLM(qwen2, dtype="float32", device="cpu", max_num_seqs=20)
    graphs = llm.engine.runner.graphs
    sizes = graphs.sizes
    assert sizes == [1, 2, 4, 8, 16, 32]
    steps = [e for e in fake_cuda.log if e[0] != "eager" or e[1] in sizes]
    want = []
    for bs in reversed(sizes):
        want += [("eager", bs), ("capture", fake_cuda.pools[0], "thread_local"), ("recorded", bs)]
    assert steps[-len(want) :] == want
    assert len(fake_cuda.pools) == 1 and graphs.pool is fake_cuda.pools[0]
    assert set(graphs.graphs) == set(sizes) and all(g.bs == bs for bs, g in graphs.graphs.items())
    # the same addresses: nothing captured again; forced, or after an address moved: all again
    n = len(fake_cuda.log)
    graphs.capture()
    assert len(fake_cuda.log) == n and graphs.captures == 1
    graphs.capture(force=True)
    assert graphs.captures == 2 and len(fake_cuda.pools) == 2
    runner = llm.engine.runner
    runner.cos_sin = runner.cos_sin.clone()  # an address a graph baked in moved (graphs still in hand)
    graphs.capture()
    assert graphs.captures == 3 and len(fake_cuda.pools) == 3
    p = next(runner.model.parameters())
    p.data = p.data.clone()  # a weight swapped for a new tensor (load_weights of another storage)
    graphs.capture()
    assert graphs.captures == 4


def test_each_engine_captures_on_a_stream_of_its_own(fake_cuda, qwen2):
    """Every capture and its warm-up of one DecodeGraphs run on that object's own stream, made once (a
    recapture keeps it), which waited for the stream the padding was filled on; two engines' graphs never
    share a stream (cuBLAS keys its workspace by capture stream: pytorch#193402)."""
    a = LLM(qwen2, dtype="float32", device="cpu", max_num_seqs=4).engine.runner.graphs
    n = len(fake_cuda.capture_streams)
    b = LLM(qwen2, dtype="float32", device="cpu", max_num_seqs=4).engine.runner.graphs
    assert isinstance(a.stream, FakeStream) and isinstance(b.stream, FakeStream) and a.stream is not b.stream
    assert fake_cuda.capture_streams[:n] == [a.stream] * len(a.sizes)
    assert fake_cuda.capture_streams[n:] == [b.stream] * len(b.sizes)
    assert b.stream in fake_cuda.warm_up_streams and a.stream in fake_cuda.warm_up_streams
    assert a.stream.waited and b.stream.waited and a.stream not in a.stream.waited
    kept = a.stream
    a.capture(force=True)
    assert a.stream is kept and fake_cuda.capture_streams[-1] is kept


def test_the_graph_pool_is_measured_and_checked_against_its_budget(fake_cuda, qwen2):
    """Each capture pass measures the memory its pool holds (its own segments, not other allocations); the
    engine warns when that is more than was set aside for the pool when the KV cache was sized, once per
    capture pass."""
    llm = LLM(qwen2, dtype="float32", device="cpu", max_num_seqs=20)
    runner = llm.engine.runner
    assert runner.graphs.pool_bytes == sum(runner.graphs.sizes) << 20 == 63 << 20
    runner.graph_pool_budget = 64 << 20
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runner.recapture()  # no address moved: nothing captured
        runner.drop_graphs()
        runner.recapture()  # within its budget
    runner.graph_pool_budget = 40 << 20
    runner.drop_graphs()
    with pytest.warns(UserWarning, match="pool holds 63 MiB, 23 MiB more than was set aside"):
        runner.recapture()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        runner.recapture()  # not captured again: no second warning


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_replays_of_captured_graphs_give_the_eager_engines_tokens(fake_cuda, qwen2, async_scheduling):
    """Decode steps replay graphs recorded on the persistent buffers (padded buckets: 3 and 5 rows run
    4 and 8), sampled and greedy, n > 1 forks, with async scheduling too (its drawn tokens are copied
    into the captured input ids on the device): the tokens of an engine without graphs."""
    prompts = _prompts([5, 9, 13, 4, 11])
    params = [
        SamplingParams(n=1, temperature=0, max_tokens=9, ignore_eos=True),
        SamplingParams(n=2, temperature=1.0, max_tokens=7, ignore_eos=True, seed=3),
        SamplingParams(n=1, temperature=0.8, top_k=20, max_tokens=12, ignore_eos=True, seed=4),
        SamplingParams(n=1, temperature=0, max_tokens=5, ignore_eos=True),
        SamplingParams(n=1, temperature=1.0, max_tokens=10, ignore_eos=True, seed=5),
    ]
    llm = LLM(qwen2, dtype="float32", device="cpu", max_num_seqs=8, async_scheduling=async_scheduling)
    got = _tokens(llm.generate(prompts, params, use_tqdm=False))
    replays = dict(llm.engine.runner.graphs.replays)
    assert replays.get(8, 0) > 0 and replays.get(4, 0) > 0  # 6 rows, then 5 (bucket 8); 3 (bucket 4)
    eager = LLM(qwen2, dtype="float32", device="cpu", max_num_seqs=8, enforce_eager=True)
    assert eager.engine.runner.graphs is None
    assert got == _tokens(eager.generate(prompts, params, use_tqdm=False))


def test_the_stand_in_catches_a_buffer_rebound_after_capture(fake_cuda, qwen2):
    """The stand-in's point: a step input replaced by a new tensor after capture (instead of being
    filled in place) leaves the graph reading the old one; the tokens then differ, as on a GPU."""
    prompts = _prompts([6, 8])
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    llm = LLM(qwen2, dtype="float32", device="cpu", max_num_seqs=4)
    want = _tokens(llm.generate(prompts, greedy, use_tqdm=False))
    inputs = llm.engine.runner.inputs
    inputs.input_ids = inputs.input_ids.clone()  # the graphs keep reading the captured tensor
    assert _tokens(llm.generate(prompts, greedy, use_tqdm=False)) != want
