"""Trainer checkpoints: an HF safetensors dir (loadable by transformers and the engine) plus, for resume,
trainer_state/ (AdamW state, step, RNG, the run's data fingerprint and schedule length).

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


def read_resume_state(ckpt: Path, run_info: dict) -> tuple[int, dict[str, torch.Tensor], dict, dict]:
    """(step, weights, full optimizer state dict, RNG state) of a checkpoint; refuses one written for
    other data or another schedule length (`run_info`'s "data" and "total_steps")."""
    d = ckpt / STATE_DIR
    if not (d / "state.json").is_file():
        raise CheckpointError(f"{ckpt}: no {STATE_DIR}/state.json to resume from")
    info = json.loads((d / "state.json").read_text())
    for k in ("data", "total_steps"):
        if info.get(k) != run_info[k]:
            raise CheckpointError(f"{ckpt}: resume with different {k} ({info.get(k)} in checkpoint, {run_info[k]} now)")
    weights = load_file(str(ckpt / "model.safetensors"))
    state: dict = {}
    for key, v in load_file(str(d / "optimizer.safetensors")).items():
        name, k = key.rsplit("/", 1)
        state.setdefault(name, {})[k] = v
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in info["param_groups"]]
    return int(info["step"]), weights, {"state": state, "param_groups": groups}, load_file(str(d / "rng.safetensors"))


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
