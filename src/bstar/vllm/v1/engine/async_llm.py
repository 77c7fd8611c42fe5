"""vllm.v1.engine.async_llm"""

from bstar.engine.entrypoints.async_llm import AsyncLLM

__all__ = ["AsyncLLM"]
