"""vllm.engine.arg_utils"""

from bstar.engine.entrypoints.async_llm import AsyncEngineArgs


class EngineArgs(AsyncEngineArgs):
    """vLLM's EngineArgs: the model and LLM's keywords (checked when the engine is built)."""


__all__ = ["AsyncEngineArgs", "EngineArgs"]
