"""Trainer checkpoints: an HF safetensors dir (loadable by transformers and the engine) plus, for resume,
trainer_state/ (no pickle anywhere): optimizer.safetensors (AdamW moments and step counts, one tensor per
parameter and field), rng.safetensors, and state.json (step, global step, schedule length, the data
fingerprint, the optimizer's param groups). The LR schedule is a pure function of (global step, schedule
length, config), so the step is its whole state. A checkpoint serves two purposes: resuming the same
training call (same data: `read_resume_info`) and continuing the schedule and optimizer on new data in a
later call (`read_continue_info`; a B-STaR run's iterations).

Weights are streamed: `stream_safetensors` writes the header from the tensors' names, shapes and dtype, then
each tensor as it is gathered, so rank 0 never holds the whole model (nor, under FSDP, do the other ranks:
each gathered tensor is dropped at once). `WeightReader` reads a checkpoint's tensors one at a time by name
(rank 0 reads, the trainer broadcasts). Rank 0 writes into a temp dir beside the destination and renames it
into place (`atomic_replace`), so a crash never leaves a half-written checkpoint under the final name, and
weights, optimizer state and schedule step (trainer_state/) are always those of one save. The
optimizer state is read on rank 0 and broadcast (a shared filesystem under multi-node torchrun still holds
the checkpoint every rank names).
"""

import json
import os
import shutil
import struct
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from bstar.engine.errors import CheckpointError
from bstar.engine.model.loader import weight_files
from bstar.utils import failpoint
from bstar.utils.jsonl import fsync_dir, fsync_tree, read_json, temp_path

STATE_DIR = "trainer_state"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
_NOT_COPIED = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")
_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}

_FROM_ST = {v: k for k, v in _ST_DTYPES.items()}


def checkpoint_dtype(model_dir: Path) -> torch.dtype:
    """The dtype a model directory's weights are stored in (config.json "dtype" / "torch_dtype"; float32
    when it names none or an unusual one)."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return torch.float32
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, torch.float32)


# -- streamed safetensors ---------------------------------------------------------------------------------------


def stream_safetensors(
    path: Path,
    specs: list[tuple[str, tuple[int, ...], torch.dtype]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: dict[str, str] | None = None,
) -> None:
    """Writes a safetensors file one tensor at a time: the header from `specs` (name, shape, dtype) first, then
    each tensor of `tensors` (the same names, shapes and dtypes, in the same order) as it arrives."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    off = 0
    for name, shape, dtype in specs:
        n = dtype.itemsize
        for d in shape:
            n *= d
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for i, ((name, shape, dtype), (got, t)) in enumerate(zip(specs, tensors, strict=True)):
            if i == len(specs) // 2:
                f.flush()
                failpoint.hit("mid-write")
            if got != name or tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise CheckpointError(
                    f"{path}: tensor {got} {tuple(t.shape)} {t.dtype} does not match the header's {name} "
                    f"{tuple(shape)} {dtype}"
                )
            t = t.detach().to("cpu").contiguous().reshape(-1)
            if t.numel():
                f.write(t.view(torch.uint8).numpy().data)
        if f.tell() != 8 + len(head) + off:
            raise CheckpointError(f"{path}: wrote {f.tell()} bytes, expected {8 + len(head) + off}")


class WeightReader:
    """A model directory's safetensors weights (one file or an index of shards), read one tensor at a time by
    name, in the stored dtype, on CPU. Use as a context manager (the files stay open inside it)."""

    def __init__(self, model_dir: str | os.PathLike):
        self.files = weight_files(str(model_dir))
        self._stack = ExitStack()
        self._where: dict[str, object] = {}

    def __enter__(self) -> "WeightReader":
        try:
            for file in self.files:
                f = self._stack.enter_context(safe_open(file, framework="pt", device="cpu"))
                for name in f.keys():
                    self._where[name] = f
        except Exception as e:
            self._stack.close()
            raise CheckpointError(f"corrupt or truncated safetensors file in {self.files}: {e}") from None
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """(shape, dtype) from the file's header, without reading the tensor."""
        sl = self._where[name].get_slice(name)
        return tuple(sl.get_shape()), _FROM_ST[sl.get_dtype()]


# -- optimizer state -------------------------------------------------------------------------------------------


def gather_optimizer_state(model, optimizer) -> dict:
    """The full (unsharded, CPU) optimizer state on rank 0 (other ranks get an empty one) and this process's
    RNG state. Every rank must call it."""
    osd = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {"optim": osd, "rng": torch.get_rng_state()}


def write_checkpoint(
    path: Path,
    specs: list[tuple[str, tuple[int, ...], torch.dtype]],
    weights: Iterable[tuple[str, torch.Tensor]],
    model_config: dict,
    source_dir: Path,
    state: dict | None = None,
    info: dict | None = None,
    extra_files: dict[str, str] | None = None,
) -> None:
    """Writes (rank 0 only) the weights (streamed: `specs` for the header, then `weights` one tensor at a
    time), config.json (with the weights' dtype) and the source dir's other files (tokenizer, generation
    config, ...) to `path`, plus trainer_state/ when `state` (gather_optimizer_state) is given; `info` (step,
    config, data fingerprint, ...) goes into trainer_state/state.json; `extra_files` (name: text) are written
    beside config.json, committed with the rest (the B-STaR controller's iteration marker)."""
    tmp = Path(temp_path(path))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        stream_safetensors(tmp / "model.safetensors", specs, weights, metadata={"format": "pt"})
        dtypes = {dt for _, _, dt in specs if dt.is_floating_point}
        save_dtype = str(max(dtypes, key=lambda d: d.itemsize) if dtypes else torch.float32).replace("torch.", "")
        cfg = dict(model_config, use_cache=True, dtype=save_dtype)
        cfg.pop("torch_dtype", None)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        for f in sorted(source_dir.iterdir()):
            if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES) and f.name not in _NOT_COPIED:
                shutil.copy2(f, tmp / f.name)
        if state is not None:
            _write_state(tmp / STATE_DIR, state, info or {})
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    except BaseException as e:  # an error, not a kill: no temporary left for a sweep
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # (a full disk: a write's error names no file)
            raise CheckpointError(f"cannot write the checkpoint {path}: {e.strerror or e}") from None
        raise
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


def read_info(ckpt: Path) -> dict:
    """trainer_state/state.json of a checkpoint (read on every rank: it is small)."""
    d = ckpt / STATE_DIR
    if not (d / "state.json").is_file():
        raise CheckpointError(f"{ckpt}: no {STATE_DIR}/state.json to resume from")
    return read_json(d / "state.json")


def read_optimizer_state(ckpt: Path, info: dict) -> dict:
    """The full optimizer state dict of a checkpoint's trainer_state/ (rank 0 reads it; see restore_optimizer)."""
    state: dict = {}
    for key, v in _load_state_file(ckpt / STATE_DIR / "optimizer.safetensors").items():
        name, k = key.rsplit("/", 1)
        state.setdefault(name, {})[k] = v
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in info["param_groups"]]
    return {"state": state, "param_groups": groups}


def read_rng(ckpt: Path) -> dict:
    return _load_state_file(ckpt / STATE_DIR / "rng.safetensors")


def _load_state_file(path: Path) -> dict:
    """A trainer_state safetensors file; a missing, truncated or garbage one is one line naming it."""
    try:
        return load_file(str(path))
    except Exception as e:  # (safetensors raises its own error types for a bad header or truncation)
        why = str(e).splitlines()[0][:100] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is corrupt or missing ({why}); resume from an earlier checkpoint") from None


def check_resume(ckpt: Path, info: dict, run_info: dict) -> None:
    """Refuses a checkpoint written for other data or another schedule (`run_info`'s "data", "total_steps"
    and "schedule_steps"): resume continues this same call."""
    for k in ("data", "total_steps", "schedule_steps"):
        if info.get(k) != run_info.get(k):
            raise CheckpointError(
                f"{ckpt}: resume with different {k} ({info.get(k)} in checkpoint, {run_info.get(k)} now)"
            )


def check_continue(ckpt: Path, info: dict, schedule_steps: int | None) -> int:
    """The global step an earlier call of the same schedule ended with (the checkpoint's), to continue that
    call's optimizer and schedule on new data; refuses one of another schedule length."""
    if info.get("schedule_steps") != schedule_steps:
        raise CheckpointError(
            f"{ckpt}: continue with a different schedule_steps ({info.get('schedule_steps')} in checkpoint, "
            f"{schedule_steps} now)"
        )
    return int(info.get("global_step", info["step"]))


def restore_optimizer(model, optimizer, osd: dict, broadcast: bool) -> None:
    """Loads a full optimizer state dict into `optimizer`: with `broadcast` (a process group), rank 0's `osd`
    is sent to every rank (the others pass {}), each keeping its shard."""
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=broadcast)
    set_optimizer_state_dict(model, optimizer, osd, options=opts)


def restore_rng(rng: dict) -> None:
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def _aside(dest: Path, what: str) -> Path:
    return dest.parent / f".{dest.name}.{what}"


def atomic_replace(tmp: Path, dest: Path) -> None:
    """Puts the complete directory `tmp` in place of `dest` so that a crash at any instant leaves exactly one
    of the two under `dest`, or leaves what `finish_replace` completes. rename() cannot replace a non-empty
    directory, so it takes three renames: tmp -> .<dest>.new (the commit: the new state is complete under a
    known name), dest -> .<dest>.old, .<dest>.new -> dest; then .<dest>.old is removed. `tmp` is fsync'ed
    before it is staged and the parent directory after each rename, so this holds after a power loss too."""
    new = _aside(dest, "new")
    shutil.rmtree(new, ignore_errors=True)  # staged by a crashed earlier swap: superseded
    shutil.rmtree(_aside(dest, "old"), ignore_errors=True)
    fsync_tree(tmp)
    os.replace(tmp, new)
    fsync_dir(dest.parent)
    failpoint.hit("staged")
    finish_replace(dest)


def finish_replace(dest: Path) -> None:
    """Completes an `atomic_replace` of `dest` that a crash interrupted (nothing to do after a complete one):
    a staged .<dest>.new is complete, so it is rolled forward into place; .<dest>.old is removed."""
    new, old = _aside(dest, "new"), _aside(dest, "old")
    if new.exists():
        if dest.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            fsync_dir(dest.parent)
        failpoint.hit("swap")  # the old state (if any) moved aside, the new one not yet in place
        os.replace(new, dest)
        fsync_dir(dest.parent)
    shutil.rmtree(old, ignore_errors=True)
