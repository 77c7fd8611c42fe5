"""Reading a local Hugging Face checkpoint directory: safetensors only, never pickle."""

import json
import os
from collections.abc import Iterator

import torch
from safetensors import safe_open

from bstar.engine.errors import CheckpointError

PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin")


def weight_files(path: str) -> list[str]:
    """The safetensors files of a model directory, with clear errors for what is not loadable."""
    if not os.path.exists(path):
        raise CheckpointError(f"model directory {path} does not exist")
    if not os.path.isdir(path):
        raise CheckpointError(f"model path {path} is not a directory")
    single = os.path.join(path, "model.safetensors")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{index} is not a valid safetensors index: {e!r}") from None
        files = sorted(set(weight_map.values()))
        for name in files:
            if not os.path.isfile(os.path.join(path, name)):
                raise CheckpointError(f"shard {name} listed in {index} is missing")
        return [os.path.join(path, f) for f in files]
    if os.path.isfile(single):
        return [single]
    pickled = [f for f in PICKLE_FILES if os.path.exists(os.path.join(path, f))]
    if pickled:
        raise CheckpointError(
            f"{path} holds only pickle weights ({pickled[0]}); refusing to unpickle. "
            "Convert the checkpoint to safetensors (model.safetensors) on a machine you trust, with the "
            "safetensors convert script (huggingface.co/spaces/safetensors/convert) or "
            "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)."
        )
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path}")


def iter_weights(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of every safetensors file, on CPU, in the stored dtype."""
    for file in weight_files(path):
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for bad headers/truncation
            raise CheckpointError(f"corrupt or truncated safetensors file {file}: {e}") from None


def generation_eos_ids(path: str) -> set[int]:
    """The eos_token_id(s) of a checkpoint's generation_config.json (none without one)."""
    f = os.path.join(path, "generation_config.json")
    if not os.path.isfile(f):
        return set()
    with open(f) as fh:
        eos = json.load(fh).get("eos_token_id")
    return set() if eos is None else ({eos} if isinstance(eos, int) else set(eos))
