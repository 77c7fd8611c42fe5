"""Test helpers for selection and the configuration search: a naive, independent re-implementation of the
reference's selection rule (bstar.loop.selection), a hand-computed sample set, and the worked literal example of
the reference's own code (its functions run on this data gave the numbers the tests assert)."""

from bstar.loop.selection import Candidate


def C(q, text, correct, prm):
    return Candidate(q, text, bool(correct), prm)


def naive_select(groups, threshold, cap=None, target=None, max_cap=64, divisor=5.0, golds=None):
    """Straightforward re-implementation of the reference's get_unique_trn_json + find_rewardbase: score,
    sort, keep score > threshold, take the first M, then drop duplicate texts; M found by trying 1, 2, ...
    until the de-duplicated size reaches the target."""

    def per_query(m):
        out = []
        for i, g in enumerate(groups):
            cands = list(g) + ([golds[i]] if golds and golds[i] else [])
            order = sorted(range(len(cands)), key=lambda j: (-(float(cands[j].correct) + cands[j].prm / divisor), j))
            above = [cands[j] for j in order if float(cands[j].correct) + cands[j].prm / divisor > threshold]
            kept, seen = [], set()
            for c in above if m is None else above[:m]:
                if c.text not in seen:
                    seen.add(c.text)
                    kept.append(c)
            out.append(kept)
        return out

    if target is not None:
        for m in range(1, max_cap + 1):
            sel = per_query(m)
            if sum(map(len, sel)) >= target:
                return sel, m
        return per_query(max_cap), max_cap
    return per_query(cap), cap


def hand_samples():
    # score = correct + prm / 5
    return {
        0.5: [
            [C(0, "a", 1, 4.0), C(0, "b", 0, 4.5), C(0, "c", 0, 1.0)],  # 1.8, 0.9, 0.2
            [C(1, "d", 0, 2.0), C(1, "e", 0, 0.5)],  # 0.4, 0.1
        ],
        1.0: [
            [C(0, "f", 1, 2.5), C(0, "g", 1, 4.5), C(0, "h", 0, 0.5)],  # 1.5, 1.9, 0.1
            [C(1, "i", 1, 1.5), C(1, "j", 0, 4.0)],  # 1.3, 0.8
        ],
    }


# A worked literal example: its expected selections, caps and balance scores (tests/unit/test_selection.py) were
# obtained by running the reference's own functions (hkust-nlp/B-STaR @ a0f5d95, train_code/determine_hyper.py
# and metric_modiacc_auto.py, unmodified) on this data, with 5 shuffle seeds. Per query, (text, correct, reward
# list); the prm value is min(reward list). Q2's candidate without the answer marker is dropped before scoring in
# the reference and is left out here; Q2.d's answer "5 and more" fails the exact match (wrong) and its
# answer step is 'Broken' (-5.0).
LITERAL = {
    "Q1": ("gold one -> 7", [("q1 step a -> 7", 1, [3.0, 2.0]), ("q1 step a -> 7", 1, [2.0, 3.0]),
                             ("q1 step c -> 7", 1, [0.5, -1.0]), ("q1 step d -> 8", 0, [1.0])]),
    "Q2": ("gold two -> 5", [("q2 step a -> 4", 0, [-2.0, 0.0]), ("q2 step b -> 6", 0, [0.5]),
                             ("q2 step c -> 5", 1, [1.0, -0.5]), ("q2 step d -> 5 and more", 0, [2.0, -5.0])]),
    "Q3": ("gold three -> 12", [("q3 step a -> 12", 1, [1.0]), ("gold three -> 12", 1, [0.5, 4.0]),
                                ("q3 step c -> 12", 1, [1.0, 2.0]), ("q3 step d -> 13", 0, [3.0])]),
}  # fmt: skip


def literal_example():
    """(groups, golds) of the worked example, queries Q1, Q2, Q3."""
    groups = [[C(q, t, ok, min(r)) for t, ok, r in cands] for q, (_, cands) in LITERAL.items()]
    golds = [Candidate.gold(q, gold) for q, (gold, _) in LITERAL.items()]
    return groups, golds
