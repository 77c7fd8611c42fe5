"""FSDP2 for the trainer: every decoder layer, then the root, wrapped with `fully_shard` (optionally with
`CPUOffloadPolicy`), and the weights moved in and out of the sharded model one tensor at a time:

- `broadcast_load`: rank 0 reads each full tensor (from a checkpoint or given tensors), broadcasts it, and
  every rank copies its own shard; nothing bigger than one tensor is ever materialised per rank (what
  `set_model_state_dict(..., broadcast_from_rank0=True)` does, without rank 0 holding the whole model);
- `gather_full`: each full tensor all-gathered in turn (a collective: every rank must iterate), for saving
  on rank 0 (`get_model_state_dict(full_state_dict=True, cpu_offload=True)`, streamed) and for handing the
  weights to every rank's engine.
"""

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from bstar.engine.errors import CheckpointError
from bstar.utils import distributed as dist_utils


def decoder_layers(model):
    base = getattr(model, model.base_model_prefix, None)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise CheckpointError(f"{type(model).__name__}: no decoder layers found to shard")
    return layers


def apply_fsdp(model, device_type: str, world_size: int, bf16: bool, offload: bool = False) -> None:
    """Shards `model` in place over a 1-D mesh of all ranks (one rank: no communication, but FSDP's mixed
    precision and offload still apply); with bf16, parameters are cast to bfloat16 for compute and gradients
    reduced in float32 (the float32 master weights stay sharded); with offload, the sharded parameters,
    gradients and optimizer state live in (pinned, on CUDA) host memory and the optimizer steps on the CPU."""
    mesh = init_device_mesh(device_type, (world_size,))
    kw: dict = dict(mesh=mesh)
    if bf16:
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if offload:
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=device_type == "cuda")
    for layer in decoder_layers(model):
        fully_shard(layer, **kw)
    fully_shard(model, **kw)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) DTensor; a plain tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class TensorSource:
    """Full tensors by name for `broadcast_load`: a mapping of name -> tensor (WeightReader reads a checkpoint
    the same way: names(), info(name), get(name))."""

    def __init__(self, tensors):
        self._t = dict(tensors)

    def names(self) -> list[str]:
        return list(self._t)

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        t = self._t[name]
        return tuple(t.shape), t.dtype

    def get(self, name: str) -> torch.Tensor:
        return self._t[name]


def check_source(model, names: list[str], source, strict: bool) -> tuple[str | None, dict[str, str]]:
    """(the first problem, one line; {name: dtype name}) of loading `source` into `model`'s tensors `names`."""
    have = set(source.names())
    missing = [n for n in names if n not in have]
    known = set(model.state_dict().keys())
    unexpected = sorted(have - known) if strict else []
    if missing or unexpected:
        return f"weights do not match the model: missing {sorted(missing)[:5]}, unexpected {unexpected[:5]}", {}
    sd, dtypes = model.state_dict(), {}
    for n in names:
        shape, dtype = source.info(n)
        if tuple(shape) != tuple(sd[n].shape):
            return f"weight {n}: shape {tuple(shape)} != model {tuple(sd[n].shape)}", {}
        dtypes[n] = str(dtype).replace("torch.", "")
    return None, dtypes


@torch.no_grad()
def broadcast_load(model, names: list[str], source, strict: bool = True) -> None:
    """Sets the model's tensors `names` (the same list on every rank) from rank 0's `source` (TensorSource or
    checkpoint.WeightReader; other ranks pass None). Rank 0 checks names and shapes first and every rank raises
    the same CheckpointError; then per tensor rank 0 reads it, broadcasts it in its stored dtype (on the device
    the shard lives on: NCCL for GPU shards, gloo for CPU-offloaded ones) and every rank copies its shard,
    cast to the parameter's dtype. strict=False ignores tensors the model does not have (a checkpoint's
    extras)."""
    rank, world = dist_utils.world()
    problem, dtypes = check_source(model, names, source, strict) if rank == 0 else (None, {})
    if world > 1:
        problem, dtypes = dist_utils.broadcast_json([problem, dtypes])
    if problem:
        raise CheckpointError(problem)
    sd = model.state_dict()
    for n in names:
        dst = sd[n]
        local = _local(dst)
        src = source.get(n) if rank == 0 else None
        if world > 1:
            full = src.to(local.device) if rank == 0 else None
            if full is None:
                full = torch.empty(dst.shape, dtype=getattr(torch, dtypes[n]), device=local.device)
            dist.broadcast(full, src=0)
        else:
            full = src.to(local.device)
        if isinstance(dst, DTensor):
            shard = distribute_tensor(full, dst.device_mesh, dst.placements, src_data_rank=None)
            local.copy_(shard.to_local())
        else:
            local.copy_(full)
        del full, src


def gather_full(model, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, full tensor) for each of `names`, one all-gather at a time (every rank must consume the iterator
    in step); a plain module's tensors are its live parameters."""
    sd = model.state_dict()
    for n in names:
        yield n, full_tensor(sd[n].detach())
