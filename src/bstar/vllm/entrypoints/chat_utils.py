"""vllm.entrypoints.chat_utils"""


def resolve_hf_chat_template(tokenizer, chat_template=None, tools=None, *, model_config=None, **kwargs):
    """The chat template a conversation is rendered with: the given one, else the tokenizer's (None when it
    has none), as vLLM resolves it for a checkpoint without a processor of its own."""
    if chat_template is not None:
        return chat_template
    return getattr(tokenizer, "chat_template", None)
