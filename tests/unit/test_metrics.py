"""bstar.loop.metrics: pass@k against enumeration, hand values, the reference's equation patterns."""

import itertools
import math
from fractions import Fraction

import pytest

from bstar.engine.errors import RequestError
from bstar.loop.metrics import (
    auc,
    distinct_correct,
    equation_diversity,
    extract_equations,
    frac_any_correct,
    greedy_accuracy,
    lucky_share,
    mean_pass_at_k,
    pass_at_1,
    pass_at_k,
    reward_at_k,
    sample_metrics,
    step_auc,
    within_question_auc,
    within_question_step_auc,
)


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
    # over correct responses only (the exploration of what is worth learning): q0 keeps its first response
    assert equation_diversity(texts, [[1, 0], [1], [1, 1]]) == pytest.approx((1.0 + 0.5) / 2)
    assert equation_diversity(texts, [[0, 0], [0], [0, 0]]) is None


def test_auc_within_question_and_steps():
    assert auc([3.0, 2.0], [1.0, 2.0]) == pytest.approx((1 + 1 + 1 + 0.5) / 4)  # ties count 1/2
    assert auc([1.0], []) is None
    # q0: the correct sample scores above both wrong ones (1); q1: below (0); q2 has no wrong sample
    correct = [[1, 0, 0], [1, 0], [1, 1]]
    prm = [[5.0, -1.0, 2.0], [-3.0, 0.0], [1.0, 2.0]]
    assert within_question_auc(correct, prm) == (0.5, 2)
    # pooled over questions this PRM would look fine: question difficulty is not what selection needs
    assert step_auc([[0.5, -2.0], [3.0]], [[True, False], [True]]) == 1.0
    assert step_auc([[0.5, -2.0]], [[False, True]]) == 0.0
    with pytest.raises(RequestError):
        step_auc([[0.5]], [[True, False]])


def test_sample_metrics_keys():
    m = sample_metrics([[1, 0], [0, 0]], [[0.9, 0.1], [0.2, 0.3]], [["1 + 1 = 2", "x"], ["y", "z"]], k=2)
    assert m == pytest.approx(
        {
            "pass_at_1": 0.25,
            "pass_at_k": 0.5,
            "frac_any_correct": 0.5,
            "reward_at_k": 0.5,
            "prm_within_auc": 1.0,
            "prm_within_auc_questions": 1,
            "diversity_distinct_correct": 0.5,
            "diversity_equations": 1.0,
        }
    )


def test_lucky_share():
    correct = [[True, True, False], [True, False]]
    valid = [[True, False, False], [False, False]]
    assert lucky_share(correct, valid) == pytest.approx(2 / 3)  # 3 correct samples, 2 with a wrong step
    assert lucky_share([[False]], [[False]]) is None
    with pytest.raises(RequestError):
        lucky_share([[True, False]], [[True]])


def test_within_question_step_auc_hand_values():
    # q0: good steps 2.0, 1.0, 0.5; bad steps -1.0 (first of candidate 0), 3.0 (after it), 0.0 (first of cand. 1)
    scores = [[[2.0, -1.0, 3.0], [1.0, 0.0], [0.5]], [[1.0], [2.0]], [[-1.0, 4.0]]]
    labels = [[[True, False, False], [True, False], [True]], [[True], [True]], [[False, True]]]
    # all bad steps: each good step beats -1 and 0, none beats 3 -> 6 wins of 9; q2: its good step 4 beats -1
    assert within_question_step_auc(scores, labels) == (pytest.approx((6 / 9 + 1.0) / 2), 2)
    # first bad steps only: -1 and 0, which every good step beats (the 3.0 after the error no longer counts)
    assert within_question_step_auc(scores, labels, first_wrong_only=True) == (pytest.approx(1.0), 2)
    # the same good/bad scores pooled over questions differ: a question's own steps are what selection compares
    assert within_question_step_auc([[[5.0], [1.0]], [[0.0], [-3.0]]], [[[True], [False]], [[True], [False]]]) == (
        1.0,
        2,
    )
    assert step_auc([[5.0], [1.0], [0.0], [-3.0]], [[True], [False], [True], [False]]) == 0.75
    assert within_question_step_auc([[[1.0]]], [[[True]]]) == (None, 0)
    with pytest.raises(RequestError):
        within_question_step_auc([[[1.0, 2.0]]], [[[True]]])
    with pytest.raises(RequestError):
        within_question_step_auc([[[1.0], [2.0]]], [[[True]]])
