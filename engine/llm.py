"""The user-facing entry point, named as in vLLM: `LLM(path).generate(prompts, SamplingParams(...))`."""

import torch
from tqdm.auto import tqdm

from engine.config import EngineConfig
from engine.inputs import prompt_list
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.prompt_forward import forward_prompts
from engine.sampling_params import SamplingParams


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
        cpu_packed_weights_bytes: int = 1 << 30,
        logprobs_mode: str = "raw_logprobs",
        enforce_eager: bool = False,
    ):
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
            cpu_packed_weights_bytes=cpu_packed_weights_bytes,
            logprobs_mode=logprobs_mode,
            enforce_eager=enforce_eager,
        )
        self.engine = LLMEngine(model, dtype=dtype, device=device, seed=seed, engine_config=cfg)
        self._counter = 0

    def get_tokenizer(self):
        return self.engine.tokenizer

    def generate(
        self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None, use_tqdm: bool = True
    ) -> list[RequestOutput]:
        """prompts: one prompt or a list of them; a prompt is a str, a list of token ids, or an
        engine.inputs TextPrompt / TokensPrompt dict. Outputs keep input order."""
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

    def load_weights(self, named_tensors) -> set[str]:
        """Replace weights in place from (HF name, tensor) pairs, e.g. straight from a trainer."""
        return self.engine.load_weights(named_tensors)

    def sleep(self, level: int = 1):
        """Free the device memory: level 1 keeps the weights in host memory, level 2 discards them (reload with
        load_weights after wake_up(tags=["weights"])); the KV cache and prefix cache are discarded."""
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
