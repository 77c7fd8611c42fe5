"""Fixtures the CPU benchmarks share."""

import pytest

from bstar.testing.model_factory import make_model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """The generation and scoring benchmarks' model: a Llama of 4 layers, hidden 256, vocabulary 4096."""
    return make_model(
        str(tmp_path_factory.mktemp("m")),
        "llama",
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        tokenizer=False,
    )
