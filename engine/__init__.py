"""Paged-KV inference engine for Llama / Qwen2 / Mistral checkpoints.

Importing the package is light (no torch): the names below load their module on first use (PEP 562),
so `from engine.errors import ...` costs nothing.
"""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.errors import BStarError, CheckpointError, DataError, RequestError
    from engine.llm import LLM
    from engine.llm_engine import LLMEngine
    from engine.outputs import CompletionOutput, RequestOutput
    from engine.prm import PRM, PRMScore
    from engine.sampling_params import SamplingParams

__all__ = [
    "LLM",
    "LLMEngine",
    "SamplingParams",
    "PRM",
    "PRMScore",
    "RequestOutput",
    "CompletionOutput",
    "BStarError",
    "CheckpointError",
    "RequestError",
    "DataError",
]
_MODULE_OF = {  # name -> the module that defines it
    "LLM": "engine.llm",
    "LLMEngine": "engine.llm_engine",
    "SamplingParams": "engine.sampling_params",
    "PRM": "engine.prm",
    "PRMScore": "engine.prm",
    "RequestOutput": "engine.outputs",
    "CompletionOutput": "engine.outputs",
    "BStarError": "engine.errors",
    "CheckpointError": "engine.errors",
    "RequestError": "engine.errors",
    "DataError": "engine.errors",
}


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
