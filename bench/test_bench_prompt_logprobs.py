"""Scoring (lm-eval's loglikelihood): our prompt_logprobs against transformers' batched forward on the same
model, same run, same work.

64 requests of 96-223 tokens, as lm-eval's vllm backend sends them: SamplingParams(temperature=0,
prompt_logprobs=1, max_tokens=1, detokenize=False), then per request the sum of the continuation's
logprobs and whether each token was the greedy one (rank 1). The peer is lm-eval's hf backend's work:
right-padded batches of 16 through the model, log_softmax, gather, argmax. Both sides include reading the
numbers out. Rounds alternate peer / ours after one warm-up of each; our prefix cache is not used (vLLM
skips it for prompt_logprobs requests, and so do we). Both run on one torch thread: on a shared machine
two threads spin against other work and the figures mean nothing.

Run: pytest bench/test_bench_prompt_logprobs.py --benchmark-only -s
"""

import time

import pytest
import torch

from bstar.engine import LLM, SamplingParams

N_REQ, BATCH, CONT = 64, 16, 8  # requests, the peer's batch size, continuation tokens scored per request


def _requests(vocab):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (96 + (i * 37) % 128,), generator=g).tolist() for i in range(N_REQ)]


def ours_scores(llm, reqs):
    params = SamplingParams(temperature=0, prompt_logprobs=1, max_tokens=1, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": r} for r in reqs], params, use_tqdm=False)
    scores = []
    for r, o in zip(reqs, outs):
        entries = o.prompt_logprobs[len(r) - CONT :]
        lps = [e[t] for e, t in zip(entries, r[len(r) - CONT :])]
        scores.append((sum(lp.logprob for lp in lps), all(lp.rank == 1 for lp in lps)))
    return scores


def peer_scores(hf, reqs):
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
            for j, r in enumerate(part):
                n = len(r)
                pos = torch.arange(n - CONT - 1, n - 1)
                target = torch.tensor(r[n - CONT :])
                rows = logp[j, pos]
                scores.append((rows.gather(1, target[:, None]).sum().item(), bool((rows.argmax(-1) == target).all())))
    return scores


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_prompt_logprobs_cpu_vs_transformers(benchmark, tiny_llama, one_thread):  # noqa: F811
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    llm = LLM(tiny_llama, dtype="float32", device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    reqs = _requests(hf.config.vocab_size)
    a, b = ours_scores(llm, reqs), peer_scores(hf, reqs)  # warm-up, and the two agree
    assert all(abs(x[0] - y[0]) < 1e-3 and x[1] == y[1] for x, y in zip(a, b))
    peer_times = []

    def timed_peer():
        t = time.perf_counter()
        peer_scores(hf, reqs)
        peer_times.append(time.perf_counter() - t)

    benchmark.pedantic(lambda: ours_scores(llm, reqs), setup=timed_peer, rounds=5, iterations=1)
    tokens = sum(map(len, reqs))
    ours_s, peer_s = benchmark.stats.stats.median, sorted(peer_times)[len(peer_times) // 2]
    benchmark.extra_info.update(
        prompt_tokens=tokens,
        ours_tokens_per_s=round(tokens / ours_s, 1),
        transformers_tokens_per_s=round(tokens / peer_s, 1),
        speedup=round(peer_s / ours_s, 2),
        ours_s=[round(t, 3) for t in benchmark.stats.stats.data],
        transformers_s=[round(t, 3) for t in peer_times],
    )
    ratio = peer_s / ours_s
    print(f"\n[cpu] prompt tokens/s: ours {tokens / ours_s:.0f}, transformers {tokens / peer_s:.0f}, {ratio:.2f}x")
    print(f"rounds (s): ours {benchmark.extra_info['ours_s']}, transformers {benchmark.extra_info['transformers_s']}")
