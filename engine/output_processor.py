"""After sampling: the stop rules of each candidate, and the output of a finished request."""

from engine.outputs import CompletionOutput, RequestOutput
from engine.sequence import Request, Sequence
from engine.tokenizer import Tokenizer


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer | None, eos_ids: set[int], max_model_len: int):
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_model_len = max_model_len

    def finish_reason(self, s: Sequence) -> str | None:
        """ "stop" or "length" when the token just appended ends the candidate, else None.

        A stop token id or stop string is recorded in s.stop_reason; a stop string also cuts the
        output text (s.stop_text), keeping the stop string when params.include_stop_str_in_output."""
        p, tok = s.params, s.token_ids[-1]
        if s.num_output >= p.min_tokens:
            if not p.ignore_eos and tok in self.eos_ids:
                return "stop"
            if tok in p.stop_token_ids:
                s.stop_reason = tok
                return "stop"
            if p.stop_strings and self.tokenizer is not None:
                text = self.tokenizer.decode(s.output_ids, p.skip_special_tokens)
                tail = max(len(x) for x in p.stop_strings) + 16  # only the new tail can hold a new match
                for stop in p.stop_strings:
                    k = text.find(stop, max(0, len(text) - tail - len(stop)))
                    if k >= 0:
                        s.stop_text = text[: k + len(stop)] if p.include_stop_str_in_output else text[:k]
                        s.stop_reason = stop
                        return "stop"
        if s.num_output >= p.max_tokens or len(s) >= self.max_model_len:
            return "length"
        return None

    def request_output(self, req: Request) -> RequestOutput:
        """The request's candidates in index order, with their text (cut at a stop string)."""
        outs = []
        for s in sorted(req.finished, key=lambda s: s.index):
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
