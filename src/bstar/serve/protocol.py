"""OpenAI's request and response bodies (as vLLM's server reads and writes them), to and from the engine's
SamplingParams and RequestOutputs. Plain dicts: a request field the server does not know is refused
with a 400 naming it, unless it is one OpenAI clients send that changes nothing here (IGNORED)."""

import time
import uuid

from bstar.engine.entrypoints.sampling_params import SamplingParams, StructuredOutputsParams
from bstar.engine.errors import RequestError

# OpenAI fields that change nothing for this server (no accounts, no storage, no tools run)
IGNORED = {"user", "service_tier", "metadata", "store", "parallel_tool_calls", "request_id"}
# OpenAI / vLLM-extra field -> SamplingParams field, where the name and meaning are the same
SAMPLING = {
    "n": "n",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "stop": "stop",
    "stop_token_ids": "stop_token_ids",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "repetition_penalty": "repetition_penalty",
    "min_tokens": "min_tokens",
    "ignore_eos": "ignore_eos",
    "skip_special_tokens": "skip_special_tokens",
    "spaces_between_special_tokens": "spaces_between_special_tokens",
    "include_stop_str_in_output": "include_stop_str_in_output",
    "logit_bias": "logit_bias",
    "allowed_token_ids": "allowed_token_ids",
    "bad_words": "bad_words",
    "prompt_logprobs": "prompt_logprobs",
}
# vLLM's older guided_* fields -> StructuredOutputsParams field
GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}
COMMON = {
    "model",
    "stream",
    "stream_options",
    "max_tokens",
    "structured_outputs",
    "response_format",
    *SAMPLING,
    *GUIDED,
    *IGNORED,
}
COMPLETION_FIELDS = COMMON | {"prompt", "logprobs", "echo", "best_of", "suffix"}
CHAT_FIELDS = COMMON | {
    "messages",
    "logprobs",
    "top_logprobs",
    "max_completion_tokens",
    "chat_template",
    "chat_template_kwargs",
    "add_generation_prompt",
    "continue_final_message",
}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def check_fields(body: dict, allowed: set[str]):
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise RequestError(f"unsupported request field {unknown[0]!r}")


def _structured(body: dict) -> StructuredOutputsParams | None:
    so = body.get("structured_outputs")
    guided = {v: body[k] for k, v in GUIDED.items() if body.get(k) is not None}
    fmt = body.get("response_format")
    if fmt is not None:
        kind = fmt.get("type") if isinstance(fmt, dict) else None
        if kind == "json_object":
            guided["json_object"] = True
        elif kind == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema")
            if schema is None:
                raise RequestError("response_format json_schema needs json_schema.schema")
            guided["json"] = schema
        elif kind != "text":
            raise RequestError(f"unsupported response_format type {kind!r}")
    if so is not None and guided:
        raise RequestError("pass structured_outputs or guided_* / response_format, not both")
    if so is not None:
        if not isinstance(so, dict):
            raise RequestError("structured_outputs must be an object")
        return StructuredOutputsParams(**so)
    return StructuredOutputsParams(**guided) if guided else None


def sampling_params(body: dict, max_tokens, logprobs: int | None, prompt_logprobs: int | None) -> SamplingParams:
    """SamplingParams of a request body (OpenAI's defaults: temperature 1, top_p 1, n 1)."""
    kw = {v: body[k] for k, v in SAMPLING.items() if body.get(k) is not None}
    if prompt_logprobs is not None:
        kw["prompt_logprobs"] = prompt_logprobs
    try:
        return SamplingParams(
            **kw, max_tokens=max_tokens, logprobs=logprobs, structured_outputs=_structured(body), detokenize=True
        )
    except TypeError as e:  # (a field of the wrong JSON type reaching a comparison)
        raise RequestError(f"invalid sampling value: {e}") from None


def usage(outputs) -> dict:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _token_text(lp, tid: int, tokenizer) -> str:
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return tokenizer.decode([tid]) if tokenizer is not None else str(tid)


def completion_logprobs(token_ids, entries, tokenizer, offset: int = 0) -> dict:
    """OpenAI's completion logprobs: tokens, token_logprobs, top_logprobs ({text: logprob}), text_offset.
    An entry of None (the prompt's first token) gives a null logprob, as vLLM's echo does."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for tid, e in zip(token_ids, entries):
        lp = e.get(tid) if e else None
        text = _token_text(lp, tid, tokenizer)
        out["tokens"].append(text)
        out["token_logprobs"].append(None if lp is None else max(lp.logprob, -9999.0))
        out["top_logprobs"].append(
            None if not e else {_token_text(v, t, tokenizer): max(v.logprob, -9999.0) for t, v in e.items()}
        )
        out["text_offset"].append(offset)
        offset += len(text)
    return out


def chat_logprobs(token_ids, entries, tokenizer, top: int) -> dict:
    """OpenAI's chat logprobs: content = [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]."""
    content = []
    for tid, e in zip(token_ids, entries):
        lp = e[tid]
        text = _token_text(lp, tid, tokenizer)
        tops = sorted(((t, v) for t, v in e.items()), key=lambda x: -x[1].logprob)[:top]
        content.append(
            {
                "token": text,
                "logprob": max(lp.logprob, -9999.0),
                "bytes": list(text.encode()),
                "top_logprobs": [
                    {
                        "token": _token_text(v, t, tokenizer),
                        "logprob": max(v.logprob, -9999.0),
                        "bytes": list(_token_text(v, t, tokenizer).encode()),
                    }
                    for t, v in tops
                ],
            }
        )
    return {"content": content}


def now() -> int:
    return int(time.time())
