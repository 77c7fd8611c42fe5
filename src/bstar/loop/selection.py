"""Reward-based selection of self-generated training data (one B-STaR iteration, step 3), as the
reference (hkust-nlp/B-STaR, determine_hyper.py / metric_modiacc_auto.py, get_unique_trn_json) does it.

Every candidate gets one score

    score = correct (0 or 1) + prm / prm_divisor          (reference: correct + min_step_logit / 5)

where prm is the PRM's aggregate over the steps: by default the minimum step logit
log p - log(1 - p) (bstar.PRM(scale="logit"), clipped to +-bstar.engine.entrypoints.prm.LOGIT_CLIP), and BROKEN (-5, the
reference's value) for a candidate with no scorable answer step. On this scale a correct answer with a
bad step can rank below a wrong answer with good steps, and thresholds in [-1, 1) trade the two.
scale="prob" (P(good) in [0, 1], BROKEN_PROB = 0 for no answer) is the other option.

Per query: sort by score (descending, stable; a gold solution, when given, joins last with prm 0, i.e.
score 1.0), keep those with score > threshold, take the first M (the per-query cap), then drop exact
duplicate texts (the first, best-scored copy stays): a duplicate uses one of the M slots, as in the
reference. M is given (`max_per_query`) or, as in the reference, the smallest cap in 1..max_cap whose
de-duplicated selection reaches `target_size` in total (max_cap when none does).

Deviations from the reference (deliberate): ties keep input order (the reference shuffles first, without
a seed); duplicates are keyed by text within one query id (the reference keys by question text, so two
queries with the same text share their duplicates).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from bstar.engine.errors import RequestError

PRM_DIVISOR = 5.0  # reference: prm_score / 5.0 (a division: 3.0 / 5 == 0.6, while 0.2 * 3.0 > 0.6)
MAX_CAP = 64  # reference: per-query caps 1..64 are tried when searching M
BROKEN = -5.0  # reference: the step reward of a candidate whose answer step cannot be scored (logit scale)
BROKEN_PROB = 0.0  # the same on the probability scale
PRM_SCALES = ("logit", "prob")


@dataclass
class Candidate:
    """One sampled (or gold) solution of one query, already graded and PRM-scored."""

    query_id: Hashable
    text: str
    correct: bool
    prm: float = 0.0  # the PRM's aggregate over the steps (min step logit by default)
    is_gold: bool = False

    @classmethod
    def gold(cls, query_id: Hashable, text: str, prm: float = 0.0) -> Candidate:
        """The reference solution as a candidate (reference: correct, PRM 0 -> score 1.0)."""
        return cls(query_id, text, True, prm, is_gold=True)


def candidate_score(c: Candidate, prm_divisor: float = PRM_DIVISOR) -> float:
    """correct + prm / prm_divisor; raises on a non-finite PRM value."""
    if not math.isfinite(c.prm):
        raise RequestError(f"query {c.query_id!r}: PRM value {c.prm} is not finite")
    return float(c.correct) + c.prm / prm_divisor


@dataclass
class RankedQuery:
    """One query's candidates, scored and sorted by score descending, duplicates kept in place.

    The selection for (threshold t, cap M) is the first occurrences among ranked[:k], k = min(n_above(t), M);
    unique_prefix[k] / correct_prefix[k] count them (and the correct ones among them)."""

    query_id: Hashable
    ranked: list[Candidate]
    scores: list[float]  # descending, aligned with ranked
    first: list[bool]  # ranked[j] is the first copy of its text
    unique_prefix: list[int]  # distinct texts among ranked[:j]; len + 1
    correct_prefix: list[int]  # distinct correct texts among ranked[:j]; len + 1

    def n_above(self, threshold: float) -> int:
        lo, hi = 0, len(self.scores)  # scores are descending: count those > threshold
        while lo < hi:
            mid = (lo + hi) // 2
            if self.scores[mid] > threshold:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def take(self, k: int) -> list[Candidate]:
        return [c for c, f in zip(self.ranked[:k], self.first[:k]) if f]


def rank_query(
    candidates: Sequence[Candidate], gold: Candidate | None = None, prm_divisor: float = PRM_DIVISOR
) -> RankedQuery:
    """Score and stable-sort (descending) one query's candidates (+ optional gold, appended last so that
    it ranks after sampled candidates of equal score); duplicates are marked, not removed."""
    cands = list(candidates) + ([gold] if gold is not None else [])
    qids = {c.query_id for c in cands}
    if len(qids) > 1:
        raise RequestError(f"candidates of one query carry different query ids: {sorted(map(repr, qids))[:4]}")
    scored = sorted(((candidate_score(c, prm_divisor), i, c) for i, c in enumerate(cands)), key=lambda t: (-t[0], t[1]))
    seen: set[str] = set()
    ranked, scores, first, uniq, corr = [], [], [], [0], [0]
    for s, _, c in scored:
        new = c.text not in seen
        seen.add(c.text)
        ranked.append(c)
        scores.append(s)
        first.append(new)
        uniq.append(uniq[-1] + new)
        corr.append(corr[-1] + (new and bool(c.correct)))
    qid = next(iter(qids)) if qids else None
    return RankedQuery(qid, ranked, scores, first, uniq, corr)


def selected_size(ranked: Sequence[RankedQuery], n_above: Sequence[int], cap: int) -> int:
    """Size of the de-duplicated selection with per-query cap `cap`."""
    return sum(q.unique_prefix[min(n, cap)] for q, n in zip(ranked, n_above))


def cap_for_target(
    ranked: Sequence[RankedQuery], n_above: Sequence[int], target_size: int, max_cap: int = MAX_CAP
) -> int:
    """Smallest per-query cap M in 1..max_cap whose de-duplicated selection holds >= target_size candidates
    (max_cap when none does), as the reference's search over `max_samples` (duplicates use slots, the
    target counts after de-duplication)."""
    if target_size < 0:
        raise RequestError(f"target_size must be >= 0, got {target_size}")
    if max_cap < 1:
        raise RequestError(f"max_cap must be >= 1, got {max_cap}")
    if selected_size(ranked, n_above, max_cap) < target_size:
        return max_cap
    lo, hi = 1, max_cap
    while lo < hi:  # the size is non-decreasing in M: binary search for the first M reaching it
        mid = (lo + hi) // 2
        if selected_size(ranked, n_above, mid) >= target_size:
            hi = mid
        else:
            lo = mid + 1
    return lo


@dataclass
class Selection:
    """The selected training set and what the balance score needs from it."""

    selected: list[Candidate]  # query by query (input order), best first
    per_query: list[tuple[int, int]]  # (s_i, c_i): selected and selected-correct, per query
    threshold: float
    cap: int | None  # the M used (None: no cap)

    @property
    def size(self) -> int:
        return sum(s for s, _ in self.per_query)

    @property
    def accuracy(self) -> float:
        """Fraction of selected candidates that are correct (0.0 when nothing is selected)."""
        n = self.size
        return sum(c for _, c in self.per_query) / n if n else 0.0


def _check_cap_options(max_per_query: int | None, target_size: int | None) -> None:
    if max_per_query is not None and target_size is not None:
        raise RequestError("give either max_per_query (a fixed M) or target_size (search M), not both")
    if max_per_query is not None and max_per_query < 1:
        raise RequestError(f"max_per_query must be >= 1, got {max_per_query}")


def select_ranked(
    ranked: Sequence[RankedQuery],
    threshold: float,
    *,
    max_per_query: int | None = None,
    target_size: int | None = None,
    max_cap: int = MAX_CAP,
) -> Selection:
    """The selection for one threshold over already ranked queries (cheap: no re-sorting)."""
    _check_cap_options(max_per_query, target_size)
    n_above = [q.n_above(threshold) for q in ranked]
    if target_size is not None:
        cap = cap_for_target(ranked, n_above, target_size, max_cap)
    else:
        cap = max_per_query
    selected, per_query = [], []
    for q, n in zip(ranked, n_above):
        k = n if cap is None else min(n, cap)
        selected.extend(q.take(k))
        per_query.append((q.unique_prefix[k], q.correct_prefix[k]))
    return Selection(selected, per_query, threshold, cap)


def rank_all(
    groups: Sequence[Sequence[Candidate]],
    golds: Sequence[Candidate | None] | None = None,
    prm_divisor: float = PRM_DIVISOR,
) -> list[RankedQuery]:
    if golds is not None and len(golds) != len(groups):
        raise RequestError(f"golds has {len(golds)} entries for {len(groups)} queries")
    return [rank_query(g, golds[i] if golds is not None else None, prm_divisor) for i, g in enumerate(groups)]


def select(
    groups: Sequence[Sequence[Candidate]],
    threshold: float,
    *,
    max_per_query: int | None = None,
    target_size: int | None = None,
    max_cap: int = MAX_CAP,
    prm_divisor: float = PRM_DIVISOR,
    golds: Sequence[Candidate | None] | None = None,
) -> Selection:
    """Select training data from per-query candidate groups (groups[i] = candidates of query i).

    threshold: keep candidates with score > threshold (score = correct + prm / prm_divisor).
    max_per_query: fixed cap M; or target_size: M = smallest cap reaching that many selected in
    total (capped at max_cap); neither: no cap. golds: optional gold candidate per query
    (Candidate.gold(...)), aligned with groups, None entries allowed.
    """
    _check_cap_options(max_per_query, target_size)
    ranked = rank_all(groups, golds, prm_divisor)
    return select_ranked(ranked, threshold, max_per_query=max_per_query, target_size=target_size, max_cap=max_cap)
