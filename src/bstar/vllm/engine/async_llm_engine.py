"""vllm.engine.async_llm_engine"""

from bstar.engine.entrypoints.async_llm import AsyncLLMEngine

__all__ = ["AsyncLLMEngine"]
