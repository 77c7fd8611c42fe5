"""Paged-KV inference engine for Llama / Qwen2 / Mistral / Qwen3 checkpoints.

A prompt's path through the files:

    llm.py              LLM(path).generate(prompts, SamplingParams(...)), named as in vLLM
    vllm_compat.py      vLLM's keywords and handles RL loops reach into (llm_engine...model.load_weights)
    async_llm.py        AsyncLLM / AsyncLLMEngine: vLLM's asyncio front-end, one thread stepping LLMEngine
    inputs.py           the prompt forms (str, token ids, TextPrompt / TokensPrompt dicts)
    llm_engine.py       LLMEngine: loads the checkpoint (config.py, loader.py, tokenizer.py) into
                        model.py's decoder; add_request makes the prompt a sequence.py Sequence;
                        step() is schedule, run, sample, postprocess:
    scheduler.py          1. schedule: which sequences run this step, how many tokens each
                             (continuous batching, chunked prefill, preemption); after the
                             forward, a prefilled prompt forks its n - 1 sibling candidates
    block_manager.py         their KV cache blocks: shared prompt blocks, prefix cache, copy-on-write
    model_runner.py       2. run: owns the paged KV cache, turns the batch into tensors
                             (AttnMetadata) and runs model.py, whose attention, norm and rotary
                             calls go to kernels/
    cpu_decode.py            the torch decode path's state across steps: shared-prefix buffers,
                             write-back, the CPU GEMM per machine (linear.py: oneDNN or MKL-packed)
    step_inputs.py           the Triton (GPU) path's step inputs: persistent buffers filled
                             without host syncs, block tables kept on the device
    cuda_graphs.py           decode CUDA graphs per batch-size bucket, kernel warm-up at start-up
    sampler.py            3. sample: per-candidate seeds, min_tokens bans, penalties, kernels.sample,
                             logprobs (logprobs_mode)
    output_processor.py   4. postprocess: stop rules, then outputs.py's RequestOutput (Logprob entries)
    prompt_forward.py   prompts without sampling, for LLM.compute_logits and prm.py
    prm.py              PRM: a process reward model's score for every step of every candidate
    memory_plan.py      device memory arithmetic: each engine's KV budget, the trainer's estimate,
                        a per-phase plan that refuses what cannot fit (sleep/wake: LLM.sleep)
    errors.py           the errors a user can act on

Importing the package is light (no torch): the names below load their module on first use (PEP 562),
so `from engine.errors import ...` costs nothing.
"""

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bstar.engine.entrypoints.async_llm import AsyncEngineArgs, AsyncLLM, AsyncLLMEngine
    from bstar.engine.errors import BStarError, CheckpointError, DataError, MemoryPlanError, RequestError, UnsupportedError
    from bstar.engine.entrypoints.inputs import TextPrompt, TokensPrompt
    from bstar.engine.entrypoints.llm import LLM
    from bstar.engine.core.llm_engine import LLMEngine
    from bstar.engine.entrypoints.outputs import CompletionOutput, Logprob, RequestOutput
    from bstar.engine.entrypoints.prm import PRM, PRMScore
    from bstar.engine.entrypoints.sampling_params import SamplingParams

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
    "DataError",
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
    "BStarError": "bstar.engine.errors",
    "CheckpointError": "bstar.engine.errors",
    "RequestError": "bstar.engine.errors",
    "DataError": "bstar.engine.errors",
    "MemoryPlanError": "bstar.engine.errors",
    "UnsupportedError": "bstar.engine.errors",
}


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'bstar.engine' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
