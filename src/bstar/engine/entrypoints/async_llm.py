"""AsyncLLM (also named AsyncLLMEngine), vLLM's asyncio front-end, over one LLMEngine:

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=path, ...))   # or AsyncLLM(path, ...)
    async for out in engine.generate(TokensPrompt(prompt_token_ids=ids), params, request_id): ...

LLMEngine is not thread-safe, so one background thread owns it: it runs the commands the event loop sends
(add, abort, sleep, collective_rpc...) between steps, and steps while any request is unfinished, so
concurrent generate calls batch together (continuous batching). Each step's outputs go back to the event
loop of the request's caller. As vLLM's default (CUMULATIVE), each output holds everything generated so
far; a consumer slower than the engine gets the newest one (older ones are superseded, not queued), and
the last output has finished=True. output_kind DELTA gives only what is new since the consumer's previous
output (so a slow consumer gets a larger piece), FINAL_ONLY only the finished output. abort() ends a
request's stream with its tokens so far and finish_reason "abort"; cancelling the consuming task (or
closing the generator) aborts the request.
The engine thread steps the synchronous LLMEngine unchanged: no cost to LLM.generate.
"""

import asyncio
import concurrent.futures
import contextlib
import queue
import threading
from collections.abc import Iterable

from bstar.engine.compat.vllm import GENERATE_KWARGS, no_lora
from bstar.engine.core.output_processor import DeltaOutputs
from bstar.engine.core.sequence import Request
from bstar.engine.entrypoints.llm import LLM
from bstar.engine.entrypoints.outputs import RequestOutput
from bstar.engine.entrypoints.sampling_params import SamplingParams
from bstar.engine.entrypoints.vllm_sampling import RequestOutputKind
from bstar.engine.errors import RequestError, UnsupportedError

_STOP = object()


class AsyncEngineArgs:
    """vLLM's AsyncEngineArgs: the model and the keywords LLM takes (checked when the engine is built)."""

    def __init__(self, model: str, **kwargs):
        self.model = model
        self.kwargs = kwargs


class _Stream:
    """One request's outputs, read on the caller's event loop: only the newest output is kept."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.latest: RequestOutput | BaseException | None = None
        self.ready = asyncio.Event()
        self.done = False  # the final output (or an error) was delivered
        self.final_only = False  # output_kind FINAL_ONLY: no progress outputs are made for it

    def put(self, item):  # on the event loop
        self.latest = item
        self.ready.set()

    async def get(self):
        await self.ready.wait()
        item, self.latest = self.latest, None
        self.ready.clear()
        if isinstance(item, BaseException):
            raise item
        return item


def _post(stream: _Stream, item):
    """Hand an output to the stream's event loop (from the engine thread)."""
    try:
        stream.loop.call_soon_threadsafe(stream.put, item)
    except RuntimeError:  # that loop is closed: nobody reads this stream any more
        pass


class _OutputProcessor:
    """vLLM's AsyncLLM.output_processor, as far as load balancers read it."""

    def __init__(self, owner: "AsyncLLM"):
        self._owner = owner

    def get_num_unfinished_requests(self) -> int:
        return self._owner.get_num_unfinished_requests()

    def has_unfinished_requests(self) -> bool:
        return self._owner.get_num_unfinished_requests() > 0


class AsyncLLM:
    def __init__(self, model: str, **kwargs):
        """kwargs: whatever LLM takes (engine options and vLLM keywords)."""
        self._llm = LLM(model, **kwargs)
        self.llm_engine = self._llm.engine  # touched only by the engine thread once it runs
        self.model_config = self.llm_engine.model_config
        self.output_processor = _OutputProcessor(self)
        self.num_steps = 0  # engine steps run (batching shows as fewer steps for the same requests)
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()  # guards _streams between the event loop and the engine thread
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._paused = False
        self._thread = threading.Thread(target=self._run, name="engine-step-loop", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, engine_args: AsyncEngineArgs, start_engine_loop: bool = True, **_ignored):
        """vLLM's constructor (usage_context, stat_loggers... have no use here)."""
        return cls(engine_args.model, **engine_args.kwargs)

    # -- the engine thread --------------------------------------------------------------------
    def _run(self):
        eng = self.llm_engine
        while True:
            busy = eng.has_unfinished_requests() and not self._paused
            try:
                item = self._cmds.get_nowait() if busy else self._cmds.get()
            except queue.Empty:
                item = None
            while item is not None:  # every pending command before the next step
                if item is _STOP:
                    return
                fn, fut = item
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except BaseException as e:  # the caller gets it
                        fut.set_exception(e)
                try:
                    item = self._cmds.get_nowait()
                except queue.Empty:
                    item = None
            if eng.has_unfinished_requests() and not self._paused:
                self._step()

    def _step(self):
        eng = self.llm_engine
        try:
            finished = eng.step()
            self.num_steps += 1
            for out in finished:
                self._deliver(out.request_id, out)
            self._deliver_progress({out.request_id for out in finished})
        except Exception as e:  # the engine's state is unknown: fail every request, keep serving commands
            # (an error building an output counts too: it would end this thread and leave every stream waiting)
            with self._lock:
                ids = list(self._streams)
            for rid in ids:
                with contextlib.suppress(Exception):  # (it frees the blocks before it builds the output)
                    eng.abort_request(rid)
                self._deliver(rid, e)

    def _deliver(self, rid: str, item):
        with self._lock:
            stream = self._streams.get(rid)
            if stream is None:
                return
            if isinstance(item, BaseException) or item.finished:
                stream.done = True
                del self._streams[rid]
        _post(stream, item)

    def _deliver_progress(self, skip: set[str]):
        """Cumulative outputs of the unfinished requests whose consumer took the previous one."""
        with self._lock:
            wanted = {
                rid
                for rid, st in self._streams.items()
                if not st.ready.is_set() and not st.final_only and rid not in skip
            }
        if not wanted:
            return
        eng = self.llm_engine
        live: dict[str, list] = {}
        for s in list(eng.scheduler.running) + list(eng.scheduler.waiting):
            if s.request_id in wanted:
                live.setdefault(s.request_id, []).append(s)
        for rid, seqs in live.items():
            req = eng.requests.get(rid)
            if req is None or not any(s.output_ids for s in seqs):
                continue
            snap = Request(rid, req.prompt, req.prompt_token_ids, req.params, req.finished + seqs, req.prompt_logprobs)
            out = eng.output_processor.request_output(snap)
            out.finished = False
            for c in out.outputs:  # the engine keeps appending to its own lists
                c.logprobs = None if c.logprobs is None else list(c.logprobs)
            with self._lock:
                stream = self._streams.get(rid)
            if stream is not None:
                _post(stream, out)

    def _submit(self, fn) -> concurrent.futures.Future:
        if not self._thread.is_alive():
            raise RequestError("the engine was shut down")
        fut = concurrent.futures.Future()
        self._cmds.put((fn, fut))
        return fut

    async def _call(self, fn):
        return await asyncio.wrap_future(self._submit(fn))

    # -- requests -----------------------------------------------------------------------------
    async def generate(self, prompt, sampling_params: SamplingParams, request_id: str, **_ignored):
        """Yield RequestOutputs of one request until the finished one: cumulative ones, only what is new in
        each (output_kind DELTA), or only the finished one (FINAL_ONLY). vLLM's other keywords
        (compat.vllm.GENERATE_KWARGS: priority, trace_headers...) have no use here; lora_request only None."""
        unknown = sorted(set(_ignored) - GENERATE_KWARGS)
        if unknown:
            raise UnsupportedError(f"generate got unknown keyword {unknown[0]!r}")
        no_lora(_ignored.get("lora_request"))
        stream = _Stream(asyncio.get_running_loop())
        kind = getattr(sampling_params, "output_kind", RequestOutputKind.CUMULATIVE)
        stream.final_only = kind == RequestOutputKind.FINAL_ONLY
        delta = DeltaOutputs(sampling_params) if kind == RequestOutputKind.DELTA else None
        with self._lock:
            if request_id in self._streams:
                raise RequestError(f"duplicate request id {request_id!r}")
            self._streams[request_id] = stream
        try:
            await self._call(lambda: self.llm_engine.add_request(request_id, prompt, sampling_params))
        except BaseException:
            with self._lock:
                self._streams.pop(request_id, None)
            raise
        try:
            while True:
                out = await stream.get()
                finished = out.finished
                if delta is not None:
                    out = delta.next(out)
                if out is not None:
                    yield out
                if finished:
                    return
        finally:
            if not stream.done and self._thread.is_alive():  # the consumer left early: free the blocks
                await asyncio.wrap_future(self._abort_now([request_id], notify=False))

    def _abort_now(self, ids: list[str], notify: bool = True) -> concurrent.futures.Future:
        if not notify:
            with self._lock:
                for rid in ids:
                    self._streams.pop(rid, None)

        def run():
            for rid in ids:
                out = self.llm_engine.abort_request(rid)
                if out is not None:
                    self._deliver(rid, out)

        return self._submit(run)

    async def abort(self, request_id: str | Iterable[str], internal: bool = False):
        """Stop requests and free their blocks; each stream ends with its output so far, finish_reason
        "abort" (as vLLM's). Unknown or finished ids are ignored."""
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        await asyncio.wrap_future(self._abort_now(ids))

    def get_num_unfinished_requests(self) -> int:
        with self._lock:
            return len(self._streams)

    async def wait_for_requests_to_drain(self, drain_timeout: float = 300):
        loop = asyncio.get_running_loop()
        end = loop.time() + drain_timeout
        while self.get_num_unfinished_requests():
            if loop.time() > end:
                raise TimeoutError(f"requests still unfinished after {drain_timeout} s")
            await asyncio.sleep(0.01)

    async def _settle(self, mode: str):
        """What sleep / pause do with unfinished requests: "abort" them, or "wait" for them."""
        if mode == "abort":
            with self._lock:
                ids = list(self._streams)
            await asyncio.wrap_future(self._abort_now(ids))
        elif mode == "wait":
            await self.wait_for_requests_to_drain()
        elif mode != "keep":
            raise RequestError(f"mode must be 'abort', 'wait' or 'keep', got {mode!r}")

    async def pause_generation(self, *, mode: str = "abort", clear_cache: bool = True):
        """Stop stepping. mode "abort" aborts unfinished requests, "wait" lets them finish first, "keep"
        freezes them until resume_generation. clear_cache resets the prefix cache (when none is running)."""
        await self._settle(mode)

        def run():
            self._paused = True
            if clear_cache and not self.llm_engine.has_unfinished_requests():
                self.llm_engine.reset_prefix_cache()

        await self._call(run)

    async def resume_generation(self):
        def run():
            self._paused = False

        await self._call(run)

    async def is_paused(self) -> bool:
        return self._paused

    # -- engine-wide calls, run on the engine thread between steps -----------------------------------
    async def sleep(self, level: int = 1, mode: str = "abort"):
        """As LLMEngine.sleep, after dealing with unfinished requests per mode ("abort" or "wait")."""
        if mode == "keep":
            raise RequestError("sleep(mode='keep') is not supported: sleeping discards the KV cache")
        await self._settle(mode)
        await self._call(lambda: self.llm_engine.sleep(level))

    async def wake_up(self, tags: list[str] | None = None):
        await self._call(lambda: self.llm_engine.wake_up(tags))

    async def is_sleeping(self) -> bool:
        return await self._call(self.llm_engine.is_sleeping)

    async def reset_prefix_cache(self, reset_running_requests: bool = False, reset_connector: bool = False) -> bool:
        return await self._call(self.llm_engine.reset_prefix_cache)

    async def collective_rpc(
        self, method, timeout: float | None = None, args: tuple = (), kwargs: dict | None = None
    ) -> list:
        """As LLM.collective_rpc, run between steps (a weight update never lands mid-step)."""
        return await self._call(lambda: self.llm_engine.collective_rpc(method, timeout, args, kwargs))

    def get_tokenizer(self):
        return self._llm.get_tokenizer()

    def shutdown(self, timeout: float | None = None):
        """Stop the engine thread (unfinished requests are left as they are)."""
        if self._thread.is_alive():
            self._cmds.put(_STOP)
            self._thread.join(timeout)


class AsyncLLMEngine(AsyncLLM):
    """vLLM's older name for AsyncLLM (OpenRLHF's: AsyncLLMEngine.from_engine_args)."""
