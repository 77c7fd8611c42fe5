"""Test helpers for selection and the configuration search: a naive, independent re-implementation of the
selection rule (bstar.selection) and a hand-computed sample set."""

from bstar.selection import Candidate


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
