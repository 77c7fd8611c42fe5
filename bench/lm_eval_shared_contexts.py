"""lm-evaluation-harness's own loglikelihood loop, end to end: its `vllm` backend (`vllm` = bstar.vllm) against
its `hf` backend on the CPU benchmarks' model (bench/conftest.py's tiny_llama, with a tokenizer), on lm-eval's
multiple-choice shape: 24 contexts of 20-60 words x 4 continuations of 1-6 words. One torch thread each, the
median of 5 alternating rounds, our prefix cache emptied before each round. Prints one line of JSON per
batch_size: the largest loglikelihood difference, is_greedy agreement, prompt tokens served from the cache,
seconds and the ratio. Needs `pip install -e '.[compat]'` (lm-eval).

Run: taskset -c 0 python bench/lm_eval_shared_contexts.py
"""

import json
import random
import sys
import tempfile
import time

import torch

import bstar.vllm
from bstar.testing.model_factory import make_model

bstar.vllm.install()
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.models.vllm_causallms import VLLM  # noqa: E402

WORDS = "the cat sat on a mat and then ran to see what the dog was doing in the old barn".split()
MODEL = dict(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8)


def requests() -> list[Instance]:
    rng = random.Random(0)

    def text(n):
        return " ".join(rng.choice(WORDS) for _ in range(n))

    out = []
    for _ in range(24):
        ctx = text(rng.randint(20, 60))
        out += [Instance("loglikelihood", {}, (ctx, " " + text(rng.randint(1, 6))), len(out)) for _ in range(4)]
    return out


def compare(path: str, batch_size: int, reqs: list[Instance]) -> dict:
    ours = VLLM(pretrained=path, dtype="float32", max_model_len=1024, batch_size=batch_size, seed=0)
    hf = HFLM(pretrained=path, device="cpu", dtype="float32", batch_size=batch_size, max_length=1024)
    ours.loglikelihood(reqs[:8]), hf.loglikelihood(reqs[:8])  # warm-up
    bm = ours.model.llm_engine.block_manager
    ours_s, hf_s = [], []
    for _ in range(5):
        ours.model.reset_prefix_cache()
        hits = bm.prefix_hits
        t = time.perf_counter()
        a = ours.loglikelihood(reqs)
        ours_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        b = hf.loglikelihood(reqs)
        hf_s.append(time.perf_counter() - t)
    o, h = sorted(ours_s)[2], sorted(hf_s)[2]
    return dict(
        batch_size=batch_size,
        requests=len(reqs),
        ll_max_diff=max(abs(x[0] - y[0]) for x, y in zip(a, b)),
        is_greedy_equal=sum(x[1] == y[1] for x, y in zip(a, b)),
        cached_tokens=bm.prefix_hits - hits,
        ours_s=round(o, 3),
        hf_s=round(h, 3),
        speedup=round(h / o, 2),
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        path = make_model(d, "llama", num_key_value_heads=4, max_position_embeddings=1024, **MODEL)
        reqs = requests()
        for bs in (64, 8):
            print(json.dumps(compare(path, bs, reqs)), file=sys.stdout, flush=True)
