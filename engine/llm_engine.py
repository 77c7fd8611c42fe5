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
from engine.inputs import ParsedPrompt, parse_prompt
from engine.loader import iter_weights
from engine.model import CausalLM
from engine.model_runner import ModelRunner
from engine.output_processor import OutputProcessor
from engine.outputs import RequestOutput
from engine.sampler import Sampler, position_logprobs
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
        self.sampler = Sampler(self.eos_ids, self.ecfg.logprobs_mode)
        # vLLM's primary EOS (the tokenizer's) ends with stop_reason None; the others give their id.
        primary_eos = self.tokenizer.eos_token_id if self.tokenizer is not None else None
        self.output_processor = OutputProcessor(self.tokenizer, self.eos_ids, self.max_model_len, primary_eos)
        self.requests: dict[str, Request] = {}
        self._prompt_logprob_seqs: set[Sequence] = set()  # sequences whose prefill fills prompt_logprobs
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
    def encode_prompt(self, prompt) -> tuple[str | None, list[int]]:
        """(prompt text or None, token ids) of a prompt in any engine.inputs form."""
        parsed = prompt if isinstance(prompt, ParsedPrompt) else parse_prompt(prompt)
        if parsed.token_ids is None:
            return parsed.text, require(self.tokenizer, "a text prompt").encode(parsed.text)
        ids = parsed.token_ids
        bad = [t for t in ids if not 0 <= t < self.mcfg.vocab_size]
        if bad:
            raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.mcfg.vocab_size})")
        return parsed.text, ids

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

    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None):
        """prompt: a str, a list of token ids, or an engine.inputs TextPrompt / TokensPrompt dict."""
        params = params or SamplingParams()
        params.validate()  # again: fields may have changed since construction
        if self.mcfg.head != "lm":
            raise RequestError(
                f"{self.model_path} is a reward model ({self.mcfg.head} head) without an LM head; "
                "load it with engine.PRM to score, not to generate"
            )
        if request_id in self.requests:
            raise RequestError(f"duplicate request id {request_id!r}")
        parsed = parse_prompt(prompt)
        text, ids = self.encode_prompt(parsed)
        self.check_prompt_len(len(ids))
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        req = Request(request_id, text, ids, params)
        seq = Sequence(request_id, ids, params, index=0, fork_count=params.n - 1, seed=seed)
        if parsed.cache_salt is not None:
            seq.hash_root = seq.last_hash = hash(("cache_salt", parsed.cache_salt))
        if params.prompt_logprobs is not None:
            # Computed once per request, by candidate 0's prefill; it skips the prefix cache (a
            # cached prefix has no logits), as vLLM does for such requests.
            req.prompt_logprobs = [None] * len(ids)
            if len(ids) > 1:
                seq.prompt_logprobs_pending = True
                self._prompt_logprob_seqs.add(seq)
        self.requests[request_id] = req
        self.scheduler.add(seq)

    def abort_request(self, request_id: str):
        for s in self.scheduler.abort(request_id):
            self._prompt_logprob_seqs.discard(s)
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
        spans = self._prompt_logprob_spans(batch) if self._prompt_logprob_seqs else None
        if spans:
            logits, hidden = self.runner.run_with_prompt_hidden(batch, [r for sp in spans for r in sp[3]])
            self._fill_prompt_logprobs(spans, hidden)
        else:
            logits = self.runner.run(batch)  # a row per sequence of batch.sampled
        seqs, rows = self.scheduler.advance(batch)  # prefilled prompts fork their siblings here
        if not seqs:
            return []
        tokens, logprobs, tops = self.sampler(logits, rows, seqs)
        return self._postprocess(seqs, tokens, logprobs, tops)

    def _prompt_logprob_spans(self, batch):
        """For the batch's sequences that fill prompt_logprobs: (seq, first position, end position,
        token rows) of the prompt positions computed this step whose next token is a prompt token.
        A sequence whose prefill ends this step is done with them."""
        spans, row = [], 0
        for s, n in zip(batch.seqs, batch.num_new):
            if s.prompt_logprobs_pending:
                start = s.num_computed
                end = min(start + n, s.prompt_len - 1)
                if end > start:
                    spans.append((s, start, end, range(row, row + end - start)))
                if start + n >= s.prompt_len:
                    s.prompt_logprobs_pending = False
                    self._prompt_logprob_seqs.discard(s)
            row += n
        return spans

    def _fill_prompt_logprobs(self, spans, hidden: torch.Tensor):
        """Raw logprobs (no penalty, temperature or filter, as vLLM) of each span's next prompt
        tokens from their hidden states, a slice of rows at a time (never [tokens, vocab] at once)."""
        rows = [(s, p) for s, start, end, _ in spans for p in range(start, end)]
        step = max(1, (1 << 24) // self.mcfg.vocab_size)
        for i in range(0, len(rows), step):
            part = rows[i : i + step]
            lp = torch.log_softmax(self.model.compute_logits(hidden[i : i + step]).float(), dim=-1)
            targets = torch.tensor([s.token_ids[p + 1] for s, p in part], device=lp.device)
            _, entries = position_logprobs(lp, targets, [s.params.prompt_logprobs for s, _ in part])
            for (s, p), e in zip(part, entries):
                self.requests[s.request_id].prompt_logprobs[p + 1] = e

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
