"""The built-in task: arithmetic word problems with several valid solution styles, true step labels and a
style detector.

    Question: Tom has 3 boxes with 4 apples each. He buys 5 more apples. He gives away 2 apples.
              How many apples does he have now?
    story order:      3 * 4 = 12 / 12 + 5 = 17 / 17 - 2 = 15 / #### 15
    operands swapped: 4 * 3 = 12 / 5 + 12 = 17 / 17 - 2 = 15 / #### 15
    merged steps:     3 * 4 + 5 - 2 = 15 / #### 15
    another route:    3 * 4 = 12 / 5 - 2 = 3 / 12 + 3 = 15 / #### 15      (the net change first)

One equation per line, the answer on a GSM8K-style '#### N' line (bstar.loop.rewards.grade(..., "gsm8k")).
A solution's style is four switches (STYLES): `swap` (operand order of + and *), `first` (the
products of "buys 3 boxes with 4 each" computed before the running total instead of when needed),
`merge` (two consecutive gains/losses, or a box purchase, in one line) and `route` (the net change of
two consecutive gains/losses first; doubling as v + v). The warm-start set draws a random style per
example, so a policy trained on it has several ways to solve each problem; `style_of` tells them apart.

Numbers are small (start <= 12, changes <= 9, boxes <= 5 x 5, every value <= MAX_VALUE) and are
sometimes reused, so wrong reasoning often lands on the right answer: a reward must look at the steps.

True step labels (`step_labels`): a line is good when its arithmetic is right, every operand is a
number of the question (2 and 3 for doubles / triples) or the result of an earlier line, and it
computes something on a valid route to the answer: a product of a box purchase, a sum of a subset of
one stretch of gains and losses (with or without the count before it; a net loss as a positive
difference), or the doubled / tripled count. The answer line is good when it states the answer and
that number was computed (or given). Anything after the answer line, or not an equation, is bad.

The question text determines the problem (`parse_question` reads it back), so labels and styles are
available for any sample of the loop, not only for problems generated in this process.
"""

from __future__ import annotations

import itertools
import random
import re
from dataclasses import dataclass
from functools import lru_cache

from bstar.errors import BStarError
from bstar.loop.tasks import Example

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
GAIN_VERBS = ("buys", "finds", "gets")
LOSS_VERBS = ("gives away", "loses", "sells")
MAX_VALUE = 99  # every intermediate value is at most 2 digits


@dataclass(frozen=True)
class Event:
    """One sentence of the story. kind: 'has' (a items), 'boxes' (has a boxes with b each), 'gain' (+a),
    'loss' (-a), 'mul' (times a: doubles / triples), 'buy' (+ a boxes with b each)."""

    kind: str
    a: int
    b: int = 0
    verb: str = ""


@dataclass(frozen=True)
class Problem:
    name: str
    pronoun: str
    item: str
    box: str
    events: tuple[Event, ...]

    def question(self) -> str:
        he, out = self.pronoun, []
        for e in self.events:
            if e.kind == "has":
                out.append(f"{self.name} has {e.a} {self.item}.")
            elif e.kind == "boxes":
                out.append(f"{self.name} has {e.a} {self.box} with {e.b} {self.item} each.")
            elif e.kind == "gain":
                out.append(f"{he.capitalize()} {e.verb} {e.a} more {self.item}.")
            elif e.kind == "loss":
                out.append(f"{he.capitalize()} {e.verb} {e.a} {self.item}.")
            elif e.kind == "mul":
                out.append(f"{he.capitalize()} {'doubles' if e.a == 2 else 'triples'} the number of {self.item}.")
            else:
                out.append(f"{he.capitalize()} buys {e.a} {self.box} with {e.b} {self.item} each.")
        ending = "left" if self.events[-1].kind == "loss" else "now"
        out.append(f"How many {self.item} does {he} have {ending}?")
        return " ".join(out)

    def answer(self) -> int:
        v = 0
        for e in self.events:
            v = _apply(v, e)
        return v


def _apply(v: int, e: Event) -> int:
    if e.kind == "has":
        return e.a
    if e.kind == "boxes":
        return e.a * e.b
    if e.kind == "gain":
        return v + e.a
    if e.kind == "loss":
        return v - e.a
    if e.kind == "mul":
        return v * e.a
    return v + e.a * e.b


# -- generation ----------------------------------------------------------------------------------


def random_problem(rng: random.Random) -> Problem:
    """A story of a start and 2 or 3 events; every value stays in 0..MAX_VALUE. Numbers of earlier
    sentences are reused now and then."""
    name, he = rng.choice(NAMES)
    item, box = rng.choice(ITEMS), rng.choice(CONTAINERS)
    used: list[int] = []

    def num(lo: int, hi: int) -> int:
        pool = [x for x in used if lo <= x <= hi]
        x = rng.choice(pool) if pool and rng.random() < 0.25 else rng.randint(lo, hi)
        used.append(x)
        return x

    if rng.random() < 0.5:
        events = [Event("boxes", num(2, 5), num(2, 5))]
    else:
        events = [Event("has", num(2, 12))]
    v = _apply(0, events[0])
    n_more = rng.randint(2, 3)
    while len(events) < 1 + n_more:
        kinds = ["gain"] * 3 + (["loss"] * 3 if v >= 3 else []) + ["buy"] * 2
        if v * 2 <= MAX_VALUE and not any(e.kind == "mul" for e in events):
            kinds += ["mul"]
        kind = rng.choice(kinds)
        if kind == "gain":
            e = Event("gain", num(2, 9), verb=rng.choice(GAIN_VERBS))
        elif kind == "loss":
            e = Event("loss", num(2, min(v - 1, 9)), verb=rng.choice(LOSS_VERBS))
        elif kind == "mul":
            e = Event("mul", 3 if v * 3 <= MAX_VALUE and v <= 9 and rng.random() < 0.3 else 2)
        else:
            e = Event("buy", num(2, 5), num(2, 5))
        if not 0 <= _apply(v, e) <= MAX_VALUE:
            continue
        events.append(e)
        v = _apply(v, e)
    if not any(e.kind in ("boxes", "buy") for e in events):
        box = CONTAINERS[0]  # not in the text: the parsed question gives the same Problem
    return Problem(name, he, item, box, tuple(events))


# -- solution styles ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Style:
    swap: bool = False  # "5 + 12", "4 * 3", "2 * 12": the new number first
    first: bool = False  # box purchases' products before the running total
    merge: bool = False  # two gains/losses (or a box purchase) in one line
    route: bool = False  # net change of two gains/losses first; doubling as v + v

    def name(self) -> str:
        on = [f for f in ("swap", "first", "merge", "route") if getattr(self, f)]
        return "+".join(on) or "story"


STYLES = tuple(Style(*bits) for bits in itertools.product((False, True), repeat=4))


def _add(v: int, op: str, x: int, swap: bool) -> str:
    return f"{x} + {v}" if op == "+" and swap else f"{v} {op} {x}"


def _prod(a: int, b: int, swap: bool) -> str:
    return f"{b} * {a}" if swap else f"{a} * {b}"


def render(p: Problem, style: Style) -> list[str]:
    """The solution of `p` in `style`: step lines, then '#### N'."""
    ev, s, lines = p.events, style, []
    if s.first:
        lines += [f"{_prod(e.a, e.b, s.swap)} = {e.a * e.b}" for e in ev if e.kind == "buy"]
    v, i = 0, 0
    while i < len(ev):
        e = ev[i]
        nxt = ev[i + 1] if i + 1 < len(ev) else None
        if e.kind == "has":
            v = e.a
        elif e.kind == "boxes":
            prod = _prod(e.a, e.b, s.swap)
            if s.merge and not s.route and nxt is not None and nxt.kind in ("gain", "loss"):
                op = "+" if nxt.kind == "gain" else "-"
                v = _apply(e.a * e.b, nxt)
                lines.append(f"{prod} {op} {nxt.a} = {v}")
                i += 1
            else:
                v = e.a * e.b
                lines.append(f"{prod} = {v}")
        elif e.kind in ("gain", "loss") and nxt is not None and nxt.kind in ("gain", "loss") and (s.merge or s.route):
            x, y = (e.a if e.kind == "gain" else -e.a), (nxt.a if nxt.kind == "gain" else -nxt.a)
            net, after = x + y, v + x + y
            if s.route and net != 0:
                if x > 0 and y > 0 or x < 0 and y < 0:
                    lines.append(f"{abs(x)} + {abs(y)} = {abs(net)}")
                else:
                    pos, neg = max(x, y), -min(x, y)
                    lines.append(f"{max(pos, neg)} - {min(pos, neg)} = {abs(net)}")
                lines.append(_add(v, "+" if net > 0 else "-", abs(net), s.swap) + f" = {after}")
            else:
                op1, op2 = ("+" if x > 0 else "-"), ("+" if y > 0 else "-")
                lines.append(f"{_add(v, op1, abs(x), s.swap)} {op2} {abs(y)} = {after}")
            v = after
            i += 1
        elif e.kind in ("gain", "loss"):
            after = _apply(v, e)
            lines.append(_add(v, "+" if e.kind == "gain" else "-", e.a, s.swap) + f" = {after}")
            v = after
        elif e.kind == "mul":
            after = v * e.a
            if s.route:
                lines.append(" + ".join([str(v)] * e.a) + f" = {after}")
            else:
                lines.append((f"{e.a} * {v}" if s.swap else f"{v} * {e.a}") + f" = {after}")
            v = after
        else:  # buy
            w, after = e.a * e.b, v + e.a * e.b
            if s.first:
                lines.append(_add(v, "+", w, s.swap) + f" = {after}")
            elif s.merge:
                prod = _prod(e.a, e.b, s.swap)
                lines.append((f"{prod} + {v}" if s.swap else f"{v} + {prod}") + f" = {after}")
            else:
                lines.append(f"{_prod(e.a, e.b, s.swap)} = {w}")
                lines.append(_add(v, "+", w, s.swap) + f" = {after}")
            v = after
        i += 1
    return lines + [f"#### {v}"]


def render_text(p: Problem, style: Style) -> str:
    return "\n".join(render(p, style))


def solutions(p: Problem) -> dict[str, Style]:
    """Every distinct solution text of `p` -> the first style (in STYLES order) that renders it."""
    out: dict[str, Style] = {}
    for s in STYLES:
        out.setdefault("\n".join(render(p, s)), s)
    return out


# -- reading a question back -------------------------------------------------------------------

_SENTENCE = re.compile(r"[^.?]+[.?]")
_RULES = (
    ("boxes", re.compile(r"^([A-Z][a-z]+) has (\d+) ([a-z]+) with (\d+) ([a-z]+) each\.$")),
    ("has", re.compile(r"^([A-Z][a-z]+) has (\d+) ([a-z]+)\.$")),
    ("buy", re.compile(r"^(?:He|She) buys (\d+) ([a-z]+) with (\d+) [a-z]+ each\.$")),
    ("gain", re.compile(rf"^(?:He|She) ({'|'.join(GAIN_VERBS)}) (\d+) more [a-z]+\.$")),
    ("loss", re.compile(rf"^(?:He|She) ({'|'.join(LOSS_VERBS)}) (\d+) [a-z]+\.$")),
    ("mul", re.compile(r"^(?:He|She) (doubles|triples) the number of [a-z]+\.$")),
)
_ENDING = re.compile(r"^How many ([a-z]+) does (he|she) have (?:now|left)\?$")


@lru_cache(maxsize=65536)
def parse_question(question: str) -> Problem:
    """The Problem whose question() is `question` (BStarError when the text is not one of this task's)."""
    sentences = [s.strip() for s in _SENTENCE.findall(question)]
    end = _ENDING.match(sentences[-1]) if sentences else None
    if not end:
        raise BStarError(f"not a built-in task question: {question[:80]!r}")
    name, box, events = "", "boxes", []
    for s in sentences[:-1]:
        hits = [(kind, rx.match(s)) for kind, rx in _RULES if rx.match(s)]
        if not hits:
            raise BStarError(f"not a built-in task sentence: {s!r}")
        kind, m = hits[0]
        if kind == "boxes":
            name, box = m[1], m[3]
            events.append(Event("boxes", int(m[2]), int(m[4])))
        elif kind == "has":
            name = m[1]
            events.append(Event("has", int(m[2])))
        elif kind == "buy":
            box = m[2]
            events.append(Event("buy", int(m[1]), int(m[3])))
        elif kind in ("gain", "loss"):
            events.append(Event(kind, int(m[2]), verb=m[1]))
        else:
            events.append(Event("mul", 2 if m[1] == "doubles" else 3))
    p = Problem(name, end[2], end[1], box, tuple(events))
    if p.question() != question:
        raise BStarError(f"not a built-in task question: {question[:80]!r}")
    return p


# -- true step labels --------------------------------------------------------------------------

_NUM = re.compile(r"\d+")
_EQUATION = re.compile(r"^\s*(\d+(?:\s*[-+*]\s*\d+)*)\s*=\s*(\d+)\s*$")
_ANSWER = re.compile(r"^####\s*(\d+)\s*$")

Operand = tuple  # ("n", value) or ("p", sorted factors)
Key = tuple  # (sorted (sign, operand) pairs, result)


def parse_equation(line: str) -> tuple[list[tuple[str, Operand]], int, int] | None:
    """'12 + 3 * 4 = 24' -> ([('+', ('n', 12)), ('+', ('p', (3, 4)))], value of the left side, 24);
    None when the line is not an equation of numbers, + - * and one '='."""
    m = _EQUATION.match(line)
    if not m:
        return None
    toks = re.findall(r"\d+|[-+*]", m[1])
    terms, sign, factors = [], "+", []
    for t in toks + ["+"]:
        if t == "*":
            continue
        if t in "+-":
            operand = ("n", factors[0]) if len(factors) == 1 else ("p", tuple(sorted(factors)))
            terms.append((sign, operand))
            sign, factors = t, []
        else:
            factors.append(int(t))
    value = 0
    for sg, (kind, x) in terms:
        v = x if kind == "n" else _product(x)
        value += v if sg == "+" else -v
    return terms, value, int(m[2])


def _product(xs) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


def _key(terms, result: int) -> Key:
    return (tuple(sorted(terms)), result)


def _partitions(items: list) -> list[list[list]]:
    if not items:
        return [[]]
    first, rest = items[0], items[1:]
    out = []
    for part in _partitions(rest):
        out.append([[first]] + part)
        for i in range(len(part)):
            out.append(part[:i] + [[first] + part[i]] + part[i + 1 :])
    return out


@lru_cache(maxsize=65536)
def good_keys(p: Problem) -> frozenset:
    """The equations (as order-free keys) that lie on some valid route to the answer of `p`."""
    keys: set = set()
    # stretches of gains / losses / purchases between multiplications; each item: (signed value, factors)
    stretches: list[list[tuple[int, tuple | None]]] = [[]]
    totals = []  # value entering each stretch after the first
    v = 0
    for e in p.events:
        if e.kind == "mul":
            keys.add(_key([("+", ("p", tuple(sorted((v, e.a)))))], v * e.a))
            keys.add(_key([("+", ("n", v))] * e.a, v * e.a))
            v *= e.a
            totals.append(v)
            stretches.append([(v, None)])  # the count entering the stretch: a plain number
            continue
        if e.kind in ("boxes", "buy"):
            f = tuple(sorted((e.a, e.b)))
            keys.add(_key([("+", ("p", f))], e.a * e.b))
            stretches[-1].append((e.a * e.b, f))
        elif e.kind == "has":
            stretches[-1].append((e.a, None))
        else:
            stretches[-1].append((e.a if e.kind == "gain" else -e.a, None))
        v = _apply(v, e)
    for items in stretches:
        idx = list(range(len(items)))
        for r in range(1, len(idx) + 1):
            for subset in itertools.combinations(idx, r):
                total = sum(items[i][0] for i in subset)
                for flip in (1, -1):
                    if flip * total < 0 or (flip == -1 and total == 0):
                        continue
                    for part in _partitions(list(subset)):
                        if len(part) == 1 and len(part[0]) == 1:
                            continue  # a lone number is no step (its product is keyed above)
                        for terms in _operand_choices(items, part, flip):
                            keys.add(_key(terms, flip * total))
    return frozenset(keys)


def _operand_choices(items, part, flip):
    """The ways to write each group of a partition as an operand: a single item as its number (or, for a
    product, as 'a * b' inline), a group of several as the number it sums to (computed earlier)."""
    options = []
    for group in part:
        val = flip * sum(items[i][0] for i in group)
        sign = "+" if val >= 0 else "-"
        opts = [(sign, ("n", abs(val)))]
        if len(group) == 1 and items[group[0]][1] is not None:
            opts.append((sign, ("p", items[group[0]][1])))
        options.append(opts)
    return [list(c) for c in itertools.product(*options)]


def given_numbers(p: Problem) -> set[int]:
    """Numbers a solution may use without computing them: those of the question, 2 / 3 for doubles / triples."""
    out = {int(x) for x in _NUM.findall(p.question())}
    out |= {e.a for e in p.events if e.kind == "mul"}
    return out


def label_lines(p: Problem, lines: list[str]) -> list[bool]:
    """True step labels of a solution's (stripped, non-empty) lines."""
    keys, avail, out, answered = good_keys(p), given_numbers(p), [], False
    for line in lines:
        if answered:
            out.append(False)
            continue
        m = _ANSWER.match(line)
        if m:
            answered = True
            out.append(int(m[1]) == p.answer() and int(m[1]) in avail)
            continue
        eq = parse_equation(line)
        if eq is None:
            out.append(False)
            continue
        terms, value, result = eq
        ok = value == result
        ok = ok and all((x in avail) if k == "n" else all(f in avail for f in x) for _, (k, x) in terms)
        ok = ok and _key(terms, result) in keys
        out.append(ok)
        avail.add(result)
    return out


def solution_lines(text: str) -> list[str]:
    """A response's steps as the PRM sees them (bstar.engine.entrypoints.prm.split_steps): stripped non-empty lines."""
    return [s.strip() for s in text.split("\n") if s.strip()] or [text.strip()]


def step_labels(question: str, text: str) -> list[bool]:
    """True labels of the steps of `text` (a response to `question`), aligned with bstar.PRM's steps."""
    return label_lines(parse_question(question), solution_lines(text))


def is_valid(question: str, text: str) -> bool:
    """Every step good and the last one the right answer."""
    p = parse_question(question)
    lines = solution_lines(text)
    labels = label_lines(p, lines)
    return all(labels) and bool(_ANSWER.match(lines[-1]))


def normalize(text: str) -> str:
    return "\n".join(" ".join(s.split()) for s in solution_lines(text))


def style_of(question: str, text: str) -> str | None:
    """The style of a valid solution: the name of the first style that renders it (Style.name), 'other'
    for a valid solution no single style renders (e.g. operands swapped in some lines only); None when
    the solution is not valid."""
    if not is_valid(question, text):
        return None
    s = _solutions_cached(question).get(normalize(text))
    return s.name() if s is not None else "other"


@lru_cache(maxsize=65536)
def _solutions_cached(question: str) -> dict[str, Style]:
    return solutions(parse_question(question))


def distinct_valid(question: str, texts: list[str]) -> int:
    """Distinct valid solutions among `texts` (whitespace-normalised): the distinct correct styles of one
    query (solutions rendered by no single style count one each)."""
    return len({normalize(t) for t in texts if is_valid(question, t)})


# -- wrong solutions (PRM training data) -------------------------------------------------------------

_TOKEN = re.compile(r"\d+|[-+*=]")


def _evaluate(tokens: list[str]) -> int:
    """Value of '3 + 4 * 2 - 1' tokens (* before + and -)."""
    total, sign, prod = 0, 1, None
    for t in tokens + ["+"]:
        if t in "+-":
            total += sign * prod
            sign, prod = (1 if t == "+" else -1), None
        elif t != "*":
            prod = int(t) if prod is None else prod * int(t)
    return total


def _slip(lines: list[str], i: int, delta: int) -> list[str]:
    """Line i's result off by delta, the error carried into the later lines that use it, and the answer
    line stating the last result."""
    out, changed = list(lines[:i]), {}
    for j, line in enumerate(lines[i:-1], start=i):
        toks = _TOKEN.findall(line)
        lhs, old = toks[: toks.index("=")], int(toks[-1])
        lhs = [str(changed.get(int(t), int(t))) if t.isdigit() else t for t in lhs]
        new = _evaluate(lhs) + (delta if j == i else 0)
        if new != old:
            changed[old] = new
        out.append(" ".join(lhs) + f" = {new}")
    last = _TOKEN.findall(out[-1])[-1] if out else "0"
    return out + [f"#### {last}"]


def _mutate(p: Problem, rng: random.Random) -> Problem | None:
    """The problem with one event misread: a number changed or taken from elsewhere, a gain read as a loss
    (or back), the factor changed, an event dropped or repeated, two events swapped."""
    ev = list(p.events)
    numbers = [x for e in ev for x in (e.a, e.b) if x]
    i = rng.randrange(len(ev))
    e, how = ev[i], rng.randrange(6)
    if how == 0 and e.kind != "mul":
        e = Event(e.kind, max(1, e.a + rng.choice((-3, -2, -1, 1, 2, 3))), e.b, e.verb)
    elif how == 1 and e.kind != "mul":
        e = Event(e.kind, rng.choice(numbers), e.b, e.verb)
    elif how == 2 and e.kind in ("gain", "loss"):
        e = Event("loss" if e.kind == "gain" else "gain", e.a, e.b, e.verb)
    elif how == 3 and e.kind == "mul":
        e = Event("mul", 5 - e.a)
    elif how == 4 and i > 0:
        ev.insert(i, e) if rng.random() < 0.5 else ev.pop(i)
        e = None
    elif how == 5 and 0 < i < len(ev) - 1:
        ev[i], ev[i + 1] = ev[i + 1], ev[i]
        e = None
    else:
        return None
    if e is not None:
        ev[i] = e
    q = Problem(p.name, p.pronoun, p.item, p.box, tuple(ev))
    v = 0
    for x in q.events:
        v = _apply(v, x)
        if not 0 <= v <= MAX_VALUE:
            return None
    return q if len(q.events) >= 2 and q.events != p.events else None


def wrong_solution(p: Problem, rng: random.Random) -> str:
    """A plausible wrong solution of `p` in a random style: a misread problem solved correctly, an
    arithmetic slip carried on, an answer line that is not the last result, or a solution that stops
    early. (Labels come from step_labels, not from how it was made.)"""
    style = rng.choice(STYLES)
    for _ in range(20):
        how = rng.random()
        if how < 0.45:
            q = _mutate(p, rng)
            if q is not None:
                return "\n".join(render(q, style))
        lines = render(p, style)
        if how < 0.8:
            i = rng.randrange(len(lines) - 1)
            return "\n".join(_slip(lines, i, rng.choice((-10, -3, -2, -1, 1, 2, 3, 10))))
        if how < 0.9:
            ans = p.answer() + rng.choice((-2, -1, 1, 2))
            if ans >= 0:
                return "\n".join(lines[:-1] + [f"#### {ans}"])
        elif len(lines) > 2:
            k = rng.randrange(1, len(lines) - 1)
            return "\n".join(lines[:k] + [f"#### {_TOKEN.findall(lines[k - 1])[-1]}"])
    return "\n".join(render(p, style)[:-1] + [f"#### {p.answer() + 1}"])


# -- datasets -----------------------------------------------------------------------------------


def generate(
    n: int,
    seed: int | str,
    exclude: set[str] | frozenset = frozenset(),
    split: str = "train",
    styles: str = "random",
) -> list[Example]:
    """n distinct problems from one seeded stream, skipping questions in `exclude`. styles: 'random' draws
    the gold solution's style at random per problem (from a stream of its own: the questions do not depend
    on it); 'story' writes every gold solution in story order."""
    if n < 0:
        raise BStarError(f"number of synthetic problems must be >= 0, got {n}")
    if styles not in ("story", "random"):
        raise BStarError(f"styles must be 'story' or 'random', got {styles!r}")
    rng = random.Random(f"bstar-synthetic-2-{seed}-{split}")
    style_rng = random.Random(f"bstar-styles-{seed}-{split}")
    seen: set[str] = set()
    out: list[Example] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise BStarError(f"could not generate {n} distinct synthetic problems")
        p = random_problem(rng)
        q = p.question()
        if q in seen or q in exclude:
            continue
        seen.add(q)
        style = style_rng.choice(STYLES) if styles == "random" else Style()
        out.append(Example(f"synth-{split}-{len(out)}", q, str(p.answer()), "\n".join(render(p, style)), "gsm8k"))
    return out


def make_splits(n_train: int, n_test: int, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """(train, test): disjoint questions; test depends only on (n_test, seed), train's first
    examples stay the same when n_train grows."""
    test = generate(n_test, seed, split="test")
    train = generate(n_train, seed, exclude={e.question for e in test}, split="train")
    return train, test
