"""The built-in task: procedurally generated multi-step arithmetic word problems.

    Question: Tom has 3 boxes with 4 apples each. He gives away 5 apples.
              How many apples does he have left?
    Solution: 3 * 4 = 12
              12 - 5 = 7
              #### 7

2 to 4 steps of +, - and * on small non-negative integers, one step per solution line, the
answer on a GSM8K-style '#### N' line (so bstar.rewards.grade(..., task="gsm8k") grades it).
The text is deliberately regular: numbers, a small fixed word set, a few sentence templates.
Seeded; the test split depends only on (n_test, seed), and no train question equals a test one.
"""

from __future__ import annotations

import random

from bstar.tasks import Example
from engine.errors import BStarError

NAMES = (
    ("Tom", "he"),
    ("Ben", "he"),
    ("Sam", "he"),
    ("Max", "he"),
    ("Anna", "she"),
    ("Lisa", "she"),
    ("Mia", "she"),
    ("Emma", "she"),
)
ITEMS = ("apples", "pens", "books", "cards", "eggs", "marbles", "stickers", "coins")
CONTAINERS = ("boxes", "bags", "packs", "jars")
MAX_VALUE = 999  # keeps every intermediate result at most 3 digits


def _problem(rng: random.Random) -> tuple[str, list[str], int]:
    """(question, solution step lines, answer) of one random problem."""
    name, he = rng.choice(NAMES)
    item, box = rng.choice(ITEMS), rng.choice(CONTAINERS)
    n_steps = rng.randint(2, 4)
    sentences, steps = [], []

    def step(a: int, op: str, b: int) -> int:
        r = a + b if op == "+" else a - b if op == "-" else a * b
        steps.append(f"{a} {op} {b} = {r}")
        return r

    if rng.random() < 0.5:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        sentences.append(f"{name} has {a} {box} with {b} {item} each.")
        v = step(a, "*", b)
    else:
        v = rng.randint(2, 20)
        sentences.append(f"{name} has {v} {item}.")
    last = "+"
    while len(steps) < n_steps:
        left = n_steps - len(steps)
        ops = ["add", "add"]
        if v >= 2:
            ops += ["sub", "sub"]
        if 2 <= v * 2 <= MAX_VALUE:
            ops.append("mul")
        if left >= 2:
            ops.append("buy")
        op = rng.choice(ops)
        if op == "add":
            b = rng.randint(2, 20)
            if v + b > MAX_VALUE:
                continue
            verb = rng.choice(("buys", "finds", "gets"))
            sentences.append(f"{he.capitalize()} {verb} {b} more {item}.")
            v, last = step(v, "+", b), "+"
        elif op == "sub":
            b = rng.randint(2, min(v, 20))
            verb = rng.choice(("gives away", "loses", "sells"))
            sentences.append(f"{he.capitalize()} {verb} {b} {item}.")
            v, last = step(v, "-", b), "-"
        elif op == "mul":
            k = 3 if v * 3 <= MAX_VALUE and rng.random() < 0.5 else 2
            word = "triples" if k == 3 else "doubles"
            sentences.append(f"{he.capitalize()} {word} the number of {item}.")
            v, last = step(v, "*", k), "*"
        else:
            a, b = rng.randint(2, 9), rng.randint(2, 9)
            if v + a * b > MAX_VALUE:
                continue
            sentences.append(f"{he.capitalize()} buys {a} {box} with {b} {item} each.")
            w = step(a, "*", b)
            v, last = step(v, "+", w), "+"
    ending = "left" if last == "-" else "now"
    sentences.append(f"How many {item} does {he} have {ending}?")
    return " ".join(sentences), steps, v


def generate(
    n: int, seed: int | str, exclude: set[str] | frozenset = frozenset(), split: str = "train"
) -> list[Example]:
    """n distinct problems from one seeded stream, skipping questions in `exclude`."""
    if n < 0:
        raise BStarError(f"number of synthetic problems must be >= 0, got {n}")
    rng = random.Random(f"bstar-synthetic-{seed}-{split}")
    seen: set[str] = set()
    out: list[Example] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise BStarError(f"could not generate {n} distinct synthetic problems")
        q, steps, ans = _problem(rng)
        if q in seen or q in exclude:
            continue
        seen.add(q)
        solution = "\n".join(steps + [f"#### {ans}"])
        out.append(Example(f"synth-{split}-{len(out)}", q, str(ans), solution, "gsm8k"))
    return out


def make_splits(n_train: int, n_test: int, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(train, test): disjoint questions; test depends only on (n_test, seed), train's first
    examples stay the same when n_train grows."""
    test = generate(n_test, seed, split="test")
    train = generate(n_train, seed, exclude={e.question for e in test}, split="train")
    return train, test
