"""The user-facing entry point, named as in vLLM: `LLM(path).generate(prompts, SamplingParams(...))`.

vLLM's constructor keywords are accepted where they mean something here (or change nothing) and refused
with one line otherwise (bstar/engine/compat/vllm.py lists them); `llm.llm_engine`, `reset_prefix_cache`,
`collective_rpc`, `sleep` / `wake_up`, `get_tokenizer` and `chat` are vLLM's calls.
"""

import torch
from tqdm.auto import tqdm

from bstar.engine.compat import vllm as vllm_compat
from bstar.engine.config import EngineConfig
from bstar.engine.core.llm_engine import LLMEngine
from bstar.engine.core.prompt_forward import forward_prompts
from bstar.engine.entrypoints.inputs import prompt_list
from bstar.engine.entrypoints.outputs import RequestOutput
from bstar.engine.entrypoints.sampling_params import SamplingParams


class LLM:
    def __init__(
        self,
        model: str,
        dtype: str = "auto",
        device: str = "auto",
        seed: int = 0,
        tokenizer: str | None = None,
        skip_tokenizer_init: bool = False,
        worker_extension_cls=None,
        **kwargs,
    ):
        """model: a Hugging Face checkpoint directory. Every field of EngineConfig is a keyword here, with its
        default and meaning (block_size, max_num_seqs, gpu_memory_utilization, ...). vLLM's own: tokenizer
        (another directory's tokenizer.json), skip_tokenizer_init (token-id prompts only), worker_extension_cls
        (methods for collective_rpc), and the vLLM keywords of bstar.engine.compat.vllm.VLLM_KWARGS at values that
        mean the same here (tensor_parallel_size=1, ...). As in vLLM, None means the default for the options of
        vllm_compat.NONE_MEANS_DEFAULT."""
        kwargs = {k: v for k, v in kwargs.items() if not (v is None and k in vllm_compat.NONE_MEANS_DEFAULT)}
        seed = 0 if seed is None else seed
        cfg, vllm_kwargs = EngineConfig.split_kwargs(kwargs)
        vllm_compat.check_vllm_kwargs(vllm_kwargs, model)
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
        bstar.engine.entrypoints.inputs TextPrompt / TokensPrompt dict. Outputs keep input order. lora_request: vLLM's,
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
