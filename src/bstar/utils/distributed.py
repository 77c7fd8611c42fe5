"""Process-group helpers for the loop and the trainer: the one place that creates a process group (torchrun's,
or a one-rank group for FSDP2 in a single process), records exchanged as bytes (never pickle), barrier.

Backend: "cuda:nccl,cpu:gloo" with CUDA (NCCL for GPU tensors; gloo for CPU tensors: the CPU-offloaded
trainer's gradient norm and state-dict collectives, and the byte exchange below), "gloo" without.
Timeout: `BSTAR_DIST_TIMEOUT_MIN` minutes (default 60), not torch's 10-minute NCCL default: rank 0 writes
15-30 GB checkpoints and runs phases while the other ranks wait in a collective.
"""

import gc
import json
import os
import struct
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from bstar.errors import BStarError

DEFAULT_TIMEOUT_MIN = 60.0
_ARRAY = "__bstar_array__"  # placeholder key for a list of ints carried as binary
_MIN_ARRAY = 8  # shorter int lists stay in the JSON


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_world_size() -> int:
    """The world size torchrun launched this process into ($WORLD_SIZE; 1 without torchrun), joined or not."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    """This process's rank on its node ($LOCAL_RANK; 0 without torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def timeout() -> timedelta:
    """The process-group timeout: $BSTAR_DIST_TIMEOUT_MIN minutes, 60 by default."""
    raw = os.environ.get("BSTAR_DIST_TIMEOUT_MIN", str(DEFAULT_TIMEOUT_MIN))
    try:
        minutes = float(raw)
    except ValueError:
        raise BStarError(f"BSTAR_DIST_TIMEOUT_MIN must be a number of minutes, got {raw!r}") from None
    if minutes <= 0:
        raise BStarError(f"BSTAR_DIST_TIMEOUT_MIN must be > 0, got {minutes}")
    return timedelta(minutes=minutes)


def backend(cuda: bool | None = None) -> str:
    cuda = torch.cuda.is_available() if cuda is None else cuda
    return "cuda:nccl,cpu:gloo" if cuda else "gloo"


def init_process_group(*, store=None, rank: int | None = None, world_size: int | None = None) -> None:
    """Creates the default process group (env:// from torchrun, or the given store / rank / world size),
    with this module's backend and timeout; with CUDA each rank on its LOCAL_RANK device."""
    kw = {}
    if torch.cuda.is_available():
        dev = torch.device("cuda", local_rank())
        torch.cuda.set_device(dev)
        kw["device_id"] = dev
    if store is not None:
        kw.update(store=store, rank=rank, world_size=world_size)
    dist.init_process_group(backend(), timeout=timeout(), **kw)


def init_from_env() -> tuple[int, int]:
    """Join the process group torchrun describes; a no-op without torchrun (WORLD_SIZE unset or 1) or when
    already joined."""
    if launched_world_size() > 1 and not dist.is_initialized():
        init_process_group()
    return world()


def init_single_process() -> None:
    """A one-rank process group in this process (an in-memory store, no network), for FSDP2 on one device
    (CPU offload); a no-op when a group exists. Lives until the process exits or `destroy()`."""
    if not dist.is_initialized():
        init_process_group(store=dist.HashStore(), rank=0, world_size=1)


def destroy() -> None:
    """Destroy the process group, after collecting garbage: sharded modules and DTensors left in reference
    cycles, torn down after the group, made a 2-rank gloo run abort at exit now and then ("terminate called
    without an active exception", tests/integration/test_trainer.py with offload)."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


# -- records as bytes -------------------------------------------------------------------------------------------


def encode(obj) -> bytes:
    """`obj` (JSON-serialisable) as bytes: JSON, with every list of >= 8 plain ints (token ids) carried as a
    little-endian int32/int64 array after it instead of as text. decode(encode(x)) == json round trip of x."""
    arrays: list[np.ndarray] = []

    def walk(x):
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            if len(x) >= _MIN_ARRAY and all(type(v) is int for v in x):
                try:
                    a = np.asarray(x, dtype=np.int64)
                except OverflowError:
                    return list(x)
                if a.size and -(2**31) <= a.min() and a.max() < 2**31:
                    a = a.astype(np.int32)
                arrays.append(a)
                return {_ARRAY: len(arrays) - 1}
            return [walk(v) for v in x]
        return x

    tree = walk(obj)
    head = json.dumps({"tree": tree, "arrays": [[a.dtype.str, a.size] for a in arrays]}).encode()
    parts = [struct.pack("<Q", len(head)), head] + [a.astype(a.dtype.newbyteorder("<")).tobytes() for a in arrays]
    return b"".join(parts)


def decode(data: bytes | memoryview):
    (n,) = struct.unpack_from("<Q", data, 0)
    head = json.loads(bytes(data[8 : 8 + n]).decode())
    pos, arrays = 8 + n, []
    for dt, size in head["arrays"]:
        a = np.frombuffer(data, dtype=np.dtype(dt), count=size, offset=pos)
        arrays.append(a.tolist())
        pos += a.nbytes

    def walk(x):
        if isinstance(x, dict):
            if len(x) == 1 and _ARRAY in x:
                return arrays[x[_ARRAY]]
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(head["tree"])


def _exchange_device() -> torch.device:
    """CPU when the group has a gloo backend for CPU tensors, else the current CUDA device (NCCL only)."""
    if "gloo" in str(dist.get_backend()):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def all_gather_bytes(data: bytes) -> list[bytes]:
    """Every rank's `data`, in rank order: the sizes first, then one all_gather of a uint8 tensor padded to
    the largest."""
    rank, size = world()
    if size == 1:
        return [bytes(data)]
    dev = _exchange_device()
    n = torch.tensor([len(data)], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(size)]
    dist.all_gather(sizes, n)
    lengths = [int(s.item()) for s in sizes]
    buf = torch.zeros(max(lengths), dtype=torch.uint8)
    if data:
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    buf = buf.to(dev)
    bufs = [torch.empty_like(buf) for _ in range(size)]
    dist.all_gather(bufs, buf)
    return [b[:k].cpu().numpy().tobytes() for b, k in zip(bufs, lengths)]


def all_gather_json(obj) -> list:
    """Every rank's JSON-serialisable `obj`, in rank order (a one-element list without a group), carried as
    bytes (`encode`: token-id lists as binary arrays)."""
    if world()[1] == 1:
        return [obj]
    return [decode(b) for b in all_gather_bytes(encode(obj))]


def broadcast_json(obj=None):
    """Rank 0's JSON-serialisable `obj` on every rank (as bytes; other ranks' `obj` is ignored)."""
    rank, size = world()
    if size == 1:
        return obj
    dev = _exchange_device()
    data = encode(obj) if rank == 0 else b""
    n = torch.tensor([len(data)], dtype=torch.int64, device=dev)
    dist.broadcast(n, src=0)
    buf = torch.empty(int(n.item()), dtype=torch.uint8)
    if rank == 0:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    buf = buf.to(dev)
    dist.broadcast(buf, src=0)
    return decode(buf.cpu().numpy().tobytes())


def barrier():
    if world()[1] > 1:
        dist.barrier()
