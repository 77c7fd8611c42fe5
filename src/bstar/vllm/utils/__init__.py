"""vllm.utils: random_uuid; network_utils (what TRL imports at load)."""

import uuid


def random_uuid() -> str:
    """vllm.utils.random_uuid: a request id."""
    return uuid.uuid4().hex
