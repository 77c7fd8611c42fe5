"""vllm.inputs"""

from bstar.engine.entrypoints.inputs import TextPrompt, TokensPrompt

PromptType = str | TextPrompt | TokensPrompt | list[int]

__all__ = ["PromptType", "TextPrompt", "TokensPrompt"]
