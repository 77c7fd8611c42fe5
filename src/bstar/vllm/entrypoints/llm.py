"""vllm.entrypoints.llm"""

from bstar.engine.entrypoints.llm import LLM

__all__ = ["LLM"]
