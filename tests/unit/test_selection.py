"""bstar.loop.selection: hand-computed cases on the logit scale, the reference's worked literal example (cap growth,
duplicates removed after the cap) and a naive re-implementation (tests/reference_selection.py)."""

import random

import pytest
from reference_selection import C, literal_example, naive_select

from bstar.engine.errors import RequestError
from bstar.loop.search import REFERENCE_THRESHOLDS, SearchConfig, search_threshold
from bstar.loop.selection import BROKEN, Candidate, candidate_score, cap_for_target, rank_all, select


def test_logit_scale_hand_computed():
    # score = correct + min step logit / 5
    g = [
        C(0, "right, bad step", 1, -7.0),  # 1 - 1.4 = -0.4
        C(0, "wrong, good steps", 0, 3.0),  # 0 + 0.6 = 0.6
        C(0, "right, good steps", 1, 2.0),  # 1 + 0.4 = 1.4
        C(0, "wrong, bad step", 0, -4.0),  # -0.8
        C(0, "no answer step", 0, BROKEN),  # -1.0: below every threshold of the grid
    ]
    assert [candidate_score(c) for c in g] == pytest.approx([-0.4, 0.6, 1.4, -0.8, -1.0])
    # a wrong candidate outranks a correct one
    assert [c.text for c in select([g], -1.0).selected] == [
        "right, good steps",
        "wrong, good steps",
        "right, bad step",
        "wrong, bad step",
    ]
    # and thresholds in [-1, 1) trade them
    assert [c.text for c in select([g], 0.0).selected] == ["right, good steps", "wrong, good steps"]
    assert [c.text for c in select([g], -0.5).selected] == ["right, good steps", "wrong, good steps", "right, bad step"]
    assert select([g], 0.6).per_query == [(1, 1)]  # 0.6 > 0.6 is false: strict
    assert select([g], 0.59).per_query == [(2, 1)]
    for thr in REFERENCE_THRESHOLDS:
        assert "no answer step" not in {c.text for c in select([g], thr).selected}
    with pytest.raises(RequestError, match="not finite"):
        candidate_score(C(0, "x", 0, float("nan")))
    # the probability scale: P(good) in [0, 1] can never reorder correct and wrong
    assert candidate_score(C(0, "x", 0, 0.99)) < candidate_score(C(0, "y", 1, 0.0))


def test_literal_example_threshold_research():
    """The reference's full-pool pass on the worked example, target 9 (3 per query): every threshold regime's
    cap, size and balance, and the chosen threshold 0.60 with M = 64 (the target is never reached)."""
    groups, golds = literal_example()
    cfg = SearchConfig(target_per_query=3.0)
    res = search_threshold(groups, cfg, golds=golds, target_per_query=3.0)
    assert len(res.table) == 200 and res.table[0].threshold == -1.0 and res.table[-1].threshold == 0.99
    regimes = [  # (first grid index, last, M, size, balance)
        (0, 59, 4, 10, 0.875 / 3),
        (60, 109, 4, 9, 0.305556),
        (110, 119, 5, 10, 0.270833),
        (120, 159, 5, 9, 0.302083),
        (160, 179, 64, 8, 1 / 3),
        (180, 189, 64, 7, 0.291667),
        (190, 199, 64, 6, 0.25),
    ]
    for lo, hi, m, size, bal in regimes:
        for row in res.table[lo : hi + 1]:
            assert (row.cap, row.selected_size) == (m, size), row
            assert row.balance_score == pytest.approx(bal, abs=1e-6), row
    assert (res.threshold, res.cap, res.selected_size, res.selected_acc) == (0.6, 64, 8, 1.0)
    assert res.balance_score == pytest.approx(1 / 3)
    sel = select(groups, res.threshold, max_per_query=res.cap, golds=golds)
    assert {c.text for c in sel.selected} == {
        "q1 step a -> 7",
        "gold one -> 7",
        "q1 step c -> 7",
        "gold two -> 5",
        "q2 step c -> 5",
        "q3 step a -> 12",
        "q3 step c -> 12",
        "gold three -> 12",
    }
    # Q3's kept "gold three -> 12" is the sampled copy (ranked 1.1); the gold (1.0) was the duplicate
    assert [c.is_gold for c in sel.selected if c.text == "gold three -> 12"] == [False]


def test_literal_example_dedup_after_cap():
    """Selections at given (threshold, M), as the reference's get_unique_trn_json(M, data, threshold)."""
    groups, golds = literal_example()

    def texts(thr, m):
        sel = select(groups, thr, max_per_query=m, golds=golds)
        by_q = {}
        for c in sel.selected:
            by_q.setdefault(c.query_id, []).append(c.text.split(" -> ")[0].replace("q1 ", "").replace("q2 ", ""))
        return by_q, sel.size

    got, size = texts(-1.0, 4)
    # Q1's second slot went to b (a duplicate of a) and Q3's fourth to the gold (a duplicate of b): 3 kept each
    assert got == {
        "Q1": ["step a", "gold one", "step c"],
        "Q2": ["gold two", "step c", "step b", "step a"],
        "Q3": ["q3 step a", "q3 step c", "gold three"],
    }
    assert size == 10
    assert texts(-0.4, 4)[1] == 9 and texts(0.1, 5)[1] == 10 and texts(0.2, 5)[1] == 9
    assert texts(0.1, 5)[0]["Q1"] == ["step a", "gold one", "step c", "step d"]
    assert texts(0.8, 64)[0] == {"Q1": ["step a", "gold one"], "Q2": ["gold two", "step c"],
                                 "Q3": ["q3 step a", "q3 step c", "gold three"]}  # fmt: skip
    assert texts(0.9, 64)[0]["Q2"] == ["gold two"]
    # the cap grows until the de-duplicated size reaches the target: at -1.0, M = 3 gives 8, M = 4 gives 10
    ranked = rank_all(groups, golds)
    n = [q.n_above(-1.0) for q in ranked]
    assert n == [5, 4, 5]
    assert [cap_for_target(ranked, n, t) for t in (3, 5, 8, 9, 10, 11, 12, 13)] == [1, 2, 3, 4, 4, 5, 5, 64]
    # de-duplicating before the cap would have reached 9 with M = 3
    assert select(groups, -1.0, target_size=9, golds=golds).cap == 4


def test_duplicates_use_cap_slots():
    g = [C(0, "A", 1, 4.5), C(0, "A", 1, 4.5), C(0, "B", 1, 2.5), C(0, "C", 0, 2.5)]
    sel = select([g], threshold=0.0, max_per_query=2)
    assert [c.text for c in sel.selected] == ["A"]
    assert sel.per_query == [(1, 1)] and sel.cap == 2
    assert [c.text for c in select([g], threshold=0.0, max_per_query=3).selected] == ["A", "B"]
    assert [c.text for c in select([g], threshold=0.0).selected] == ["A", "B", "C"]


def test_cap_m_limits_each_query():
    groups = [[C(q, f"{q}-{j}", j % 2, 0.5 * j) for j in range(6)] for q in range(3)]
    sel = select(groups, threshold=-1, max_per_query=4)
    assert sel.per_query == [(4, 3)] * 3  # 1,3,5 correct rank first, then 4, (2, 0 cut)
    assert [c.text for c in sel.selected[:4]] == ["0-5", "0-3", "0-1", "0-4"]


def test_auto_cap_reaches_target_size():
    groups = [
        [C(0, f"a{j}", 1, 0.5) for j in range(5)],
        [C(1, "b0", 1, 0.5)],
        [C(2, f"c{j}", 0, 2.5) for j in range(3)],
    ]
    # candidates above threshold -1: n = [5, 1, 3]; size(M) = 3, 5, 7, 8, 9 for M = 1..5
    for target, want_m, want_size in [(0, 1, 3), (3, 1, 3), (4, 2, 5), (6, 3, 7), (7, 3, 7), (9, 5, 9), (100, 64, 9)]:
        sel = select(groups, threshold=-1, target_size=target)
        assert (sel.cap, sel.size) == (want_m, want_size), target
    sel = select(groups, threshold=-1, target_size=100, max_cap=4)
    assert (sel.cap, sel.size) == (4, 8)


def test_gold_candidate_joins_and_dedups():
    g = [C(7, "s1", 1, 2.0), C(7, "s2", 0, 4.5), C(7, "gold text", 1, 0.5)]
    gold = Candidate.gold(7, "gold text")
    sel = select([g], threshold=0.95, golds=[gold])
    # the sampled copy of the gold text (score 1.1) outranks the gold (1.0); one copy kept
    assert [c.text for c in sel.selected] == ["s1", "gold text"]
    assert not sel.selected[1].is_gold
    gold2 = Candidate.gold(8, "only gold")
    sel = select([[], [C(9, "x", 0, 2.5)]], threshold=0.5, golds=[gold2, None])
    assert [c.text for c in sel.selected] == ["only gold"]
    assert sel.per_query == [(1, 1), (0, 0)]
    # gold (1.0) ranks after sampled correct ones with a positive PRM value, before ones with a negative one
    g = [C(3, "w", 0, 4.95), C(3, "c", 1, 1.0), C(3, "c-", 1, -1.0)]
    sel = select([g], threshold=-1, golds=[Candidate.gold(3, "G")])
    assert [c.text for c in sel.selected] == ["c", "G", "w", "c-"]


def test_selection_matches_naive_on_random_data():
    rng = random.Random(2)
    for trial in range(40):
        groups = []
        for q in range(rng.randint(1, 8)):
            groups.append(
                [
                    C(q, f"t{rng.randint(0, 6)}", rng.random() < 0.4, round(rng.uniform(-8, 8), 2))
                    for _ in range(rng.randint(0, 10))
                ]
            )
        golds = (
            [Candidate.gold(q, f"t{rng.randint(0, 8)}") if rng.random() < 0.5 else None for q in range(len(groups))]
            if trial % 2
            else None
        )
        # identical text must mean identical grade (a duplicate's PRM value may differ: the gold's is 0)
        for g in groups:
            info = {}
            for c in g:
                c.correct, c.prm = info.setdefault(c.text, (c.correct, c.prm))
        thr = rng.choice([-1.0, -0.5, 0.0, 0.1, 0.5, 0.99, 1.1])
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
