"""Per-iteration metrics of a self-improvement run: pure functions over plain lists.

Inputs are per query: `correct[i][j]` whether sample j of query i is right, `prm[i][j]` its
aggregated PRM score, `texts[i][j]` its text.

    pass_at_k(n, c, k)                    unbiased pass@k of one query (Chen et al. 2021)
    mean_pass_at_k(correct, k)            over queries; pass_at_1 = mean_pass_at_k(correct, 1)
    greedy_accuracy(correct)              one greedy answer per query
    reward_at_k(correct, prm, k)          accuracy of the PRM's best of the first k samples
    frac_any_correct(correct)             queries with at least one correct sample
    distinct_correct(texts, correct)      distinct correct responses per query
    extract_equations(text)               the reference's "equations" of a response
    equation_diversity(texts, correct)    distinct / total equations per query (reference), correct ones only
    auc(pos, neg)                         P(a positive scores above a negative), ties 1/2
    within_question_auc(correct, prm)     the PRM's AUC of correct vs wrong samples of the same question
    step_auc(step_scores, step_labels)    the PRM's AUC of its step scores against true step labels
    lucky_share(correct, valid)           share of correct samples whose steps are not all good
    sample_metrics(correct, prm, texts, k) the sampled-eval metrics as one dict
"""

from __future__ import annotations

import math
import re
from bisect import bisect_left, bisect_right
from collections.abc import Sequence

from bstar.engine.errors import RequestError


def pass_at_k(n: int, c: int, k: int) -> float:
    """P(at least one of k samples drawn without replacement from n, c of them correct, is
    correct) = 1 - C(n-c, k) / C(n, k), as the product prod_{i=n-c+1}^{n} (1 - k/i), which
    never forms the huge binomials."""
    if not (0 <= c <= n):
        raise RequestError(f"pass@k needs 0 <= c <= n, got n={n}, c={c}")
    if not (1 <= k <= n):
        raise RequestError(f"pass@k needs 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if len(xs) else 0.0


def mean_pass_at_k(correct: Sequence[Sequence[bool]], k: int) -> float:
    """Mean unbiased pass@k over queries (each query's n = its number of samples)."""
    return _mean([pass_at_k(len(row), sum(map(bool, row)), k) for row in correct])


def pass_at_1(correct: Sequence[Sequence[bool]]) -> float:
    return mean_pass_at_k(correct, 1)


def greedy_accuracy(correct: Sequence[bool]) -> float:
    return _mean([float(bool(x)) for x in correct])


def reward_at_k(correct: Sequence[Sequence[bool]], prm: Sequence[Sequence[float]], k: int | None = None) -> float:
    """Accuracy when the PRM picks one of each query's first k samples (all when k is None);
    ties go to the earlier sample."""
    if len(correct) != len(prm):
        raise RequestError(f"reward@k: {len(correct)} queries of grades but {len(prm)} of PRM scores")
    hits = []
    for i, (cs, ps) in enumerate(zip(correct, prm)):
        if len(cs) != len(ps):
            raise RequestError(f"reward@k: query {i} has {len(cs)} grades but {len(ps)} PRM scores")
        kk = len(cs) if k is None else k
        if not 1 <= kk <= len(cs):
            raise RequestError(f"reward@k needs 1 <= k <= samples, got k={kk} for {len(cs)} samples")
        best = max(range(kk), key=lambda j: (ps[j], -j))
        hits.append(float(bool(cs[best])))
    return _mean(hits)


def frac_any_correct(correct: Sequence[Sequence[bool]]) -> float:
    return _mean([float(any(row)) for row in correct])


def distinct_correct(texts: Sequence[Sequence[str]], correct: Sequence[Sequence[bool]]) -> float:
    """Mean number of distinct correct responses per query (whitespace-normalised text).

    Distinct correct *final answers* would be at most 1 on single-answer tasks, so diversity
    counts distinct correct solutions instead."""
    if len(texts) != len(correct):
        raise RequestError(f"distinct_correct: {len(texts)} queries of texts but {len(correct)} of grades")
    return _mean([float(len({" ".join(t.split()) for t, ok in zip(ts, cs) if ok})) for ts, cs in zip(texts, correct)])


# The reference's equations: $...$, GSM8K calculator annotations <<...>> and \[...\].
_DELIMITED_EQ = re.compile(r"\$(.*?)\$|<<([^<>]*)>>|\\\[(.*?)\\\]", re.S)
# Plain "3 * 4 = 12" / "12-5=7" steps (our synthetic task, undecorated GSM8K-style text).
_NUM = r"\d+(?:\.\d+)?"
_PLAIN_EQ = re.compile(rf"(?<![\w.]){_NUM}(?:[ \t]*[-+*/×÷][ \t]*{_NUM})+[ \t]*=[ \t]*{_NUM}(?![\w.])")


def extract_equations(text: str) -> list[str]:
    """The equations of one response, in order, repeats kept.

    As the reference (metric_modiacc_auto.py, cal_diversity): every non-empty $...$, <<...>> and
    \\[...\\] span, verbatim. When a response has none of those, plain arithmetic steps
    'a op b (op c...) = r' count instead, spaces removed."""
    eqs = [g for m in _DELIMITED_EQ.findall(text) for g in m if g]
    if eqs:
        return eqs
    return [re.sub(r"\s+", "", m) for m in _PLAIN_EQ.findall(text)]


def equation_diversity(texts: Sequence[Sequence[str]], correct: Sequence[Sequence[bool]] | None = None) -> float | None:
    """Mean over queries of (distinct equations) / (all equations) among that query's responses (only the
    correct ones when `correct` is given).

    Queries whose responses hold no equation are skipped, as in the reference; None when no
    query has any (undefined)."""
    ratios = []
    for i, ts in enumerate(texts):
        keep = ts if correct is None else [t for t, ok in zip(ts, correct[i]) if ok]
        eqs = [e for t in keep for e in extract_equations(t)]
        if eqs:
            ratios.append(len(set(eqs)) / len(eqs))
    return _mean(ratios) if ratios else None


def auc(pos: Sequence[float], neg: Sequence[float]) -> float | None:
    """Mann-Whitney AUC: the probability that a positive scores above a negative (ties count 1/2); None
    when either side is empty."""
    if not pos or not neg:
        return None
    neg_sorted = sorted(neg)
    wins = 0.0
    for p in pos:
        below, upto = bisect_left(neg_sorted, p), bisect_right(neg_sorted, p)
        wins += below + 0.5 * (upto - below)
    return wins / (len(pos) * len(neg))


def within_question_auc(correct: Sequence[Sequence[bool]], prm: Sequence[Sequence[float]]) -> tuple[float | None, int]:
    """(mean over questions with both correct and wrong samples of the AUC of the PRM's score of correct
    against wrong samples, number of such questions). Selection only compares candidates of one question,
    so this, not a pooled AUC (which mostly measures question difficulty), is what a reward needs."""
    aucs = []
    for cs, ps in zip(correct, prm):
        a = auc([p for p, ok in zip(ps, cs) if ok], [p for p, ok in zip(ps, cs) if not ok])
        if a is not None:
            aucs.append(a)
    return (_mean(aucs) if aucs else None), len(aucs)


def step_auc(step_scores: Sequence[Sequence[float]], step_labels: Sequence[Sequence[bool]]) -> float | None:
    """Pooled AUC of step scores against true step labels (good = positive)."""
    pos, neg = [], []
    for ss, ls in zip(step_scores, step_labels):
        if len(ss) != len(ls):
            raise RequestError(f"step_auc: {len(ss)} step scores but {len(ls)} labels")
        for s, ok in zip(ss, ls):
            (pos if ok else neg).append(s)
    return auc(pos, neg)


def within_question_step_auc(
    step_scores: Sequence[Sequence[Sequence[float]]],
    step_labels: Sequence[Sequence[Sequence[bool]]],
    first_wrong_only: bool = False,
) -> tuple[float | None, int]:
    """(mean over questions of the AUC of step scores, good steps against bad steps of the same question's
    candidates, number of questions with both). Inputs are indexed [question][candidate][step].
    first_wrong_only: the bad side is each candidate's first bad step only, the error a reward must catch (the
    steps after it are easy: they build on a wrong result)."""
    if len(step_scores) != len(step_labels):
        raise RequestError("within_question_step_auc: scores and labels differ in shape")
    aucs = []
    for qs, ql in zip(step_scores, step_labels):
        pos, neg = [], []
        if len(qs) != len(ql):
            raise RequestError("within_question_step_auc: scores and labels differ in shape")
        for ss, ls in zip(qs, ql):
            if len(ss) != len(ls):
                raise RequestError(f"within_question_step_auc: {len(ss)} step scores but {len(ls)} labels")
            seen_bad = False
            for s, ok in zip(ss, ls):
                if ok:
                    pos.append(s)
                elif not (first_wrong_only and seen_bad):
                    neg.append(s)
                seen_bad = seen_bad or not ok
        a = auc(pos, neg)
        if a is not None:
            aucs.append(a)
    return (_mean(aucs) if aucs else None), len(aucs)


def lucky_share(correct: Sequence[Sequence[bool]], valid: Sequence[Sequence[bool]]) -> float | None:
    """The share of correct samples that are not valid (a wrong step on the way to the right answer): right
    answers a step-level reward should rank low. None when no sample is correct."""
    if len(correct) != len(valid) or any(len(c) != len(v) for c, v in zip(correct, valid)):
        raise RequestError("lucky_share: grades and validity flags differ in shape")
    pairs = [(c, v) for cs, vs in zip(correct, valid) for c, v in zip(cs, vs) if c]
    return sum(not v for _, v in pairs) / len(pairs) if pairs else None


def sample_metrics(
    correct: Sequence[Sequence[bool]],
    prm: Sequence[Sequence[float]] | None,
    texts: Sequence[Sequence[str]] | None,
    k: int,
) -> dict[str, float | None]:
    """The metrics of K samples per eval query, under the keys bstar.results.plots knows."""
    out: dict[str, float | None] = {
        "pass_at_1": pass_at_1(correct),
        "pass_at_k": mean_pass_at_k(correct, k),
        "frac_any_correct": frac_any_correct(correct),
    }
    if prm is not None:
        out["reward_at_k"] = reward_at_k(correct, prm, k)
        out["prm_within_auc"], out["prm_within_auc_questions"] = within_question_auc(correct, prm)
    if texts is not None:
        out["diversity_distinct_correct"] = distinct_correct(texts, correct)
        out["diversity_equations"] = equation_diversity(texts, correct)
    return out
