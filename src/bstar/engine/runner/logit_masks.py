"""vLLM's per-request logits masks and bias, applied on the device before the penalties.

vLLM's order: the structured-output grammar's bitmask, allowed_token_ids, bad_words, (min_tokens bans,
done by the sampler just before), logit_bias; then the penalties, temperature and filters. Masks set
-inf (they commute with each other and with the bans); the bias is added last, so a banned or masked
token stays at -inf.

Structured outputs use xgrammar (vLLM's default backend; chosen over llguidance on this CPU at a 27k
vocabulary: a JSON schema's per-token mask in 3 us against 158 us, compile 9 ms against 1 ms). One
compiled grammar per request (cached by its text), one matcher per candidate kept on its Sequence and
advanced through the candidate's output tokens before each of its draws, so preemption and forks need
no bookkeeping.
"""

import json

import torch

from bstar.engine.errors import RequestError
from bstar.kernels.host import index_pairs, to_device


def bad_words_token_ids(bad_words: list[str], encode) -> list[list[int]]:
    """vLLM's tokenization of bad_words (SamplingParams.update_from_tokenizer): each word as it is and with
    a leading space; the spaced form is kept only when it is a different sequence of the same length."""
    out = []
    for word in bad_words:
        for spaced in (False, True):
            ids = encode((" " if spaced else "") + word.lstrip())
            if not spaced or (ids and ids[0] != out[-1][0] and len(ids) == len(out[-1])):
                out.append(ids)
    return out


def banned_by_bad_words(bad_ids: list[list[int]], outputs: list[int]) -> list[int]:
    """The last token of each bad word whose other tokens end `outputs` (vLLM's apply_bad_words)."""
    banned = []
    for ids in bad_ids:
        n = len(ids) - 1
        if n > len(outputs):
            continue
        if n == 0 or outputs[-n:] == ids[:n]:
            banned.append(ids[-1])
    return banned


class _Grammars:
    """xgrammar's compiler over the engine's tokenizer, made on first use (only requests with
    structured_outputs pay for importing it)."""

    def __init__(self, hf_tokenizer, vocab_size: int, stop_ids: set[int]):
        import xgrammar

        self.xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(
            hf_tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(stop_ids)
        )
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1)
        self.cache: dict[str, object] = {}

    def compile(self, so):
        key = json.dumps([so.kind, getattr(so, so.kind)], sort_keys=True, default=str)
        if key not in self.cache:
            self.cache[key] = self._compile(so)
        return self.cache[key]

    def _compile(self, so):
        c = self.compiler
        try:
            if so.kind == "json":
                schema = so.json if isinstance(so.json, str) else json.dumps(so.json)
                return c.compile_json_schema(schema, any_whitespace=not so.disable_any_whitespace)
            if so.kind == "json_object":
                return c.compile_builtin_json_grammar()
            if so.kind == "regex":
                return c.compile_regex(so.regex)
            if so.kind == "choice":  # (JSON string literals are EBNF string literals)
                return c.compile_grammar("root ::= " + " | ".join(json.dumps(x) for x in so.choice))
            if "::=" in so.grammar:
                return c.compile_grammar(so.grammar)  # EBNF (GBNF), as vLLM's xgrammar backend
            return c.compile_lark(so.grammar)
        except (RuntimeError, ValueError) as e:
            msg = " ".join(str(e).split())[:300]
            raise RequestError(f"structured_outputs.{so.kind} does not compile: {msg}") from None


class LogitMasks:
    """The engine's masks: `prepare(params)` when a request is added (tokenizes bad_words, compiles the
    grammar, checks ids against the vocabulary), `apply(logits, seqs)` at each draw."""

    def __init__(self, get_tokenizer, vocab_size: int, stop_ids: set[int]):
        self.get_tokenizer = get_tokenizer  # transformers' tokenizer with the engine's ids, or None
        self.V = vocab_size
        self.stop_ids = stop_ids
        self._grammars: _Grammars | None = None

    def _tokenizer(self, what: str):
        tok = self.get_tokenizer()
        if tok is None:
            raise RequestError(f"{what} needs a tokenizer, but the engine has none (skip_tokenizer_init=True?)")
        return tok

    def prepare(self, params):
        """Check and precompute a request's mask fields (RequestError on a bad one)."""
        for name in ("allowed_token_ids", "logit_bias"):
            ids = getattr(params, name) or ()
            bad = [t for t in ids if t >= self.V]
            if bad:
                raise RequestError(f"{name}: token id {bad[0]} is outside the vocabulary [0, {self.V})")
        if params.bad_words:
            tok = self._tokenizer("bad_words")
            encode = lambda s: tok.encode(s, add_special_tokens=False)
            params.bad_words_token_ids = bad_words_token_ids(params.bad_words, encode)
        if params.allowed_token_ids:
            self._check_something_allowed(params)
        if params.structured_outputs is not None:
            if params.min_tokens:  # (a grammar that ends earlier allows only EOS, which min_tokens bans)
                raise RequestError("structured_outputs with min_tokens > 0 is not supported: the grammar may end first")
            if self._grammars is None:
                self._grammars = _Grammars(self._tokenizer("structured_outputs"), self.V, self.stop_ids)
            self._grammars.compile(params.structured_outputs)  # (compile errors are the request's)

    def _check_something_allowed(self, params):
        """Refuse allowed_token_ids that the single-token bad words, or the min_tokens bans, leave empty
        (the draw would have no token to choose: vLLM's result is undefined there)."""
        never = {ids[0] for ids in params.bad_words_token_ids or () if len(ids) == 1}
        banned = never | set(params.stop_token_ids) | (set() if params.ignore_eos else self.stop_ids)
        for ban, why in ((never, "bad_words"), (banned if params.min_tokens else never, "min_tokens")):
            if set(params.allowed_token_ids) <= ban:
                raise RequestError(f"allowed_token_ids: {why} bans every allowed id; nothing could be drawn")

    def apply(self, logits: torch.Tensor, seqs) -> None:
        """Mask and bias `logits` [R, V] in place; row r belongs to seqs[r]."""
        dev, V = logits.device, logits.shape[1]
        rows = [r for r, s in enumerate(seqs) if s.params.structured_outputs is not None]
        if rows:
            self._apply_grammar(logits, rows, [seqs[r] for r in rows])
        mask_r, mask_c = [], []  # (row, token) pairs set to -inf
        for r, s in enumerate(seqs):
            p = s.params
            if p.bad_words:
                for t in banned_by_bad_words(p.bad_words_token_ids, known_outputs(s)):
                    mask_r.append(r)
                    mask_c.append(t)
        allowed = [(r, s.params.allowed_token_ids) for r, s in enumerate(seqs) if s.params.allowed_token_ids]
        if allowed:
            keep = torch.zeros(len(allowed), V, dtype=torch.bool, device=dev)
            kr = [i for i, (_, ids) in enumerate(allowed) for _ in ids]
            kc = [t for _, ids in allowed for t in ids]
            keep[index_pairs(kr, kc, dev)] = True
            rows_t = to_device([r for r, _ in allowed], torch.int64, dev)
            logits[rows_t] = logits[rows_t].masked_fill(~keep, float("-inf"))
        if mask_r:
            logits[index_pairs(mask_r, mask_c, dev)] = float("-inf")
        bias = [(r, t, b) for r, s in enumerate(seqs) for t, b in (s.params.logit_bias or {}).items()]
        if bias:
            br, bc, bv = zip(*bias)
            vals = to_device(list(bv), torch.float32, dev)
            logits.index_put_(index_pairs(list(br), list(bc), dev), vals, accumulate=True)

    def _apply_grammar(self, logits: torch.Tensor, rows: list[int], seqs) -> None:
        g = self._grammars
        bitmask = g.xgr.allocate_token_bitmask(len(rows), logits.shape[1])
        for i, s in enumerate(seqs):
            m = _matcher(s, g)
            if not m.is_terminated():
                m.fill_next_token_bitmask(bitmask, i)
            else:  # (only a row whose draw is discarded: its candidate has stopped)
                bitmask[i] = -1
        words = bitmask.to(logits.device, non_blocking=True)
        bits = (words[:, :, None] >> torch.arange(32, device=logits.device, dtype=torch.int32)) & 1
        allowed = bits.reshape(len(rows), -1)[:, : logits.shape[1]].bool()
        rows_t = to_device(rows, torch.int64, logits.device)
        logits[rows_t] = logits[rows_t].masked_fill(~allowed, float("-inf"))


def known_outputs(s) -> list[int]:
    """The candidate's output tokens, its pending ones (async scheduling: drawn by the step in flight) read
    from the device: a mask that depends on the last token waits for it."""
    out = s.output_ids
    if s.num_pending:
        draw, r = s.pending_source
        out = out + [int(draw[r])]
    return out


def _matcher(s, grammars: _Grammars):
    """The candidate's grammar matcher, advanced through its output tokens (made on first use: a fork or a
    new candidate starts from its outputs so far)."""
    state = getattr(s, "grammar_state", None)
    if state is None:
        compiled = grammars.compile(s.params.structured_outputs)
        state = s.grammar_state = [grammars.xgr.GrammarMatcher(compiled), 0]
    m, done = state
    outs = known_outputs(s)
    for t in outs[done:]:
        if not m.accept_token(t):
            raise RequestError(f"structured_outputs: token {t} was drawn outside the grammar")
    state[1] = len(outs)
    return m
