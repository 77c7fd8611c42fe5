"""The built-in task's PRM: the warm policy fine-tuned to predict the task's true step labels
(bstar.embedded.task.step_labels) at bstar.PRM's step tags, and its quality measured the way selection
uses it.

Why not Math-Shepherd labels (the previous version): labels from 8 rollouts of a weak policy mark a good
step bad whenever the policy cannot finish from it, so they mostly encode how hard the question is for
the policy, not whether the step is right; the PRM learnt question difficulty (pooled AUC 0.72, within a
question 0.42, every candidate of a question scored about the same). True labels depend only on the step.

Training data, per question of the train split: the warm policy's own samples at two temperatures (the
distribution the loop scores), valid solutions in random styles, and plausible wrong ones
(task.wrong_solution: a misread problem, an arithmetic slip carried on, a wrong answer line, stopping
early), all labelled by task.step_labels. Loss: binary cross entropy on the good-minus-bad logit at each
step tag (the reference trains its PRM with BCE-with-logits), which is exactly the value bstar.PRM reads
(scale="logit"; softmax over the two rows for scale="prob").
"""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from bstar.embedded import task as T
from bstar.embedded.config import EmbeddedConfig
from bstar.embedded.policy import engine_llm
from bstar.embedded.tokenizer import BAD, GOOD, PAD, STEP_TAG
from bstar.engine import PRM, SamplingParams
from bstar.engine.entrypoints.prm import tagged_step_ids
from bstar.errors import BStarError
from bstar.loop.metrics import lucky_share, reward_at_k, step_auc, within_question_auc, within_question_step_auc
from bstar.loop.rewards import grade
from bstar.loop.tasks import Example, format_prompt
from bstar.train.cpu_gemm import apply_cpu_gemm

PRM_QUESTION_TEMPLATE = "{question} "  # bstar.PRM's default question_template


def prm_inputs(tok, question: str, steps: list[str]) -> tuple[list[int], list[int]]:
    """(ids, tag positions) of a question and its steps, in bstar.PRM's format (its tagged_step_ids)."""
    q = tok.encode(PRM_QUESTION_TEMPLATE.format(question=question)).ids
    encode = lambda text: tok.encode(text, add_special_tokens=False).ids
    ids, tags = tagged_step_ids(steps, encode, tok.token_to_id(STEP_TAG))
    return q + ids, [len(q) + t for t in tags]


def policy_samples(cfg: EmbeddedConfig, policy: Path, questions: list[Example], n: int, temperatures, seed: int):
    """The policy's samples: per question, n texts at each temperature."""
    llm = engine_llm(policy, cfg)
    texts = [[] for _ in questions]
    for k, temp in enumerate(temperatures):
        params = SamplingParams(n=n, temperature=temp, max_tokens=cfg.max_new_tokens, seed=seed + k)
        for i, o in enumerate(llm.generate([format_prompt(e) for e in questions], params, use_tqdm=False)):
            texts[i] += [c.text for c in o.outputs]
    return texts


def prm_data(cfg: EmbeddedConfig, policy: Path, questions: list[Example]) -> tuple[list, dict]:
    """(rows, stats): rows = (question, steps, labels), the warm policy's samples and synthetic solutions of
    `questions`, labelled with the true step labels."""
    rng = random.Random(f"bstar-prm-data-{cfg.seed}")
    sampled = policy_samples(cfg, policy, questions, cfg.prm_samples, (0.8, 1.2), cfg.seed + 101)
    rows, n_policy = [], 0
    for e, texts in zip(questions, sampled):
        p = T.parse_question(e.question)
        synthetic = [T.render_text(p, rng.choice(T.STYLES)) for _ in range(cfg.prm_valid)]
        synthetic += [T.wrong_solution(p, rng) for _ in range(cfg.prm_wrong)]
        for text in [t for t in texts if t.strip()] + synthetic:
            steps = T.solution_lines(text)
            rows.append((e.question, steps, T.label_lines(p, steps)))
        n_policy += sum(1 for t in texts if t.strip())
    labels = [x for _, _, lb in rows for x in lb]
    stats = {
        "candidates": len(rows),
        "policy_candidates": n_policy,
        "steps": len(labels),
        "good_rate": sum(labels) / max(1, len(labels)),
    }
    return rows, stats


def _batches(encoded, batch: int, steps: int, seed: int, pool: int = 16):
    """`steps` batches of `batch` rows: a shuffled pass over the rows, cut into pools of `pool` batches, each pool
    sorted by length before it is cut and its batches shuffled. Rows of a batch are padded to its longest: on the
    built-in task's rows that costs 3% more tokens than the rows hold, against 46% for random batches."""
    rng = random.Random(seed)
    order: list[int] = []
    ready: list[list[int]] = []
    for _ in range(steps):
        if not ready:
            while len(order) < batch * pool:
                more = list(range(len(encoded)))
                rng.shuffle(more)
                order += more
            chunk = sorted(order[: batch * pool], key=lambda i: len(encoded[i][0]))
            order = order[batch * pool :]
            ready = [chunk[k : k + batch] for k in range(0, len(chunk), batch)]
            rng.shuffle(ready)
        yield [encoded[i] for i in ready.pop()]


def train_prm(cfg: EmbeddedConfig, policy: Path, tok, rows, out: Path, progress: bool) -> float:
    """Fine-tunes the warm policy into the PRM: BCE on the good-minus-bad logit at every step tag, batches bucketed
    by length, Linear layers on the trainer's CPU GEMM (bstar/train/cpu_gemm.py; with both, 1,500 steps took 245 s
    instead of 360 s on an AMD EPYC; 900 steps take 229 s on an idle Intel Xeon, one thread). Saves an HF
    directory (weights, config, the policy's tokenizer); returns the mean loss of the last 50 steps."""
    if not rows:
        raise BStarError("embedded PRM: no labelled steps to train on")
    good, bad = tok.token_to_id(GOOD), tok.token_to_id(BAD)
    encoded = []
    for q, steps, labels in rows:
        ids, tags = prm_inputs(tok, q, steps)
        if len(ids) <= cfg.max_position_embeddings:
            encoded.append((ids, tags, labels))
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32, attn_implementation="sdpa")
    apply_cpu_gemm(model)  # the trainer's rule
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.prm_lr, betas=(0.9, 0.98), weight_decay=0.0)
    warm = max(1, cfg.prm_steps // 20)
    losses = []
    bar = tqdm(total=cfg.prm_steps, desc="prm", disable=not progress)
    for step, batch in enumerate(_batches(encoded, cfg.prm_batch, cfg.prm_steps, cfg.seed)):
        lr = cfg.prm_lr * min((step + 1) / warm, 0.5 * (1 + math.cos(math.pi * step / cfg.prm_steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        width = max(len(ids) for ids, _, _ in batch)
        x = torch.full((len(batch), width), PAD, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        rows_i, cols, y = [], [], []
        for i, (ids, tags, labels) in enumerate(batch):
            x[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
            rows_i += [i] * len(tags)
            cols += tags
            y += [float(v) for v in labels]
        h = model.model(input_ids=x, attention_mask=mask).last_hidden_state[rows_i, cols]  # [S, H]
        w = model.lm_head.weight[[good, bad]]
        z = h @ (w[0] - w[1])  # the good-minus-bad logit: bstar.PRM's logit-scale step score
        loss = F.binary_cross_entropy_with_logits(z, torch.tensor(y))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        bar.update(1)
        if step % 50 == 0:
            bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.3f}")
    bar.close()
    model.config.use_cache = True
    model.save_pretrained(out, safe_serialization=True)
    for f in Path(policy).iterdir():
        if f.name.startswith("tokenizer") or f.name == "generation_config.json":
            shutil.copy2(f, out / f.name)
    return sum(losses[-50:]) / len(losses[-50:])


def prm_quality(cfg: EmbeddedConfig, prm: Path, policy: Path, questions: list[Example]) -> dict:
    """The PRM judged as selection uses it, on `questions` (held out from its training): K samples of the
    policy per question; within-question AUC of the min-step logit (correct vs wrong answers of the same
    question), Reward@K (the PRM's pick) against Pass@1 (a random pick), step AUC and accuracy against the
    true step labels. The same against validity (every step good, task.is_valid), what a step-level reward
    can see: within-question AUC, the share of questions where its pick is valid against a random pick's,
    the lucky share (right answers with a wrong step), and Reward@K of an oracle scoring every step by its
    true label (how far a perfect PRM would lift the pick on these samples). And where it fails, step by step
    within a question: the AUC of its step scores, good steps against bad ones of the same question's samples,
    and against only each sample's first bad step (the error a reward must catch)."""
    k = cfg.prm_eval_k
    texts = policy_samples(cfg, policy, questions, k, (1.0,), cfg.seed + 202)
    model = PRM(str(prm), device="cpu", scale="logit")
    scored = model.score_batch([e.question for e in questions], texts)
    correct = [[grade(t, e.gold_answer, e.task) for t in ts] for e, ts in zip(questions, texts)]
    prm = [[s.score for s in ss] for ss in scored]
    labels = [[T.step_labels(e.question, t) for t in ts] for e, ts in zip(questions, texts)]
    valid = [[T.is_valid(e.question, t) for t in ts] for e, ts in zip(questions, texts)]
    per_question = [[s.step_scores for s in ss] for ss in scored]
    steps = [s for q in per_question for s in q]
    flat_labels = [lb for q in labels for lb in q]
    within_steps, n_step_q = within_question_step_auc(per_question, labels)
    within_first, _ = within_question_step_auc(per_question, labels, first_wrong_only=True)
    within, n_q = within_question_auc(correct, prm)
    within_valid, n_valid_q = within_question_auc(valid, prm)
    right = sum(v > 0 and lb for ss, lbs in zip(steps, flat_labels) for v, lb in zip(ss, lbs))
    right += sum(v <= 0 and not lb for ss, lbs in zip(steps, flat_labels) for v, lb in zip(ss, lbs))
    n_steps = sum(len(lb) for lb in flat_labels)
    good = sum(sum(lb) for lb in flat_labels) / max(1, n_steps)
    return {
        "prm_eval_questions": len(questions),
        "prm_eval_k": k,
        "prm_within_auc": within,
        "prm_within_auc_questions": n_q,
        "prm_reward_at_k": reward_at_k(correct, prm, k),
        "prm_pass_at_1": sum(sum(c) / len(c) for c in correct) / len(correct),
        "prm_within_auc_valid": within_valid,
        "prm_within_auc_valid_questions": n_valid_q,
        "prm_valid_at_k": reward_at_k(valid, prm, k),
        "prm_valid_at_1": sum(sum(v) / len(v) for v in valid) / len(valid),
        "prm_lucky_share": lucky_share(correct, valid),
        # a PRM that scored every step by its true label: the pick's accuracy with perfect step rewards
        "prm_oracle_reward_at_k": reward_at_k(correct, [[float(all(lb)) for lb in q] for q in labels], k),
        "prm_step_auc": step_auc(steps, flat_labels),
        "prm_within_step_auc": within_steps,
        "prm_within_first_wrong_auc": within_first,
        "prm_within_step_auc_questions": n_step_q,
        "prm_step_accuracy": right / max(1, n_steps),
        "prm_majority_rate": max(good, 1 - good),
        "prm_eval_steps": n_steps,
    }


def dump_rows(path: Path, rows) -> None:
    """The PRM's training rows as JSONL (for inspection and the tests)."""
    with open(path, "w") as f:
        for q, steps, labels in rows:
            f.write(json.dumps({"question": q, "steps": steps, "labels": labels}) + "\n")
