"""The user-facing entry point, named as in vLLM: `LLM(path).generate(prompts, SamplingParams(...))`.

vLLM's constructor keywords are accepted where they mean something here (or change nothing) and refused
with one line otherwise (engine/vllm_compat.py lists them); `llm.llm_engine`, `reset_prefix_cache`,
`collective_rpc`, `sleep` / `wake_up`, `get_tokenizer` and `chat` are vLLM's calls.
"""

import inspect

import torch
from tqdm.auto import tqdm

from bstar.engine.compat import vllm as vllm_compat
from bstar.engine.config import EngineConfig
from bstar.engine.core.llm_engine import LLMEngine
from bstar.engine.core.prompt_forward import forward_prompts
from bstar.engine.entrypoints.inputs import prompt_list
from bstar.engine.entrypoints.outputs import RequestOutput
from bstar.engine.entrypoints.sampling_params import SamplingParams


def _defaults_for_none(given: dict) -> dict:
    """vLLM reads None as "the default" for these options (vllm_compat.NONE_MEANS_DEFAULT)."""
    params = inspect.signature(LLM.__init__).parameters
    return {k: params[k].default if v is None and k in vllm_compat.NONE_MEANS_DEFAULT else v for k, v in given.items()}


class LLM:
    def __init__(
        self,
        model: str,
        dtype: str = "auto",
        device: str = "auto",
        seed: int = 0,
        block_size: int = 16,
        num_kv_blocks: int | None = None,
        gpu_memory_utilization: float = 0.9,
        kv_cache_memory_bytes: int | None = None,
        cpu_kv_cache_bytes: int = 256 << 20,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 4096,
        max_model_len: int | None = None,
        enable_prefix_caching: bool = True,
        cpu_gemm: str = "auto",
        cpu_packed_weights_bytes: int = 1 << 30,
        logprobs_mode: str = "raw_logprobs",
        enforce_eager: bool = False,
        max_logprobs: int = 20,
        async_scheduling: bool = False,
        tokenizer: str | None = None,
        skip_tokenizer_init: bool = False,
        worker_extension_cls=None,
        **vllm_kwargs,
    ):
        """The engine's options, plus vLLM's: max_logprobs (the most logprobs a request may ask for, -1: no
        cap), tokenizer (another directory's tokenizer.json), skip_tokenizer_init (token-id prompts only),
        worker_extension_cls (methods for collective_rpc), and the vLLM keywords of
        engine.vllm_compat.VLLM_KWARGS at values that mean the same here (tensor_parallel_size=1, ...)."""
        vllm_compat.check_vllm_kwargs(vllm_kwargs, model)
        given = dict(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)
        given.update(gpu_memory_utilization=gpu_memory_utilization, seed=seed)
        defaults = _defaults_for_none(given)
        max_num_seqs, max_num_batched_tokens = defaults["max_num_seqs"], defaults["max_num_batched_tokens"]
        gpu_memory_utilization, seed = defaults["gpu_memory_utilization"], defaults["seed"]
        cfg = EngineConfig(
            block_size=block_size,
            num_kv_blocks=num_kv_blocks,
            gpu_memory_utilization=gpu_memory_utilization,
            kv_cache_memory_bytes=kv_cache_memory_bytes,
            cpu_kv_cache_bytes=cpu_kv_cache_bytes,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len,
            enable_prefix_caching=enable_prefix_caching,
            cpu_gemm=cpu_gemm,
            cpu_packed_weights_bytes=cpu_packed_weights_bytes,
            logprobs_mode=logprobs_mode,
            enforce_eager=enforce_eager,
            max_logprobs=max_logprobs,
            async_scheduling=async_scheduling,
        )
        self.engine = LLMEngine(
            model,
            dtype=dtype,
            device=device,
            seed=seed,
            engine_config=cfg,
            tokenizer=tokenizer,
            skip_tokenizer_init=skip_tokenizer_init,
            worker_extension_cls=worker_extension_cls,
        )
        self._counter = 0

    @property
    def llm_engine(self) -> LLMEngine:
        """vLLM's handle: .model_config.max_model_len, .model_executor.driver_worker.model_runner.model..."""
        return self.engine

    def get_tokenizer(self):
        """transformers' fast tokenizer (PreTrainedTokenizerFast) with the engine's ids; None without one."""
        return self.engine.get_tokenizer()

    def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        """Forget every cached prefix (e.g. after a weight update). False while requests are unfinished."""
        return self.engine.reset_prefix_cache()

    def collective_rpc(self, method, timeout: float | None = None, args: tuple = (), kwargs: dict | None = None):
        """Run `method` on the in-process worker (a name of a worker method, e.g. from worker_extension_cls,
        or a callable taking the worker first); returns [result], one per worker as vLLM's."""
        return self.engine.collective_rpc(method, timeout, args, kwargs)

    def generate(
        self,
        prompts,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
        lora_request=None,
    ) -> list[RequestOutput]:
        """prompts: one prompt or a list of them; a prompt is a str, a list of token ids, or an
        engine.inputs TextPrompt / TokensPrompt dict. Outputs keep input order. lora_request: vLLM's,
        only None (no LoRA adapters)."""
        vllm_compat.no_lora(lora_request)
        prompts = prompt_list(prompts)
        params = sampling_params or SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                rid = f"gen-{self._counter}"
                self._counter += 1
                self.engine.add_request(rid, prompt, p)
                ids.append(rid)
        except Exception:
            for rid in ids:  # a bad prompt rejects the whole call, leaving the engine clean
                self.engine.abort_request(rid)
            raise
        results = {}
        total = sum(p.n * (p.max_tokens or self.engine.max_model_len) for p in params)
        bar = tqdm(total=total, desc="generate", unit="tok", disable=not use_tqdm, leave=False)
        before = self.engine.num_generated_tokens
        while self.engine.has_unfinished_requests():
            for out in self.engine.step():
                results[out.request_id] = out
            bar.update(self.engine.num_generated_tokens - before - bar.n)
        bar.close()
        return [results[r] for r in ids]

    def chat(
        self,
        messages,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict] | None = None,
        chat_template_kwargs: dict | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of {"role", "content"} dicts) or a list of them,
        rendered with the checkpoint's chat template (or `chat_template`). One output per conversation."""
        prompts = vllm_compat.render_chats(
            self.get_tokenizer(),
            messages,
            chat_template,
            add_generation_prompt,
            continue_final_message,
            tools,
            chat_template_kwargs,
        )
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def load_weights(self, weights) -> set[str]:
        """Replace weights in place from (HF name, tensor) pairs, e.g. straight from a trainer. (`weights`:
        vLLM's parameter name, which callers pass by keyword.)"""
        return self.engine.load_weights(weights)

    def sleep(self, level: int = 1, mode: str = "abort"):
        """Free the device memory: level 1 keeps the weights in host memory, level 2 discards them (reload with
        load_weights after wake_up(tags=["weights"])); the KV cache and prefix cache are discarded. mode is
        vLLM's (what to do with running requests): moot here, generate leaves none running."""
        self.engine.sleep(level)

    def wake_up(self, tags: list[str] | None = None):
        """Bring back "weights" and/or "kv_cache" (None: both)."""
        self.engine.wake_up(tags)

    def is_sleeping(self) -> bool:
        return self.engine.is_sleeping()

    def compute_logits(self, token_lists: list[list[int]]) -> list[torch.Tensor]:
        """Full-sequence logits [len, vocab] (float32, CPU) of each token list (for a reward model: its
        class logits [len, labels]); no caching, no sampling."""
        out = [None] * len(token_lists)
        for k, _, h in forward_prompts(self.engine, token_lists, use_prefix_cache=False):
            with self.engine.runner.guard():
                out[k] = self.engine.model.compute_logits(h).float().cpu()
        return out
