"""Generation: ours against transformers `generate` on the same model, same run, same work.

Two workloads of 8 x 16 x 128 = 16,384 generated tokens each, EOS ignored:
- n=16: 8 prompts of ~100 tokens, 16 sampled candidates each (prompt sharing: our candidates share
  the prompt's KV blocks; transformers' num_return_sequences expands the prompt 16 times);
- decode-only: 128 distinct prompts of ~100 tokens, one candidate each (nothing to share), so the
  decode speed is reported apart from the gain of prompt sharing.
Rounds alternate peer / ours after one warm-up of each (the peer runs in the benchmark's setup);
our prefix cache is reset at the start of each of our rounds, so no prompt computed in an earlier
round is reused.

Run: pytest bench/test_bench_generate.py --benchmark-only -s
"""

import time

import pytest
import torch

from bstar.engine import LLM, SamplingParams
from bstar.testing.model_factory import QWEN25_05B, make_model

N_PROMPTS, N, PROMPT_LEN, NEW = 8, 16, 100, 128
WORKLOADS = {"n16": (N_PROMPTS, N), "decode": (N_PROMPTS * N, 1)}  # (prompts, candidates each)


def _prompts(vocab, count):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (PROMPT_LEN + i % 8,), generator=g).tolist() for i in range(count)]


def _run_pair(benchmark, path, device, dtype, rounds, workload="n16"):
    from transformers import AutoModelForCausalLM

    llm = LLM(path, dtype={torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype], device=device)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    n_prompts, n = WORKLOADS[workload]
    prompts = _prompts(hf.config.vocab_size, n_prompts)
    params = SamplingParams(n=n, temperature=1.0, max_tokens=NEW, ignore_eos=True, seed=0)
    # Left-padded batch of the prompts, each expanded to n sampled continuations.
    width = max(map(len, prompts))
    ids = torch.full((n_prompts, width), 2, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def ours():
        llm.engine.block_manager.reset_prefix_cache()  # no prompt carried over from an earlier round
        outs = llm.generate(prompts, params, use_tqdm=False)
        sync()
        assert all(len(c.token_ids) == NEW for o in outs for c in o.outputs)

    def peer():
        with torch.no_grad():
            out = hf.generate(
                ids,
                attention_mask=mask,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                num_return_sequences=n,
                max_new_tokens=NEW,
                min_new_tokens=NEW,
                pad_token_id=2,
            )
        sync()
        assert out.shape == (n_prompts * n, width + NEW)

    peer_times = []

    def timed_peer():  # runs before each of our rounds: the two alternate
        t = time.perf_counter()
        peer()
        peer_times.append(time.perf_counter() - t)

    ours(), peer()  # warm up both
    benchmark.pedantic(ours, setup=timed_peer, rounds=rounds, iterations=1)
    ours_times = list(benchmark.stats.stats.data)
    tokens = n_prompts * n * NEW
    ours_tps = tokens / benchmark.stats.stats.median
    peer_tps = tokens / sorted(peer_times)[len(peer_times) // 2]
    benchmark.extra_info.update(
        workload=workload,
        ours_tokens_per_s=round(ours_tps, 1),
        transformers_tokens_per_s=round(peer_tps, 1),
        speedup=round(ours_tps / peer_tps, 2),
        ours_s=[round(t, 3) for t in ours_times],
        transformers_s=[round(t, 3) for t in peer_times],
        device=device if device == "cpu" else torch.cuda.get_device_name(),
    )
    print(
        f"\n[{device}, {workload}] output tokens/s: ours {ours_tps:.0f}, transformers {peer_tps:.0f}, "
        f"ratio {ours_tps / peer_tps:.2f}x"
    )


@pytest.fixture(scope="module")
def qwen05b(tmp_path_factory):
    """Qwen2.5-0.5B shapes, random weights."""
    return make_model(
        str(tmp_path_factory.mktemp("q")),
        "qwen2",
        **QWEN25_05B,
        tokenizer=False,
        dtype=torch.bfloat16,
    )


def test_generate_cpu_vs_transformers(benchmark, tiny_llama):
    _run_pair(benchmark, tiny_llama, "cpu", torch.float32, rounds=3)


def test_generate_cpu_decode_only_vs_transformers(benchmark, tiny_llama):
    _run_pair(benchmark, tiny_llama, "cpu", torch.float32, rounds=3, workload="decode")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_generate_cuda_qwen2_05b_vs_transformers(benchmark, qwen05b, workload):
    _run_pair(benchmark, qwen05b, "cuda", torch.bfloat16, rounds=3, workload=workload)
