"""bstar.loop.search: the configuration search against hand-computed balance scores and against selection run
at every grid pair."""

import random

import numpy as np
import pytest
from reference_selection import C, hand_samples, naive_select

from bstar.engine.errors import RequestError
from bstar.loop.balance import mean_balance_score
from bstar.loop.search import SearchConfig, _Grid, choose_subset, search_config, search_threshold
from bstar.loop.selection import Candidate, cap_for_target, rank_all


def test_search_picks_hand_computed_best_pair():
    cfg = SearchConfig(thresholds=(0.0, 0.1, 1.6), n_star=2, target_per_query=None)
    res = search_config(hand_samples(), cfg)
    # n* = 2; bs = min(c/2, 1) * c/s per query with something selected, mean over those queries
    want = {
        (0.5, 0.0): (0.5 * 1 / 3 + 0) / 2,  # q0 s3 c1 (1.8, 0.9, 0.2), q1 s2 c0 (0.4, 0.1)
        (0.5, 0.1): (0.5 * 1 / 3 + 0) / 2,  # q0 s3 c1, q1 s1 c0 (0.4)
        (0.5, 1.6): 0.5,  # q0 s1 c1; q1 has nothing selected and is not in the mean
        (1.0, 0.0): (2 / 3 + 0.5 * 0.5) / 2,  # q0 s3 c2, q1 s2 c1
        (1.0, 0.1): (1.0 + 0.5 * 0.5) / 2,  # h scores 0.5 / 5 = 0.1, not > 0.1: q0 s2 c2
        (1.0, 1.6): 0.5,  # q0 s1 c1 (1.9)
    }
    got = {(r.temperature, r.threshold): r.balance_score for r in res.table}
    assert got == pytest.approx(want)
    assert [(r.temperature, r.threshold) for r in res.table] == list(want)  # grid order
    assert (res.temperature, res.threshold) == (1.0, 0.1)
    assert res.balance_score == pytest.approx(0.625)
    assert (res.selected_size, res.selected_acc) == (4, 0.75)
    cfg = SearchConfig(thresholds=(0.0, 0.85), n_star=2, target_per_query=None)
    res = search_config(hand_samples(), cfg)
    assert (res.temperature, res.threshold) == (1.0, 0.85)  # q0 s2 c2 -> 1, q1 s1 c1 -> 0.5
    assert res.balance_score == pytest.approx(0.75) and (res.selected_size, res.selected_acc) == (3, 1.0)


def test_search_ties_go_to_first_grid_pair():
    s = hand_samples()
    s[0.7] = s[1.0]
    s[0.9] = s[1.0]
    res = search_config(s, SearchConfig(thresholds=(0.85, 0.87, 0.89), n_star=2, target_per_query=None))
    # thresholds 0.85, 0.87, 0.89 select the same at T=0.7, 0.9, 1.0 (scores 1.9, 1.5 | 1.3, 0.8)
    assert (res.temperature, res.threshold) == (0.7, 0.85)
    assert res.balance_score == pytest.approx(0.75)
    assert sum(r.balance_score == res.balance_score for r in res.table) == 9


def test_search_matches_select_on_random_data():
    rng = random.Random(3)
    n_q = 12
    samples = {}
    for t in (0.6, 0.8, 1.0):
        p = 0.2 + 0.5 * t
        groups = []
        for q in range(n_q):
            g, info = [], {}
            for _ in range(rng.randint(0, 9)):
                text = f"q{q}-{rng.randint(0, int(12 * t))}"
                ok, prm = info.setdefault(text, (rng.random() < p, round(rng.uniform(-6, 6), 2)))
                g.append(C(q, text, ok, prm))
            groups.append(g)
        samples[t] = groups
    golds = [Candidate.gold(q, f"gold{q}") if q % 3 else None for q in range(n_q)]
    for kw in (
        {"target_per_query": 25 / 12},
        {"target_per_query": None, "max_per_query": 3},
        {"target_per_query": None},
    ):
        cfg = SearchConfig(
            thresholds=(-1.0, -0.4, 0.0, 0.05, 0.1, 0.15, 0.99, 1.0, 1.1, 1.15), n_star=3, max_cap=8, **kw
        )
        target = None if cfg.target_per_query is None else 25
        res = search_config(samples, cfg, golds=golds)
        best = None
        for t in sorted(samples):
            for thr in cfg.thresholds:
                want, m = naive_select(samples[t], thr, cap=cfg.max_per_query, target=target, max_cap=8, golds=golds)
                pq = [(len(g), sum(c.correct for c in g)) for g in want]
                bs = mean_balance_score(pq, 3)
                row = next(r for r in res.table if (r.temperature, r.threshold) == (t, thr))
                assert row.balance_score == pytest.approx(bs, abs=1e-12)
                assert row.selected_size == sum(s for s, _ in pq) and row.cap == m
                if best is None or bs > best[0] + 1e-12:
                    best = (bs, t, thr)
        assert (res.temperature, res.threshold) == best[1:]
        # the full-pool pass at one temperature is the same scan
        pool = search_threshold(samples[1.0], cfg, golds=golds, target_per_query=cfg.target_per_query)
        rows = [r for r in res.table if r.temperature == 1.0]
        assert [(r.threshold, r.balance_score, r.cap, r.selected_size) for r in pool.table] == [
            (r.threshold, r.balance_score, r.cap, r.selected_size) for r in rows
        ]


def test_search_config_defaults_are_reference_values():
    cfg = SearchConfig()
    assert cfg.temperatures[0] == 0.5 and cfg.temperatures[-1] == 1.2 and len(cfg.temperatures) == 15
    assert cfg.temperatures[9] == 0.95
    # the reference's loop: h = -1.0; h += 0.01 while h <= 1.0 -> 200 values, 1.00 never reached
    assert cfg.thresholds[0] == -1.0 and cfg.thresholds[-1] == 0.99 and len(cfg.thresholds) == 200
    assert cfg.thresholds[160] == 0.6
    assert (cfg.k, cfg.n_star, cfg.subset_size, cfg.target_per_query, cfg.prm_divisor) == (64, 8, 1000, 3.55, 5.0)
    with pytest.raises(RequestError):
        SearchConfig(max_per_query=4)  # target_per_query is set too
    with pytest.raises(RequestError):
        SearchConfig(thresholds=())
    with pytest.raises(RequestError, match="same queries"):
        search_config({0.5: [[]], 1.0: [[], []]}, SearchConfig(target_per_query=None))


def test_vectorised_cap_matches_pure():
    rng = random.Random(4)
    for _ in range(200):
        groups = [
            [C(q, f"t{rng.randint(0, 5)}", 1, 0.0) for _ in range(rng.randint(0, 12))]
            for q in range(rng.randint(1, 15))
        ]
        ranked = rank_all(groups)
        thr, target, max_cap = rng.choice([-1.0, 0.5, 1.5]), rng.randint(0, 120), rng.randint(1, 15)
        n = [q.n_above(thr) for q in ranked]
        g = _Grid(ranked)
        assert g.cap_for_target(np.array(n), target, max_cap) == cap_for_target(ranked, n, target, max_cap)


def test_choose_subset():
    a = choose_subset(100, 10, seed=5)
    assert a == choose_subset(100, 10, seed=5) and len(set(a)) == 10 and a == sorted(a)
    assert a != choose_subset(100, 10, seed=6)
    assert choose_subset(5, 10, seed=0) == [0, 1, 2, 3, 4]
