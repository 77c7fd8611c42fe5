"""B-STaR configuration search, as the reference does it in two places.

1. Temperature (reference determine_hyper.py): on a fixed subset of training queries, K candidates per
   query are sampled once per temperature, graded and PRM-scored once; for every (temperature,
   threshold) pair the selection (bstar.loop.selection, cap grown to `target_per_query` x queries) and its
   mean balance score (bstar.loop.balance) are computed. The best pair's temperature is used; its threshold
   is recorded but, as in the reference, not used.
2. Threshold and cap (reference metric_modiacc_auto.py): on the full candidate pool sampled at that
   temperature, every threshold of the grid is tried again with the cap grown until the pool's target
   size (`target_per_query` x training queries; the reference: 67,500 / 7,500 = 9), and the threshold with
   the best balance is the one the training set is selected with (`search_threshold`).

Nothing is re-generated per threshold: each query's candidates are ranked once and a threshold only
moves a cut-off in that ranking, so the whole reference grid (15 temperatures x 200 thresholds x 1000
queries x 64 samples) takes about a second on one CPU core with numpy.

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

from bstar.engine.errors import RequestError
from bstar.errors import BStarError
from bstar.loop.selection import MAX_CAP, PRM_DIVISOR, Candidate, RankedQuery, rank_all


def grid(start: float, stop: float, step: float) -> tuple[float, ...]:
    """start, start + step, ... up to stop (both ends included when step divides the range), each
    rounded to 4 decimals."""
    n = int(round((stop - start) / step))
    return tuple(round(start + i * step, 4) for i in range(n + 1))


MAX_GRID = 10_000  # values in a search grid from the command line or a config


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
            if (stop - start) / step >= MAX_GRID:  # (before building it: 0:1e9:1e-9 is 10^18 values)
                raise BStarError(f"bad grid {spec!r}: more than {MAX_GRID} values; use a larger step")
            return list(grid(start, stop, step))
        values = [float(x) for x in spec.split(",")]
        if not all(math.isfinite(x) for x in values):
            raise ValueError
        return values
    except ValueError:
        raise BStarError(f"bad grid {spec!r}: {how}") from None


def format_grid(values) -> str:
    """A grid as parse_grid reads it: 'start:stop:step' when the values are one (three or more), else a
    comma-separated list."""
    values = [float(x) for x in values]
    if len(values) >= 3:
        step = round(values[1] - values[0], 4)
        if step > 0 and list(grid(values[0], values[-1], step)) == values:
            return f"{values[0]:g}:{values[-1]:g}:{step:g}"
    return ",".join(f"{x:g}" for x in values)


# Reference grids: temperatures 0.50..1.20 by 0.05 (train_bstar.sh), thresholds -1.00..0.99 by 0.01 (the
# reference's `h += 0.01; if h > 1.0: break` loop tries 200 values; 1.00 is never reached).
REFERENCE_TEMPERATURES = grid(0.50, 1.20, 0.05)
REFERENCE_THRESHOLDS = grid(-1.00, 0.99, 0.01)


@dataclass
class SearchConfig:
    """Grid and selection options of the configuration search; defaults are the reference's.

    target_per_query: the selection's target size per query on the searched subset (the reference's
    `valid_sample_size` 3,550 for its 1,000-query subset, gold included); max_per_query (a fixed M)
    instead skips the search for M (then set target_per_query=None)."""

    temperatures: tuple[float, ...] = REFERENCE_TEMPERATURES  # 15 values
    thresholds: tuple[float, ...] = REFERENCE_THRESHOLDS  # 200 values
    k: int = 64  # samples per query and temperature
    n_star: int = 8  # balance-score saturation
    subset_size: int = 1000  # training queries the search runs on
    target_per_query: float | None = 3.55
    max_per_query: int | None = None
    max_cap: int = MAX_CAP
    prm_divisor: float = PRM_DIVISOR

    def __post_init__(self):
        if not self.temperatures or not self.thresholds:
            raise RequestError("the search grid needs at least one temperature and one threshold")
        if any(t < 0 for t in self.temperatures):
            raise RequestError(f"temperatures must be >= 0, got {self.temperatures}")
        for name in ("k", "n_star", "subset_size", "max_cap"):
            if getattr(self, name) < 1:
                raise RequestError(f"SearchConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_per_query is not None and self.target_per_query is not None:
            raise RequestError("SearchConfig: give either max_per_query or target_per_query, not both")


def target_size(target_per_query: float | None, n_queries: int) -> int | None:
    """The selection's target size for n_queries (None: no target)."""
    return None if target_per_query is None else int(round(target_per_query * n_queries))


@dataclass
class SearchRow:
    temperature: float | None
    threshold: float
    balance_score: float
    selected_size: int
    selected_acc: float
    cap: int | None


@dataclass
class SearchResult:
    temperature: float | None
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


class _Grid:
    """Ranked queries as padded arrays (row i = query i), for many thresholds at once."""

    def __init__(self, ranked: Sequence[RankedQuery]):
        q = len(ranked)
        width = max((len(r.scores) for r in ranked), default=0)
        self.scores = np.full((q, max(width, 1)), -np.inf)  # [Q, L] descending per row
        self.unique = np.zeros((q, width + 1), dtype=np.int64)  # [Q, L + 1] distinct among the first j
        self.correct = np.zeros((q, width + 1), dtype=np.int64)  # [Q, L + 1] distinct correct among them
        for i, r in enumerate(ranked):
            n = len(r.scores)
            self.scores[i, :n] = r.scores
            self.unique[i, : n + 1] = r.unique_prefix
            self.unique[i, n + 1 :] = r.unique_prefix[-1]
            self.correct[i, : n + 1] = r.correct_prefix
            self.correct[i, n + 1 :] = r.correct_prefix[-1]
        self.rows = np.arange(q)

    def cap_for_target(self, n: np.ndarray, target: int, max_cap: int) -> int:
        """selection.cap_for_target for all M at once: size(M) = sum_i unique_i[min(n_i, M)]."""
        caps = np.arange(1, max_cap + 1)
        k = np.minimum(n[None, :], caps[:, None])  # [max_cap, Q]
        sizes = self.unique[self.rows[None, :], k].sum(axis=1)
        reached = np.flatnonzero(sizes >= target)
        return int(caps[reached[0]]) if len(reached) else max_cap

    def evaluate(
        self, threshold: float, n_star: int, max_per_query: int | None, target: int | None, max_cap: int
    ) -> tuple[float, int, float, int | None]:
        """(mean balance over queries with something selected, selected size, selected accuracy, cap)."""
        n = (self.scores > threshold).sum(axis=1)  # [Q] candidates above
        cap = self.cap_for_target(n, target, max_cap) if target is not None else max_per_query
        k = n if cap is None else np.minimum(n, cap)
        s = self.unique[self.rows, k]  # [Q] selected (after de-duplication)
        c = self.correct[self.rows, k]  # [Q] selected and correct
        present = s > 0
        bs = np.minimum(c / n_star, 1.0) * (c / np.maximum(s, 1))
        size = int(s.sum())
        acc = float(c.sum() / size) if size else 0.0
        return (float(bs[present].mean()) if present.any() else 0.0), size, acc, cap


def _scan(
    g: _Grid, temperature, thresholds, n_star, max_per_query, target, max_cap
) -> tuple[list[SearchRow], SearchRow]:
    rows, best = [], None
    for thr in thresholds:
        bs, size, acc, cap = g.evaluate(thr, n_star, max_per_query, target, max_cap)
        row = SearchRow(temperature, thr, bs, size, acc, cap)
        rows.append(row)
        if best is None or row.balance_score > best.balance_score:
            best = row
    return rows, best


def _result(best: SearchRow, table: list[SearchRow]) -> SearchResult:
    return SearchResult(
        best.temperature, best.threshold, best.balance_score, best.cap, best.selected_size, best.selected_acc, table
    )


def search_config(
    samples: Mapping[float, Sequence[Sequence[Candidate]]],
    config: SearchConfig | None = None,
    golds: Sequence[Candidate | None] | None = None,
    progress: bool = False,
) -> SearchResult:
    """Best (temperature, threshold) by mean balance score on the subset, and the full table.

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
    target = target_size(config.target_per_query, n_queries)
    table: list[SearchRow] = []
    best: SearchRow | None = None
    for t in tqdm(temps, desc="config search", unit="temp", disable=not progress):
        g = _Grid(rank_all(samples[t], golds, config.prm_divisor))
        rows, row = _scan(g, t, config.thresholds, config.n_star, config.max_per_query, target, config.max_cap)
        table += rows
        if best is None or row.balance_score > best.balance_score:
            best = row
    return _result(best, table)


def search_threshold(
    groups: Sequence[Sequence[Candidate]],
    config: SearchConfig,
    golds: Sequence[Candidate | None] | None = None,
    target_per_query: float | None = None,
) -> SearchResult:
    """The reference's full-pool pass (metric_modiacc_auto.py): the threshold of config.thresholds whose
    selection from `groups` (cap grown to target_per_query x queries, or config.max_per_query) has the best
    mean balance score; ties to the lowest threshold. temperature is None in the result."""
    target = target_size(target_per_query, len(groups))
    g = _Grid(rank_all(groups, golds, config.prm_divisor))
    cap = None if target is not None else config.max_per_query
    rows, best = _scan(g, None, config.thresholds, config.n_star, cap, target, config.max_cap)
    return _result(best, rows)
