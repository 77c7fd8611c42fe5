"""bstar.loop.balance: the balance score against hand values and the reference's own formula."""

import random

import pytest

from bstar.engine.errors import RequestError
from bstar.loop.balance import balance_score, mean_balance_score


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


def test_mean_balance_score_is_over_queries_with_a_selection():
    # as the reference, a query with nothing selected is not part of the mean
    assert mean_balance_score([(0, 0), (2, 2), (20, 12)], 8) == pytest.approx((0.25 + 0.6) / 2)
    assert mean_balance_score([(0, 0)], 8) == 0.0
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
