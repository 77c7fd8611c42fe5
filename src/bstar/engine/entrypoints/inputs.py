"""Prompt forms, named as in vLLM (`vllm.inputs`): a string, a list of token ids, a `TextPrompt` or a
`TokensPrompt` dict, or a list of these.

`TextPrompt` / `TokensPrompt` are plain TypedDicts, so `TokensPrompt(prompt_token_ids=ids)` is just
`{"prompt_token_ids": ids}`. `parse_prompt` reads one prompt for `LLMEngine.add_request`;
`prompt_list` splits what `LLM.generate` was given into single prompts. Optional vLLM fields that
have no meaning here (multi-modal data, token type ids) are accepted only when empty; anything else
is refused with one line.
"""

from numbers import Integral
from typing import Any, NamedTuple, TypedDict

from bstar.engine.errors import RequestError


class _PromptOptions(TypedDict, total=False):  # optional keys (total=False: NotRequired on Python 3.10)
    multi_modal_data: Any  # only None or empty: no multi-modal models here
    mm_processor_kwargs: dict | None  # only None or empty
    cache_salt: str  # prefix-cache namespace: requests share cached blocks only with the same salt


class TextPrompt(_PromptOptions):
    prompt: str


class _TokensRequired(_PromptOptions):
    prompt_token_ids: list[int]


class TokensPrompt(_TokensRequired, total=False):
    prompt: str  # the text the ids came from, echoed in RequestOutput.prompt
    token_type_ids: list[int]  # only None or empty: decoder-only models


class ParsedPrompt(NamedTuple):
    text: str | None  # the prompt text (None for token ids without one)
    token_ids: list[int] | None  # None: tokenize `text`
    cache_salt: str | None = None


_EMPTY_OK = ("multi_modal_data", "mm_processor_kwargs", "token_type_ids")
_KNOWN = {"prompt", "prompt_token_ids", "cache_salt", *_EMPTY_OK}
_FORMS = "a str, a list of token ids, TextPrompt {'prompt': str} or TokensPrompt {'prompt_token_ids': [...]}"


def _is_token_ids(x) -> bool:
    if not isinstance(x, (list, tuple)):
        return False
    # (plain ints first: the ABC check costs ~1 us a token, 10 ms per 10k-token scoring batch)
    return all(type(t) is int for t in x) or all(isinstance(t, Integral) and not isinstance(t, bool) for t in x)


def parse_prompt(prompt) -> ParsedPrompt:
    """One prompt in any accepted form -> ParsedPrompt; anything else raises RequestError."""
    if isinstance(prompt, str):
        return ParsedPrompt(prompt, None)
    if _is_token_ids(prompt):
        return ParsedPrompt(None, [int(t) for t in prompt])
    if not isinstance(prompt, dict):
        raise RequestError(f"unsupported prompt of type {type(prompt).__name__}; use {_FORMS}")
    unknown = sorted(set(prompt) - _KNOWN, key=str)
    if unknown:
        raise RequestError(f"unsupported prompt field {unknown[0]!r}; a prompt dict takes {sorted(_KNOWN)}")
    for key in _EMPTY_OK:
        if prompt.get(key):
            raise RequestError(f"prompt field {key!r} is not supported (text-only decoder models); pass it empty")
    salt = prompt.get("cache_salt")
    if salt is not None and not isinstance(salt, str):
        raise RequestError(f"cache_salt must be a string, got {type(salt).__name__}")
    text = prompt.get("prompt")
    if text is not None and not isinstance(text, str):
        raise RequestError(f"prompt 'prompt' must be a string, got {type(text).__name__}")
    if "prompt_token_ids" in prompt:
        ids = prompt["prompt_token_ids"]
        if not _is_token_ids(ids):
            raise RequestError(f"prompt_token_ids must be a list of ints, got {type(ids).__name__}")
        return ParsedPrompt(text, [int(t) for t in ids], salt)
    if text is None:
        raise RequestError("a prompt dict needs 'prompt_token_ids' (TokensPrompt) or 'prompt' (TextPrompt)")
    return ParsedPrompt(text, None, salt)


def prompt_list(prompts) -> list:
    """What LLM.generate was given, as a list of single prompts: one prompt (a str, a list of ids, a
    dict) becomes a list of one; a list or tuple of prompts stays as it is."""
    if isinstance(prompts, (str, dict)) or (_is_token_ids(prompts) and len(prompts) > 0):
        return [prompts]
    if isinstance(prompts, (list, tuple)):
        return list(prompts)
    raise RequestError(f"unsupported prompts of type {type(prompts).__name__}; use {_FORMS}, or a list of them")
