"""What a request must satisfy before the engine takes it, beyond what SamplingParams checks alone: token ids
in the vocabulary, a prompt that fits the context and the KV cache, and candidates that can ever be scheduled."""

from bstar.engine.entrypoints.inputs import ParsedPrompt, parse_prompt
from bstar.engine.entrypoints.sampling_params import SamplingParams
from bstar.engine.errors import RequestError
from bstar.engine.model.tokenizer import require


def encode_prompt(prompt, tokenizer, vocab_size: int) -> tuple[str | None, list[int]]:
    """(prompt text or None, token ids) of a prompt in any bstar.engine.entrypoints.inputs form."""
    parsed = prompt if isinstance(prompt, ParsedPrompt) else parse_prompt(prompt)
    if parsed.token_ids is None:
        return parsed.text, require(tokenizer, "a text prompt").encode(parsed.text)
    ids = parsed.token_ids
    bad = [t for t in ids if not 0 <= t < vocab_size]
    if bad:
        raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    return parsed.text, ids


def check_prompt_len(n: int, max_model_len: int, block_size: int, num_blocks: int):
    """A prompt of n tokens fits the context (with one token to generate) and the whole KV cache."""
    if n == 0:
        raise RequestError("empty prompt")
    if n >= max_model_len:
        raise RequestError(
            f"prompt of {n} tokens is longer than the context: max_model_len is "
            f"{max_model_len} and at least one token must be generated"
        )
    need = -(-(n + 1) // block_size)
    if need > num_blocks:
        raise RequestError(
            f"prompt of {n} tokens needs {need} KV blocks but the whole cache has "
            f"{num_blocks} (block_size {block_size})"
        )


def check_request(
    prompt_len: int, params: SamplingParams, vocab_size: int, max_model_len: int, block_size: int, num_blocks: int
):
    """What SamplingParams cannot check alone: n within the KV blocks, stop ids in the vocabulary, and a
    candidate's full length (prompt + max_tokens, within the context) against the whole KV cache (one
    candidate that outgrows it could never be scheduled)."""
    if params.n > num_blocks:  # (they fork at once, each to write a block of its own)
        raise RequestError(
            f"n={params.n} candidates is more than the KV cache's {num_blocks} blocks "
            "(each candidate needs one); lower n or raise num_kv_blocks"
        )
    bad = [t for t in params.stop_token_ids if t >= vocab_size]
    if bad:
        raise RequestError(f"stop token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    if params.max_tokens is None:
        return
    total = min(prompt_len + params.max_tokens, max_model_len)
    need = -(-total // block_size)
    if need > num_blocks:
        raise RequestError(
            f"prompt of {prompt_len} tokens plus max_tokens={params.max_tokens} needs {need} KV blocks but "
            f"the whole cache has {num_blocks} (block_size {block_size}); lower max_tokens or raise num_kv_blocks"
        )
