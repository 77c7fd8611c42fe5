"""FSDP2 for the trainer: every decoder layer, then the root, wrapped with `fully_shard`."""

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from engine.errors import CheckpointError


def decoder_layers(model):
    base = getattr(model, model.base_model_prefix, None)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise CheckpointError(f"{type(model).__name__}: no decoder layers found to shard")
    return layers


def apply_fsdp(model, device_type: str, world_size: int, bf16: bool) -> None:
    """Shards `model` in place over a 1-D mesh of all ranks; with bf16, parameters are cast to bfloat16
    for compute and gradients reduced in float32 (the float32 master weights stay sharded)."""
    mesh = init_device_mesh(device_type, (world_size,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kw = dict(mesh=mesh, mp_policy=mp) if mp else dict(mesh=mesh)
    for layer in decoder_layers(model):
        fully_shard(layer, **kw)
    fully_shard(model, **kw)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly sharded) DTensor; a plain tensor as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t
