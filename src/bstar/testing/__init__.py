"""Tiny local checkpoints for tests, benchmarks and trying the engine without a model hub (model_factory.py:
random Llama / Qwen2 / Mistral / Qwen3 with a small trained tokenizer; `python -m bstar.testing.model_factory DIR`)."""
