"""What `generate` returns, named as in vLLM."""

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """One token's entry at one position (vLLM's `Logprob`). `logprob` holds what the engine's
    logprobs_mode asks for (by default the raw log-probability), `rank` is 1 + the number of tokens
    with a strictly larger value (for top-k entries: their place in the top-k), and `decoded_token`
    the token's text (None when the request has detokenize=False or the model has no tokenizer)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# Per position: {sampled or prompt token id: Logprob, then the top-k ids: Logprob}.
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float  # sum of the sampled tokens' values (always kept, even without logprobs)
    logprobs: list[PositionLogprobs] | None  # one dict per generated token when params.logprobs is set
    finish_reason: str | None  # "stop" (EOS, stop token or string), "length", "abort", "error" (RequestOutput.error)
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True
    # params.prompt_logprobs: one entry per prompt token, the first None (nothing predicts it)
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    # Why the request failed (its unfinished candidates end with finish_reason "error"): one line, e.g. a
    # step that raised with this request in it, NaN logits, more KV than the whole cache. None: no error.
    error: str | None = None
