"""Trainer checkpoints: an HF safetensors dir (loadable by transformers and the engine) plus, for resume,
trainer_state/ (no pickle anywhere): optimizer.safetensors (AdamW moments and step counts, one tensor per
parameter and field), rng.safetensors, and state.json (step, global step, schedule length, the data
fingerprint, the optimizer's param groups). The LR schedule is a pure function of (global step, schedule
length, config), so the step is its whole state. A checkpoint serves two purposes: resuming the same
training call (same data: `read_resume_state`) and continuing the schedule and optimizer on new data in a
later call (`read_continue_state`; a B-STaR run's iterations).

Rank 0 writes into a temp dir beside the destination and renames it into place (`atomic_replace`), so a
crash never leaves a half-written checkpoint under the final name. Resume reads on every rank (a shared
filesystem under multi-node torchrun).
"""

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from engine.errors import CheckpointError

STATE_DIR = "trainer_state"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
_NOT_COPIED = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def gather_optimizer_state(model, optimizer) -> dict:
    """The full (unsharded, CPU) optimizer state and this process's RNG state. Every rank must call it."""
    osd = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {"optim": osd, "rng": torch.get_rng_state()}


def write_checkpoint(
    path: Path,
    weights: dict[str, torch.Tensor],
    model_config: dict,
    save_dtype: str,
    source_dir: Path,
    state: dict | None = None,
    info: dict | None = None,
) -> None:
    """Writes (rank 0 only) weights, config.json and the source dir's other files (tokenizer,
    generation config, ...) to `path`, plus trainer_state/ when `state` (gather_optimizer_state) is given;
    `info` (step, config, data fingerprint, ...) goes into trainer_state/state.json."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    cfg = dict(model_config, use_cache=True, dtype=save_dtype)
    cfg.pop("torch_dtype", None)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for f in sorted(source_dir.iterdir()):
        if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES) and f.name not in _NOT_COPIED:
            shutil.copy2(f, tmp / f.name)
    if state is not None:
        _write_state(tmp / STATE_DIR, state, info or {})
    atomic_replace(tmp, path)


def _write_state(d: Path, state: dict, info: dict) -> None:
    d.mkdir()
    osd = state["optim"]
    flat = {f"{name}/{k}": v.detach().cpu().contiguous() for name, st in osd["state"].items() for k, v in st.items()}
    save_file(flat, str(d / "optimizer.safetensors"))
    rng = {"cpu": state["rng"]}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    save_file(rng, str(d / "rng.safetensors"))
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in osd["param_groups"]]
    (d / "state.json").write_text(json.dumps(dict(info, param_groups=groups), indent=2) + "\n")


def _read_state(ckpt: Path) -> tuple[dict, dict, dict]:
    """(state.json info, full optimizer state dict, RNG state) of a checkpoint's trainer_state/."""
    d = ckpt / STATE_DIR
    if not (d / "state.json").is_file():
        raise CheckpointError(f"{ckpt}: no {STATE_DIR}/state.json to resume from")
    info = json.loads((d / "state.json").read_text())
    state: dict = {}
    for key, v in load_file(str(d / "optimizer.safetensors")).items():
        name, k = key.rsplit("/", 1)
        state.setdefault(name, {})[k] = v
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in info["param_groups"]]
    return info, {"state": state, "param_groups": groups}, load_file(str(d / "rng.safetensors"))


def read_resume_state(ckpt: Path, run_info: dict) -> tuple[dict, dict[str, torch.Tensor], dict, dict]:
    """(state.json info, weights, full optimizer state dict, RNG state) of a checkpoint written during this
    same run; refuses one written for other data or another schedule (`run_info`'s "data", "total_steps"
    and "schedule_steps")."""
    info, osd, rng = _read_state(ckpt)
    for k in ("data", "total_steps", "schedule_steps"):
        if info.get(k) != run_info.get(k):
            raise CheckpointError(
                f"{ckpt}: resume with different {k} ({info.get(k)} in checkpoint, {run_info.get(k)} now)"
            )
    return info, load_file(str(ckpt / "model.safetensors")), osd, rng


def read_continue_state(ckpt: Path, schedule_steps: int | None) -> tuple[int, dict, dict]:
    """(global step, full optimizer state dict, RNG state) of the checkpoint an earlier training call of
    the same schedule ended with, to continue it on new data; refuses one of another schedule length."""
    info, osd, rng = _read_state(ckpt)
    if info.get("schedule_steps") != schedule_steps:
        raise CheckpointError(
            f"{ckpt}: continue with a different schedule_steps ({info.get('schedule_steps')} in checkpoint, "
            f"{schedule_steps} now)"
        )
    return int(info.get("global_step", info["step"])), osd, rng


def restore_optimizer_and_rng(model, optimizer, osd: dict, rng: dict) -> None:
    set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(full_state_dict=True))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def atomic_replace(tmp: Path, dest: Path) -> None:
    """rename() cannot replace a non-empty directory, so an existing `dest` is first moved aside;
    at every instant either the old or the new complete checkpoint exists under a known name."""
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)
