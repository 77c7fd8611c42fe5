"""Reward-based selection of self-generated training data (one B-STaR iteration, step 3).

Every candidate gets one score

    score = correct (0 or 1) + prm_scale * prm        with 0 <= prm_scale * prm < 1

so that a correct candidate always outranks a wrong one and the process reward model (PRM) only
orders candidates within each group (reference: min-over-steps PRM, prm_scale = 1/5).
Per query: sort by score (descending, stable), keep those with score > threshold, drop exact
duplicate texts (the first, best-scored copy stays), keep at most M.

M is either given (`max_per_query`) or, as in the reference, the smallest per-query cap whose
selected set reaches `target_size` candidates in total (the largest allowed cap, `max_cap`, if
none does). Optionally a gold (reference) solution joins each query's candidates with
correct=True and prm = 0, i.e. score 1.0, as the reference does.

Differences from the reference code (deliberate): duplicates are dropped before the cap, so a
duplicate never takes a slot of the M; ties keep input order (the reference shuffles first).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from engine.errors import RequestError

PRM_SCALE = 0.2  # reference: prm_score / 5
MAX_CAP = 64  # reference: per-query caps 1..64 are tried when searching M


@dataclass
class Candidate:
    """One sampled (or gold) solution of one query, already graded and PRM-scored."""

    query_id: Hashable
    text: str
    correct: bool
    prm: float = 0.0  # the PRM's aggregate over the steps (engine.PRM), expected in [0, 1]
    is_gold: bool = False

    @classmethod
    def gold(cls, query_id: Hashable, text: str, prm: float = 0.0) -> Candidate:
        """The reference solution as a candidate (reference: correct, PRM 0 -> score 1.0)."""
        return cls(query_id, text, True, prm, is_gold=True)


def candidate_score(c: Candidate, prm_scale: float = PRM_SCALE) -> float:
    """correct + prm_scale * prm; raises when the PRM term could reorder correct and wrong."""
    term = prm_scale * c.prm
    if not (0.0 <= term < 1.0):  # also rejects NaN
        raise RequestError(
            f"query {c.query_id!r}: prm_scale * prm = {prm_scale} * {c.prm} = {term} is outside "
            "[0, 1); correct candidates would no longer always outrank wrong ones"
        )
    return float(c.correct) + term


@dataclass
class RankedQuery:
    """One query's candidates, scored, sorted by score descending, exact duplicates removed.

    Everything a threshold/cap needs: the selection for (threshold t, cap M) is
    ranked[:min(n_above(t), M)], with n_above(t) = number of scores > t."""

    query_id: Hashable
    ranked: list[Candidate]
    scores: list[float]  # descending, aligned with ranked
    correct_prefix: list[int]  # correct_prefix[j] = correct among ranked[:j]; len + 1

    def n_above(self, threshold: float) -> int:
        # scores are descending: the first index whose -score >= -threshold is the count
        return bisect_left(self.scores, -threshold, key=lambda s: -s)


def rank_query(
    candidates: Sequence[Candidate], gold: Candidate | None = None, prm_scale: float = PRM_SCALE
) -> RankedQuery:
    """Score, stable-sort (descending) and de-duplicate one query's candidates (+ optional gold,
    appended last so that it ranks after sampled candidates of equal score)."""
    cands = list(candidates) + ([gold] if gold is not None else [])
    qids = {c.query_id for c in cands}
    if len(qids) > 1:
        raise RequestError(f"candidates of one query carry different query ids: {sorted(map(repr, qids))[:4]}")
    scored = sorted(((candidate_score(c, prm_scale), i, c) for i, c in enumerate(cands)), key=lambda t: (-t[0], t[1]))
    seen: set[str] = set()
    ranked, scores, prefix = [], [], [0]
    for s, _, c in scored:
        if c.text in seen:
            continue
        seen.add(c.text)
        ranked.append(c)
        scores.append(s)
        prefix.append(prefix[-1] + int(bool(c.correct)))
    qid = next(iter(qids)) if qids else None
    return RankedQuery(qid, ranked, scores, prefix)


def cap_for_target(n_above: Sequence[int], target_size: int, max_cap: int = MAX_CAP) -> int:
    """Smallest per-query cap M in 1..max_cap with sum_i min(n_i, M) >= target_size
    (max_cap when none reaches it), as the reference's search over `max_samples`."""
    if target_size < 0:
        raise RequestError(f"target_size must be >= 0, got {target_size}")
    if max_cap < 1:
        raise RequestError(f"max_cap must be >= 1, got {max_cap}")
    lo, hi = 1, max_cap
    if sum(min(n, hi) for n in n_above) < target_size:
        return max_cap
    while lo < hi:  # the size is non-decreasing in M: binary search for the first M reaching it
        mid = (lo + hi) // 2
        if sum(min(n, mid) for n in n_above) >= target_size:
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
        cap = cap_for_target(n_above, target_size, max_cap)
    else:
        cap = max_per_query
    selected, per_query = [], []
    for q, n in zip(ranked, n_above):
        k = n if cap is None else min(n, cap)
        selected.extend(q.ranked[:k])
        per_query.append((k, q.correct_prefix[k]))
    return Selection(selected, per_query, threshold, cap)


def select(
    groups: Sequence[Sequence[Candidate]],
    threshold: float,
    *,
    max_per_query: int | None = None,
    target_size: int | None = None,
    max_cap: int = MAX_CAP,
    prm_scale: float = PRM_SCALE,
    golds: Sequence[Candidate | None] | None = None,
) -> Selection:
    """Select training data from per-query candidate groups (groups[i] = candidates of query i).

    threshold: keep candidates with score > threshold (score = correct + prm_scale * prm).
    max_per_query: fixed cap M; or target_size: M = smallest cap reaching that many selected in
    total (capped at max_cap); neither: no cap. golds: optional gold candidate per query
    (Candidate.gold(...)), aligned with groups, None entries allowed.
    """
    _check_cap_options(max_per_query, target_size)
    if golds is not None and len(golds) != len(groups):
        raise RequestError(f"golds has {len(golds)} entries for {len(groups)} queries")
    ranked = [rank_query(g, golds[i] if golds is not None else None, prm_scale) for i, g in enumerate(groups)]
    return select_ranked(ranked, threshold, max_per_query=max_per_query, target_size=target_size, max_cap=max_cap)
