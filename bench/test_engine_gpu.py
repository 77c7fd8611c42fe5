"""Engine decode on CUDA (random model with Qwen2.5-0.5B shapes, bf16) against transformers
`generate` (its default SDPA attention) on the same prompts, with our decode CUDA graphs on and
off (enforce_eager) in the same run; the logits of both engines are checked against transformers
first. Skips without CUDA.

Run: pytest bench/test_engine_gpu.py --benchmark-only -s
"""

import time

import pytest
import torch

from bstar.testing.model_factory import QWEN25_05B, make_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

BATCH, PROMPT_LEN, NEW = 64, 512, 128


def test_engine_decode_graphs_eager_vs_transformers(benchmark, tmp_path):
    from transformers import AutoModelForCausalLM

    from bstar.engine import LLM, SamplingParams

    path = make_model(
        str(tmp_path / "q"),
        "qwen2",
        **QWEN25_05B,
        tokenizer=False,
        dtype=torch.bfloat16,
    )
    engines = {
        "graphs": LLM(path, dtype="bfloat16", device="cuda", gpu_memory_utilization=0.3),
        "eager": LLM(path, dtype="bfloat16", device="cuda", gpu_memory_utilization=0.3, enforce_eager=True),
    }
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 150000, (BATCH, PROMPT_LEN), generator=g)
    check = prompts[:2, :128]
    with torch.no_grad():  # the results agree: our logits against transformers' on a few prompts
        want = hf(check.cuda()).logits.float().cpu()
    for name, llm in engines.items():
        got = torch.stack(llm.compute_logits(check.tolist()))
        rel = ((got - want).norm() / want.norm()).item()
        assert rel < 3e-2, f"{name}: logits differ from transformers by {rel:.3f} (relative)"

    params = SamplingParams(temperature=1.0, max_tokens=NEW, ignore_eos=True, seed=0)
    tokens = BATCH * NEW

    def ours(name):
        llm = engines[name]
        llm.engine.block_manager.reset_prefix_cache()
        llm.generate(prompts.tolist(), params, use_tqdm=False)
        torch.cuda.synchronize()

    def peer():
        with torch.no_grad():
            hf.generate(
                prompts.cuda(),
                attention_mask=torch.ones_like(prompts).cuda(),
                do_sample=True,
                top_k=0,
                max_new_tokens=NEW,
                min_new_tokens=NEW,
                pad_token_id=2,
            )
        torch.cuda.synchronize()

    times = {"eager": [], "transformers": []}

    def others():  # before each timed round of the graphs engine: the two others, interleaved
        for name, fn in (("eager", lambda: ours("eager")), ("transformers", peer)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)

    ours("graphs"), ours("eager"), peer()  # warm-up
    benchmark.pedantic(ours, args=("graphs",), setup=others, rounds=3, iterations=1)
    graphs_tps = tokens / benchmark.stats.stats.median
    eager_tps = tokens / sorted(times["eager"])[1]
    hf_tps = tokens / sorted(times["transformers"])[1]
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name(),
        graphs_tokens_per_s=round(graphs_tps),
        eager_tokens_per_s=round(eager_tps),
        transformers_tokens_per_s=round(hf_tps),
        graphs_over_transformers=round(graphs_tps / hf_tps, 2),
        graphs_over_eager=round(graphs_tps / eager_tps, 2),
    )
    print(
        f"\n[cuda] batch {BATCH}, prompt {PROMPT_LEN}, {NEW} new tokens, output tokens/s: graphs {graphs_tps:.0f}, "
        f"eager {eager_tps:.0f}, transformers {hf_tps:.0f}; graphs/transformers {graphs_tps / hf_tps:.2f}x, "
        f"graphs/eager {graphs_tps / eager_tps:.2f}x"
    )
