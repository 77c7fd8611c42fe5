"""The engine loop: requests in, one scheduled model step at a time, finished outputs out.

This is the lower-level interface for embedding in RL loops:
    eng = LLMEngine(model_path, ...); eng.add_request("r0", prompt, params)
    while eng.has_unfinished_requests(): for out in eng.step(): ...
"""

import json
import os
import random

import torch

from engine.block_manager import BlockManager
from engine.config import DTYPES, EngineConfig, ModelConfig
from engine.errors import CheckpointError, RequestError
from engine.loader import iter_weights
from engine.model import CausalLM
from engine.model_runner import ModelRunner
from engine.output_processor import OutputProcessor
from engine.outputs import RequestOutput
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Request, Sequence
from engine.tokenizer import load_tokenizer, require


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RequestError("device 'cuda' requested but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise RequestError(f"unsupported device {device!r}; use 'cpu' or 'cuda'")
    return dev


def resolve_dtype(dtype: str | torch.dtype, mcfg: ModelConfig, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        return DTYPES.get(mcfg.torch_dtype or "bfloat16", torch.bfloat16)
    if dtype not in DTYPES:
        raise RequestError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)} or 'auto'")
    return DTYPES[dtype]


class LLMEngine:
    def __init__(
        self,
        model: str,
        dtype: str = "auto",
        device: str = "auto",
        seed: int = 0,
        engine_config: EngineConfig | None = None,
    ):
        self.model_path = model
        self.device = resolve_device(device)
        self.mcfg = ModelConfig.from_dir(model) if os.path.isdir(model) else None
        if self.mcfg is None:
            raise CheckpointError(f"model directory {model} does not exist")
        self.dtype = resolve_dtype(dtype, self.mcfg, self.device)
        self.ecfg = engine_config or EngineConfig()
        self.ecfg.validate()
        self.max_model_len = self.ecfg.max_model_len or self.mcfg.max_position_embeddings
        if self.mcfg.sliding_window:  # within the window, sliding attention equals full attention
            self.max_model_len = min(self.max_model_len, self.mcfg.sliding_window)
        self.tokenizer = load_tokenizer(model)
        self.eos_ids = set(self.mcfg.eos_token_ids) | self._generation_eos(model)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)

        with torch.device("meta"):
            net = CausalLM(self.mcfg)
        net = net.to_empty(device=self.device).to(self.dtype)
        if self.mcfg.tie_word_embeddings and self.mcfg.head == "lm":
            net.lm_head.weight = net.model.embed_tokens.weight
        net.load_weights(iter_weights(model))
        self.model = net.eval().requires_grad_(False)
        self.runner = ModelRunner(net, self.mcfg, self.ecfg, self.max_model_len, self.device, self.dtype)
        self.block_manager = BlockManager(self.runner.num_blocks, self.ecfg.block_size, self.ecfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.ecfg, self.block_manager)
        self.sampler = Sampler(self.eos_ids)
        self.output_processor = OutputProcessor(self.tokenizer, self.eos_ids, self.max_model_len)
        self.requests: dict[str, Request] = {}
        self._rng = random.Random(seed)
        self.num_generated_tokens = 0

    @staticmethod
    def _generation_eos(path: str) -> set[int]:
        f = os.path.join(path, "generation_config.json")
        if not os.path.isfile(f):
            return set()
        with open(f) as fh:
            eos = json.load(fh).get("eos_token_id")
        return set() if eos is None else ({eos} if isinstance(eos, int) else set(eos))

    # -- requests -----------------------------------------------------------------------------
    def encode_prompt(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, require(self.tokenizer, "a text prompt").encode(prompt)
        ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < self.mcfg.vocab_size]
        if bad:
            raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.mcfg.vocab_size})")
        return None, ids

    def check_prompt_len(self, n: int):
        if n == 0:
            raise RequestError("empty prompt")
        if n >= self.max_model_len:
            raise RequestError(
                f"prompt of {n} tokens is longer than the context: max_model_len is "
                f"{self.max_model_len} and at least one token must be generated"
            )
        need = -(-(n + 1) // self.ecfg.block_size)
        if need > self.block_manager.num_blocks:
            raise RequestError(
                f"prompt of {n} tokens needs {need} KV blocks but the whole cache has "
                f"{self.block_manager.num_blocks} (block_size {self.ecfg.block_size})"
            )

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None):
        params = params or SamplingParams()
        if self.mcfg.head != "lm":
            raise RequestError(
                f"{self.model_path} is a reward model ({self.mcfg.head} head) without an LM head; "
                "load it with engine.PRM to score, not to generate"
            )
        if request_id in self.requests:
            raise RequestError(f"duplicate request id {request_id!r}")
        text, ids = self.encode_prompt(prompt)
        self.check_prompt_len(len(ids))
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        self.requests[request_id] = Request(request_id, text, ids, params)
        self.scheduler.add(Sequence(request_id, ids, params, index=0, fork_count=params.n - 1, seed=seed))

    def abort_request(self, request_id: str):
        self.scheduler.abort(request_id)
        self.requests.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work()

    # -- one step -----------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one scheduled model step; return the requests that finished in it."""
        batch = self.scheduler.schedule()
        if not batch:
            if self.scheduler.has_work():
                raise RuntimeError("scheduler made no progress: KV cache too small for any waiting sequence")
            return []
        logits = self.runner.run(batch)  # a row per sequence of batch.sampled
        seqs, rows = self.scheduler.advance(batch)  # prefilled prompts fork their siblings here
        if not seqs:
            return []
        tokens, logprobs, tops = self.sampler(logits, rows, seqs)
        return self._postprocess(seqs, tokens, logprobs, tops)

    def _postprocess(self, seqs, tokens, logprobs, tops) -> list[RequestOutput]:
        """Append each candidate's token, finish those a stop rule ends, and return the outputs of the
        requests whose candidates have all finished."""
        self.num_generated_tokens += len(tokens)
        done = []
        for s, tok, lp, top in zip(seqs, tokens, logprobs, tops):
            s.append_token(tok, lp, top)
            reason = self.output_processor.finish_reason(s)
            if reason is None:
                continue
            self.scheduler.finish(s, reason)
            req = self.requests[s.request_id]
            req.finished.append(s)
            if req.is_finished:
                done.append(self.output_processor.request_output(self.requests.pop(s.request_id)))
        return done

    # -- weights ------------------------------------------------------------------------------
    def load_weights(self, named_tensors, strict: bool = False):
        """In-process weight update (e.g. from a trainer). Invalidates the prefix cache."""
        self.model.load_weights(named_tensors, strict=strict)
        self.block_manager.reset_prefix_cache()
        self.runner.invalidate_buffers()
