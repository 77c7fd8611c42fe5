"""After sampling: the stop rules of each candidate, and the output of a finished request."""

from dataclasses import dataclass, field

from bstar.engine.core.sequence import Request, Sequence
from bstar.engine.entrypoints.outputs import CompletionOutput, RequestOutput
from bstar.engine.model.tokenizer import Tokenizer


@dataclass
class StopTextState:
    """A candidate's output text for its stop strings, decoded incrementally as vLLM's
    detokenize_incrementally does: each step decodes only the window of outputs [prefix, new end) and
    takes what it adds to the decode of [prefix, read) (so a tokenizer that treats a text's first token
    apart, or a character split over tokens, gives the full decode's text). The text is kept in pieces;
    only its last characters (`tail`, as long as a stop string can reach back) are searched again."""

    prefix: int = 0  # outputs before the window
    read: int = 0  # outputs whose text is in `pieces`
    pieces: list[str] = field(default_factory=list)
    length: int = 0  # characters in `pieces`
    tail: str = ""  # the last max(len(stop)) - 1 characters of the text


class OutputProcessor:
    def __init__(
        self, tokenizer: Tokenizer | None, eos_ids: set[int], max_model_len: int, primary_eos: int | None = None
    ):
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.max_model_len = max_model_len
        self.primary_eos = primary_eos  # ends with stop_reason None; other EOS ids are reported as stop_reason

    def finish_reason(self, s: Sequence) -> str | None:
        """ "stop" or "length" when the token just appended ends the candidate, else None.

        A stop token id or stop string is recorded in s.stop_reason; a stop string also cuts the
        output text (s.stop_text), keeping the stop string when params.include_stop_str_in_output."""
        p, tok = s.params, s.token_ids[-1]
        if p.min_tokens == 0 or s.num_output >= p.min_tokens:
            if not p.ignore_eos and tok in self.eos_ids:
                if tok != self.primary_eos:
                    s.stop_reason = tok
                return "stop"
            if tok in p.stop_token_ids:
                s.stop_reason = tok
                return "stop"
            if p.stop_strings and self.tokenizer is not None and self._stop_string(s):
                return "stop"
        return "length" if self.length_reached(s) else None

    def _stop_string(self, s: Sequence) -> bool:
        """Whether the text the new tokens add completes a stop string (then s.stop_text and s.stop_reason are
        set). Host work per step is O(new tokens + longest stop string), whatever the output's length."""
        p, st = s.params, s.stop_text_state
        start, end = s.prompt_len, len(s.token_ids) - s.num_pending
        n = end - start
        if st is None or n < st.read:  # (outputs cut below what was read: read them again)
            st = s.stop_text_state = StopTextState()
        if n == st.read:
            return False
        decode = self.tokenizer.decode
        seen = decode(s.token_ids[start + st.prefix : start + st.read], p.skip_special_tokens) if st.read else ""
        window = decode(s.token_ids[start + st.prefix : end], p.skip_special_tokens)
        if len(window) <= len(seen) or window.endswith("\ufffd"):  # no new character yet (a split one)
            return False
        new = window[len(seen) :]
        st.prefix, st.read = st.read, n
        buf = st.tail + new
        at = st.length - len(st.tail)  # where buf starts in the text
        st.pieces.append(new)
        st.length += len(new)
        reach = max(len(x) for x in p.stop_strings) - 1
        st.tail = buf[max(0, len(buf) - reach) :] if reach else ""
        for stop in p.stop_strings:
            k = buf.find(stop)
            if k >= 0:
                k += at
                text = "".join(st.pieces)
                s.stop_text = text[: k + len(stop)] if p.include_stop_str_in_output else text[:k]
                s.stop_reason = stop
                return True
        return False

    def length_reached(self, s: Sequence) -> bool:
        """The candidate has all the tokens max_tokens or the context allow (max_tokens None: up to the
        context, which the second test covers)."""
        p, n = s.params, len(s.token_ids)  # (called for every candidate at every step: no properties)
        return n >= self.max_model_len or (p.max_tokens is not None and n - s.prompt_len >= p.max_tokens)

    def text(self, s: Sequence) -> str:
        """The output text, as vLLM: "" without detokenize (or tokenizer); cut at a stop string; and
        an EOS or stop token that ended the candidate is not detokenized unless
        include_stop_str_in_output (even with skip_special_tokens=False)."""
        p = s.params
        if not p.detokenize or self.tokenizer is None:
            return ""
        if s.stop_text is not None:
            return s.stop_text
        ids = s.output_ids
        if s.finish_reason == "stop" and not p.include_stop_str_in_output:
            ids = ids[:-1]
        return self.tokenizer.decode(ids, p.skip_special_tokens)

    def _decode_logprobs(self, positions, cache: dict[int, str]):
        """Fill Logprob.decoded_token: each id decoded alone, special tokens kept (vLLM's
        convert_ids_list_to_tokens)."""
        for entry in positions:
            for tid, lp in (entry or {}).items():
                text = cache.get(tid)
                if text is None:
                    text = cache[tid] = self.tokenizer.decode([tid], skip_special_tokens=False)
                lp.decoded_token = text

    def request_output(self, req: Request) -> RequestOutput:
        """The request's candidates in index order, with their text (cut at a stop string)."""
        outs = []
        decode = req.params.detokenize and self.tokenizer is not None
        cache: dict[int, str] = {}
        for s in sorted(req.finished, key=lambda s: s.index):
            logprobs = s.logprobs if s.params.logprobs is not None else None
            if decode and logprobs:
                self._decode_logprobs(logprobs, cache)
            outs.append(
                CompletionOutput(
                    index=s.index,
                    text=self.text(s),
                    token_ids=s.output_ids,
                    cumulative_logprob=s.cumulative_logprob,
                    logprobs=logprobs,
                    finish_reason=s.finish_reason,
                    stop_reason=s.stop_reason,
                )
            )
        if decode and req.prompt_logprobs:
            self._decode_logprobs(req.prompt_logprobs, cache)
        return RequestOutput(
            req.request_id,
            req.prompt,
            req.prompt_token_ids,
            outs,
            finished=True,
            prompt_logprobs=req.prompt_logprobs,
        )


@dataclass
class _Sent:
    """What a candidate's earlier DELTA outputs carried."""

    tokens: int = 0
    text: int = 0  # characters
    finished: bool = False


class DeltaOutputs:
    """vLLM's output_kind=DELTA for one request's stream: each output carries only what is new since the
    previous one (token ids, text, logprobs; prompt_logprobs in the first only), and only the candidates
    with something new; the pieces concatenate to the CUMULATIVE outputs. Made from the cumulative
    outputs the stream would deliver, so a slow consumer gets one larger delta, never a lost one.

    Text that a later token could still change is held back until it cannot: trailing U+FFFD (a
    character whose bytes are split across tokens) and, when stop strings cut the text, the last
    characters a stop string could still complete (as vLLM's stop buffer). The final output flushes."""

    def __init__(self, params):
        self.sent: dict[int, _Sent] = {}
        self.prompt_sent = False
        stops = params.stop_strings if not params.include_stop_str_in_output else ()
        self.hold = max((len(s) for s in stops), default=1) - 1

    def _visible(self, c: CompletionOutput) -> str:
        """The part of an unfinished candidate's text that no later token can change."""
        text = c.text.rstrip("\ufffd")
        return text[: len(text) - self.hold] if self.hold else text

    def next(self, out: RequestOutput) -> RequestOutput | None:
        """The delta of cumulative output `out` against what was sent; None when it adds nothing."""
        pieces = []
        for c in out.outputs:
            sent = self.sent.setdefault(c.index, _Sent())
            if sent.finished:
                continue
            done = c.finish_reason is not None
            text = c.text if done else self._visible(c)
            new_text = text[sent.text :] if len(text) > sent.text else ""
            if len(c.token_ids) == sent.tokens and not new_text and not done:
                continue
            n = sent.tokens
            pieces.append(
                CompletionOutput(
                    c.index,
                    new_text,
                    c.token_ids[n:],
                    c.cumulative_logprob,
                    None if c.logprobs is None else c.logprobs[n:],
                    c.finish_reason,
                    c.stop_reason,
                )
            )
            sent.tokens, sent.text, sent.finished = len(c.token_ids), max(sent.text, len(text)), done
        if not pieces and not out.finished and (self.prompt_sent or out.prompt_logprobs is None):
            return None
        prompt_logprobs = None if self.prompt_sent else out.prompt_logprobs
        self.prompt_sent = True
        return RequestOutput(
            out.request_id, out.prompt, out.prompt_token_ids, pieces, out.finished, prompt_logprobs, out.error
        )
