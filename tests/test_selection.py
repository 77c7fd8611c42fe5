"""bstar.selection: hand-computed cases and a naive re-implementation (tests/reference_selection.py)."""

import random

import pytest
from reference_selection import C, naive_select

from bstar.selection import Candidate, candidate_score, cap_for_target, select
from engine.errors import RequestError


def test_selection_threshold_and_order():
    g = [C(0, "w-hi", 0, 0.95), C(0, "c-lo", 1, 0.1), C(0, "w-lo", 0, 0.2), C(0, "c-hi", 1, 0.9)]
    # scores: 0.19, 1.02, 0.04, 1.18
    sel = select([g], threshold=1.05)
    assert [c.text for c in sel.selected] == ["c-hi"]
    assert sel.per_query == [(1, 1)]
    sel = select([g], threshold=0.99)
    assert [c.text for c in sel.selected] == ["c-hi", "c-lo"]
    sel = select([g], threshold=0.1)
    assert [c.text for c in sel.selected] == ["c-hi", "c-lo", "w-hi"]
    assert sel.per_query == [(3, 2)] and sel.size == 3 and sel.accuracy == pytest.approx(2 / 3)
    sel = select([g], threshold=-1.0)
    assert [c.text for c in sel.selected] == ["c-hi", "c-lo", "w-hi", "w-lo"]
    assert select([g], threshold=1.5).per_query == [(0, 0)]


def test_correct_always_outranks_wrong():
    rng = random.Random(1)
    for _ in range(50):
        g = [C(0, f"t{j}", rng.random() < 0.5, rng.random() * 0.999) for j in range(12)]
        for scale in (0.2, 0.5, 1.0):
            ranked = select([g], -1.0, prm_scale=scale).selected
            flags = [c.correct for c in ranked]
            assert flags == sorted(flags, reverse=True)  # all correct first
            # within each group the PRM orders them
            for grp in (True, False):
                prms = [c.prm for c in ranked if c.correct == grp]
                assert prms == sorted(prms, reverse=True)


def test_prm_term_must_stay_below_one():
    with pytest.raises(RequestError, match="outside"):
        candidate_score(C(0, "x", 0, 5.0), prm_scale=0.2)  # 5 * 0.2 = 1: could tie a correct one
    with pytest.raises(RequestError):
        candidate_score(C(0, "x", 0, -0.5))
    with pytest.raises(RequestError):
        candidate_score(C(0, "x", 0, float("nan")))


def test_duplicates_dropped_before_cap():
    g = [C(0, "A", 1, 0.9), C(0, "A", 1, 0.9), C(0, "B", 1, 0.5), C(0, "C", 0, 0.5)]
    sel = select([g], threshold=0.0, max_per_query=2)
    assert [c.text for c in sel.selected] == ["A", "B"]
    assert sel.per_query == [(2, 2)] and sel.cap == 2
    sel = select([g], threshold=0.0)
    assert [c.text for c in sel.selected] == ["A", "B", "C"]


def test_cap_m_limits_each_query():
    groups = [[C(q, f"{q}-{j}", j % 2, 0.1 * j) for j in range(6)] for q in range(3)]
    sel = select(groups, threshold=-1, max_per_query=4)
    assert sel.per_query == [(4, 3)] * 3  # 1,3,5 correct rank first, then 4, (2, 0 cut)
    assert [c.text for c in sel.selected[:4]] == ["0-5", "0-3", "0-1", "0-4"]


def test_auto_cap_reaches_target_size():
    groups = [
        [C(0, f"a{j}", 1, 0.1) for j in range(5)],
        [C(1, "b0", 1, 0.1)],
        [C(2, f"c{j}", 0, 0.5) for j in range(3)],
    ]
    # candidates above threshold -1: n = [5, 1, 3]; size(M) = 3, 5, 7, 8, 9 for M = 1..5
    for target, want_m, want_size in [(0, 1, 3), (3, 1, 3), (4, 2, 5), (6, 3, 7), (7, 3, 7), (9, 5, 9), (100, 64, 9)]:
        sel = select(groups, threshold=-1, target_size=target)
        assert (sel.cap, sel.size) == (want_m, want_size), target
    sel = select(groups, threshold=-1, target_size=100, max_cap=4)
    assert (sel.cap, sel.size) == (4, 8)
    assert cap_for_target([5, 1, 3], 6) == 3


def test_gold_candidate_joins_and_dedups():
    g = [C(7, "s1", 1, 0.4), C(7, "s2", 0, 0.9), C(7, "gold text", 1, 0.1)]
    gold = Candidate.gold(7, "gold text")
    sel = select([g], threshold=0.5, golds=[gold])
    # the sampled copy of the gold text (score 1.02) outranks the gold (1.0); one copy kept
    assert [c.text for c in sel.selected] == ["s1", "gold text"]
    assert not sel.selected[1].is_gold
    gold2 = Candidate.gold(8, "only gold")
    sel = select([[], [C(9, "x", 0, 0.5)]], threshold=0.5, golds=[gold2, None])
    assert [c.text for c in sel.selected] == ["only gold"]
    assert sel.per_query == [(1, 1), (0, 0)]
    # gold ranks after sampled correct ones of higher PRM, before wrong ones
    g = [C(3, "w", 0, 0.99), C(3, "c", 1, 0.2)]
    sel = select([g], threshold=-1, golds=[Candidate.gold(3, "G")])
    assert [c.text for c in sel.selected] == ["c", "G", "w"]


def test_selection_matches_naive_on_random_data():
    rng = random.Random(2)
    for trial in range(40):
        groups = []
        for q in range(rng.randint(1, 8)):
            groups.append(
                [
                    C(q, f"t{rng.randint(0, 6)}", rng.random() < 0.4, round(rng.random(), 3))
                    for _ in range(rng.randint(0, 10))
                ]
            )
        golds = (
            [Candidate.gold(q, f"t{rng.randint(0, 8)}") if rng.random() < 0.5 else None for q in range(len(groups))]
            if trial % 2
            else None
        )
        # identical text must mean identical grade and score for dedup to be well defined
        for g in groups:
            info = {}
            for c in g:
                c.correct, c.prm = info.setdefault(c.text, (c.correct, c.prm))
        thr = rng.choice([-1.0, 0.0, 0.1, 0.5, 1.0, 1.1])
        for kw in ({}, {"max_per_query": rng.randint(1, 4)}, {"target_size": rng.randint(0, 30)}):
            sel = select(groups, thr, golds=golds, max_cap=6, **kw)
            want, m = naive_select(
                groups, thr, cap=kw.get("max_per_query"), target=kw.get("target_size"), max_cap=6, golds=golds
            )
            assert [(c.query_id, c.text) for c in sel.selected] == [(c.query_id, c.text) for g in want for c in g]
            assert sel.per_query == [(len(g), sum(c.correct for c in g)) for g in want]
            assert sel.cap == m


def test_selection_errors():
    with pytest.raises(RequestError, match="different query ids"):
        select([[C(0, "a", 1, 0.1), C(1, "b", 1, 0.1)]], 0.0)
    with pytest.raises(RequestError, match="not both"):
        select([[]], 0.0, max_per_query=2, target_size=3)
    with pytest.raises(RequestError):
        select([[]], 0.0, max_per_query=0)
    with pytest.raises(RequestError, match="golds"):
        select([[]], 0.0, golds=[None, None])
