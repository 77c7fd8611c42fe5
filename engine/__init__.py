"""Paged-KV inference engine for Llama / Qwen2 / Mistral checkpoints."""

from engine.errors import BStarError, CheckpointError, DataError, RequestError
from engine.llm import LLM
from engine.llm_engine import LLMEngine
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput",
           "BStarError", "CheckpointError", "RequestError", "DataError"]
