"""Paged-KV inference engine for Llama / Qwen2 / Mistral / Qwen3 checkpoints, named as in vLLM.

A prompt's path through the folders:

    entrypoints/   what a user calls: LLM (llm.py), AsyncLLM (async_llm.py), PRM (prm.py), the prompt
                   forms (inputs.py), SamplingParams (sampling_params.py), RequestOutput (outputs.py)
    core/          the engine step. llm_engine.py: LLMEngine.add_request makes a prompt a sequence.py
                   Sequence; step() is schedule, run, sample, postprocess:
                     1. scheduler.py: which sequences run this step and how many tokens each
                        (continuous batching, chunked prefill, preemption, sibling forks), with
                        block_manager.py (shared prompt blocks, prefix cache, copy-on-write)
                     4. output_processor.py: stop rules, then RequestOutputs
                   prompt_forward.py runs prompts without sampling (compute_logits, PRM) as the
                   scheduler's prompt-only sequences; async_step.py: the overlapped step
    runner/        2. run and 3. sample: model_runner.py is the runner interface (it owns the paged KV
                   cache and runs the decoder); runners.py picks, once when the engine is built, the
                   CPU runner (cpu/: torch references, the decode state kept across steps) or the GPU
                   runner (gpu/: Triton kernels, step inputs, CUDA graphs); sampler.py draws (seeds,
                   penalties, filters, logprobs); memory_plan.py sizes the KV cache
    model/         the checkpoint: decoder.py (the network, its kernels from bstar.kernels; attention
                   on the runner's backend, attention_backend.py),
                   loader.py (safetensors), tokenizer.py, linear.py (the CPU GEMM per machine)
    compat/        vllm.py: vLLM's keywords and the handles RL loops reach into
    config.py      EngineConfig (and the checkpoint's ModelConfig); errors.py: the engine's errors

Importing the package is light (no torch): the names below load their module on first use (PEP 562).
"""

from typing import TYPE_CHECKING

from bstar.utils.lazy import lazy_names

if TYPE_CHECKING:
    from bstar.engine.core.llm_engine import LLMEngine
    from bstar.engine.entrypoints.async_llm import AsyncEngineArgs, AsyncLLM, AsyncLLMEngine
    from bstar.engine.entrypoints.inputs import TextPrompt, TokensPrompt
    from bstar.engine.entrypoints.llm import LLM
    from bstar.engine.entrypoints.outputs import CompletionOutput, Logprob, RequestOutput
    from bstar.engine.entrypoints.prm import PRM, PRMScore
    from bstar.engine.entrypoints.sampling_params import SamplingParams
    from bstar.engine.errors import CheckpointError, MemoryPlanError, RequestError, UnsupportedError
    from bstar.errors import BStarError

__all__ = [
    "LLM",
    "LLMEngine",
    "AsyncLLM",
    "AsyncLLMEngine",
    "AsyncEngineArgs",
    "SamplingParams",
    "PRM",
    "PRMScore",
    "RequestOutput",
    "CompletionOutput",
    "Logprob",
    "TextPrompt",
    "TokensPrompt",
    "BStarError",
    "CheckpointError",
    "RequestError",
    "MemoryPlanError",
    "UnsupportedError",
]
_MODULE_OF = {  # name -> the module that defines it
    "LLM": "bstar.engine.entrypoints.llm",
    "LLMEngine": "bstar.engine.core.llm_engine",
    "AsyncLLM": "bstar.engine.entrypoints.async_llm",
    "AsyncLLMEngine": "bstar.engine.entrypoints.async_llm",
    "AsyncEngineArgs": "bstar.engine.entrypoints.async_llm",
    "SamplingParams": "bstar.engine.entrypoints.sampling_params",
    "PRM": "bstar.engine.entrypoints.prm",
    "PRMScore": "bstar.engine.entrypoints.prm",
    "RequestOutput": "bstar.engine.entrypoints.outputs",
    "CompletionOutput": "bstar.engine.entrypoints.outputs",
    "Logprob": "bstar.engine.entrypoints.outputs",
    "TextPrompt": "bstar.engine.entrypoints.inputs",
    "TokensPrompt": "bstar.engine.entrypoints.inputs",
    "BStarError": "bstar.errors",
    "CheckpointError": "bstar.engine.errors",
    "RequestError": "bstar.engine.errors",
    "MemoryPlanError": "bstar.engine.errors",
    "UnsupportedError": "bstar.engine.errors",
}


__getattr__, __dir__ = lazy_names(__name__, _MODULE_OF)
