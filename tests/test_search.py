"""bstar.search: the configuration search against hand-computed balance scores and against selection run
at every grid pair."""

import random

import numpy as np
import pytest
from reference_selection import C, hand_samples, naive_select

from bstar.balance import mean_balance_score
from bstar.search import SearchConfig, _cap_for_target, choose_subset, search_config
from bstar.selection import Candidate, cap_for_target
from engine.errors import RequestError


def test_search_picks_hand_computed_best_pair():
    cfg = SearchConfig(thresholds=(0.0, 0.1, 1.12), n_star=2, target_size=None)
    res = search_config(hand_samples(), cfg)
    # n* = 2; bs = min(c/2, 1) * c/s per query, mean of the two queries
    want = {
        (0.5, 0.0): (0.5 * 1 / 3 + 0) / 2,  # q0 s3 c1, q1 s2 c0
        (0.5, 0.1): (0.5 * 0.5 + 0) / 2,  # q0 s2 c1, q1 s0
        (0.5, 1.12): (0.5 + 0) / 2,  # q0 s1 c1
        (1.0, 0.0): (2 / 3 + 0.5 * 0.5) / 2,  # q0 s3 c2, q1 s2 c1
        (1.0, 0.1): (1.0 + 0.25) / 2,  # q0 s2 c2, q1 s2 c1
        (1.0, 1.12): (0.5 + 0) / 2,  # q0 s1 c1, q1 s0
    }
    got = {(r.temperature, r.threshold): r.balance_score for r in res.table}
    assert got == pytest.approx(want)
    assert [(r.temperature, r.threshold) for r in res.table] == list(want)  # grid order
    assert (res.temperature, res.threshold) == (1.0, 0.1)
    assert res.balance_score == pytest.approx(0.625)
    assert (res.selected_size, res.selected_acc) == (4, 0.75)


def test_search_ties_go_to_first_grid_pair():
    s = hand_samples()
    s[0.7] = s[1.0]
    s[0.9] = s[1.0]
    res = search_config(s, SearchConfig(thresholds=(0.1, 0.12, 0.15), n_star=2, target_size=None))
    # thresholds 0.1, 0.12, 0.15 select the same at T=1.0 (scores 1.18, 1.10 | 1.06, 0.16)
    assert (res.temperature, res.threshold) == (0.7, 0.1)
    assert res.balance_score == pytest.approx(0.625)
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
                ok, prm = info.setdefault(text, (rng.random() < p, round(rng.random(), 2)))
                g.append(C(q, text, ok, prm))
            groups.append(g)
        samples[t] = groups
    golds = [Candidate.gold(q, f"gold{q}") if q % 3 else None for q in range(n_q)]
    for kw in ({"target_size": 25}, {"target_size": None, "max_per_query": 3}, {"target_size": None}):
        cfg = SearchConfig(thresholds=(-1.0, 0.0, 0.05, 0.1, 0.15, 0.99, 1.0, 1.1, 1.15), n_star=3, max_cap=8, **kw)
        res = search_config(samples, cfg, golds=golds)
        best = None
        for t in sorted(samples):
            for thr in cfg.thresholds:
                want, m = naive_select(
                    samples[t], thr, cap=cfg.max_per_query, target=cfg.target_size, max_cap=8, golds=golds
                )
                pq = [(len(g), sum(c.correct for c in g)) for g in want]
                bs = mean_balance_score(pq, 3)
                row = next(r for r in res.table if (r.temperature, r.threshold) == (t, thr))
                assert row.balance_score == pytest.approx(bs, abs=1e-12)
                assert row.selected_size == sum(s for s, _ in pq) and row.cap == m
                if best is None or bs > best[0] + 1e-12:
                    best = (bs, t, thr)
        assert (res.temperature, res.threshold) == best[1:]


def test_search_config_defaults_are_reference_values():
    cfg = SearchConfig()
    assert cfg.temperatures[0] == 0.5 and cfg.temperatures[-1] == 1.2 and len(cfg.temperatures) == 15
    assert cfg.temperatures[9] == 0.95
    assert cfg.thresholds[0] == -1.0 and cfg.thresholds[-1] == 1.0 and len(cfg.thresholds) == 201
    assert cfg.thresholds[150] == 0.5
    assert (cfg.k, cfg.n_star, cfg.subset_size, cfg.target_size, cfg.prm_scale) == (64, 8, 1000, 3550, 0.2)
    with pytest.raises(RequestError):
        SearchConfig(max_per_query=4)  # target_size is set too
    with pytest.raises(RequestError):
        SearchConfig(thresholds=())
    with pytest.raises(RequestError, match="same queries"):
        search_config({0.5: [[]], 1.0: [[], []]}, SearchConfig(target_size=None))


def test_vectorised_cap_matches_pure():
    rng = random.Random(4)
    for _ in range(300):
        n = [rng.randint(0, 12) for _ in range(rng.randint(0, 20))]
        target, max_cap = rng.randint(0, 150), rng.randint(1, 15)
        assert _cap_for_target(np.array(n, dtype=np.int64), target, max_cap) == cap_for_target(n, target, max_cap)


def test_choose_subset():
    a = choose_subset(100, 10, seed=5)
    assert a == choose_subset(100, 10, seed=5) and len(set(a)) == 10 and a == sorted(a)
    assert a != choose_subset(100, 10, seed=6)
    assert choose_subset(5, 10, seed=0) == [0, 1, 2, 3, 4]
