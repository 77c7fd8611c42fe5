"""End-to-end engine decode on CUDA with the Triton kernels and with the torch references
(BSTAR_KERNELS=torch), same model, same run. Skips without CUDA.

Run: pytest bench/test_engine_gpu.py --benchmark-only -s
"""

import time

import pytest
import torch
from model_factory import make_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_engine_decode_triton_vs_torch(benchmark, tmp_path, monkeypatch):
    from engine import LLM, SamplingParams

    path = make_model(
        str(tmp_path / "q"),
        "qwen2",
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
        tokenizer=False,
        dtype=torch.bfloat16,
    )
    llm = LLM(path, dtype="bfloat16", device="cuda", gpu_memory_utilization=0.5)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 150000, (512,), generator=g).tolist() for _ in range(16)]
    params = SamplingParams(n=16, temperature=1.0, max_tokens=256, ignore_eos=True, seed=0)
    tokens = 16 * 16 * 256

    def run():
        llm.generate(prompts, params, use_tqdm=False)
        torch.cuda.synchronize()

    monkeypatch.setenv("BSTAR_KERNELS", "torch")
    run()
    t = time.perf_counter()
    run()
    torch_s = time.perf_counter() - t
    monkeypatch.setenv("BSTAR_KERNELS", "triton")
    run()
    benchmark.pedantic(run, rounds=3, iterations=1)
    tri_s = benchmark.stats.stats.median
    benchmark.extra_info.update(
        triton_tokens_per_s=tokens / tri_s, torch_tokens_per_s=tokens / torch_s, speedup=torch_s / tri_s
    )
    print(
        f"\n[cuda] engine output tokens/s: triton kernels {tokens / tri_s:.0f}, torch references "
        f"{tokens / torch_s:.0f}, ratio {torch_s / tri_s:.2f}x"
    )
