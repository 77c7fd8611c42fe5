"""Decode attention's split count fills whole waves of resident programs (kernels.contract.wave_splits,
a pure function), at the SM counts of an H100 SXM and an H200 (both 132) and of an H100 PCIe
(114); and the decode graph pool's estimate bounds the partials it implies and counts the cuBLASLt workspace
where a model's GEMMs take that path."""

import pytest

from bstar.kernels.contract import (
    CTAS_PER_SM,
    FULL_WAVES,
    MIN_TOKENS_PER_SPLIT,
    SPLIT_FIXED_TOKENS,
    wave_splits,
)

H100_SXM = H200 = 132
H100_PCIE = 114
BUCKETS = [1, 2, 4, 8, 16, 32, 48, 64, 128, 256]


def _fill(programs, splits, sms):
    """The busy share of the waves: programs x splits over the slots of whole waves."""
    slots = sms * CTAS_PER_SM
    return programs * splits / (-(-programs * splits // slots) * slots)


@pytest.mark.parametrize("sms", [H100_SXM, H200])
def test_llama_b64_fills_whole_waves(sms):
    """B=64 x 8 KV heads = 512 programs: 1.3 waves at one split (the last mostly idle); the choice fills
    its waves to >= 95% and its estimated time is under one split's."""
    assert _fill(512, 1, sms) < 0.7
    for context in (1024, 2048, 4096):
        s = wave_splits(512, context, sms)
        assert s > 1 and _fill(512, s, sms) >= 0.95, (context, s)

        def est(k, context=context):
            return -(-512 * k // (sms * CTAS_PER_SM)) * (-(-context // k) + SPLIT_FIXED_TOKENS)

        assert est(s) < est(1)


@pytest.mark.parametrize("sms", [H100_SXM, H200, H100_PCIE])
def test_split_choices_over_buckets_and_contexts(sms):
    slots = sms * CTAS_PER_SM
    for hkv in (1, 2, 4, 8):
        for b in BUCKETS:
            p = b * hkv
            for context in (100, 256, 300, 1024, 4096, 32768):
                cap = max(1, min(-(-context // MIN_TOKENS_PER_SPLIT), 64))
                s = wave_splits(p, context, sms)
                assert 1 <= s <= cap
                if p * cap <= slots:  # all of them fit one wave: as many splits as the context allows
                    assert s == cap
                elif p * s <= slots:  # within one wave: no more splits would fit in it
                    assert p * (s + 1) > slots
                if p >= FULL_WAVES * slots:
                    assert s == 1  # many waves already: the last one's idle share is small
                if s > 1:
                    assert _fill(p, s, sms) >= _fill(p, 1, sms) or p * s <= slots
                # the decode graph pool's bound (memory_plan.decode_graph_pool_bytes)
                assert b * s <= max(b, FULL_WAVES * slots // hkv)


def test_the_sm_count_changes_the_choice():
    assert wave_splits(512, 4096, H100_SXM) != wave_splits(512, 4096, 80)
    assert wave_splits(8, 32768, H100_PCIE) == 114 * CTAS_PER_SM // 8


def test_graph_pool_estimate_counts_the_cublaslt_workspace(monkeypatch):
    """A model with a bias on its GEMMs (Qwen2's qkv) takes cuBLASLt at >= 2 rows: its workspace is counted,
    unless the build shares cuBLAS's, at CUBLASLT_WORKSPACE_SIZE when set; none for a model without biases."""
    import dataclasses

    import torch
    from transformers import Qwen2Config

    from bstar.engine.config import ModelConfig
    from bstar.engine.runner.memory_plan import (
        CUBLAS_WORKSPACE_BYTES,
        cublaslt_workspace_bytes,
        decode_graph_pool_bytes,
    )
    from bstar.testing.model_factory import QWEN25_05B

    qwen = ModelConfig.from_dict(Qwen2Config(**QWEN25_05B).to_dict())
    assert qwen.qkv_bias
    plain = dataclasses.replace(qwen, qkv_bias=False, o_bias=False, mlp_bias=False)
    monkeypatch.delenv("TORCH_CUBLASLT_UNIFIED_WORKSPACE", raising=False)
    monkeypatch.delenv("CUBLASLT_WORKSPACE_SIZE", raising=False)
    assert cublaslt_workspace_bytes(qwen) == CUBLAS_WORKSPACE_BYTES and cublaslt_workspace_bytes(plain) == 0
    args = (torch.bfloat16, 64, 2048)
    assert decode_graph_pool_bytes(qwen, *args) - decode_graph_pool_bytes(plain, *args) == CUBLAS_WORKSPACE_BYTES
    monkeypatch.setenv("CUBLASLT_WORKSPACE_SIZE", "4096")
    assert cublaslt_workspace_bytes(qwen) == 4 << 20
    monkeypatch.setenv("TORCH_CUBLASLT_UNIFIED_WORKSPACE", "1")
    assert cublaslt_workspace_bytes(qwen) == 0
