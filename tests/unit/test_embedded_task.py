"""bstar.embedded.task, the built-in word problems: seeded disjoint splits, every gold solution checked by an
independent sentence interpreter, solution styles and their detector, and the true step labels on
hand-labelled solutions and on generated problems."""

import collections
import operator
import random
import re

import pytest

from bstar.embedded import task as T
from bstar.embedded.task import MAX_VALUE, generate, make_splits
from bstar.errors import BStarError
from bstar.loop.rewards import grade
from bstar.loop.tasks import Example

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
        assert 0 <= v <= MAX_VALUE
    return v


def evaluate(expr: str) -> int:
    """'3 * 4 + 5 - 2' with * first, by hand (no eval)."""
    total = 0
    for sign, term in re.findall(r"([+-]?)\s*(\d+(?:\s*\*\s*\d+)*)", expr):
        v = 1
        for f in term.split("*"):
            v *= int(f)
        total += -v if sign == "-" else v
    return total


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


def test_every_gold_solution_is_correct_and_valid(splits):
    lines_per = collections.Counter()
    answers = collections.Counter()
    for e in splits[0] + splits[1]:
        assert isinstance(e, Example) and e.task == "gsm8k"
        *steps, final = e.gold_solution.split("\n")
        assert final == f"#### {e.gold_answer}"
        lines_per[len(steps)] += 1
        result = None
        for line in steps:
            lhs, rhs = line.split(" = ")
            assert evaluate(lhs) == int(rhs), line
            assert 0 <= int(rhs) <= MAX_VALUE
            result = int(rhs)
        assert str(result) == e.gold_answer
        assert interpret(e.question) == int(e.gold_answer), e.question
        assert T.is_valid(e.question, e.gold_solution) and T.parse_question(e.question).question() == e.question
        answers[int(e.gold_answer)] += 1
    assert set(lines_per) >= {1, 2, 3, 4, 5}
    # a small answer range: wrong reasoning often lands on a right answer
    assert max(answers) <= MAX_VALUE and sum(answers[a] for a in range(31)) > 0.6 * sum(answers.values())


def test_text_is_regular(splits):
    words = {w for e in splits[0] for w in re.findall(r"[A-Za-z]+", e.question + e.gold_solution)}
    assert len(words) < 60


def test_rewards_grade_accepts_gold(splits):
    for e in splits[1][:50]:
        assert grade(e.gold_solution, e.gold_answer, "gsm8k")
        wrong = e.gold_solution.rsplit("####", 1)[0] + f"#### {int(e.gold_answer) + 1}"
        assert not grade(wrong, e.gold_answer, "gsm8k")


def test_generate_rejects_bad_arguments():
    with pytest.raises(BStarError):
        generate(-1, seed=0)
    with pytest.raises(BStarError, match="styles"):
        generate(1, seed=0, styles="fancy")
    with pytest.raises(BStarError, match="not a built-in task"):
        T.parse_question("What is 2 + 2?")


# -- styles ----------------------------------------------------------------------------------------

Q = (
    "Tom has 3 boxes with 4 apples each. He buys 5 more apples. He gives away 2 apples. "
    "How many apples does he have left?"
)


def test_styles_of_a_literal_problem():
    p = T.parse_question(Q)
    assert p.answer() == 15 and p.question() == Q
    sols = {s.name(): text.replace("\n", " | ") for text, s in T.solutions(p).items()}
    assert sols == {
        "story": "3 * 4 = 12 | 12 + 5 = 17 | 17 - 2 = 15 | #### 15",
        "route": "3 * 4 = 12 | 5 - 2 = 3 | 12 + 3 = 15 | #### 15",
        "merge": "3 * 4 + 5 = 17 | 17 - 2 = 15 | #### 15",
        "swap": "4 * 3 = 12 | 5 + 12 = 17 | 17 - 2 = 15 | #### 15",
        "swap+route": "4 * 3 = 12 | 5 - 2 = 3 | 3 + 12 = 15 | #### 15",
        "swap+merge": "4 * 3 + 5 = 17 | 17 - 2 = 15 | #### 15",
    }
    for text, s in T.solutions(p).items():
        assert T.style_of(Q, text) == s.name() and T.is_valid(Q, text)
        assert T.style_of(Q, "  " + text.replace("\n", " \n ") + "\n") == s.name()  # whitespace does not matter
    # operands swapped in one line only: valid, but no single style renders it
    assert T.style_of(Q, "3 * 4 = 12\n5 + 12 = 17\n17 - 2 = 15\n#### 15") == "other"
    assert T.style_of(Q, "3 * 4 = 12\n12 + 5 = 17\n17 - 2 = 14\n#### 14") is None  # not valid: no style
    texts = list(T.solutions(p)) * 2 + ["3 * 4 = 12\n12 + 5 = 17\n17 - 2 = 14\n#### 14"]
    assert T.distinct_valid(Q, texts) == 6


def test_every_style_of_generated_problems_is_valid_and_detected():
    rng = random.Random(5)
    counts = collections.Counter()
    for _ in range(400):
        p = T.random_problem(rng)
        q = p.question()
        sols = T.solutions(p)
        counts[len(sols)] += 1
        for text, style in sols.items():
            assert T.step_labels(q, text) == [True] * len(text.split("\n")), (q, text)
            assert T.style_of(q, text) == style.name()
            assert grade(text, str(p.answer()), "gsm8k")
        assert T.distinct_valid(q, list(sols)) == len(sols)
    assert min(counts) >= 2 and sum(n >= 6 for n in counts.elements()) > 200  # several styles per problem


def test_warm_start_set_draws_random_styles():
    examples = generate(400, seed=3, split="seed")
    names = collections.Counter(T.style_of(e.question, e.gold_solution) for e in examples)
    assert None not in names and "other" not in names
    assert len(names) >= 10 and max(names.values()) < 0.25 * len(examples)
    story = generate(50, seed=3, split="seed", styles="story")
    assert [e.question for e in story] == [e.question for e in examples[:50]]  # styles do not move questions
    assert all(T.style_of(e.question, e.gold_solution) == "story" for e in story)


# -- true step labels ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "solution, labels",
    [
        ("3 * 4 = 12\n12 + 5 = 17\n17 - 2 = 15\n#### 15", [1, 1, 1, 1]),
        ("3 * 4 = 12\n12 - 2 = 10\n10 + 5 = 15\n#### 15", [1, 1, 1, 1]),  # another order of the same route
        ("4 * 3 = 12\n12 + 5 - 2 = 15\n#### 15", [1, 1, 1]),  # merged
        ("3 * 4 = 12\n12 + 2 = 14\n14 + 5 = 19\n#### 19", [1, 0, 0, 0]),  # a loss read as a gain
        ("3 * 4 = 13\n13 + 5 = 18\n18 - 2 = 16\n#### 16", [0, 0, 0, 0]),  # a slip carried on
        ("3 * 4 = 12\n12 + 5 = 17\n17 - 2 = 16\n#### 15", [1, 1, 0, 0]),  # the answer not computed
        ("12 + 5 = 17\n17 - 2 = 15\n#### 15", [0, 1, 1]),  # 12 used before it is computed or given
        ("3 * 5 = 15\n#### 15", [0, 1]),  # a false positive: wrong reasoning, right answer
        ("3 * 4 = 12\n12 + 5 = 17\n17 - 2 = 15\n#### 15\n15 + 1 = 16", [1, 1, 1, 1, 0]),  # after the answer
        ("3 * 4 = 12\nso we add\n#### 12", [1, 0, 0]),  # not an equation; 12 is not the answer
        ("4 * 3 = 12\n12 + 5 = 17\n17 - 2 = 15", [1, 1, 1]),  # every step good, but no answer line
    ],
)
def test_step_labels_hand_labelled(solution, labels):
    assert T.step_labels(Q, solution) == [bool(x) for x in labels]
    assert T.is_valid(Q, solution) == (all(labels) and solution.split("\n")[-1].startswith("####"))


def test_step_labels_route_and_doubling():
    q = (
        "Anna has 10 cards. She doubles the number of cards. She loses 7 cards. She finds 3 more cards. "
        "How many cards does she have now?"
    )
    p = T.parse_question(q)
    assert p.answer() == 16
    assert T.step_labels(q, "10 + 10 = 20\n7 - 3 = 4\n20 - 4 = 16\n#### 16") == [True] * 4  # net loss first
    assert T.step_labels(q, "2 * 10 = 20\n20 + 3 - 7 = 16\n#### 16") == [True] * 3
    assert T.step_labels(q, "10 - 7 = 3\n3 * 2 = 6\n6 + 3 = 9\n#### 9") == [False] * 4  # the loss before doubling
    assert T.step_labels(q, "10 * 2 = 20\n20 - 3 = 17\n17 + 7 = 24\n#### 24") == [True, False, False, False]


def test_wrong_solutions_are_mostly_invalid_with_both_labels():
    rng = random.Random(7)
    invalid = good = bad = right_answer = 0
    for _ in range(500):
        p = T.random_problem(rng)
        text = T.wrong_solution(p, rng)
        labels = T.step_labels(p.question(), text)
        invalid += not T.is_valid(p.question(), text)
        good += sum(labels)
        bad += len(labels) - sum(labels)
        right_answer += grade(text, str(p.answer()), "gsm8k") and not T.is_valid(p.question(), text)
    assert invalid > 450 and good > 300 and bad > 300
    assert right_answer > 0  # some land on the right answer by wrong reasoning
