"""Per-request sampling options, named as in vLLM."""

import math
import numbers
from dataclasses import dataclass, field

from bstar.engine.entrypoints.vllm_sampling import (  # noqa: F401 (GuidedDecodingParams: vllm.sampling_params')
    GuidedDecodingParams,
    RequestOutputKind,
    StructuredOutputsParams,
    check_vllm_fields,
)
from bstar.engine.errors import RequestError
from bstar.utils.settings import setting


@dataclass
class SamplingParams:
    # (the help of a field is its `bstar-engine generate` option's, where it has one)
    n: int = setting(1, "Candidates per prompt; they share the prompt's KV blocks.")
    temperature: float = setting(1.0, "Sampling temperature; 0: greedy.")
    top_p: float = setting(1.0, "Nucleus sampling: the most likely tokens up to this total probability (1: off).")
    top_k: int = setting(-1, "Sample from the k most likely tokens (-1 or 0: off).")
    min_p: float = setting(0.0, "Drop tokens below this fraction of the most likely one's probability (0: off).")
    max_tokens: int | None = setting(
        16, "Most tokens generated per candidate.", unset="up to the context (max_model_len - prompt length)"
    )
    min_tokens: int = setting(0, "EOS and stop_token_ids are banned until this many tokens.")
    stop: str | list[str] | None = setting(None, "Stop string (repeatable).", unset="none")
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False  # keep the stop string (or the stop/EOS token's text) in .text
    ignore_eos: bool = setting(False, "Go on after EOS, up to max_tokens.")
    seed: int | None = setting(
        None, "Per-request seed: the same seed and inputs give the same outputs.", unset="drawn by the engine"
    )
    logprobs: int | None = setting(None, "Each token's logprob (0), plus the top-k (k > 0).", unset="none")
    skip_special_tokens: bool = True  # only affects .text
    # Penalties, before temperature and the filters (vLLM's order: repetition, frequency, presence).
    repetition_penalty: float = 1.0  # tokens of prompt + output: logit / p if > 0 else logit * p (1 = off)
    presence_penalty: float = 0.0  # output tokens: logit - p once a token has appeared (0 = off)
    frequency_penalty: float = 0.0  # output tokens: logit - p * its count so far (0 = off)
    prompt_logprobs: int | None = None  # None: none; k: each prompt token's raw logprob plus the top-k
    detokenize: bool = True  # False: no .text, no Logprob.decoded_token, no stop strings
    # vLLM's other fields (checked in entrypoints/vllm_sampling.py). Masks and bias, applied before the
    # penalties in vLLM's order (runner/logit_masks.py):
    logit_bias: dict[int, float] | None = None  # added to the logits (after the bans, before the penalties)
    allowed_token_ids: list[int] | None = None  # only these may be drawn
    bad_words: list[str] | None = None  # never completed (each word, with and without a leading space)
    structured_outputs: StructuredOutputsParams | None = None  # JSON schema, regex, choice or grammar
    # no-ops here
    spaces_between_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    extra_args: dict | None = None
    skip_clone: bool = False
    flat_logprobs: bool = False
    skip_reading_prefix_cache: bool | None = None
    best_of: int | None = None  # None or n
    # refused unless None
    logits_processors: list | None = None
    truncate_prompt_tokens: int | None = None
    guided_decoding: StructuredOutputsParams | None = None
    stop_strings: list[str] = field(init=False, default_factory=list)
    # bad_words as token id lists (vLLM's _bad_words_token_ids), set when a request is added
    bad_words_token_ids: list[list[int]] | None = field(init=False, default=None, repr=False, compare=False)
    has_penalties: bool = field(init=False, default=False, repr=False, compare=False)

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Check every field and refresh the derived ones. Runs again when a request is added, so
        fields changed after construction (e.g. max_tokens set later) are checked too."""

        def bad(name, why):
            raise RequestError(f"invalid sampling value {name}={getattr(self, name)!r}: {why}")

        def integer(name, optional=False):
            """An integer (numpy's too; not a bool: True is not a count) below 2**31 (counts reach int32
            tensors: 10**30 is no count), or None when optional."""
            v = getattr(self, name)
            return (optional and v is None) or (
                isinstance(v, numbers.Integral) and not isinstance(v, bool) and (name == "seed" or v < 2**31)
            )

        def number(name):
            """A finite int or float (not a bool, not a string such as "0.5")."""
            v = getattr(self, name)
            return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)

        def flag(name):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be True or False")

        if not isinstance(self.stop, (str, list, tuple, type(None))):
            bad("stop", "must be a non-empty string or a list of them")
        self.stop_strings = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if not isinstance(self.stop_token_ids, (list, tuple, type(None))):
            bad("stop_token_ids", "must be a list of non-negative integers")
        self.stop_token_ids = list(self.stop_token_ids or [])
        if not integer("n") or self.n < 1:
            bad("n", "must be an integer >= 1")
        if not number("temperature") or self.temperature < 0:
            bad("temperature", "must be a finite number >= 0 (0 = greedy)")
        if not number("top_p") or not 0 < self.top_p <= 1:
            bad("top_p", "must be a number in (0, 1]")
        if not integer("top_k") or self.top_k < -1:
            bad("top_k", "must be an integer >= 1, or -1/0 for off")
        if not number("min_p") or not 0 <= self.min_p <= 1:
            bad("min_p", "must be a number in [0, 1]")
        if not integer("max_tokens", optional=True) or (self.max_tokens is not None and self.max_tokens < 1):
            bad("max_tokens", "must be an integer >= 1, or None for up to the context")
        if not integer("min_tokens") or self.min_tokens < 0:
            bad("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            bad("min_tokens", "must be an integer in [0, max_tokens]")
        if not integer("logprobs", optional=True) or (self.logprobs or 0) < -1:
            bad("logprobs", "must be None or an integer >= 0 (-1: the whole vocabulary)")
        if not integer("prompt_logprobs", optional=True) or (self.prompt_logprobs or 0) < -1:
            bad("prompt_logprobs", "must be None or an integer >= 0 (-1: the whole vocabulary)")
        if not integer("seed", optional=True) or not -(2**63) <= (self.seed or 0) < 2**63:
            bad("seed", "must be a 64-bit integer or None")
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens", "detokenize"):
            flag(name)
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            bad("stop", "must be a non-empty string or a list of them")
        if self.stop_strings and not self.detokenize:
            bad("stop", "stop strings need detokenize=True (use stop_token_ids instead)")
        if any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be non-negative integers")
        if not number("repetition_penalty") or self.repetition_penalty <= 0:
            bad("repetition_penalty", "must be a finite number > 0 (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not number(name) or not -2 <= getattr(self, name) <= 2:
                bad(name, "must be in [-2, 2] (0 = off)")
        self.has_penalties = self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0
        check_vllm_fields(self)
