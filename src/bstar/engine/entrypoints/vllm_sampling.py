"""vLLM's SamplingParams fields beyond the engine's own (entrypoints/sampling_params.py holds the fields; this
module checks the vLLM ones, so each lives in one place): the logits masks and bias (logit_bias,
allowed_token_ids, bad_words, structured_outputs; applied on the device by runner/logit_masks.py, in vLLM's
order), the fields that change nothing here (accepted at any value), and those refused unless at their
default, each with one line naming the field."""

import enum
import json
from dataclasses import dataclass

from bstar.engine.errors import RequestError


class RequestOutputKind(enum.IntEnum):
    """vLLM's output_kind. LLM.generate returns final outputs whatever it is (as vLLM's); AsyncLLM streams
    cumulative outputs (CUMULATIVE), only what each adds (DELTA: core.output_processor.DeltaOutputs), or
    only the finished output (FINAL_ONLY)."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass
class StructuredOutputsParams:
    """vLLM's structured output constraint: exactly one of json (a JSON schema, as a dict or its text),
    regex, choice (one of these strings), grammar (Lark / EBNF text), json_object (any JSON object)."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    # vLLM's options; no-ops here (the one backend has no fallback, whitespace follows the schema)
    disable_fallback: bool = False
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None
    backend: str | None = None

    def __post_init__(self):
        kinds = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if self.structural_tag is not None:
            raise RequestError("structured_outputs.structural_tag is not supported; use json, regex, choice or grammar")
        if len(kinds) != 1:
            raise RequestError(
                "structured_outputs needs exactly one of json, regex, choice, grammar, json_object; "
                f"got {kinds or 'none'}"
            )
        self.kind = kinds[0]
        if self.kind == "json" and isinstance(self.json, str):
            try:
                json.loads(self.json)
            except ValueError as e:
                raise RequestError(f"structured_outputs.json is not valid JSON: {e}") from None
        choice = self.choice
        if self.kind == "choice" and not (
            isinstance(choice, (list, tuple)) and all(isinstance(c, str) for c in choice)
        ):
            raise RequestError("structured_outputs.choice must be a non-empty list of strings")
        for k in ("regex", "grammar"):
            if self.kind == k and (not isinstance(getattr(self, k), str) or not getattr(self, k)):
                raise RequestError(f"structured_outputs.{k} must be a non-empty string")


GuidedDecodingParams = StructuredOutputsParams  # vLLM's name before 0.10.2 (same fields)

# vLLM fields refused unless at their default: field -> why
REFUSED_FIELDS = {
    "logits_processors": "Python logits processors are not run (use logit_bias, allowed_token_ids, bad_words)",
    "truncate_prompt_tokens": "prompts are not truncated; truncate them before the call",
    "guided_decoding": "vLLM 0.10.2 renamed it structured_outputs: pass structured_outputs=StructuredOutputsParams()",
}


def _bad(params, name: str, why: str):
    raise RequestError(f"invalid sampling value {name}={getattr(params, name)!r}: {why}")


def _is_token_id(t) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and t >= 0


def _logit_bias(params) -> dict[int, float]:
    """{token id: bias}; ids may come as strings (OpenAI's JSON keys)."""
    try:
        lb = {int(k): float(v) for k, v in params.logit_bias.items()}
    except (AttributeError, TypeError, ValueError):
        _bad(params, "logit_bias", "must be a dict {token id: bias}")
    if not all(k >= 0 and -1e9 < v < 1e9 for k, v in lb.items()):
        _bad(params, "logit_bias", "token ids must be >= 0 and biases finite")
    return lb


def check_vllm_fields(params):
    """Check the vLLM fields of SamplingParams `params` (one line naming the field when refused)."""
    for name, why in REFUSED_FIELDS.items():
        if getattr(params, name) not in (None, []):
            raise RequestError(f"SamplingParams({name}=...) is not supported: {why}")
    if params.best_of not in (None, params.n):
        _bad(params, "best_of", "must be None or n (vLLM 1.x has no best_of; draw n and pick)")
    if params.output_kind not in tuple(RequestOutputKind):
        _bad(params, "output_kind", "must be a RequestOutputKind (CUMULATIVE, DELTA or FINAL_ONLY)")
    if params.logit_bias is not None:
        params.logit_bias = _logit_bias(params)
    ids = params.allowed_token_ids
    if ids is not None and (not isinstance(ids, (list, tuple)) or not ids or not all(_is_token_id(t) for t in ids)):
        _bad(params, "allowed_token_ids", "must be a non-empty list of token ids")
    words = params.bad_words
    if words is not None and (not isinstance(words, (list, tuple)) or not all(isinstance(w, str) and w for w in words)):
        _bad(params, "bad_words", "must be a list of non-empty strings")
    so = params.structured_outputs
    if isinstance(so, dict):
        params.structured_outputs = so = StructuredOutputsParams(**so)
    if so is not None and not isinstance(so, StructuredOutputsParams):
        _bad(params, "structured_outputs", "must be a StructuredOutputsParams (or a dict of its fields)")


def uses_masks(params) -> bool:
    """Whether a request's logits are masked or biased before its penalties (runner/logit_masks.py)."""
    return bool(params.logit_bias or params.allowed_token_ids or params.bad_words or params.structured_outputs)
