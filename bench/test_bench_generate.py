"""Multi-candidate generation: ours against transformers `generate` on the same model, same run.

8 prompts of ~100 tokens, n=16 candidates each, 128 new tokens, EOS ignored.
Run: pytest bench/test_bench_generate.py --benchmark-only -s
"""

import time

import pytest
import torch
from model_factory import make_model

from engine import LLM, SamplingParams

N_PROMPTS, N, PROMPT_LEN, NEW = 8, 16, 100, 128


def _prompts(vocab):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (PROMPT_LEN + i,), generator=g).tolist() for i in range(N_PROMPTS)]


def _run_pair(benchmark, path, device, dtype, rounds):
    from transformers import AutoModelForCausalLM

    llm = LLM(path, dtype={torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype], device=device)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    vocab = hf.config.vocab_size
    prompts = _prompts(vocab)
    params = SamplingParams(n=N, temperature=1.0, max_tokens=NEW, ignore_eos=True, seed=0)

    def ours():
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert all(len(c.token_ids) == NEW for o in outs for c in o.outputs)

    def peer():
        # Left-padded batch of the 8 prompts, each expanded to 16 sampled continuations.
        width = max(map(len, prompts))
        ids = torch.full((N_PROMPTS, width), 2, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        with torch.no_grad():
            out = hf.generate(
                ids.to(device),
                attention_mask=mask.to(device),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                num_return_sequences=N,
                max_new_tokens=NEW,
                min_new_tokens=NEW,
                pad_token_id=2,
            )
        assert out.shape == (N_PROMPTS * N, width + NEW)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    ours(), peer()  # warm up both
    peer_times = []
    for _ in range(rounds):
        sync()
        t = time.perf_counter()
        peer()
        sync()
        peer_times.append(time.perf_counter() - t)
    benchmark.pedantic(ours, rounds=rounds, iterations=1)
    tokens = N_PROMPTS * N * NEW
    ours_tps = tokens / benchmark.stats.stats.median
    peer_tps = tokens / sorted(peer_times)[len(peer_times) // 2]
    benchmark.extra_info.update(
        ours_tokens_per_s=round(ours_tps, 1),
        transformers_tokens_per_s=round(peer_tps, 1),
        speedup=round(ours_tps / peer_tps, 2),
        device=device,
    )
    print(
        f"\n[{device}] output tokens/s: ours {ours_tps:.0f}, transformers {peer_tps:.0f}, "
        f"ratio {ours_tps / peer_tps:.2f}x"
    )


def test_generate_cpu_vs_transformers(benchmark, tmp_path):
    path = make_model(
        str(tmp_path / "m"),
        "llama",
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        tokenizer=False,
    )
    _run_pair(benchmark, path, "cpu", torch.float32, rounds=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_generate_cuda_qwen2_05b_vs_transformers(benchmark, tmp_path):
    # Qwen2-0.5B shapes, random weights.
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
    _run_pair(benchmark, path, "cuda", torch.bfloat16, rounds=3)
