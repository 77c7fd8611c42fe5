"""vllm.entrypoints: LLM as vllm.entrypoints.llm has it; chat_utils."""
