"""The engine-independent parts of the B-STaR loop: balance score, selection, configuration search,
metrics, data loading, plots. Everything is checked against hand-computed values or a naive,
independent re-implementation written here."""

import itertools
import json
import math
import random
from fractions import Fraction
from pathlib import Path

import pytest

from bstar.balance import balance_score, mean_balance_score
from bstar.data import DEFAULT_PROMPT, Example, check_template, format_prompt, load_examples
from bstar.metrics import (
    distinct_correct,
    equation_diversity,
    extract_equations,
    frac_any_correct,
    greedy_accuracy,
    mean_pass_at_k,
    pass_at_1,
    pass_at_k,
    reward_at_k,
    sample_metrics,
    selected_stats,
)
from bstar.plots import plot_runs, plot_search_table, write_report
from bstar.search import SearchConfig, choose_subset, search_config
from bstar.selection import Candidate, aggregate_prm, candidate_score, cap_for_target, select
from engine.errors import BStarError, DataError, RequestError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


# ---------------------------------------------------------------------------------------------
# Balance score


@pytest.mark.parametrize(
    "s, c, n_star, want",
    [
        (0, 0, 8, 0.0),  # nothing selected
        (3, 0, 8, 0.0),  # only wrong ones selected
        (2, 2, 8, 0.25),  # clean but too few: 2/8 * 1
        (4, 1, 8, 0.03125),  # 1/8 * 1/4
        (10, 8, 8, 0.8),  # enough correct: 1 * 8/10
        (12, 12, 8, 1.0),  # c above n*: the first factor saturates at 1
        (20, 12, 8, 0.6),  # c above n*, 12/20 clean
        (6, 5, 4, 5 / 6),  # another n*
        (6, 3, 4, 0.75 * 0.5),
    ],
)
def test_balance_score_hand_values(s, c, n_star, want):
    assert balance_score(s, c, n_star) == pytest.approx(want, abs=1e-15)


def test_mean_balance_score_counts_empty_queries_as_zero():
    assert mean_balance_score([(0, 0), (2, 2), (20, 12)], 8) == pytest.approx((0 + 0.25 + 0.6) / 3)
    assert mean_balance_score([], 8) == 0.0


def test_balance_score_matches_reference_style_formula():
    # The reference writes it as: ratio if c >= n* else c * ratio / n*.
    rng = random.Random(0)
    for _ in range(500):
        s = rng.randint(1, 70)
        c = rng.randint(0, s)
        n_star = rng.randint(1, 16)
        ratio = c / s
        ref = ratio if c >= n_star else c * ratio / n_star
        assert balance_score(s, c, n_star) == pytest.approx(ref, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("s, c, n_star", [(2, 3, 8), (-1, 0, 8), (3, -1, 8), (3, 1, 0)])
def test_balance_score_rejects_impossible_counts(s, c, n_star):
    with pytest.raises(RequestError):
        balance_score(s, c, n_star)


# ---------------------------------------------------------------------------------------------
# Selection


def C(q, text, correct, prm):
    return Candidate(q, text, bool(correct), prm)


def naive_select(groups, threshold, cap=None, target=None, max_cap=64, scale=0.2, golds=None):
    """Straightforward re-implementation: score, sort, filter, dedup, cap (M found by trying
    1, 2, ... as the reference does)."""

    def per_query(m):
        out = []
        for i, g in enumerate(groups):
            cands = list(g) + ([golds[i]] if golds and golds[i] else [])
            order = sorted(range(len(cands)), key=lambda j: (-(float(cands[j].correct) + scale * cands[j].prm), j))
            kept, seen = [], set()
            for j in order:
                c = cands[j]
                if float(c.correct) + scale * c.prm > threshold and c.text not in seen:
                    seen.add(c.text)
                    kept.append(c)
            out.append(kept if m is None else kept[:m])
        return out

    if target is not None:
        for m in range(1, max_cap + 1):
            sel = per_query(m)
            if sum(map(len, sel)) >= target:
                return sel, m
        return per_query(max_cap), max_cap
    return per_query(cap), cap


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


def test_aggregate_prm():
    s = [0.9, 0.4, 0.7]
    assert aggregate_prm(s) == 0.4
    assert aggregate_prm(s, "mean") == pytest.approx(2.0 / 3)
    assert aggregate_prm(s, "last") == 0.7
    assert aggregate_prm(s, "prod") == pytest.approx(0.9 * 0.4 * 0.7)
    with pytest.raises(RequestError):
        aggregate_prm([])
    with pytest.raises(RequestError):
        aggregate_prm(s, "max")


# ---------------------------------------------------------------------------------------------
# Configuration search


def hand_samples():
    # prm_scale 0.2: score = correct + prm / 5
    return {
        0.5: [
            [C(0, "a", 1, 0.8), C(0, "b", 0, 0.9), C(0, "c", 0, 0.2)],  # 1.16, 0.18, 0.04
            [C(1, "d", 0, 0.4), C(1, "e", 0, 0.1)],
        ],  # 0.08, 0.02
        1.0: [
            [C(0, "f", 1, 0.5), C(0, "g", 1, 0.9), C(0, "h", 0, 0.1)],  # 1.10, 1.18, 0.02
            [C(1, "i", 1, 0.3), C(1, "j", 0, 0.8)],
        ],  # 1.06, 0.16
    }


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
    assert res.best_per_temperature()[0.5].threshold == 1.12


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
    import numpy as np

    from bstar.search import _cap_for_target

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


# ---------------------------------------------------------------------------------------------
# Metrics


def brute_pass_at_k(n, c, k):
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(samples[i] for i in s) for s in subsets), len(subsets))


def test_pass_at_k_against_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(brute_pass_at_k(n, c, k)), abs=1e-12)


def test_pass_at_k_large_n_is_stable():
    exact = 1 - Fraction(math.comb(995, 100), math.comb(1000, 100))
    assert pass_at_k(1000, 5, 100) == pytest.approx(float(exact), rel=1e-12)
    assert pass_at_k(10_000, 0, 64) == 0.0
    assert pass_at_k(64, 1, 64) == 1.0
    with pytest.raises(RequestError):
        pass_at_k(4, 5, 1)
    with pytest.raises(RequestError):
        pass_at_k(4, 1, 5)


def test_metric_hand_values():
    correct = [[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]]
    assert pass_at_1(correct) == pytest.approx((0.5 + 0 + 1) / 3)
    assert mean_pass_at_k(correct, 2) == pytest.approx((5 / 6 + 0 + 1) / 3)
    assert frac_any_correct(correct) == pytest.approx(2 / 3)
    assert greedy_accuracy([True, False, False, True]) == 0.5
    rc, rp = [[0, 1, 0], [1, 0, 1]], [[0.2, 0.9, 0.5], [0.3, 0.8, 0.95]]
    assert reward_at_k(rc, rp) == 1.0
    assert reward_at_k(rc, rp, 2) == 0.5  # q1 picks sample 1 (wrong)
    assert reward_at_k(rc, rp, 1) == 0.5
    assert reward_at_k([[0, 1]], [[0.5, 0.5]]) == 0.0  # tie: the earlier sample
    with pytest.raises(RequestError):
        reward_at_k([[1, 0]], [[0.5]])
    texts = [["a b", "a  b", "c", "d"], ["x", "y"]]
    assert distinct_correct(texts, [[1, 1, 1, 0], [0, 0]]) == pytest.approx((2 + 0) / 2)
    assert selected_stats([(3, 2), (0, 0), (1, 1)]) == (4, 0.75)
    assert selected_stats([]) == (0, 0.0)


def test_extract_equations_follows_reference_patterns():
    gsm = "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18\n#### 18"
    assert extract_equations(gsm) == ["16-3-4=9", "9*2=18"]
    assert extract_equations("so $x+1=2$ and \\[y = 3\\] done") == ["x+1=2", "y = 3"]
    assert extract_equations("3 * 4 = 12\n12 - 5 = 7\n7+1+2=10\n#### 10") == ["3*4=12", "12-5=7", "7+1+2=10"]
    assert extract_equations("no maths here, just 12 apples") == []


def test_equation_diversity():
    texts = [
        ["3 * 4 = 12\n12 - 5 = 7", "3*4=12\n12 + 1 = 13"],  # 3 distinct of 4
        ["nothing"],  # skipped, as the reference
        ["<<2+2=4>>", "<<2+2=4>>"],
    ]  # 1 of 2
    assert equation_diversity(texts) == pytest.approx((0.75 + 0.5) / 2)
    assert equation_diversity([["none"], []]) is None


def test_sample_metrics_keys():
    m = sample_metrics([[1, 0], [0, 0]], [[0.9, 0.1], [0.2, 0.3]], [["1 + 1 = 2", "x"], ["y", "z"]], k=2)
    assert m == pytest.approx(
        {
            "pass_at_1": 0.25,
            "pass_at_k": 0.5,
            "frac_any_correct": 0.5,
            "reward_at_k": 0.5,
            "diversity_distinct_correct": 0.5,
            "diversity_equations": 1.0,
        }
    )


# ---------------------------------------------------------------------------------------------
# Data


def test_load_gsm8k_files():
    from decimal import Decimal

    for name, n in (("gsm8k_test.jsonl", 1319), ("gsm8k_train.jsonl", 7473)):
        exs = load_examples(DATA / name)
        raw = [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]
        assert len(exs) == len(raw) == n
        assert all(e.task == "gsm8k" for e in exs)
        assert len({e.id for e in exs}) == n
        for e, r in zip(exs, raw):
            assert e.question == r["question"] and e.gold_solution == r["answer"]
            Decimal(e.gold_answer)  # a plain number
            assert r["answer"].splitlines()[-1].replace(",", "").endswith(e.gold_answer)
    assert exs[0].gold_answer == "72"
    assert load_examples(DATA / "gsm8k_test.jsonl")[0].gold_answer == "18"


def test_load_gsm8k_agrees_with_rewards_gold():
    rewards = pytest.importorskip("bstar.rewards")
    for e in load_examples(DATA / "gsm8k_test.jsonl"):
        assert rewards.gsm8k_gold(e.gold_solution) == e.gold_answer


def test_load_math500():
    exs = load_examples(DATA / "math500_test.jsonl")
    raw = [json.loads(line) for line in (DATA / "math500_test.jsonl").read_text().splitlines()]
    assert len(exs) == 500 and all(e.task == "math" for e in exs)
    for e, r in zip(exs, raw):
        assert (e.id, e.question, e.gold_solution, e.gold_answer) == (
            r["unique_id"],
            r["problem"],
            r["solution"],
            r["answer"],
        )
    assert exs[0].gold_answer == "\\left( 3, \\frac{\\pi}{2} \\right)"


def write(tmp_path, name, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return p


GOOD_GSM = json.dumps({"question": "1+1?", "answer": "1 + 1 = 2\n#### 2"})


@pytest.mark.parametrize(
    "content, where, msg",
    [
        (GOOD_GSM + "\n{not json\n", 2, "malformed JSON"),
        (GOOD_GSM + "\n\n" + GOOD_GSM + "\n[1, 2]\n", 4, "expected a JSON object"),
        (GOOD_GSM + "\n" + json.dumps({"question": "q"}) + "\n", 2, "missing field 'answer'"),
        (json.dumps({"answer": "#### 1"}) + "\n", 1, "cannot tell the format"),
        (GOOD_GSM + "\n" + json.dumps({"question": "q", "answer": "no final line"}), 2, "'#### N'"),
        (GOOD_GSM + "\n" + json.dumps({"question": 5, "answer": "#### 1"}), 2, "non-empty string"),
        (json.dumps({"problem": "p", "solution": "no box"}) + "\n", 1, "missing field 'answer'"),
        (json.dumps({"problem": "p", "answer": "1"}) + "\n", 1, "missing field 'solution'"),
        (json.dumps({"problem": "p", "solution": "s", "answer": "  "}) + "\n", 1, "is empty"),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path, content, where, msg):
    p = write(tmp_path, "data.jsonl", content.encode())
    with pytest.raises(DataError) as e:
        load_examples(p)
    assert f"data.jsonl:{where}: " in str(e.value) and msg in str(e.value)


def test_non_utf8_line(tmp_path):
    p = write(tmp_path, "bad.jsonl", GOOD_GSM.encode() + b"\n" + GOOD_GSM.encode() + b"\n\xff\xfe{}\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: line is not valid UTF-8"):
        load_examples(p)


def test_data_misc(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_examples(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no examples"):
        load_examples(write(tmp_path, "empty.jsonl", b"\n\n"))
    p = write(tmp_path, "g.jsonl", (GOOD_GSM + "\n").encode())
    with pytest.raises(DataError, match=r"g\.jsonl:1: missing field 'problem'"):
        load_examples(p, task="math")
    with pytest.raises(DataError, match="unknown data format"):
        load_examples(p, task="arc")
    boxed = json.dumps({"problem": "p", "solution": "so $\\boxed{\\frac{1}{2}}$.", "id": 7})
    (e,) = load_examples(write(tmp_path, "m.jsonl", boxed.encode()))
    assert (e.id, e.gold_answer, e.task) == ("7", "\\frac{1}{2}", "math")
    gsm = json.dumps({"question": "q", "answer": "x\n#### 1,234"})
    assert load_examples(write(tmp_path, "c.jsonl", gsm.encode()))[0].gold_answer == "1234"


def test_prompt_template():
    ex = Example("1", "What is 2+2?", "4", "2 + 2 = 4\n#### 4", "gsm8k")
    assert format_prompt(ex) == DEFAULT_PROMPT.format(question="What is 2+2?")
    assert format_prompt(ex) == "Question: What is 2+2?\nAnswer: Let's think step by step.\n"
    assert format_prompt("Q", "[{question}] {{json}}") == "[Q] {json}"
    for bad in ("{q}", "no field", "{question} {answer}", "{question"):
        with pytest.raises(BStarError):
            check_template(bad)


# ---------------------------------------------------------------------------------------------
# Plots and report

PNG = b"\x89PNG\r\n\x1a\n"


def test_plots_and_report(tmp_path):
    bstar = [
        {
            "iteration": i,
            "greedy_acc": 0.2 + 0.1 * i,
            "pass_at_1": 0.2 + 0.05 * i,
            "pass_at_k": 0.6 + 0.02 * i,
            "reward_at_k": 0.4,
            "diversity_distinct_correct": 3.0 - i,
            "diversity_equations": None if i == 1 else 0.5,
            "temperature": 0.7 + 0.1 * i,
            "threshold": 0.5,
            "balance_score": 0.3 + 0.1 * i,
            "selected_size": 100 + 10 * i,
            "selected_acc": 0.9,
        }
        for i in range(1, 4)
    ]
    rft = [{"iteration": i, "greedy_acc": 0.25, "pass_at_k": float("nan"), "temperature": 1.0} for i in range(1, 4)]
    paths = plot_runs({"bstar": bstar, "online-rft": rft}, tmp_path / "figs")
    assert {p.name for p in paths} == {"accuracy.png", "diversity.png", "config.png", "selection.png"}
    for p in paths:
        data = p.read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
    # only what has data is drawn
    only = plot_runs([{"iteration": 1, "greedy_acc": 0.1}, {"greedy_acc": 0.3}], tmp_path / "one")
    assert [p.name for p in only] == ["accuracy.png"]
    assert plot_runs([{"iteration": 1}], tmp_path / "none") == []

    res = search_config(hand_samples(), SearchConfig(thresholds=(0.0, 0.1, 1.12), n_star=2, target_size=None))
    hp = plot_search_table(res.table, tmp_path / "search.png")
    assert hp.read_bytes().startswith(PNG)

    text = write_report({"bstar": bstar, "online-rft": rft}, tmp_path / "report.md", figures=paths)
    assert (tmp_path / "report.md").read_text() == text
    assert "## bstar" in text and "## online-rft" in text and "side by side" in text
    assert "| iteration | greedy_acc |" in text
    assert "greedy accuracy (eval): 0.300 → 0.500 (+0.200)" in text
    assert "selected-set size: 110 → 130 (+20)" in text
    assert "chosen temperature over iterations: 0.800, 0.900, 1.000" in text
    assert "chosen reward threshold: 0.500 throughout" in text
    assert "chosen temperature: 1.000 throughout" in text  # online-rft
    assert "![accuracy](accuracy.png)" in text
    assert "nan" not in text.lower()
