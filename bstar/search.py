"""B-STaR configuration search: the (temperature, threshold) whose selection balances best.

Step 1 of every iteration. On a fixed subset of training queries, K candidates per query are
sampled once per temperature, graded and PRM-scored once; then for every (temperature,
threshold) pair the selection (bstar.selection) is applied and its mean balance score
(bstar.balance) computed. Nothing is re-generated per threshold: each query's candidates are
ranked once per temperature and a threshold only moves a cut-off in that ranking, so the whole
reference grid (15 temperatures x 201 thresholds x 1000 queries x 64 samples) takes about a
second on one CPU core with numpy.

Ties go to the first pair in grid order (lowest temperature, then lowest threshold), as in the
reference (strict '>' while scanning thresholds upwards, then list.index(max) over temperatures).
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from bstar.selection import MAX_CAP, PRM_SCALE, Candidate, RankedQuery, rank_query
from engine.errors import BStarError, RequestError


def grid(start: float, stop: float, step: float) -> tuple[float, ...]:
    """start, start + step, ... up to stop (both ends included when step divides the range), each
    rounded to 4 decimals."""
    n = int(round((stop - start) / step))
    return tuple(round(start + i * step, 4) for i in range(n + 1))


def parse_grid(spec: str) -> list[float]:
    """A grid from the command line: 'start:stop:step' (see grid) or a comma-separated list of numbers.
    An empty or malformed grid raises BStarError saying why."""
    how = "use start:stop:step (step > 0, stop >= start) or a comma-separated list of numbers"
    try:
        if ":" in spec:
            start, stop, step = (float(x) for x in spec.split(":"))
            if not all(math.isfinite(x) for x in (start, stop, step)):
                raise ValueError
            if step <= 0 or stop < start:
                why = "step must be > 0" if step <= 0 else f"stop {stop:g} is below start {start:g}"
                raise BStarError(f"bad grid {spec!r}: {why}; {how}")
            return list(grid(start, stop, step))
        values = [float(x) for x in spec.split(",")]
        if not all(math.isfinite(x) for x in values):
            raise ValueError
        return values
    except ValueError:
        raise BStarError(f"bad grid {spec!r}: {how}") from None


@dataclass
class SearchConfig:
    """Grid and selection options of the configuration search; defaults are the reference's.

    target_size is the reference's `valid_sample_size` for its 1000-query subset (3.55 selected
    per query, gold included); scale it with subset_size. Give max_per_query (a fixed M)
    instead to skip the search for M (then set target_size=None)."""

    temperatures: tuple[float, ...] = grid(0.50, 1.20, 0.05)  # 15 values
    thresholds: tuple[float, ...] = grid(-1.00, 1.00, 0.01)  # 201 values (reference loop)
    k: int = 64  # samples per query and temperature
    n_star: int = 8  # balance-score saturation
    subset_size: int = 1000  # training queries the search runs on
    target_size: int | None = 3550  # auto-M: smallest cap reaching this many selected
    max_per_query: int | None = None
    max_cap: int = MAX_CAP
    prm_scale: float = PRM_SCALE

    def __post_init__(self):
        if not self.temperatures or not self.thresholds:
            raise RequestError("the search grid needs at least one temperature and one threshold")
        if any(t < 0 for t in self.temperatures):
            raise RequestError(f"temperatures must be >= 0, got {self.temperatures}")
        for name in ("k", "n_star", "subset_size", "max_cap"):
            if getattr(self, name) < 1:
                raise RequestError(f"SearchConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_per_query is not None and self.target_size is not None:
            raise RequestError("SearchConfig: give either max_per_query or target_size, not both")


@dataclass
class SearchRow:
    temperature: float
    threshold: float
    balance_score: float
    selected_size: int
    selected_acc: float
    cap: int | None


@dataclass
class SearchResult:
    temperature: float
    threshold: float
    balance_score: float
    cap: int | None
    selected_size: int
    selected_acc: float
    table: list[SearchRow] = field(default_factory=list)  # every grid pair, grid order


def choose_subset(n_queries: int, subset_size: int, seed: int) -> list[int]:
    """Indices of the fixed random query subset (all queries when there are fewer), sorted."""
    if subset_size >= n_queries:
        return list(range(n_queries))
    return sorted(random.Random(seed).sample(range(n_queries), subset_size))


def _cap_for_target(n: np.ndarray, target_size: int, max_cap: int) -> int:
    """selection.cap_for_target, vectorised: size(M) = sum_i min(n_i, M) for all M at once."""
    counts = np.bincount(n)  # [L + 1] queries with n_i = v
    values = np.arange(len(counts))
    caps = np.arange(1, max_cap + 1)
    sizes = (np.minimum(values[None, :], caps[:, None]) * counts).sum(axis=1)  # [max_cap]
    reached = np.flatnonzero(sizes >= target_size)
    return int(caps[reached[0]]) if len(reached) else max_cap


class _Grid:
    """One temperature's ranked queries as padded arrays: row i = query i."""

    def __init__(self, ranked: Sequence[RankedQuery]):
        q = len(ranked)
        width = max((len(r.scores) for r in ranked), default=0)
        self.scores = np.full((q, max(width, 1)), -np.inf)  # [Q, L] descending per row
        self.correct_prefix = np.zeros((q, width + 1), dtype=np.int64)  # [Q, L + 1]
        for i, r in enumerate(ranked):
            n = len(r.scores)
            self.scores[i, :n] = r.scores
            self.correct_prefix[i, : n + 1] = r.correct_prefix
            self.correct_prefix[i, n + 1 :] = r.correct_prefix[-1]
        self.rows = np.arange(q)

    def evaluate(
        self, threshold: float, n_star: int, max_per_query: int | None, target_size: int | None, max_cap: int
    ) -> tuple[float, int, float, int | None]:
        """(mean balance, selected size, selected accuracy, cap) of one threshold."""
        n = (self.scores > threshold).sum(axis=1)  # [Q] candidates above
        if target_size is not None:
            cap = _cap_for_target(n, target_size, max_cap)
        else:
            cap = max_per_query
        s = n if cap is None else np.minimum(n, cap)  # [Q] selected
        c = self.correct_prefix[self.rows, s]  # [Q] selected and correct
        bs = np.where(s > 0, np.minimum(c / n_star, 1.0) * (c / np.maximum(s, 1)), 0.0)
        size = int(s.sum())
        acc = float(c.sum() / size) if size else 0.0
        return float(bs.mean()) if len(bs) else 0.0, size, acc, cap


def search_config(
    samples: Mapping[float, Sequence[Sequence[Candidate]]],
    config: SearchConfig | None = None,
    golds: Sequence[Candidate | None] | None = None,
    progress: bool = False,
) -> SearchResult:
    """Best (temperature, threshold) by mean balance score, and the full table.

    samples: temperature -> per-query candidate lists (the same queries, in the same order, at
    every temperature), graded and PRM-scored. The temperatures searched are the keys of
    `samples` (ascending); the thresholds come from config. golds: optional gold candidate per
    query, added at every temperature (reference behaviour).
    """
    config = config or SearchConfig()
    if not samples:
        raise RequestError("configuration search got no samples")
    temps = sorted(samples)
    counts = {len(samples[t]) for t in temps}
    if len(counts) != 1:
        raise RequestError(f"every temperature needs the same queries; got query counts {sorted(counts)}")
    n_queries = counts.pop()
    if golds is not None and len(golds) != n_queries:
        raise RequestError(f"golds has {len(golds)} entries for {n_queries} queries")

    table: list[SearchRow] = []
    best: SearchRow | None = None
    for t in tqdm(temps, desc="config search", unit="temp", disable=not progress):
        grid = _Grid(
            [rank_query(g, golds[i] if golds is not None else None, config.prm_scale) for i, g in enumerate(samples[t])]
        )
        for thr in config.thresholds:
            bs, size, acc, cap = grid.evaluate(
                thr, config.n_star, config.max_per_query, config.target_size, config.max_cap
            )
            row = SearchRow(t, thr, bs, size, acc, cap)
            table.append(row)
            if best is None or row.balance_score > best.balance_score:
                best = row
    return SearchResult(
        best.temperature, best.threshold, best.balance_score, best.cap, best.selected_size, best.selected_acc, table
    )
