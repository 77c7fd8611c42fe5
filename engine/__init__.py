"""Paged-KV inference engine for Llama / Qwen2 / Mistral checkpoints."""

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
