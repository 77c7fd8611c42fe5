"""bstar.embedded.task, the built-in arithmetic word-problem task: seeded, disjoint splits, and every gold solution
checked twice without eval: each step line recomputed, and the answer re-derived from the
question text by an independent sentence interpreter."""

import operator
import re

import pytest

from bstar.embedded.task import MAX_VALUE, generate, make_splits
from bstar.rewards import grade
from bstar.tasks import Example
from engine.errors import BStarError

STEP = re.compile(r"^(\d+) ([+\-*]) (\d+) = (\d+)$")
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}

# sentence -> how it changes the running count (v); one rule must match each sentence
RULES = [
    (
        re.compile(r"^[A-Z][a-z]+ has (\d+) (boxes|bags|packs|jars) with (\d+) [a-z]+ each\.$"),
        lambda v, m: int(m[1]) * int(m[3]),
    ),
    (re.compile(r"^[A-Z][a-z]+ has (\d+) [a-z]+\.$"), lambda v, m: int(m[1])),
    (
        re.compile(r"^(He|She) buys (\d+) (boxes|bags|packs|jars) with (\d+) [a-z]+ each\.$"),
        lambda v, m: v + int(m[2]) * int(m[4]),
    ),
    (re.compile(r"^(He|She) (buys|finds|gets) (\d+) more [a-z]+\.$"), lambda v, m: v + int(m[3])),
    (re.compile(r"^(He|She) (gives away|loses|sells) (\d+) [a-z]+\.$"), lambda v, m: v - int(m[3])),
    (re.compile(r"^(He|She) doubles the number of [a-z]+\.$"), lambda v, m: v * 2),
    (re.compile(r"^(He|She) triples the number of [a-z]+\.$"), lambda v, m: v * 3),
]
QUESTION = re.compile(r"^How many [a-z]+ does (he|she) have (now|left)\?$")


def interpret(question: str) -> int:
    sentences = re.findall(r"[^.?]+[.?]", question)
    assert QUESTION.match(sentences[-1].strip()), sentences[-1]
    v = None
    for s in sentences[:-1]:
        s = s.strip()
        hits = [(rx.match(s), f) for rx, f in RULES if rx.match(s)]
        assert len(hits) == 1, s
        m, f = hits[0]
        assert (v is None) == (" has " in s), s  # the story starts with exactly one "has"
        v = f(v, m)
        assert v >= 0
    return v


@pytest.fixture(scope="module")
def splits():
    return make_splits(1500, 300, seed=11)


def test_deterministic_by_seed(splits):
    again = make_splits(1500, 300, seed=11)
    assert again == splits
    other = make_splits(1500, 300, seed=12)
    assert [e.question for e in other[0]] != [e.question for e in splits[0]]
    assert [e.question for e in other[1]] != [e.question for e in splits[1]]


def test_splits_are_disjoint_and_sized(splits):
    train, test = splits
    assert len(train) == 1500 and len(test) == 300
    tq, sq = [e.question for e in train], [e.question for e in test]
    assert len(set(tq)) == len(tq) and len(set(sq)) == len(sq)
    assert not set(tq) & set(sq)
    assert len({e.id for e in train + test}) == 1800
    # the test split depends only on (n_test, seed); growing n_train keeps the train prefix
    small_train, same_test = make_splits(100, 300, seed=11)
    assert same_test == test and small_train == train[:100]
    assert make_splits(0, 0, seed=1) == ([], [])


def test_every_gold_solution_is_correct(splits):
    step_counts = set()
    for e in splits[0] + splits[1]:
        assert isinstance(e, Example) and e.task == "gsm8k"
        *steps, final = e.gold_solution.split("\n")
        assert final == f"#### {e.gold_answer}"
        assert 2 <= len(steps) <= 4
        step_counts.add(len(steps))
        result = None
        for line in steps:
            m = STEP.match(line)
            assert m, line
            a, op, b, r = int(m[1]), m[2], int(m[3]), int(m[4])
            assert OPS[op](a, b) == r, line
            assert 0 <= r <= MAX_VALUE
            result = r
        assert str(result) == e.gold_answer
        assert interpret(e.question) == int(e.gold_answer), e.question
    assert step_counts == {2, 3, 4}
    ops = {line.split()[1] for e in splits[0] for line in e.gold_solution.split("\n")[:-1]}
    assert ops == {"+", "-", "*"}


def test_text_is_regular(splits):
    words = {w for e in splits[0] for w in re.findall(r"[A-Za-z]+", e.question + e.gold_solution)}
    assert len(words) < 60


def test_rewards_grade_accepts_gold(splits):
    for e in splits[1][:50]:
        assert grade(e.gold_solution, e.gold_answer, "gsm8k")
        wrong = e.gold_solution.rsplit("####", 1)[0] + f"#### {int(e.gold_answer) + 1}"
        assert not grade(wrong, e.gold_answer, "gsm8k")


def test_generate_rejects_negative():
    with pytest.raises(BStarError):
        generate(-1, seed=0)
