"""Host lists to tensors, fast (and to the device without a sync): per-step metadata is built from
Python lists every decode step.

`torch.tensor(list)` converts element by element (~50 ns each); going through `array` is ~3x
faster, which matters for the few thousand block ids a step can carry.
"""

import threading
from array import array

import torch


def long_tensor(values, device=None) -> torch.Tensor:
    """int64 tensor [len(values)] from a list of Python ints."""
    if not values:
        return torch.empty(0, dtype=torch.long, device=device)
    t = torch.frombuffer(array("q", values), dtype=torch.long)
    return t if device is None or torch.device(device).type == "cpu" else t.to(device)


_ARRAY_CODE = {torch.int64: "q", torch.int32: "i", torch.float32: "f", torch.float64: "d"}


def host_tensor(values, dtype: torch.dtype) -> torch.Tensor:
    """CPU tensor [len(values)] of `dtype` (int64, int32, float32 or float64) from a list, fast."""
    if not values:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(array(_ARRAY_CODE[dtype], values), dtype=dtype)


def pinned_request_bytes(nbytes: int) -> int:
    """Host bytes a pinned request of nbytes holds when it goes through PyTorch's caching host allocator
    (`pin_memory=True`, `.pin_memory()`): rounded up to a power of two, and kept after the tensor is freed."""
    return 1 << (nbytes - 1).bit_length() if nbytes > 0 else 0


class HostBuffer:
    """One flat host buffer for bulk copies between host and device (an engine's weights while it sleeps).
    With pin (CUDA): an ordinary allocation page-locked with cudaHostRegister, so exactly nbytes are pinned
    (the caching host allocator would round the request up to a power of two and keep it); from that
    allocator when registering fails. `host_bytes` is what it holds; `close()` gives it back."""

    def __init__(self, nbytes: int, pin: bool):
        self.tensor = torch.empty(nbytes, dtype=torch.uint8)
        self.host_bytes, self.registered = nbytes, False
        if pin and nbytes:
            try:
                rc = torch.cuda.cudart().cudaHostRegister(self.tensor.data_ptr(), nbytes, 0)
                self.registered = int(rc) == 0
            except Exception:
                self.registered = False
            if not self.registered:
                self.tensor = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
                self.host_bytes = pinned_request_bytes(nbytes)

    def close(self):
        if self.registered:
            torch.cuda.cudart().cudaHostUnregister(self.tensor.data_ptr())
            self.registered = False
        self.tensor, self.host_bytes = None, 0

    def __del__(self):
        self.close()


class PinnedRing:
    """A few pinned staging buffers reused from step to step, each guarded by an event recorded after the
    copy that reads (or writes) it, instead of a fresh pinned buffer per copy (a `cudaHostAlloc`-backed
    request each, which the caching host allocator rounds up to a power of two and keeps).

    `take(n)` gives the next slot's buffer (grown to n bytes if smaller) when its last copy has run
    (`event.query()`) and no HostCopy still holds it; otherwise a fresh buffer from `alloc`: the host
    never waits here. `used(slot, stream)` records the slot's event after its copy was queued;
    `hold` / `release` keep a device-to-host slot until its values were read. One ring per thread and
    device (`ring()`): an engine thread and a trainer never share a slot."""

    def __init__(self, slots: int = 8, alloc=None, event=None):
        self._alloc = alloc or (lambda n: torch.empty(n, dtype=torch.uint8, pin_memory=True))
        self._new_event = event or torch.cuda.Event
        self.buffers: list[torch.Tensor | None] = [None] * slots
        self._events: list = [None] * slots
        self._held = [False] * slots
        self._next = 0
        self.fresh = 0  # buffers taken outside the ring (every slot busy): statistics, tests

    def take(self, nbytes: int) -> tuple[int | None, torch.Tensor]:
        """(slot or None, a uint8 buffer of nbytes)."""
        i = self._next
        self._next = (i + 1) % len(self.buffers)
        ev = self._events[i]
        if self._held[i] or (ev is not None and not ev.query()):
            self.fresh += 1
            return None, self._alloc(nbytes)
        buf = self.buffers[i]
        if buf is None or buf.numel() < nbytes:
            size = max(4096, 1 << (max(nbytes, 1) - 1).bit_length())  # (power-of-two growth: few reallocations)
            buf = self.buffers[i] = self._alloc(size)
        return i, buf[:nbytes]

    def used(self, slot: int | None, stream):
        if slot is not None:
            if self._events[slot] is None:
                self._events[slot] = self._new_event()
            self._events[slot].record(stream)

    def hold(self, slot: int | None):
        if slot is not None:
            self._held[slot] = True

    def release(self, slot: int | None):
        if slot is not None:
            self._held[slot] = False


_rings = threading.local()


def ring(device: torch.device) -> PinnedRing:
    """This thread's PinnedRing for `device` (CUDA)."""
    rings = getattr(_rings, "by_device", None)
    if rings is None:
        rings = _rings.by_device = {}
    index = device.index if device.index is not None else torch.cuda.current_device()
    r = rings.get(index)
    if r is None:
        r = rings[index] = PinnedRing()
    return r


def _staged_copy(host: torch.Tensor, device: torch.device, dst: torch.Tensor | None = None) -> torch.Tensor:
    """host (a contiguous CPU tensor) on the CUDA device through the thread's pinned ring: the bytes into a
    ring slot, one non-blocking copy, the slot's event recorded after it. Into `dst` when given."""
    nbytes = host.numel() * host.element_size()
    if dst is None:
        dst = torch.empty(host.shape, dtype=host.dtype, device=device)
    if not nbytes:
        return dst
    r = ring(device)
    slot, stage = r.take(nbytes)
    stage.copy_(host.reshape(-1).view(torch.uint8))
    dst.copy_(stage.view(host.dtype).view(host.shape), non_blocking=True)
    r.used(slot, torch.cuda.current_stream(device))
    return dst


def to_device(values, dtype: torch.dtype, device, out: torch.Tensor | None = None) -> torch.Tensor:
    """A list as a 1-D tensor on `device`, without a stream synchronisation.

    On CUDA the values are staged in a pinned buffer of the thread's PinnedRing (reused once its last copy
    has run) and copied with non_blocking=True; a copy from pageable memory would make the host wait.
    With `out`, the values land in out[:len(values)] (a persistent device buffer) and that view is
    returned."""
    host = values if isinstance(values, torch.Tensor) else host_tensor(values, dtype)
    device = torch.device(device)
    if device.type == "cuda":
        return _staged_copy(host.contiguous(), device, None if out is None else out[: host.shape[0]])
    if out is None:
        return host.to(device, non_blocking=True) if device.type != "cpu" else host
    dst = out[: host.shape[0]]
    dst.copy_(host, non_blocking=True)
    return dst


_SEGMENT_ALIGN = 16  # bytes: Triton specialises pointer arguments on 16-byte alignment


def to_device_packed(columns: list[tuple[list, torch.dtype]], device) -> list[torch.Tensor]:
    """Several lists as 1-D tensors on `device` through one copy: to_device for each (value list, dtype)
    pair, at one host-to-device copy (CUDA: one pinned staging buffer, one non-blocking copy) instead of
    one each. The tensors are views of one byte buffer, each starting at a multiple of 16 bytes, so a
    Triton kernel sees the pointer alignment a separately allocated tensor has (no new variant)."""
    device = torch.device(device)
    offsets, total = [], 0
    for values, dtype in columns:
        offsets.append(total)
        total += -(-len(values) * dtype.itemsize // _SEGMENT_ALIGN) * _SEGMENT_ALIGN
    packed = bytearray(total)
    for (values, dtype), at in zip(columns, offsets):
        raw = array(_ARRAY_CODE[dtype], values)
        packed[at : at + len(raw) * raw.itemsize] = raw
    host = torch.frombuffer(packed, dtype=torch.uint8) if total else torch.empty(0, dtype=torch.uint8)
    if device.type == "cuda":
        host = _staged_copy(host, device)
    elif device.type != "cpu":
        host = host.to(device)
    return [host[at : at + len(v) * dt.itemsize].view(dt) for (v, dt), at in zip(columns, offsets)]


def to_device_segments(layout: dict[str, tuple[list, torch.dtype]], device) -> dict[str, torch.Tensor]:
    """Named lists on `device` through one copy (to_device_packed): `layout` {name: (values, dtype)} is the one
    description of what the copy holds, and the result {name: 1-D view} is read by name, never at a counted
    offset."""
    return dict(zip(layout, to_device_packed(list(layout.values()), device)))


def index_pairs(rows: list[int], cols: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Two equally long index lists (rows and columns of the entries to set, sources and destinations of
    the blocks to copy) as int64 tensors on `device`, through one to_device copy."""
    if len(rows) != len(cols):
        raise ValueError(f"index_pairs needs lists of one length, got {len(rows)} and {len(cols)}")
    both = to_device(rows + cols, torch.int64, device).view(2, len(rows))
    return both[0], both[1]


class HostCopy:
    """Device tensors on their way to the host, the reverse of to_device: on CUDA they are copied, without
    blocking, into one slot of the thread's PinnedRing (each at a 16-byte aligned offset) and an event is
    recorded after the copies, on the stream of the tensors' device (not necessarily the current device's: an
    engine on cuda:N called outside its device guard), so `lists()` waits for those copies only, and the host
    can work until then. The slot is held until `lists()` has read it (or the copy is dropped). Elsewhere the
    tensors are read directly."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.tensors, self._event, self._lists = tensors, None, None
        self._ring = self._slot = None
        if tensors and tensors[0].device.type == "cuda":
            device = tensors[0].device
            stream = torch.cuda.current_stream(device)
            offsets, total = [], 0
            for t in tensors:
                offsets.append(total)
                total += -(-t.numel() * t.element_size() // _SEGMENT_ALIGN) * _SEGMENT_ALIGN
            self._ring = ring(device)
            self._slot, buf = self._ring.take(total)
            self._ring.hold(self._slot)
            staged = []
            for t, at in zip(tensors, offsets):
                h = buf[at : at + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
                h.copy_(t, non_blocking=True)
                staged.append(h)
            self.tensors = staged
            self._event = torch.cuda.Event()
            self._event.record(stream)
            self._ring.used(self._slot, stream)

    def lists(self) -> list[list]:
        """Each tensor as (nested) lists, once its copy has run."""
        if self._lists is None:
            if self._event is not None:
                self._event.synchronize()
            self._lists = [t.tolist() for t in self.tensors]
            self._free()
        return self._lists

    def _free(self):
        if self._ring is not None:
            self._ring.release(self._slot)
            self._ring = None
            self.tensors = []

    def __del__(self):  # (a copy never read: its slot goes back to the ring)
        self._free()
