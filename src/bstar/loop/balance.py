"""The B-STaR balance score: how good a selected training set is for self-improvement.

Self-improvement needs two things at once from the data a policy generates for itself:

* exploration: the policy must still produce *enough different correct* solutions per query
  for training to learn something new. Sampling hotter finds more of them, until too hot.
* exploitation: the selection (answer check + reward model + threshold) must keep those
  solutions *and little else*. A stricter threshold gives a cleaner set, until it also starts
  dropping the correct solutions.

For one query, after selection, let s = number of selected candidates and c = how many of them
are correct. Then

    balance = min(c / n*, 1) * (c / s)          (0 when s == 0)
              \\_____________/   \\___/
                exploration       exploitation

The first factor counts correct candidates up to a saturation point n* (8 in the reference):
beyond n* correct solutions a query gains nothing more. The second is the precision of the
selection. A query with 2 correct out of 2 selected scores 2/8 * 1 = 0.25; 8 correct out of 10
scores 1 * 0.8 = 0.8; 12 correct out of 12 scores 1. B-STaR picks, at every iteration, the
sampling temperature (exploration) and reward threshold (exploitation) whose selection has the
highest mean balance over a subset of the training queries.
"""

from bstar.engine.errors import RequestError


def balance_score(num_selected: int, num_correct: int, n_star: int = 8) -> float:
    """Balance score of one query: min(c / n*, 1) * (c / s), and 0 when nothing is selected."""
    s, c = num_selected, num_correct
    if n_star < 1:
        raise RequestError(f"n_star must be >= 1, got {n_star}")
    if not 0 <= c <= s:
        raise RequestError(f"need 0 <= num_correct <= num_selected, got c={c}, s={s}")
    if s == 0:
        return 0.0
    return min(c / n_star, 1.0) * (c / s)


def mean_balance_score(per_query: list[tuple[int, int]], n_star: int = 8) -> float:
    """Mean balance score over the queries given as (s_i, c_i) pairs that have something selected (s_i > 0),
    as the reference (cal_modi_acc_soft groups the selected set by query, so a query with nothing selected
    is not part of the mean). 0.0 when nothing is selected at all (the reference: nan, never chosen)."""
    present = [(s, c) for s, c in per_query if s > 0]
    if not present:
        return 0.0
    return sum(balance_score(s, c, n_star) for s, c in present) / len(present)
