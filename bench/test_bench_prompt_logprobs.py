"""Scoring (lm-eval's loglikelihood): our prompt_logprobs against transformers' batched forward on the same
model, same run, same work, on two workloads:

- `unique`: 64 requests of 96-223 tokens with nothing in common, scoring their last 8 tokens (the first
  version of this benchmark; nothing to share, so it measures the forward and the entries alone);
- `lm-eval`: lm-eval's shape, 16 contexts of 64-255 tokens with 4 continuations of 3-30 tokens each
  (multiple choice: hellaswag, arc, piqa), in lm-eval's order (longest first, so a context's continuations
  are not adjacent).

Ours is what lm-eval's vllm backend sends: SamplingParams(temperature=0, prompt_logprobs=1, max_tokens=1,
detokenize=False), then per request the sum of the continuation's logprobs and whether each token was the
greedy one (rank 1). The peer is lm-eval's hf backend's work: right-padded batches of 16 (in the same
order) through the model, log_softmax, gather, argmax; it shares nothing between requests (its one-token
logits cache does not apply to these continuations). Both sides include reading the numbers out. Rounds
alternate peer / ours after one warm-up of each; our prefix cache is emptied before each round (a round
must not reuse the previous round's work). Both run on one torch thread: on a shared machine two threads
spin against other work and the figures mean nothing.

Run: pytest bench/test_bench_prompt_logprobs.py --benchmark-only -s
"""

import random
import time

import pytest
import torch

from bstar.engine import LLM, SamplingParams

BATCH = 16  # the peer's batch size


def unique_requests(vocab: int) -> tuple[list[list[int]], list[int]]:
    """64 unrelated prompts of 96-223 tokens; each scores its last 8."""
    g = torch.Generator().manual_seed(0)
    reqs = [torch.randint(3, vocab, (96 + (i * 37) % 128,), generator=g).tolist() for i in range(64)]
    return reqs, [8] * len(reqs)


def lm_eval_requests(vocab: int) -> tuple[list[list[int]], list[int]]:
    """16 contexts x 4 continuations, longest request first (lm-eval's Collator order)."""
    rng = random.Random(0)
    pairs = []
    for _ in range(16):
        ctx = [rng.randrange(3, vocab) for _ in range(rng.randint(64, 255))]
        pairs += [(ctx, [rng.randrange(3, vocab) for _ in range(rng.randint(3, 30))]) for _ in range(4)]
    pairs.sort(key=lambda p: -(len(p[0]) + len(p[1])))
    return [c + x for c, x in pairs], [len(x) for _, x in pairs]


def ours_scores(llm, reqs, conts):
    params = SamplingParams(temperature=0, prompt_logprobs=1, max_tokens=1, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": r} for r in reqs], params, use_tqdm=False)
    scores = []
    for r, k, o in zip(reqs, conts, outs):
        lps = [e[t] for e, t in zip(o.prompt_logprobs[len(r) - k :], r[len(r) - k :])]
        scores.append((sum(lp.logprob for lp in lps), all(lp.rank == 1 for lp in lps)))
    return scores


def peer_scores(hf, reqs, conts):
    scores = []
    with torch.no_grad():
        for i in range(0, len(reqs), BATCH):
            part = reqs[i : i + BATCH]
            width = max(map(len, part))
            ids = torch.full((len(part), width), 2, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for j, r in enumerate(part):
                ids[j, : len(r)] = torch.tensor(r)
                mask[j, : len(r)] = 1
            logp = torch.log_softmax(hf(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
            for j, (r, k) in enumerate(zip(part, conts[i : i + BATCH])):
                n = len(r)
                pos = torch.arange(n - k - 1, n - 1)
                target = torch.tensor(r[n - k :])
                rows = logp[j, pos]
                scores.append((rows.gather(1, target[:, None]).sum().item(), bool((rows.argmax(-1) == target).all())))
    return scores


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("workload", ["unique", "lm-eval"])
def test_prompt_logprobs_cpu_vs_transformers(benchmark, tiny_llama, one_thread, workload):  # noqa: F811
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    llm = LLM(tiny_llama, dtype="float32", device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    make = unique_requests if workload == "unique" else lm_eval_requests
    reqs, conts = make(hf.config.vocab_size)
    a, b = ours_scores(llm, reqs, conts), peer_scores(hf, reqs, conts)  # warm-up, and the two agree
    assert all(abs(x[0] - y[0]) < 1e-3 and x[1] == y[1] for x, y in zip(a, b))
    bm = llm.llm_engine.block_manager
    peer_times, hits = [], []

    def timed_peer():
        t = time.perf_counter()
        peer_scores(hf, reqs, conts)
        peer_times.append(time.perf_counter() - t)
        llm.reset_prefix_cache()
        hits.append(bm.prefix_hits)

    benchmark.pedantic(lambda: ours_scores(llm, reqs, conts), setup=timed_peer, rounds=7, iterations=1)
    tokens = sum(map(len, reqs))
    cached = bm.prefix_hits - hits[-1]  # the last round's prompt tokens served from the cache
    ours_s, peer_s = benchmark.stats.stats.median, sorted(peer_times)[len(peer_times) // 2]
    benchmark.extra_info.update(
        workload=workload,
        prompt_tokens=tokens,
        cached_tokens=cached,
        ours_tokens_per_s=round(tokens / ours_s, 1),
        transformers_tokens_per_s=round(tokens / peer_s, 1),
        speedup=round(peer_s / ours_s, 2),
        ours_s=[round(t, 3) for t in benchmark.stats.stats.data],
        transformers_s=[round(t, 3) for t in peer_times],
    )
    ratio = peer_s / ours_s
    print(f"\n[cpu {workload}] {tokens} prompt tokens ({cached} from the cache): ", end="")
    print(f"ours {tokens / ours_s:.0f}/s, transformers {tokens / peer_s:.0f}/s, {ratio:.2f}x")
    print(f"rounds (s): ours {benchmark.extra_info['ours_s']}, transformers {benchmark.extra_info['transformers_s']}")
