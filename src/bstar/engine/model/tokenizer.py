"""Tokenizer of a local model directory (local files only; optional for token-id prompts)."""

import json
import os

import tokenizers

from bstar.engine.errors import CheckpointError, RequestError


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens named in tokenizer_config.json."""

    def __init__(self, path: str):
        file = os.path.join(path, "tokenizer.json")
        try:
            self.tok = tokenizers.Tokenizer.from_file(file)
        except Exception as e:
            raise CheckpointError(f"cannot read tokenizer {file}: {e}") from None
        self.eos_token_id = None
        self.bos_token_id = None
        cfg_file = os.path.join(path, "tokenizer_config.json")
        if os.path.isfile(cfg_file):
            with open(cfg_file) as f:
                cfg = json.load(f)
            self.eos_token_id = self._id(cfg.get("eos_token"))
            self.bos_token_id = self._id(cfg.get("bos_token"))

    def _id(self, tok):
        if isinstance(tok, dict):
            tok = tok.get("content")
        return self.tok.token_to_id(tok) if isinstance(tok, str) else None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # The tokenizer's own post-processor adds BOS where the model expects it, as in transformers.
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def single_token_id(self, text: str) -> int:
        """The id of a string that must be exactly one token (a PRM's step tag, good/bad labels)."""
        tid = self.tok.token_to_id(text)
        if tid is None:
            ids = self.encode(text, add_special_tokens=False)
            if len(ids) != 1:
                raise RequestError(f"{text!r} is not a single token of this tokenizer (it encodes to {ids})")
            tid = ids[0]
        return tid

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)


def load_tokenizer(path: str) -> Tokenizer | None:
    """The directory's tokenizer, or None when it has no tokenizer.json."""
    return Tokenizer(path) if os.path.isfile(os.path.join(path, "tokenizer.json")) else None


def require(tokenizer: Tokenizer | None, what: str) -> Tokenizer:
    if tokenizer is None:
        raise RequestError(
            f"{what} needs a tokenizer, but the model directory has no tokenizer.json; pass token id lists instead"
        )
    return tokenizer
