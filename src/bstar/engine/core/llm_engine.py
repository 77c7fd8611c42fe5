"""The engine loop: requests in, one scheduled model step at a time, finished outputs out.

This is the lower-level interface for embedding in RL loops:
    eng = LLMEngine(model_path, ...); eng.add_request("r0", prompt, params)
    while eng.has_unfinished_requests(): for out in eng.step(): ...
    eng.sleep(2); ...train...; eng.wake_up(["weights"]); eng.load_weights(new); eng.wake_up(["kv_cache"])
"""

import logging
import os
import random
import warnings
import weakref

import torch

from bstar.engine.compat import vllm as vllm_compat
from bstar.engine.config import EngineConfig, ModelConfig, resolve_device, resolve_dtype
from bstar.engine.core.async_step import InFlight, step_async, take_draw
from bstar.engine.core.block_manager import BlockManager
from bstar.engine.core.input_checks import check_prompt_len, check_request, encode_prompt
from bstar.engine.core.isolation import Isolation
from bstar.engine.core.output_processor import OutputProcessor
from bstar.engine.core.prompt_logprobs import PromptLogprobs
from bstar.engine.core.scheduler import Scheduler
from bstar.engine.core.sequence import Request, Sequence
from bstar.engine.entrypoints.inputs import parse_prompt
from bstar.engine.entrypoints.outputs import CompletionOutput, RequestOutput
from bstar.engine.entrypoints.sampling_params import SamplingParams
from bstar.engine.entrypoints.vllm_sampling import uses_masks
from bstar.engine.errors import CheckpointError, RequestError
from bstar.engine.model.decoder import build_model
from bstar.engine.model.loader import generation_eos_ids, iter_weights
from bstar.engine.model.tokenizer import load_tokenizer
from bstar.engine.runner.logit_masks import LogitMasks
from bstar.engine.runner.memory_plan import SLEEP_TAGS, engine_max_model_len
from bstar.engine.runner.runners import build_runner
from bstar.engine.runner.sampler import (
    Draw,
    Sampler,
    whole_vocabulary,
)

log = logging.getLogger(__name__)  # (debug only: the CLI shows one line, never a traceback)


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
        self.eos_ids = set(self.mcfg.eos_token_ids) | generation_eos_ids(model)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)

        net = build_model(self.mcfg, self.dtype, self.device)
        net.load_weights(iter_weights(model))
        self.model = net.eval().requires_grad_(False)
        self.runner = build_runner(net, self.mcfg, self.ecfg, self.max_model_len, self.device, self.dtype)
        self.block_manager = BlockManager(self.runner.num_blocks, self.ecfg.block_size, self.ecfg.enable_prefix_caching)
        self.scheduler = Scheduler(self.ecfg, self.block_manager)
        self.sampler = Sampler(self.eos_ids, self.ecfg.logprobs_mode, triton=self.runner.triton)
        # vLLM's primary EOS (the tokenizer's) ends with stop_reason None; the others give their id.
        primary_eos = self.tokenizer.eos_token_id if self.tokenizer is not None else None
        self.output_processor = OutputProcessor(self.tokenizer, self.eos_ids, self.max_model_len, primary_eos)
        self.requests: dict[str, Request] = {}
        self.prompt_logprobs = PromptLogprobs(self.mcfg.vocab_size, self.device, self.block_manager, self.requests)
        self.scheduler.match_scored_prefix = self.prompt_logprobs.match
        self._rng = random.Random(seed)
        self.num_generated_tokens = 0
        self.num_discarded_tokens = 0  # async scheduling: drawn for candidates that had stopped meanwhile
        self._weights_to_load: set[str] = set()  # after a level-2 sleep: names load_weights has yet to set
        self._in_flight: InFlight | None = None  # async scheduling: the launched step whose draw is not taken in
        self._batch = None  # the scheduled batch of the step under way (what a failed step involved)
        self.isolation = Isolation()
        # vLLM's handles (llm_engine.model_config, .model_executor.driver_worker...): bstar/engine/compat/vllm.py
        # (they hold a weak proxy: no reference cycle, so dropping the engine frees its memory at once)
        me = weakref.proxy(self)
        self.model_config = vllm_compat.VllmModelConfig(me)
        self.model_executor = vllm_compat.Executor(me, worker_extension_cls)
        # vLLM's per-request masks (logit_bias, allowed_token_ids, bad_words, structured_outputs)
        self.sampler.masks = LogitMasks(lambda: me.get_tokenizer(), self.mcfg.vocab_size, self.eos_ids)

    # -- requests -----------------------------------------------------------------------------
    def check_prompt_len(self, n: int):
        check_prompt_len(n, self.max_model_len, self.ecfg.block_size, self.block_manager.num_blocks)

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
        text, ids = encode_prompt(parsed, self.tokenizer, self.mcfg.vocab_size)
        self.check_prompt_len(len(ids))
        check_request(
            len(ids),
            params,
            self.mcfg.vocab_size,
            self.max_model_len,
            self.ecfg.block_size,
            self.block_manager.num_blocks,
        )
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        req = Request(request_id, text, ids, params)
        seq = Sequence(request_id, ids, params, index=0, fork_count=params.n - 1, seed=seed)
        if parsed.cache_salt is not None:
            seq.hash_root = seq.last_hash = hash(("cache_salt", parsed.cache_salt))
        if params.prompt_logprobs is not None:
            # Computed once per request, by candidate 0's prefill; a cached prefix is used only with
            # its stored entries (PromptLogprobs.match).
            req.prompt_logprobs = [None] * len(ids)
            if len(ids) > 1:
                seq.prompt_logprobs_pending = True
                self.prompt_logprobs.seqs.add(seq)
        self.requests[request_id] = req
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Drop a request and free its blocks. Returns its output so far (finish_reason "abort" for the
        candidates that were still running), or None for an unknown id."""
        gone = self.scheduler.abort(request_id)
        for s in gone:
            self.prompt_logprobs.seqs.discard(s)
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
        self.scheduler.focus = self.isolation.next_focus(self.requests)
        with self.runner.guard():
            try:
                done = self._step()
            except Exception as e:
                return self._recover(e)
        batch, self._batch = self._batch, None
        self.isolation.after_step(batch, self.requests)
        return done

    def _recover(self, err: Exception) -> list[RequestOutput]:
        """After a step raised: fail the request that ran alone (or the only one in the step), else queue
        the step's requests to run alone; undo the step (preempt everything, drop pending draws) and
        return the outputs that step had already finished."""
        log.debug("engine step failed", exc_info=err)
        batch, self._batch = self._batch, None
        done = self.isolation.take_salvaged()
        involved = list(dict.fromkeys(s.request_id for s in batch.seqs)) if batch else list(self.requests)
        self._undo_step(batch)
        why = str(err).strip().splitlines()[0] if str(err).strip() else "no message"
        if len(involved) == 1:
            out = self.fail_request(
                involved[0], f"an engine step failed with this request: {type(err).__name__}: {why}"
            )
            if out is not None:
                done.append(out)
        else:
            self.isolation.bisect(involved)
        return done

    def _undo_step(self, batch):
        """Forget everything a failed step may have left half done: launched draws and their pending
        tokens, prompt logprobs still on their way, the kept decode buffers and cached prefixes; every
        running sequence is preempted and recomputed from its tokens."""
        self._in_flight = None
        try:
            self.prompt_logprobs.take(self.requests)
        except Exception:
            self.prompt_logprobs.copies = []
        for s in list(self.scheduler.running) + list(self.scheduler.waiting):
            s.drop_pending()
            s.ends_at_pending, s.pending_source = False, None
        for s in batch.seqs if batch else []:  # prompt logprobs are computed again with the prompt
            req = self.requests.get(s.request_id)
            if req is not None and req.prompt_logprobs is not None and s.index == 0 and not s.output_ids:
                if len(s.token_ids) > 1 and s.finish_reason is None:
                    s.prompt_logprobs_pending = True
                    self.prompt_logprobs.seqs.add(s)
        self.scheduler.preempt_all()
        self.block_manager.reset_prefix_cache()
        self.prompt_logprobs.forget()
        self.runner.release_decode_state()

    def fail_request(self, request_id: str, message: str) -> RequestOutput | None:
        """Finish a request with an error: its unfinished candidates end with finish_reason "error", its
        blocks are freed, and its output carries `message`. None for an unknown id."""
        gone = self.scheduler.abort(request_id)
        for s in gone:
            s.finish_reason = "error"
            self.prompt_logprobs.seqs.discard(s)
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
    def _step(self) -> list[RequestOutput]:  # (async scheduling: core.async_step)
        if self.ecfg.async_scheduling:
            return step_async(self)
        done = []
        if self._in_flight is not None:  # async scheduling was switched off with a step in flight
            prev, self._in_flight = self._in_flight, None
            self.prompt_logprobs.take(self.requests)
            done = take_draw(self, prev)
        batch = self._batch = self.scheduler.schedule()
        if not batch:
            if self.scheduler.has_work():
                done.append(self._fail_stuck())
            return done
        seqs, draw = self._run(batch)
        if seqs:
            draw.start_copy()  # (CUDA: its tensors in one pinned copy each, then one wait, not a wait per tensor)
        self.prompt_logprobs.take(self.requests)  # (before any output of the requests they belong to)
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
        spans = self.prompt_logprobs.spans(batch) if self.prompt_logprobs.seqs else None
        if spans:
            logits, hidden = self.runner.run_with_prompt_hidden(batch, [r for sp in spans for r in sp[3]])
            self.prompt_logprobs.launch(spans, hidden, self.model, self.requests)
        else:
            logits = self.runner.run(batch)  # a row per sequence of batch.sampled
        seqs, rows = self.scheduler.advance(batch)  # prefilled prompts fork their siblings here
        if not seqs:
            return [], None
        return seqs, self.sampler(logits, rows, seqs)

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
        self.prompt_logprobs.forget()
        self.runner.invalidate_buffers()
        return loaded

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix, as vLLM's: refused (False, with a warning) while requests are
        unfinished, True once done."""
        if self.scheduler.has_work():
            warnings.warn("reset_prefix_cache: requests are unfinished; the prefix cache was kept", stacklevel=2)
            return False
        self.block_manager.reset_prefix_cache()
        self.prompt_logprobs.forget()
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
        self.prompt_logprobs.forget()
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
