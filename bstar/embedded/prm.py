"""The built-in task's PRM: Math-Shepherd hard-estimation step labels from the warm policy's own rollouts,
a PRM fine-tuned from the warm policy to predict them, and its held-out step accuracy through engine.PRM."""

from __future__ import annotations

import random
from pathlib import Path

from tqdm.auto import tqdm

from bstar.embedded.config import EmbeddedConfig
from bstar.embedded.policy import engine_llm, sft_config
from bstar.embedded.tokenizer import BAD, GOOD, STEP_TAG
from bstar.rewards import grade
from bstar.tasks import Example, format_prompt
from bstar.train import SFTExample, SFTTrainer
from engine import PRM, SamplingParams
from engine.errors import BStarError
from engine.prm import split_steps, tagged_step_ids

PRM_QUESTION_TEMPLATE = "{question} "  # engine.PRM's default question_template


def label_steps(cfg: EmbeddedConfig, policy: Path, questions: list[Example], progress: bool):
    """Math-Shepherd hard labels for warm-policy candidates of `questions`.

    Returns (fit, held_out, stats); fit / held_out: lists of (example, steps, labels) split by
    question. A step is good (True) when a rollout from the prefix ending with it reaches the gold
    answer; the candidate's own continuation counts as one rollout, and the last step's label is the
    candidate's own correctness (nothing follows it)."""
    llm = engine_llm(policy, cfg)
    sample = SamplingParams(
        n=cfg.prm_candidates, temperature=cfg.prm_temperature, max_tokens=cfg.max_new_tokens, seed=cfg.seed
    )
    outs = llm.generate([format_prompt(e) for e in questions], sample, use_tqdm=progress)
    cands = []  # (question index, steps, candidate correct)
    for qi, (o, e) in enumerate(zip(outs, questions)):
        for c in o.outputs:
            if c.text.strip():
                cands.append((qi, split_steps(c.text), grade(c.text, e.gold_answer, e.task)))
    # rollouts from every proper prefix of every wrong candidate (a right one's prefixes are good)
    jobs = [(k, i) for k, (qi, steps, ok) in enumerate(cands) if not ok for i in range(1, len(steps))]
    roll = SamplingParams(
        n=cfg.prm_rollouts, temperature=cfg.prm_temperature, max_tokens=cfg.max_new_tokens, seed=cfg.seed + 1
    )
    reached: dict[tuple[int, int], bool] = {}
    chunk = 256  # prompts per generate call: one bar over all of them
    bar = tqdm(total=len(jobs), desc="prm rollouts", disable=not progress)
    for s in range(0, len(jobs), chunk):
        part = jobs[s : s + chunk]
        prompts = [format_prompt(questions[cands[k][0]]) + "\n".join(cands[k][1][:i]) + "\n" for k, i in part]
        for (k, i), o in zip(part, llm.generate(prompts, roll, use_tqdm=False)):
            e = questions[cands[k][0]]
            reached[(k, i)] = any(grade(c.text, e.gold_answer, e.task) for c in o.outputs)
        bar.update(len(part))
    bar.close()
    del llm
    labelled = [
        (qi, steps, hard_labels(len(steps), ok, [reached.get((k, i), False) for i in range(1, len(steps))]))
        for k, (qi, steps, ok) in enumerate(cands)
    ]
    order = list(range(len(questions)))
    random.Random(cfg.seed).shuffle(order)
    held_q = set(order[: max(1, round(cfg.prm_holdout * len(questions)))])
    fit = [(questions[qi], st, lb) for qi, st, lb in labelled if qi not in held_q]
    held = [(questions[qi], st, lb) for qi, st, lb in labelled if qi in held_q]
    all_labels = [x for _, _, lb in labelled for x in lb]
    stats = {
        "candidates": len(cands),
        "steps": len(all_labels),
        "good_rate": sum(all_labels) / max(1, len(all_labels)),
        "candidate_accuracy": sum(ok for _, _, ok in cands) / max(1, len(cands)),
        "rollout_prompts": len(jobs),
        "fit_steps": sum(len(lb) for _, _, lb in fit),
        "held_out_steps": sum(len(lb) for _, _, lb in held),
    }
    return fit, held, stats


def hard_labels(n_steps: int, candidate_ok: bool, prefix_reached: list[bool]) -> list[bool]:
    """Math-Shepherd hard estimation: step i (of n) is good when a rollout from the prefix ending at
    it reached the gold answer (prefix_reached[i], for the n - 1 proper prefixes) or the candidate
    itself, which continues every prefix, is correct; the last step is good iff the candidate is."""
    if len(prefix_reached) != n_steps - 1:
        raise BStarError(f"{n_steps} steps need {n_steps - 1} prefix results, got {len(prefix_reached)}")
    return [candidate_ok or r for r in prefix_reached] + [candidate_ok]


def prm_inputs(tok, question: str, steps: list[str]) -> tuple[list[int], list[int]]:
    """(ids, tag positions) of a question and its steps, in engine.PRM's format (engine.prm.tagged_step_ids)."""
    q = tok.encode(PRM_QUESTION_TEMPLATE.format(question=question)).ids
    encode = lambda text: tok.encode(text, add_special_tokens=False).ids
    ids, tags = tagged_step_ids(steps, encode, tok.token_to_id(STEP_TAG))
    return q + ids, [len(q) + t for t in tags]


def prm_examples(tok, labelled) -> list:
    """One SFTExample per step: the PRM input up to and including the step's tag, then the label."""
    good, bad = tok.token_to_id(GOOD), tok.token_to_id(BAD)
    out = []
    for e, steps, labels in labelled:
        ids, tags = prm_inputs(tok, e.question, steps)
        for t, lab in zip(tags, labels):
            out.append(SFTExample(tuple(ids[: t + 1] + [good if lab else bad]), t + 1, len(out) + 1))
    return out


def train_prm(cfg: EmbeddedConfig, policy: Path, tok, labelled, out: Path, progress: bool) -> float:
    """Fine-tunes the warm policy into the PRM on the labelled steps; returns the last loss."""
    data = prm_examples(tok, labelled)
    if not data:
        raise BStarError("embedded PRM: no labelled steps to train on (the warm policy produced no steps)")
    trainer = SFTTrainer(policy, sft_config(cfg, cfg.prm_lr, cfg.prm_epochs, cfg.prm_batch, progress))
    res = trainer.train(data)
    trainer.save(out, trainer_state=False)
    return res.losses[-1]


def prm_accuracy(prm: Path, held) -> dict:
    """Step-label accuracy of engine.PRM (P(good) > 0.5) on held-out labelled candidates."""
    model = PRM(str(prm), device="cpu")
    labels, preds = [], []
    for e, steps, lab in held:
        s = model.score(e.question, ["\n".join(steps)])[0]
        labels += lab
        preds += [p > 0.5 for p in s.step_scores]
    n = max(1, len(labels))
    good = sum(labels) / n
    return {
        "prm_step_accuracy": sum(p == y for p, y in zip(preds, labels)) / n,
        "prm_majority_rate": max(good, 1 - good),
        "prm_held_out_good_rate": good,
        "prm_held_out_steps": len(labels),
    }
