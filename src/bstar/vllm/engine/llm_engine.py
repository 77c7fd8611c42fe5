"""vllm.engine.llm_engine"""

from bstar.engine.core.llm_engine import LLMEngine

__all__ = ["LLMEngine"]
