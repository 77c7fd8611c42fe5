"""vllm.transformers_utils.tokenizer: get_tokenizer as vLLM's signature has it, over the engine's tokenizer
loading (a local directory's tokenizer.json: the ids the engine encodes with)."""

from transformers import PreTrainedTokenizerBase

from bstar.engine.compat import vllm as vllm_compat
from bstar.engine.errors import UnsupportedError

AnyTokenizer = PreTrainedTokenizerBase


def get_tokenizer(
    tokenizer_name,
    *args,
    tokenizer_mode: str = "auto",
    trust_remote_code: bool = False,
    revision: str | None = None,
    download_dir: str | None = None,
    **kwargs,
) -> PreTrainedTokenizerBase:
    """The fast tokenizer of a local model directory. kwargs are tokenizer options (add_bos_token, ...), set
    on the loaded tokenizer where it has them. The keywords vLLM's loader checks are checked the same way as
    LLM's (one line when refused)."""
    if args:
        raise UnsupportedError(f"get_tokenizer: unexpected positional arguments {args!r}")
    vllm_compat.check_vllm_kwargs(dict(tokenizer_mode=tokenizer_mode, revision=revision), str(tokenizer_name))
    vllm_compat.check_trust_remote_code(trust_remote_code, str(tokenizer_name))
    tok = vllm_compat.hf_tokenizer(str(tokenizer_name))
    for k, v in kwargs.items():
        if k in ("add_bos_token", "add_eos_token") and hasattr(tok, k):
            setattr(tok, k, v)
        elif k not in ("truncation_side", "padding_side", "use_fast"):
            raise UnsupportedError(f"get_tokenizer: keyword {k!r} is not supported")
        elif k != "use_fast":
            setattr(tok, k, v)
    return tok
