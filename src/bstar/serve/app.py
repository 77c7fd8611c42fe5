"""An OpenAI-compatible HTTP server on the async engine (FastAPI + uvicorn), as `vllm serve` answers:

    POST /v1/completions       prompt(s) as text or token ids; n, logprobs, echo, stop, seed, stream (SSE)
    POST /v1/chat/completions  messages through the checkpoint's chat template; logprobs/top_logprobs, stream
    GET  /v1/models            the one served model
    GET  /health               200 while the engine thread runs
    GET  /metrics              Prometheus text: requests, tokens, KV blocks

A client that disconnects (streaming or not) has its requests aborted, which frees their KV blocks. Bad
requests get a 4xx with OpenAI's error body {"error": {"message", "type", "param", "code"}}.
"""

import asyncio
import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from bstar.engine.compat import vllm as vllm_compat
from bstar.errors import BStarError
from bstar.serve import protocol as P

_DISCONNECT_POLL_S = 0.2


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param


def error_response(status: int, message: str, kind: str = "invalid_request_error", param=None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


class _Metrics:
    def __init__(self):
        self.requests = self.aborted = self.prompt_tokens = self.generation_tokens = 0


def settled(c) -> str:
    """A candidate's text so far without a trailing partial UTF-8 character (decoded as U+FFFD until its
    other bytes arrive), so a stream never sends a character it will later take back."""
    return c.text if c.finish_reason is not None else c.text.rstrip("\ufffd")


def build_app(engine, model_name: str) -> FastAPI:
    """The app serving `engine` (an AsyncLLM) as model `model_name`."""
    app = FastAPI(title="bstar-engine OpenAI-compatible server")
    metrics = _Metrics()
    eng = engine.llm_engine
    tokenizer = eng.get_tokenizer()
    app.state.engine, app.state.metrics = engine, metrics

    @app.exception_handler(_HTTPError)
    async def _http_error(_, e: _HTTPError):
        return error_response(e.status, e.message, e.kind, e.param)

    @app.exception_handler(BStarError)
    async def _bad_request(_, e: BStarError):
        return error_response(400, str(e))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        return error_response(400, " ".join(str(e).split())[:500])

    @app.exception_handler(Exception)
    async def _internal(_, e: Exception):
        return error_response(500, f"{type(e).__name__}: {e}", "internal_server_error")

    async def read_body(request: Request, allowed: set[str]) -> dict:
        try:
            body = json.loads(await request.body())
        except ValueError as e:
            raise _HTTPError(400, f"the request body is not valid JSON: {e}") from None
        P.check_fields(body, allowed)
        if body.get("model") not in (None, model_name):
            raise _HTTPError(404, f"the model {body.get('model')!r} does not exist", "NotFoundError", "model")
        return body

    # -- running requests ------------------------------------------------------------------
    async def final_output(prompt, params, rid: str):
        final = None
        async for out in engine.generate(prompt, params, rid):
            final = out
        return final

    async def until_disconnect(request: Request, coros: list):
        """Run the requests; if the client goes away first, cancel them (AsyncLLM.generate then aborts
        each request, freeing its blocks)."""
        tasks = [asyncio.ensure_future(c) for c in coros]
        try:
            while True:
                done, pending = await asyncio.wait(tasks, timeout=_DISCONNECT_POLL_S)
                if not pending:
                    return [t.result() for t in tasks]
                if any(t.exception() is not None for t in done if not t.cancelled()):
                    break
                if await request.is_disconnected():
                    metrics.aborted += len(tasks)
                    break
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for t in tasks:  # (the first error, when one request failed)
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise t.exception()
        raise _HTTPError(499, "the client closed the request")

    async def merged(prompts, params, rid: str):
        """(prompt index, cumulative output) of every request as they come; the requests are cancelled
        (and aborted) when the consumer stops early."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i, prompt):
            try:
                async for out in engine.generate(prompt, params, f"{rid}-{i}"):
                    await queue.put((i, out, None))
            except Exception as e:  # (delivered to the consumer)
                await queue.put((i, None, e))
            finally:
                await queue.put((i, None, StopAsyncIteration()))

        tasks = [asyncio.ensure_future(pump(i, p)) for i, p in enumerate(prompts)]
        live = len(tasks)
        try:
            while live:
                i, out, err = await queue.get()
                if isinstance(err, StopAsyncIteration):
                    live -= 1
                elif err is not None:
                    raise err
                else:
                    yield i, out
        finally:
            metrics.aborted += sum(not t.done() for t in tasks)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    def wants_usage(body: dict) -> bool:  # stream_options.include_usage: a last chunk with the usage
        return bool((body.get("stream_options") or {}).get("include_usage"))

    def sse(obj) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    def count(outputs):
        metrics.requests += len(outputs)
        metrics.prompt_tokens += sum(len(o.prompt_token_ids) for o in outputs)
        metrics.generation_tokens += sum(len(c.token_ids) for o in outputs for c in o.outputs)

    # -- endpoints -------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        if not engine._thread.is_alive():
            return error_response(503, "the engine thread has stopped", "internal_server_error")
        return PlainTextResponse("")

    @app.get("/v1/models")
    async def models():
        card = {
            "id": model_name,
            "object": "model",
            "created": P.now(),
            "owned_by": "bstar-engine",
            "root": eng.model_path,
            "max_model_len": eng.max_model_len,
        }
        return {"object": "list", "data": [card]}

    @app.get("/metrics")
    async def prometheus():
        bm = eng.block_manager
        lines = [
            ("bstar_requests_total", metrics.requests),
            ("bstar_requests_aborted_total", metrics.aborted),
            ("bstar_prompt_tokens_total", metrics.prompt_tokens),
            ("bstar_generation_tokens_total", metrics.generation_tokens),
            ("bstar_requests_running", engine.get_num_unfinished_requests()),
            ("bstar_kv_blocks_free", bm.num_free),
            ("bstar_kv_blocks_total", bm.num_blocks),
        ]
        return PlainTextResponse("".join(f"{k} {v}\n" for k, v in lines), media_type="text/plain; version=0.0.4")

    def completion_prompts(prompt) -> list:
        if isinstance(prompt, str):
            return [prompt]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return [{"prompt_token_ids": prompt}]
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(p, list) for p in prompt):
            return [{"prompt_token_ids": p} for p in prompt]
        raise _HTTPError(
            400, "prompt must be a string, a list of strings, token ids, or a list of those", param="prompt"
        )

    def completion_choice(out, i: int, n: int, echo: bool, want_logprobs: bool, prev=None) -> list[dict]:
        """Choices (delta against `prev` texts / token counts when streaming)."""
        choices = []
        for c in out.outputs:
            key = (i, c.index)
            text_from, tok_from = prev.get(key, (0, 0)) if prev is not None else (0, 0)
            full = settled(c)
            text, ids = full[text_from:], c.token_ids[tok_from:]
            lps = None
            head = ""
            if echo and text_from == 0 and tok_from == 0 and (prev is None or key not in prev):
                head = (
                    out.prompt
                    if out.prompt is not None
                    else (tokenizer.decode(out.prompt_token_ids) if tokenizer else "")
                )
            if want_logprobs:
                entries = (c.logprobs or [])[tok_from:]
                lps = P.completion_logprobs(ids, entries, tokenizer, offset=len(head) + text_from)
                if head and out.prompt_logprobs is not None:
                    pre = P.completion_logprobs(out.prompt_token_ids, out.prompt_logprobs, tokenizer)
                    lps = {k: pre[k] + lps[k] for k in lps}
            if prev is not None:
                prev[key] = (len(full), len(c.token_ids))
            choices.append(
                {
                    "index": i * n + c.index,
                    "text": head + text,
                    "logprobs": lps,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                }
            )
        return choices

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request, P.COMPLETION_FIELDS)
        if body.get("suffix"):
            raise _HTTPError(400, "suffix is not supported", param="suffix")
        n = body.get("n") or 1
        if body.get("best_of") not in (None, n):
            raise _HTTPError(400, "best_of must equal n (or be left out)", param="best_of")
        if "prompt" not in body:
            raise _HTTPError(400, "prompt is required", param="prompt")
        prompts = completion_prompts(body["prompt"])
        echo, lp = bool(body.get("echo")), body.get("logprobs")
        if lp is not None and (not isinstance(lp, int) or isinstance(lp, bool) or lp < 0):
            raise _HTTPError(400, "logprobs must be a non-negative integer", param="logprobs")
        max_tokens = body.get("max_tokens", 16)
        if max_tokens == 0 and not echo:
            raise _HTTPError(400, "max_tokens=0 needs echo=true (nothing to return otherwise)", param="max_tokens")
        params = P.sampling_params(body, max_tokens or 1, lp, lp if echo and lp is not None else None)
        cid = P.new_id("cmpl")
        base = {"id": cid, "object": "text_completion", "created": P.now(), "model": model_name}
        if max_tokens == 0:  # echo only: the prompt (and its logprobs), no completion
            params.logprobs = None

        def trim(out):
            if max_tokens == 0:
                for c in out.outputs:
                    c.text, c.token_ids, c.logprobs, c.finish_reason = "", [], None, "length"
            return out

        if not body.get("stream"):
            outs = await until_disconnect(
                request, [final_output(p, params, f"{cid}-{i}") for i, p in enumerate(prompts)]
            )
            count(outs)
            outs = [trim(o) for o in outs]
            choices = [ch for i, o in enumerate(outs) for ch in completion_choice(o, i, n, echo, lp is not None)]
            return {**base, "choices": choices, "usage": P.usage(outs)}

        async def events():
            prev, last = {}, {}
            async for i, out in merged(prompts, params, cid):
                last[i] = out
                trim(out)
                choices = completion_choice(out, i, n, echo, lp is not None, prev)
                choices = [c for c in choices if c["text"] or c["finish_reason"] or c["logprobs"]]
                if choices:
                    yield sse({**base, "choices": choices})
            count(list(last.values()))
            if wants_usage(body):
                yield sse({**base, "choices": [], "usage": P.usage(list(last.values()))})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    def chat_prompt(body: dict) -> dict:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise _HTTPError(400, "messages must be a non-empty list", param="messages")
        flat = []
        for m in msgs:
            if not isinstance(m, dict) or "role" not in m:
                raise _HTTPError(400, "each message needs a role and content", param="messages")
            content = m.get("content")
            if isinstance(content, list):  # content parts: text only
                if any(not isinstance(p, dict) or p.get("type") != "text" for p in content):
                    raise _HTTPError(400, "only text content parts are supported", param="messages")
                content = "".join(p.get("text", "") for p in content)
            flat.append({**m, "content": content if content is not None else ""})
        return vllm_compat.render_chats(
            tokenizer,
            flat,
            body.get("chat_template"),
            body.get("add_generation_prompt", True),
            body.get("continue_final_message", False),
            None,
            body.get("chat_template_kwargs"),
        )[0]

    def chat_choice(c, top: int | None, want: bool, prev=None) -> dict:
        text_from, tok_from = prev.get(c.index, (0, 0)) if prev is not None else (0, 0)
        full = settled(c)
        lps = None
        if want:
            lps = P.chat_logprobs(c.token_ids[tok_from:], (c.logprobs or [])[tok_from:], tokenizer, top or 0)
        if prev is not None:
            prev[c.index] = (len(full), len(c.token_ids))
        return {"index": c.index, "text": full[text_from:], "logprobs": lps, "finish_reason": c.finish_reason}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_body(request, P.CHAT_FIELDS)
        want = bool(body.get("logprobs"))
        top = body.get("top_logprobs")
        if top is not None and (not want or not isinstance(top, int) or top < 0):
            raise _HTTPError(400, "top_logprobs needs logprobs=true and an integer >= 0", param="top_logprobs")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        params = P.sampling_params(body, max_tokens, (top or 0) if want else None, None)
        prompt = chat_prompt(body)
        cid = P.new_id("chatcmpl")
        base = {"id": cid, "created": P.now(), "model": model_name}
        if not body.get("stream"):
            (out,) = await until_disconnect(request, [final_output(prompt, params, cid)])
            count([out])
            choices = []
            for c in out.outputs:
                ch = chat_choice(c, top, want)
                message = {"role": "assistant", "content": ch.pop("text")}
                choices.append({**ch, "message": message, "stop_reason": c.stop_reason})
            return {**base, "object": "chat.completion", "choices": choices, "usage": P.usage([out])}

        async def events():
            prev, started, last = {}, set(), None
            async for _, out in merged([prompt], params, cid):
                last = out
                for c in out.outputs:
                    ch = chat_choice(c, top, want, prev)
                    delta = {"content": ch.pop("text")}
                    if c.index not in started:
                        started.add(c.index)
                        delta["role"] = "assistant"
                    if delta["content"] or ch["finish_reason"] or "role" in delta:
                        yield sse({**base, "object": "chat.completion.chunk", "choices": [{**ch, "delta": delta}]})
            if last is not None:
                count([last])
                if wants_usage(body):
                    yield sse({**base, "object": "chat.completion.chunk", "choices": [], "usage": P.usage([last])})
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app
