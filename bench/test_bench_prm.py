"""PRM scoring of 8 questions x 32 candidates: ours (shared question KV, tag rows only) against a
transformers forward over each full question+candidate sequence with full logits, same run.

Run: pytest bench/test_bench_prm.py --benchmark-only -s
"""

import random
import time

import torch

from bstar.engine import PRM
from bstar.testing.model_factory import make_model

N_Q, N_C = 8, 32


def _data():
    rng = random.Random(0)
    words = "the train apples miles hours each more total left gives buys has step add".split()

    def sentence(n):
        return " ".join(rng.choice(words) if rng.random() < 0.6 else str(rng.randint(1, 99)) for _ in range(n))

    questions = [sentence(60) + "?" for _ in range(N_Q)]
    cands = [
        ["\n".join(f"{sentence(12)} = {rng.randint(1, 500)}" for _ in range(rng.randint(3, 6))) for _ in range(N_C)]
        for _ in range(N_Q)
    ]
    return questions, cands


def test_prm_scoring_cpu_vs_transformers(benchmark, tmp_path):
    from transformers import AutoModelForCausalLM

    path = make_model(
        str(tmp_path / "prm"),
        "llama",
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=4096,
        max_position_embeddings=2048,
        extra_tokens=("ки",),
    )
    prm = PRM(path, dtype="float32", device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    questions, cands = _data()
    good, bad = prm.label_rows
    # The peer scores exactly the same token sequences.
    seqs = []
    for q, cs in zip(questions, cands):
        qi = prm.tokenizer.encode(prm.question_template.format(question=q))
        for c in cs:
            ids, tags = prm._candidate_ids(prm.split_steps(c))
            seqs.append((qi + ids, [len(qi) + t for t in tags]))

    def ours():
        return prm.score_batch(questions, cands)

    def peer():
        out = []
        for i in range(0, len(seqs), N_C):  # one padded batch per question
            chunk = seqs[i : i + N_C]
            width = max(len(s) for s, _ in chunk)
            ids = torch.full((len(chunk), width), 2)
            mask = torch.zeros_like(ids)
            for j, (s, _) in enumerate(chunk):
                ids[j, : len(s)], mask[j, : len(s)] = torch.tensor(s), 1
            with torch.no_grad():
                logits = hf(ids, attention_mask=mask).logits  # [B, T, vocab]
            for j, (_, pos) in enumerate(chunk):
                out.append(torch.softmax(logits[j, pos][:, [good, bad]].float(), -1)[:, 0])
        return out

    got, ref = ours(), peer()  # warm-up, and the two agree
    flat = [s for qs in got for s in qs]
    assert max((torch.tensor(s.step_scores) - r).abs().max().item() for s, r in zip(flat, ref)) < 1e-3
    rounds = 3
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        peer()
        times.append(time.perf_counter() - t)
    benchmark.pedantic(ours, rounds=rounds, iterations=1)
    ours_s, peer_s = benchmark.stats.stats.median, sorted(times)[rounds // 2]
    n = N_Q * N_C
    benchmark.extra_info.update(
        ours_candidates_per_s=round(n / ours_s, 1),
        transformers_candidates_per_s=round(n / peer_s, 1),
        speedup=round(peer_s / ours_s, 2),
    )
    print(
        f"\n[cpu] PRM candidates/s: ours {n / ours_s:.0f}, transformers {n / peer_s:.0f}, ratio {peer_s / ours_s:.2f}x"
    )
