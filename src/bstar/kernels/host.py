"""Host lists to tensors, fast (and to the device without a sync): per-step metadata is built from
Python lists every decode step.

`torch.tensor(list)` converts element by element (~50 ns each); going through `array` is ~3x
faster, which matters for the few thousand block ids a step can carry.
"""

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


def to_device(values, dtype: torch.dtype, device, out: torch.Tensor | None = None) -> torch.Tensor:
    """A list as a 1-D tensor on `device`, without a stream synchronisation.

    On CUDA the values are staged in pinned memory (PyTorch's caching host allocator keeps that
    block until the copy reading it has run, so reuse is safe) and copied with non_blocking=True;
    a copy from pageable memory would make the host wait. With `out`, the values land in
    out[:len(values)] (a persistent device buffer) and that view is returned."""
    host = values if isinstance(values, torch.Tensor) else host_tensor(values, dtype)
    device = torch.device(device)
    if device.type == "cuda":
        host = host.pin_memory()
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
        host = host.pin_memory().to(device, non_blocking=True)
    elif device.type != "cpu":
        host = host.to(device)
    return [host[at : at + len(v) * dt.itemsize].view(dt) for (v, dt), at in zip(columns, offsets)]


class HostCopy:
    """Device tensors on their way to the host, the reverse of to_device: on CUDA each is copied into a pinned
    buffer without blocking and an event is recorded after the copies, on the stream of the tensors' device
    (not necessarily the current device's: an engine on cuda:N called outside its device guard), so `lists()`
    waits for those copies only, and the host can work until then. Elsewhere the tensors are read directly."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.tensors, self._event = tensors, None
        if tensors and tensors[0].device.type == "cuda":
            stream = torch.cuda.current_stream(tensors[0].device)
            staged = []
            for t in tensors:
                h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                h.copy_(t, non_blocking=True)
                staged.append(h)
            self.tensors = staged
            self._event = torch.cuda.Event()
            self._event.record(stream)

    def lists(self) -> list[list]:
        """Each tensor as (nested) lists, once its copy has run."""
        if self._event is not None:
            self._event.synchronize()
        return [t.tolist() for t in self.tensors]
