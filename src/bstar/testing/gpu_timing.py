"""Device time of GPU work, measured the way the device README's method asks: one source for every
GPU benchmark (bench/gpu_check.py, bench/test_kernels_gpu.py).

- Launch gaps out: the calls are captured into one CUDA graph and its replays timed with CUDA
  events; time per call = replay time / calls. Events around one Python-launched call would also
  count the host's launch work (a Triton launch and its wrapper: tens of microseconds) while the
  device sits idle, for a kernel that may itself take 20 us.
- Cache out: the calls rotate among enough input sets that the bytes touched between two uses of
  one set are several times the L2 cache (H100: 50 MB). Repeating a call on one small input times
  the cache, not device memory.
- One method for a kernel and its peers: if any of them cannot be captured (an op that waits for
  the host, found beforehand with torch's sync debug mode), all of them are timed on the stream
  instead (events around the same calls launched back to back), and the result says so, and
  whether the host kept ahead of the device.
Without CUDA (the dry runs) the host clock stands in.
"""

import functools
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

L2_FACTOR = 4  # bytes touched between two uses of one input set, as multiples of the L2 cache
MAX_SETS = 256
MIN_CALLS = 10  # calls per timed replay (the events' resolution, and the graph launch, spread over them)
DRY_L2_BYTES = 1 << 20  # a nominal cache for CPU dry runs, so that they rotate too


@dataclass(frozen=True)
class Timing:
    seconds: float  # per call, the median over repetitions
    method: str  # "graph" (replays of a captured graph), "stream" (back-to-back launches), "host" (CPU)
    host_bound: bool = False  # "stream": enqueueing the calls took about as long as running them

    def note(self) -> str:
        return self.method + (", host-bound: an upper bound" if self.host_bound else "")


def l2_bytes(device: torch.device | str | None = None) -> int:
    """The device's L2 cache in bytes (a nominal megabyte without CUDA)."""
    if not torch.cuda.is_available() or torch.device(device or "cuda").type != "cuda":
        return DRY_L2_BYTES
    props = torch.cuda.get_device_properties(torch.device(device or "cuda"))
    return int(getattr(props, "L2_cache_size", 50 << 20))


def rotation_count(bytes_per_set: int, l2: int, factor: int = L2_FACTOR, max_sets: int = MAX_SETS) -> int:
    """How many input sets to rotate among: enough that the other sets' bytes, touched between two
    uses of one set, reach `factor` x the L2 cache; 1 when one set alone is that large."""
    if bytes_per_set >= factor * l2:
        return 1
    return min(max_sets, 1 + math.ceil(factor * l2 / max(bytes_per_set, 1)))


def call_order(n_sets: int, min_calls: int = MIN_CALLS) -> list[int]:
    """The input set of each timed call: round robin, every set equally often, at least min_calls."""
    rounds = math.ceil(max(min_calls, n_sets) / n_sets)
    return [i % n_sets for i in range(rounds * n_sets)]


def device_times(
    candidates: dict[str, Sequence[Callable[[], object]]], reps: int = 10, min_calls: int = MIN_CALLS
) -> dict[str, Timing]:
    """Seconds per call of each candidate, one callable per input set (called in rotation), all
    timed by the same method: graph replays if every candidate can be captured, the stream else."""
    orders = {name: call_order(len(fns), min_calls) for name, fns in candidates.items()}
    for fns in candidates.values():  # compile, autotune, allocate: outside every timing
        for fn in fns:
            fn()
    if not torch.cuda.is_available():
        return {name: _host_time(fns, orders[name], reps) for name, fns in candidates.items()}
    torch.cuda.synchronize()
    graphs = None
    if not any(_waits_for_host(fns[0]) for fns in candidates.values()):
        graphs = {name: _capture([fns[i] for i in orders[name]]) for name, fns in candidates.items()}
    out = {}
    for name, fns in candidates.items():
        if graphs is not None:
            out[name] = _replay_time(graphs[name], len(orders[name]), reps)
        else:
            out[name] = _stream_time([fns[i] for i in orders[name]], reps)
    graphs = None
    torch.cuda.synchronize()
    return out


def device_time(fns: Callable[[], object] | Sequence[Callable[[], object]], **kw) -> Timing:
    """device_times of one candidate (a callable, or one per input set)."""
    return device_times({"_": [fns] if callable(fns) else fns}, **kw)["_"]


@functools.cache
def copy_bandwidth(device: torch.device | str = "cuda", nbytes: int = 2 << 30) -> float:
    """Device-to-device copy of nbytes: (bytes read + bytes written) / time, in bytes/s (measured
    once per process). Far larger than any cache: one buffer, no rotation."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    t = device_time(lambda: dst.copy_(src), reps=5).seconds
    return 2 * nbytes / t


def _waits_for_host(fn: Callable[[], object]) -> bool:
    """Whether fn synchronises with the host (`.item()`, a pageable copy, `nonzero`...): such a call
    cannot be captured, and a failed capture would leave the allocator and the stream mid-capture, so
    it is found first, with torch's sync debug mode."""
    mode = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return False
    except RuntimeError:
        return True
    finally:
        torch.cuda.set_sync_debug_mode(mode)
        torch.cuda.synchronize()


def _capture(calls: list[Callable[[], object]]) -> "torch.cuda.CUDAGraph":
    g = torch.cuda.CUDAGraph()
    # a private pool, and a capture stream of its own (kept with the graph): cuBLAS keys its workspace
    # by capture stream, so graphs sharing torch's default capture stream share one, which freeing
    # either graph can release under the other (pytorch#193402)
    g.capture_stream = torch.cuda.Stream()
    g.capture_stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.graph(g, stream=g.capture_stream):
        for fn in calls:
            fn()
    g.replay()  # the first replay uploads the graph
    torch.cuda.synchronize()
    return g


def _event_pair():
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def _replay_time(graph, n_calls: int, reps: int) -> Timing:
    times = []
    for _ in range(reps):
        a, b = _event_pair()
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / n_calls)
    return Timing(statistics.median(times), "graph")


def _stream_time(calls: list[Callable[[], object]], reps: int) -> Timing:
    times, enqueue = [], []
    for _ in range(reps):
        a, b = _event_pair()
        a.record()
        t = time.perf_counter()
        for fn in calls:
            fn()
        enqueue.append(time.perf_counter() - t)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    device, host = statistics.median(times), statistics.median(enqueue)
    # the device ran no longer than the host took to enqueue: it waited for launches
    return Timing(device / len(calls), "stream", host_bound=host >= 0.9 * device)


def _host_time(fns: Sequence[Callable[[], object]], order: list[int], reps: int) -> Timing:
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for i in order:
            fns[i]()
        times.append((time.perf_counter() - t) / len(order))
    return Timing(statistics.median(times), "host")


__all__ = [
    "Timing",
    "call_order",
    "copy_bandwidth",
    "device_time",
    "device_times",
    "l2_bytes",
    "rotation_count",
]
