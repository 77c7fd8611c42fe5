"""The engine loop: requests in, one scheduled model step at a time, finished outputs out.

This is the lower-level interface for embedding in RL loops:
    eng = LLMEngine(model_path, ...); eng.add_request("r0", prompt, params)
    while eng.has_unfinished_requests(): for out in eng.step(): ...
"""

import json
import os
import random
from dataclasses import dataclass

import torch

from engine.block_manager import BlockManager
from engine.config import DTYPES, EngineConfig, ModelConfig
from engine.errors import CheckpointError, RequestError
from engine.loader import iter_weights
from engine.model import CausalLM
from engine.model_runner import ModelRunner
from engine.outputs import CompletionOutput, RequestOutput
from engine.sampler import candidate_seed, position_seed, sample_rows
from engine.sampling_params import SamplingParams
from engine.scheduler import Batch, Scheduler
from engine.sequence import Sequence
from engine.tokenizer import load_tokenizer, require


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    seqs: list[Sequence]

    @property
    def finished(self) -> bool:
        return len(self.seqs) == self.params.n and all(s.is_finished for s in self.seqs)


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
        seq = Sequence(request_id, ids, params, index=0, fork_count=params.n - 1)
        self.requests[request_id] = Request(request_id, text, ids, params, seed, [seq])
        self.scheduler.add(seq)

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
        self.runner.copy_blocks(batch.copies)
        sample_idx = [i for i, (s, n) in enumerate(zip(batch.seqs, batch.num_new)) if s.num_computed + n == len(s)]
        logits = self.runner.run(batch, sample_idx)
        for s, n in zip(batch.seqs, batch.num_new):
            s.num_computed += n
            self.block_manager.register_full_blocks(s)
        # One row per candidate to draw: a prefilled parent draws for all of its siblings at once.
        targets, rows = [], []
        for j, i in enumerate(sample_idx):
            seq = batch.seqs[i]
            group = [seq]
            if seq.fork_count:
                for c in range(1, seq.fork_count + 1):
                    child = seq.fork(c)
                    self.block_manager.fork(seq, child)
                    group.append(child)
                self.scheduler.add_forks(seq, group[1:])
                self.requests[seq.request_id].seqs += group[1:]
                seq.fork_count = 0
            targets += group
            rows += [j] * len(group)
        if not targets:
            return []
        if len(rows) != logits.shape[0] or rows != list(range(len(rows))):
            logits = logits[torch.tensor(rows, device=logits.device)]
        params = [s.params for s in targets]
        for s in targets:
            if s.seed_base is None:
                s.seed_base = candidate_seed(self.requests[s.request_id].seed, s.index)
        seeds = [position_seed(s.seed_base, s.num_output) for s in targets]
        bans = [self._banned(s) if s.params.min_tokens else [] for s in targets]
        tokens, lps, tops = sample_rows(logits, params, seeds, bans)
        self.num_generated_tokens += len(tokens)
        finished_reqs = []
        for s, tok, lp, top in zip(targets, tokens, lps, tops):
            s.token_ids.append(tok)
            s.cumulative_logprob += lp
            if s.params.logprobs is not None:
                entry = {tok: lp}
                entry.update(top or {})
                s.logprobs.append(entry)
            reason = self._stop_reason(s, tok)
            if reason is not None:
                self.scheduler.finish(s, reason[0])
                s.stop_reason = reason[1]
                req = self.requests[s.request_id]
                if req.finished:
                    finished_reqs.append(req)
        return [self._output(self.requests.pop(r.request_id)) for r in finished_reqs]

    def _banned(self, s: Sequence) -> list[int]:
        if s.num_output >= s.params.min_tokens:
            return []
        ban = list(s.params.stop_token_ids)
        if not s.params.ignore_eos:
            ban += list(self.eos_ids)
        return ban

    def _stop_reason(self, s: Sequence, tok: int):
        p = s.params
        if s.num_output >= p.min_tokens:
            if not p.ignore_eos and tok in self.eos_ids:
                return "stop", None
            if tok in p.stop_token_ids:
                return "stop", tok
            if p.stop_strings and self.tokenizer is not None:
                text = self.tokenizer.decode(s.output_ids, p.skip_special_tokens)
                tail = max(len(x) for x in p.stop_strings) + 16  # only the new tail can hold a new match
                for stop in p.stop_strings:
                    k = text.find(stop, max(0, len(text) - tail - len(stop)))
                    if k >= 0:
                        s.stop_text = text[: k + len(stop)] if p.include_stop_str_in_output else text[:k]
                        return "stop", stop
        if s.num_output >= p.max_tokens or len(s) >= self.max_model_len:
            return "length", None
        return None

    def _output(self, req: Request) -> RequestOutput:
        outs = []
        for s in sorted(req.seqs, key=lambda s: s.index):
            if s.stop_text is not None:
                text = s.stop_text
            elif self.tokenizer is not None:
                text = self.tokenizer.decode(s.output_ids, s.params.skip_special_tokens)
            else:
                text = ""
            outs.append(
                CompletionOutput(
                    index=s.index,
                    text=text,
                    token_ids=s.output_ids,
                    cumulative_logprob=s.cumulative_logprob,
                    logprobs=s.logprobs if s.params.logprobs is not None else None,
                    finish_reason=s.finish_reason,
                    stop_reason=s.stop_reason,
                )
            )
        return RequestOutput(req.request_id, req.prompt, req.prompt_token_ids, outs, finished=True)

    # -- prompt-only forward (logits, PRM scoring) --------------------------------------------
    @torch.inference_mode()
    def forward_prompts(
        self, token_lists: list[list[int]], use_prefix_cache: bool = False, prefix_limits: list[int] | None = None
    ):
        """Final hidden states of each token list: yields (index, first_row, hidden [n, H]).

        With use_prefix_cache, tokens already in the prefix cache (at most prefix_limits[i] of them)
        are not recomputed and first_row says where the returned rows start; computed blocks are
        registered for later lists, so lists sharing a prefix (a question and its candidates)
        compute it once."""
        if self.scheduler.has_work():
            raise RuntimeError("forward_prompts needs an idle engine (no unfinished requests)")
        bm, budget_total = self.block_manager, self.ecfg.max_num_batched_tokens
        for ids in token_lists:
            self.check_prompt_len(len(ids))
        i, N = 0, len(token_lists)
        while i < N:
            batch, starts, index = Batch(), [], []
            budget = budget_total
            while i < N:
                seq = Sequence(f"_fwd{i}", token_lists[i], SamplingParams())
                if use_prefix_cache:
                    bm.match_prefix(seq, None if prefix_limits is None else prefix_limits[i])
                n = len(seq) - seq.num_computed
                fits = bm.blocks_needed(seq, n) <= bm.num_free
                if batch.seqs and (n > budget or not fits):
                    bm.free_seq(seq)
                    break
                if not fits:
                    raise RuntimeError(f"KV cache too small for a {len(seq)}-token forward")
                bm.allocate(seq, n)
                batch.seqs.append(seq)
                batch.num_new.append(n)
                starts.append(seq.num_computed)
                index.append(i)
                budget -= n
                i += 1
            if len(batch.seqs) == 1 and batch.num_new[0] > budget_total:
                hs = self._chunked_forward(batch.seqs[0], batch.num_new[0])
            else:
                batch.num_decode = 0
                h, _ = self.runner.hidden_states(batch)
                hs = list(h.split(batch.num_new))
            for seq, n, start, k, hh in zip(batch.seqs, batch.num_new, starts, index, hs):
                seq.num_computed += n
                bm.register_full_blocks(seq)
                bm.free_seq(seq)
                yield k, start, hh

    def _chunked_forward(self, seq: Sequence, n: int):
        out, left = [], n
        while left:
            m = min(left, self.ecfg.max_num_batched_tokens)
            b = Batch(seqs=[seq], num_new=[m], num_decode=int(m == 1))
            h, _ = self.runner.hidden_states(b)
            out.append(h)
            seq.num_computed += m
            left -= m
        seq.num_computed -= n  # the caller advances it once
        return [torch.cat(out)]

    # -- weights ------------------------------------------------------------------------------
    def load_weights(self, named_tensors, strict: bool = False):
        """In-process weight update (e.g. from a trainer). Invalidates the prefix cache."""
        self.model.load_weights(named_tensors, strict=strict)
        self.block_manager.reset_prefix_cache()
        self.runner.invalidate_buffers()
