"""The engine loop: requests in, one scheduled model step at a time, finished outputs out.

This is the lower-level interface for embedding in RL loops:
    eng = LLMEngine(model_path, ...); eng.add_request("r0", prompt, params)
    while eng.has_unfinished_requests(): for out in eng.step(): ...
    eng.sleep(2); ...train...; eng.wake_up(["weights"]); eng.load_weights(new); eng.wake_up(["kv_cache"])
"""

import json
import logging
import os
import random
import warnings
import weakref

import torch

from bstar.engine.compat import vllm as vllm_compat
from bstar.engine.config import EngineConfig, ModelConfig, resolve_dtype
from bstar.engine.core.block_manager import BlockManager
from bstar.engine.core.output_processor import OutputProcessor
from bstar.engine.core.scheduler import Scheduler
from bstar.engine.core.sequence import Request, Sequence
from bstar.engine.entrypoints.inputs import ParsedPrompt, parse_prompt
from bstar.engine.entrypoints.outputs import CompletionOutput, RequestOutput
from bstar.engine.entrypoints.sampling_params import SamplingParams
from bstar.engine.entrypoints.vllm_sampling import uses_masks
from bstar.engine.errors import CheckpointError, RequestError
from bstar.engine.model.decoder import CausalLM
from bstar.engine.model.loader import iter_weights
from bstar.engine.model.tokenizer import load_tokenizer, require
from bstar.engine.runner.logit_masks import LogitMasks
from bstar.engine.runner.memory_plan import SLEEP_TAGS, engine_max_model_len
from bstar.engine.runner.model_runner import ModelRunner
from bstar.engine.runner.sampler import (
    Draw,
    Sampler,
    flat_logprob_entries,
    prompt_logprob_tensors,
    whole_vocabulary,
)
from bstar.kernels.host import HostCopy, to_device

log = logging.getLogger(__name__)  # (debug only: the CLI shows one line, never a traceback)


class _PromptLogprobsCopy:
    """Prompt logprobs computed on the device and on their way to the host (kernels.host.HostCopy): row r
    is prompt_logprobs[rows[r][1]] of request rows[r][0]; `want`: the entries each row asks for; `width`:
    values per row in the flat copy (sampler.prompt_logprob_tensors)."""

    def __init__(self, rows: list[tuple[Request, int]], want: list[int], copy: HostCopy, width: int):
        self.rows, self.want, self.copy, self.width = rows, want, copy, width


class _InFlight:
    """A launched step whose draw has not reached the host: the sequences that drew (sequence i
    from row i of the draw, its Sequence.pending_source) and the draw."""

    def __init__(self, seqs: list[Sequence], draw: Draw):
        self.seqs, self.draw = seqs, draw


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise RequestError(f"unsupported device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RequestError("device 'cuda' requested but CUDA is not available")
    if dev.type not in ("cpu", "cuda"):
        raise RequestError(f"unsupported device {device!r}; use 'cpu' or 'cuda'")
    if dev.type == "cuda":
        if dev.index is None:  # pin it: the device guard, KV and profiling all name this one
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise RequestError(f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s)")
    return dev


def build_model(mcfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> CausalLM:
    """The decoder with unset weights, materialised once on `device` directly in `dtype` (built and cast on
    the meta device: no float32 copy of a bf16 model ever exists). load_weights then streams the
    checkpoint in, one tensor at a time."""
    with torch.device("meta"):
        net = CausalLM(mcfg)
    net = net.to(dtype).to_empty(device=device)
    if mcfg.tie_word_embeddings and mcfg.head == "lm":  # to_empty unties
        net.lm_head.weight = net.model.embed_tokens.weight
    return net


class LLMEngine:
    def __init__(
        self,
        model: str,
        dtype: str = "auto",
        device: str = "auto",
        seed: int = 0,
        engine_config: EngineConfig | None = None,
        tokenizer: str | None = None,
        skip_tokenizer_init: bool = False,
        worker_extension_cls=None,
    ):
        """tokenizer: another directory to read tokenizer.json from; skip_tokenizer_init: no tokenizer
        (token-id prompts only, empty .text); worker_extension_cls: see bstar/engine/compat/vllm.py."""
        self.model_path = model
        self.seed = seed
        self.device = resolve_device(device)
        self.mcfg = ModelConfig.from_dir(model) if os.path.isdir(model) else None
        if self.mcfg is None:
            raise CheckpointError(f"model directory {model} does not exist")
        self.dtype = resolve_dtype(dtype, self.mcfg, self.device)
        self.ecfg = engine_config or EngineConfig()
        self.ecfg.validate()
        # within a sliding window, sliding attention equals full attention
        self.max_model_len = engine_max_model_len(self.mcfg, self.ecfg.max_model_len)
        self.tokenizer_path = tokenizer or model
        if tokenizer is not None and not os.path.isfile(os.path.join(tokenizer, "tokenizer.json")):
            raise CheckpointError(f"tokenizer directory {tokenizer} has no tokenizer.json")
        self.tokenizer = None if skip_tokenizer_init else load_tokenizer(self.tokenizer_path)
        self._hf_tokenizer = None
        self.eos_ids = set(self.mcfg.eos_token_ids) | self._generation_eos(model)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)

        net = build_model(self.mcfg, self.dtype, self.device)
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
        self._prompt_logprob_copies: list[_PromptLogprobsCopy] = []  # launched, not yet in their requests
        self._rng = random.Random(seed)
        self.num_generated_tokens = 0
        self.num_discarded_tokens = 0  # async scheduling: drawn for candidates that had stopped meanwhile
        self._weights_to_load: set[str] = set()  # after a level-2 sleep: names load_weights has yet to set
        self._in_flight: _InFlight | None = None  # async scheduling: the launched step whose draw is not taken in
        # Isolation (step()): the scheduled batch of the step under way; groups of requests of a failed step
        # still to run apart from the others; the group running now, with its members' successful drawing
        # steps; outputs a failed step had already produced.
        self._batch = None
        self._suspects: list[list[str]] = []
        self._focus: dict[str, int] | None = None
        self._salvaged: list[RequestOutput] = []
        # vLLM's handles (llm_engine.model_config, .model_executor.driver_worker...): bstar/engine/compat/vllm.py
        # (they hold a weak proxy: no reference cycle, so dropping the engine frees its memory at once)
        me = weakref.proxy(self)
        self.model_config = vllm_compat.VllmModelConfig(me)
        self.model_executor = vllm_compat.Executor(me, worker_extension_cls)
        # vLLM's per-request masks (logit_bias, allowed_token_ids, bad_words, structured_outputs)
        self.sampler.masks = LogitMasks(lambda: me.get_tokenizer(), self.mcfg.vocab_size, self.eos_ids)

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
        """(prompt text or None, token ids) of a prompt in any bstar.engine.entrypoints.inputs form."""
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

    def check_request(self, prompt_len: int, params: SamplingParams):
        """What SamplingParams cannot check alone: n within the KV blocks, stop ids in the vocabulary, and a
        candidate's full length (prompt + max_tokens, within the context) against the whole KV cache (one
        candidate that outgrows it could never be scheduled)."""
        if params.n > self.block_manager.num_blocks:  # (they fork at once, each to write a block of its own)
            raise RequestError(
                f"n={params.n} candidates is more than the KV cache's {self.block_manager.num_blocks} blocks "
                "(each candidate needs one); lower n or raise num_kv_blocks"
            )
        vocab = self.mcfg.vocab_size
        bad = [t for t in params.stop_token_ids if t >= vocab]
        if bad:
            raise RequestError(f"stop token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if params.max_tokens is None:
            return
        total = min(prompt_len + params.max_tokens, self.max_model_len)
        bs, have = self.ecfg.block_size, self.block_manager.num_blocks
        need = -(-total // bs)
        if need > have:
            raise RequestError(
                f"prompt of {prompt_len} tokens plus max_tokens={params.max_tokens} needs {need} KV blocks but "
                f"the whole cache has {have} (block_size {bs}); lower max_tokens or raise num_kv_blocks"
            )

    def add_request(self, request_id: str, prompt, params: SamplingParams | None = None):
        """prompt: a str, a list of token ids, or a bstar.engine.entrypoints.inputs TextPrompt / TokensPrompt dict."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise RequestError(f"sampling params must be a SamplingParams, got {type(params).__name__}")
        params.validate()  # again: fields may have changed since construction
        if self.mcfg.head != "lm":
            raise RequestError(
                f"{self.model_path} is a reward model ({self.mcfg.head} head) without an LM head; "
                "load it with bstar.PRM to score, not to generate"
            )
        if request_id in self.requests:
            raise RequestError(f"duplicate request id {request_id!r}")
        self.require_awake("add_request")
        cap = self.ecfg.max_logprobs
        asked = max(whole_vocabulary([params.logprobs or 0, params.prompt_logprobs or 0], self.mcfg.vocab_size))
        if cap >= 0 and asked > cap:
            raise RequestError(f"requested {asked} logprobs, more than max_logprobs={cap} (an LLM option)")
        if uses_masks(params):
            self.sampler.masks.prepare(params)
        parsed = parse_prompt(prompt)
        text, ids = self.encode_prompt(parsed)
        self.check_prompt_len(len(ids))
        self.check_request(len(ids), params)
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

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Drop a request and free its blocks. Returns its output so far (finish_reason "abort" for the
        candidates that were still running), or None for an unknown id."""
        gone = self.scheduler.abort(request_id)
        for s in gone:
            self._prompt_logprob_seqs.discard(s)
            s.drop_pending()  # (async scheduling: its draw in flight is discarded)
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        req.finished += gone
        return self.output_processor.request_output(req)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work() or self._in_flight is not None

    def get_num_unfinished_requests(self) -> int:
        """vLLM's: requests added and not yet finished or aborted."""
        return len(self.requests)

    # -- one step -----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled model step; return the requests that finished in it.

        One bad request never takes the engine down: a step that raises is undone (every running sequence
        is preempted, to be recomputed) and its requests are bisected: each half runs apart from the rest
        until every member has drawn twice, and a half that fails again is split again. The request that
        fails alone finishes with finish_reason "error" and RequestOutput.error; the others' outputs are
        those they would have had (draws depend only on the seed and the tokens). A poisoned batch of n
        requests costs about 4 log2(n) steps with fewer rows."""
        if self._focus is not None and not any(rid in self.requests for rid in self._focus):
            self._focus = None  # its members finished or were aborted
        while self._focus is None and self._suspects:
            group = {rid: 0 for rid in self._suspects.pop(0) if rid in self.requests}
            self._focus = group or None
        self.scheduler.focus = None if self._focus is None else set(self._focus)
        with self.runner.guard():
            try:
                done = self._step()
            except Exception as e:
                return self._recover(e)
        self._after_focus_step()
        return done

    def _after_focus_step(self):
        """Count the focused group's successful drawing steps; two for each live member (the step that
        failed, then one more: async scheduling takes a draw in one step later) clear the group."""
        batch, self._batch = self._batch, None
        if self._focus is None:
            return
        for rid in {batch.seqs[i].request_id for i in batch.sampled} if batch else ():
            if rid in self._focus:
                self._focus[rid] += 1
        if all(n >= 2 for rid, n in self._focus.items() if rid in self.requests):
            self._focus = None

    def _recover(self, err: Exception) -> list[RequestOutput]:
        """After a step raised: fail the request that ran alone (or the only one in the step), else queue
        the step's requests to run alone; undo the step (preempt everything, drop pending draws) and
        return the outputs that step had already finished."""
        log.debug("engine step failed", exc_info=err)
        batch, self._batch = self._batch, None
        done, self._salvaged = self._salvaged, []
        involved = list(dict.fromkeys(s.request_id for s in batch.seqs)) if batch else list(self.requests)
        self._focus = None
        self._undo_step(batch)
        why = str(err).strip().splitlines()[0] if str(err).strip() else "no message"
        if len(involved) == 1:
            out = self.fail_request(
                involved[0], f"an engine step failed with this request: {type(err).__name__}: {why}"
            )
            if out is not None:
                done.append(out)
        elif involved:  # bisect: each half runs apart, first half first
            half = len(involved) // 2
            self._suspects[:0] = [involved[:half], involved[half:]]
        return done

    def _undo_step(self, batch):
        """Forget everything a failed step may have left half done: launched draws and their pending
        tokens, prompt logprobs still on their way, the kept decode buffers and cached prefixes; every
        running sequence is preempted and recomputed from its tokens."""
        self._in_flight = None
        try:
            self._take_prompt_logprobs()
        except Exception:
            self._prompt_logprob_copies = []
        for s in list(self.scheduler.running) + list(self.scheduler.waiting):
            s.drop_pending()
            s.ends_at_pending, s.pending_source = False, None
        for s in batch.seqs if batch else []:  # prompt logprobs are computed again with the prompt
            req = self.requests.get(s.request_id)
            if req is not None and req.prompt_logprobs is not None and s.index == 0 and not s.output_ids:
                if len(s.token_ids) > 1 and s.finish_reason is None:
                    s.prompt_logprobs_pending = True
                    self._prompt_logprob_seqs.add(s)
        self.scheduler.preempt_all()
        self.block_manager.reset_prefix_cache()
        self.runner.cpu_decode.release()

    def fail_request(self, request_id: str, message: str) -> RequestOutput | None:
        """Finish a request with an error: its unfinished candidates end with finish_reason "error", its
        blocks are freed, and its output carries `message`. None for an unknown id."""
        gone = self.scheduler.abort(request_id)
        for s in gone:
            s.finish_reason = "error"
            self._prompt_logprob_seqs.discard(s)
            s.drop_pending()
        req = self.requests.pop(request_id, None)
        if req is None:
            return None
        req.finished += gone
        try:
            out = self.output_processor.request_output(req)
        except Exception:  # (building the output is what failed: the tokens, without text)
            outs = [
                CompletionOutput(s.index, "", s.output_ids, s.cumulative_logprob, None, s.finish_reason)
                for s in sorted(req.finished, key=lambda s: s.index)
            ]
            out = RequestOutput(request_id, req.prompt, req.prompt_token_ids, outs)
        out.error = message
        return out

    @torch.inference_mode()
    def _step(self) -> list[RequestOutput]:
        if self.ecfg.async_scheduling:
            return self._step_async()
        done = []
        if self._in_flight is not None:  # async scheduling was switched off with a step in flight
            prev, self._in_flight = self._in_flight, None
            self._take_prompt_logprobs()
            done = self._take_draw(prev)
        batch = self._batch = self.scheduler.schedule()
        if not batch:
            if self.scheduler.has_work():
                done.append(self._fail_stuck())
            return done
        seqs, draw = self._run(batch)
        if seqs:
            draw.start_copy()  # (CUDA: its tensors in one pinned copy each, then one wait, not a wait per tensor)
        self._take_prompt_logprobs()  # (before any output of the requests they belong to)
        if not seqs:
            return done
        return done + self._postprocess(seqs, *draw.host())

    def _fail_stuck(self) -> RequestOutput:
        """Nothing could be scheduled with every block free: the first waiting sequence needs more KV than
        the whole cache (max_tokens=None lets it grow to the context). Its request ends with an error."""
        s = self.scheduler.waiting[0]
        bs, have = self.ecfg.block_size, self.block_manager.num_blocks
        return self.fail_request(
            s.request_id,
            f"a candidate of {len(s)} tokens needs more KV than the whole cache ({have} blocks of {bs} tokens); "
            "set max_tokens or raise num_kv_blocks",
        )

    def _run(self, batch) -> tuple[list[Sequence], "Draw | None"]:
        """Forward, advance and draw of a scheduled batch: the sequences that drew a token and the
        draw, still on the device."""
        spans = self._prompt_logprob_spans(batch) if self._prompt_logprob_seqs else None
        if spans:
            logits, hidden = self.runner.run_with_prompt_hidden(batch, [r for sp in spans for r in sp[3]])
            self._launch_prompt_logprobs(spans, hidden)
        else:
            logits = self.runner.run(batch)  # a row per sequence of batch.sampled
        seqs, rows = self.scheduler.advance(batch)  # prefilled prompts fork their siblings here
        if not seqs:
            return [], None
        return seqs, self.sampler(logits, rows, seqs)

    def _step_async(self) -> list[RequestOutput]:
        """A step with async scheduling: schedule and launch this step while the previous step's draw
        is still on its way to the host, then take that draw in (stop rules, outputs).

        Each sequence that drew a token holds a PENDING_TOKEN in its place until then: lengths,
        blocks and seeds count it, this step's forward reads its value on the device (Batch.feed_*),
        and its prefix-cache block waits for it. A candidate that the previous token stops was
        scheduled again: that row's draw is discarded; one that max_tokens or the context stops is
        not scheduled again (Sequence.ends_at_pending)."""
        prev, self._in_flight, done = self._in_flight, None, []
        launched = len(self._prompt_logprob_copies)  # the steps before this one launched these
        batch = self._batch = self.scheduler.schedule()
        if batch:
            if prev is not None:
                for i, s in enumerate(batch.seqs[: batch.num_decode]):
                    if s.num_pending:
                        batch.feed_rows.append(i)
                        batch.feed_src.append(s.pending_source[1])
                batch.feed_tokens = prev.draw.tokens
            try:
                seqs, draw = self._run(batch)
            except BaseException:
                self._take_prompt_logprobs(launched)
                if prev is not None:  # its pending tokens must not outlive it; its outputs are kept
                    self._salvaged += self._take_draw(prev)
                raise
            if seqs:
                draw.start_copy()
                self._in_flight = _InFlight(seqs, draw)
                for r, s in enumerate(seqs):
                    s.add_pending()
                    s.pending_source = (draw.tokens, r)  # (penalties count it on the device)
                    s.ends_at_pending = self.output_processor.length_reached(s)
        elif prev is None and self.scheduler.has_work():
            done.append(self._fail_stuck())
        self._take_prompt_logprobs(launched)  # (before the draw that may finish their requests)
        if prev is not None:
            done += self._take_draw(prev)
            cur = self._in_flight
            if cur is not None and all(s.finish_reason is not None for s in cur.seqs):
                self._in_flight = None  # every row of it is discarded
        return done

    def _take_draw(self, inflight: "_InFlight") -> list[RequestOutput]:
        """Put a launched step's tokens in place of their PENDING_TOKENs, apply the stop rules, and
        return the requests that finished. Candidates finished (or aborted) since the draw skip it."""
        tokens, logprobs, tops = inflight.draw.host()
        done = []
        for s, tok, lp, top in zip(inflight.seqs, tokens, logprobs, tops):
            if s.finish_reason is not None:
                self.num_discarded_tokens += 1
                continue
            # The first pending token is this draw's; one after it is the step just launched's.
            later = s.drop_pending() - 1
            out = self._accept_isolated(s, tok, lp, top, register=True)
            if s.finish_reason is not None:
                if out is not None:
                    done.append(out)
            else:
                for _ in range(later):
                    s.add_pending()
        return done

    def _accept_isolated(self, s: Sequence, tok: int, lp: float, top, register: bool = False):
        """_accept, where a failure (a stop rule, detokenizing) ends only this candidate's request."""
        try:
            return self._accept(s, tok, lp, top, register)
        except Exception as e:
            log.debug("output processing failed", exc_info=e)
            why = str(e).strip().splitlines()[0] if str(e).strip() else "no message"
            return self.fail_request(
                s.request_id, f"processing this request's output failed: {type(e).__name__}: {why}"
            )

    def _accept(self, s: Sequence, tok: int, lp: float, top, register: bool = False) -> RequestOutput | None:
        """Append a drawn token and apply the stop rules; the request's output when its last
        candidate finished. register: hash the blocks the token completes (a pending token's waited)."""
        if lp != lp:  # NaN: the logits were NaN (broken weights); its tokens mean nothing
            return self.fail_request(
                s.request_id, "the model's logits are NaN (check the checkpoint's weights for NaN/inf)"
            )
        self.num_generated_tokens += 1
        s.append_token(tok, lp, top)
        if register:
            self.block_manager.register_full_blocks([s])
        reason = self.output_processor.finish_reason(s)
        if reason is None:
            return None
        self.scheduler.finish(s, reason)
        req = self.requests[s.request_id]
        req.finished.append(s)
        if req.is_finished:
            out = self.output_processor.request_output(req)  # (then dropped: a failure here leaves it to fail)
            del self.requests[s.request_id]
            return out
        return None

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

    def _launch_prompt_logprobs(self, spans, hidden: torch.Tensor):
        """Raw logprobs (no penalty, temperature or filter, as vLLM) of each span's next prompt tokens
        from their hidden states, a slice of rows at a time (never [tokens, vocab] at once), launched on
        the device and on their way to the host (`_take_prompt_logprobs` puts them in their requests).
        On the CPU the slices are small enough for a slice's logits to stay in cache through the
        logsumexp, top-k and rank passes (256 rows: 1.5-1.8x faster than 4096 here)."""
        rows = [(s, p) for s, start, end, _ in spans for p in range(start, end)]
        V = self.mcfg.vocab_size
        step = 256 if self.device.type == "cpu" else max(1, (1 << 24) // V)
        for i in range(0, len(rows), step):
            part = rows[i : i + step]
            logits = self.model.compute_logits(hidden[i : i + step]).float()
            targets = to_device([s.token_ids[p + 1] for s, p in part], torch.int64, logits.device)
            want = whole_vocabulary([s.params.prompt_logprobs for s, _ in part], V)
            *tensors, width = prompt_logprob_tensors(logits, targets, want)
            dest = [(self.requests[s.request_id], p + 1) for s, p in part]
            self._prompt_logprob_copies.append(_PromptLogprobsCopy(dest, want, HostCopy(tensors), width))

    def _take_prompt_logprobs(self, upto: int | None = None):
        """Put the first `upto` launched prompt-logprob copies (all: None) in their requests, waiting
        for each copy to reach the host; a request aborted meanwhile is left as its output returned it."""
        upto = len(self._prompt_logprob_copies) if upto is None else upto
        taken, self._prompt_logprob_copies = self._prompt_logprob_copies[:upto], self._prompt_logprob_copies[upto:]
        for c in taken:
            entries = flat_logprob_entries(*c.copy.lists(), c.want, c.width)
            for (req, i), e in zip(c.rows, entries):
                if self.requests.get(req.request_id) is req:
                    req.prompt_logprobs[i] = e

    def _postprocess(self, seqs, tokens, logprobs, tops) -> list[RequestOutput]:
        """Append each candidate's token, finish those a stop rule ends, and return the outputs of the
        requests whose candidates have all finished."""
        done = []
        for s, tok, lp, top in zip(seqs, tokens, logprobs, tops):
            if s.finish_reason is not None:  # a sibling's error ended its request meanwhile
                continue
            out = self._accept_isolated(s, tok, lp, top)
            if out is not None:
                done.append(out)
        return done

    # -- weights ------------------------------------------------------------------------------
    def load_weights(self, named_tensors, strict: bool = False) -> set[str]:
        """In-process weight update (e.g. from a trainer), cast to the engine's dtype and device as each
        tensor arrives. Invalidates the prefix cache. Returns the names loaded."""
        if "weights" in self.runner.asleep:
            raise RequestError("load_weights: the weights are asleep; call wake_up(tags=['weights']) first")
        loaded = self.model.load_weights(named_tensors, strict=strict)
        self._weights_to_load -= loaded
        self.block_manager.reset_prefix_cache()
        self.runner.invalidate_buffers()
        return loaded

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix, as vLLM's: refused (False, with a warning) while requests are
        unfinished, True once done."""
        if self.scheduler.has_work():
            warnings.warn("reset_prefix_cache: requests are unfinished; the prefix cache was kept", stacklevel=2)
            return False
        self.block_manager.reset_prefix_cache()
        return True

    def collective_rpc(self, method, timeout: float | None = None, args: tuple = (), kwargs: dict | None = None):
        return self.model_executor.collective_rpc(method, timeout, args, kwargs)

    def get_tokenizer(self):
        """transformers' fast tokenizer over the engine's tokenizer.json (loaded on first use), or None
        when the engine has no tokenizer."""
        if self.tokenizer is None:
            return None
        if self._hf_tokenizer is None:
            self._hf_tokenizer = vllm_compat.hf_tokenizer(self.tokenizer_path)
        return self._hf_tokenizer

    # -- sleep / wake (as vLLM's) -----------------------------------------------------------------
    def sleep(self, level: int = 1):
        """Free this engine's device memory. Level 1: weights kept in host memory (pinned on CUDA), KV cache
        discarded. Level 2: weights discarded too; after wake_up(tags=["weights"]) reload them with
        load_weights. The block manager and prefix cache are reset. Refused while requests are unfinished."""
        if level not in (1, 2):
            raise RequestError(f"sleep level must be 1 or 2, got {level!r}")
        if self.scheduler.has_work():
            raise RequestError(
                f"cannot sleep with {len(self.requests)} unfinished request(s); finish or abort them first"
            )
        self.runner.sleep(level)
        self.block_manager.reset()
        self._in_flight = None  # (only aborted candidates' rows can be left)

    def wake_up(self, tags: list[str] | None = None):
        """Bring back the weights and/or the KV cache (tags of "weights", "kv_cache"; None: both). Waking an
        awake tag only warns. vLLM's RL order works: wake_up(["weights"]), load_weights(...),
        wake_up(["kv_cache"])."""
        tags = list(SLEEP_TAGS) if tags is None else [tags] if isinstance(tags, str) else list(tags)
        bad = [t for t in tags if t not in SLEEP_TAGS]
        if bad:
            raise RequestError(f"unknown wake_up tag(s) {bad}; use {list(SLEEP_TAGS)}")
        awake = [t for t in tags if t not in self.runner.asleep]
        if awake:
            warnings.warn(f"wake_up: {', '.join(awake)} already awake", stacklevel=3)
        if self.runner.wake_up(tags):
            self._weights_to_load = self.model.required_weight_names()

    def is_sleeping(self) -> bool:
        return bool(self.runner.asleep)

    def require_awake(self, what: str):
        """Refuse `what` (one line) while anything is asleep or level-2 weights are not all reloaded."""
        if self.runner.asleep:
            raise RequestError(
                f"{what}: the engine is asleep ({', '.join(sorted(self.runner.asleep))}); call wake_up() first"
            )
        if self._weights_to_load:
            names = sorted(self._weights_to_load)
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            raise RequestError(
                f"{what}: after sleep(level=2) the weights must be reloaded with load_weights; "
                f"{len(names)} tensor(s) not loaded yet ({', '.join(names[:3])}{more})"
            )
