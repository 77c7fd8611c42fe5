"""Process-group helpers for the loop and the trainer: join torchrun's group, exchange JSON over tensors
(never pickle), barrier."""

import json
import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> tuple[int, int]:
    """Join the process group torchrun describes (NCCL on GPU, each rank on its LOCAL_RANK device;
    gloo on CPU); a no-op without torchrun (WORLD_SIZE unset or 1) or when already joined."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return world()


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_gather_json(obj) -> list:
    """Every rank's JSON-serialisable `obj`, in rank order (a one-element list without a group)."""
    rank, size = world()
    if size == 1:
        return [obj]
    dev = _device()
    data = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8, device=dev)
    n = torch.tensor([data.numel()], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(size)]
    dist.all_gather(sizes, n)
    width = int(max(s.item() for s in sizes))
    padded = torch.zeros(width, dtype=torch.uint8, device=dev)
    padded[: data.numel()] = data
    bufs = [torch.zeros_like(padded) for _ in range(size)]
    dist.all_gather(bufs, padded)
    return [json.loads(bytes(b[: int(s.item())].tolist()).decode()) for b, s in zip(bufs, sizes)]


def barrier():
    if world()[1] > 1:
        dist.barrier()
