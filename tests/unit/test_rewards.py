"""Answer verification (bstar.loop.rewards) on the real GSM8K / MATH500 references, hand cases,
adversarial fuzzing, and its time limit on the main thread, off it, and in worker processes."""

import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import bstar.loop.rewards as rw
from bstar.engine.errors import RequestError
from bstar.errors import DataError
from bstar.loop.rewards import extract_answer, grade, grade_batch, gsm8k_gold, has_final_answer
from bstar.utils.jsonl import read_jsonl


def _slow(n):
    """(answer, gold): a correct answer whose symbolic check takes ~1-3 s of sympy. The pre-screen refuses it
    (a symbolic base to a power above MAX_SYMBOLIC_EXPONENT), so the time limit, the last resort behind the
    screen, is tested on it directly (rewards._time_limited_equal). sympy caches results: a distinct n per use."""
    return f"(x+1)^{{{n}}}(x-1)^{{{n}}}", f"(x^2-1)^{{{n}}}"


SLOW = _slow(200)
SHORT = 0.2  # a time limit far below SLOW's cost
BOUND = 2.5  # what any limited call may take (limit + kill grace + slack for a loaded machine)


@pytest.fixture(scope="module")
def gsm8k(shared_data):
    return read_jsonl(shared_data / "gsm8k_test.jsonl")


@pytest.fixture(scope="module")
def math500(shared_data):
    return read_jsonl(shared_data / "math500_test.jsonl")


# ---------------------------------------------------------------------------------------------
# GSM8K references


def _hash_answer(solution):
    # Independent of the module: the text after '####', thousands commas dropped.
    return solution.split("####")[-1].strip().replace(",", "")


def test_gsm8k_reference_extraction(gsm8k):
    assert len(gsm8k) == 1319
    for row in gsm8k:
        want = _hash_answer(row["answer"])
        assert extract_answer(row["answer"], "gsm8k") == want, row["answer"][-80:]
        assert gsm8k_gold(row["answer"]) == want


def test_gsm8k_reference_grading(gsm8k):
    sols = [r["answer"] for r in gsm8k]
    golds = [_hash_answer(s) for s in sols]
    assert all(grade(s, g, "gsm8k") for s, g in zip(sols, golds))
    assert all(grade(s, s, "gsm8k") for s in sols[:50])  # gold given as a full reference
    wrong = [str(int(g) + random.Random(i).choice([-1, 1, 10])) for i, g in enumerate(golds)]
    assert not any(grade(s, w, "gsm8k") for s, w in zip(sols, wrong))


def test_gsm8k_other_answer_formats(gsm8k):
    """The reasoning of each reference with its `####` line replaced by other final-answer styles."""
    rng = random.Random(0)
    for row in gsm8k[:300]:
        body, gold = row["answer"].rsplit("####", 1)
        n = int(gold.strip().replace(",", ""))
        for tail, want in [
            (f"The answer is: {n}", True),
            (f"The answer is ${n:,}.", True),
            (f"So the final answer is $\\boxed{{{n}}}$.", True),
            (f"The answer is {n}.0 dollars.", True),
            (f"The answer is {n + rng.choice([-2, -1, 1, 2])}.", False),
            (f"#### {n * 10 + 1}", False),
        ]:
            assert grade(body + tail, str(n), "gsm8k") is want, tail


# ---------------------------------------------------------------------------------------------
# MATH500 references


def _perturb(answer):
    """A wrong answer: the first number + 1, else an added term."""
    m = re.search(r"\d+", answer)
    if m:
        return answer[: m.start()] + str(int(m.group()) + 1) + answer[m.end() :]
    return answer + "+1"


def test_math500_reference_answers(math500):
    sols = [r["solution"] for r in math500]
    golds = [r["answer"] for r in math500]
    ok = grade_batch(sols, golds, "math", workers=2, progress=False)
    rate = sum(ok) / len(ok)
    print(f"\nMATH500: boxed reference answer graded equal to `answer`: {rate:.1%} ({sum(ok)}/{len(ok)})")
    assert rate >= 0.99

    wrong = ["The answer is $\\boxed{" + _perturb(g) + "}$." for g in golds]
    got = grade_batch(wrong, golds, "math", workers=2, progress=False)
    rejected = 1 - sum(got) / len(got)
    print(f"MATH500: perturbed answers graded wrong: {rejected:.1%}")
    assert rejected >= 0.97

    # Another problem's answer, where the two answers differ as strings.
    perm = list(range(len(golds)))
    random.Random(1).shuffle(perm)
    pairs = [(golds[j], g) for j, g in zip(perm, golds) if golds[j].replace(" ", "") != g.replace(" ", "")]
    got = grade_batch(
        ["\\boxed{" + a + "}" for a, _ in pairs], [g for _, g in pairs], "math", workers=0, progress=False
    )
    rejected = 1 - sum(got) / len(got)
    print(f"MATH500: other problems' answers graded wrong: {rejected:.1%} of {len(pairs)}")
    assert rejected >= 0.98


_FRAC = re.compile(r"(-?)\\[dt]?frac\{(\d+)\}\{(\d+)\}|(-?\d+)")


def test_math500_equivalent_forms(math500):
    """Numeric answers rewritten in other forms, built independently with Fraction, grade equal;
    this goes through math-verify's symbolic path rather than string equality."""
    cases = []
    for r in math500:
        m = _FRAC.fullmatch(r["answer"].strip())
        if not m:
            continue
        v = Fraction(int(m[2]), int(m[3])) * (-1 if m[1] else 1) if m[2] else Fraction(int(m[4]))
        p, q = v.numerator, v.denominator
        cases.append((f"\\boxed{{\\frac{{{3 * p}}}{{{3 * q}}}}}", r["answer"], True))
        cases.append((f"\\boxed{{{p}/{q}}}", r["answer"], True))
        cases.append((f"\\boxed{{{float(v):.10f}}}", r["answer"], True))
        cases.append((f"\\boxed{{\\frac{{{p + q}}}{{{q}}}}}", r["answer"], False))  # v + 1
    assert len(cases) > 4 * 150
    got = grade_batch([c[0] for c in cases], [c[1] for c in cases], "math", workers=2, progress=False)
    agree = sum(g == c[2] for g, c in zip(got, cases)) / len(cases)
    print(f"\nMATH500 numeric answers in other forms graded as expected: {agree:.1%} of {len(cases)}")
    assert agree >= 0.99


# ---------------------------------------------------------------------------------------------
# Hand cases

HAND = [
    # response, gold, task, expected
    ("The total is $1,000.", "1000", "gsm8k", True),
    ("#### $1,000", "1000", "gsm8k", True),
    ("\\boxed{\\$1{,}000}", "1000", "math", True),
    ("She pays 50% of it. The answer is 50%", "50", "gsm8k", True),
    ("\\boxed{50\\%}", "50", "math", True),
    ("#### 3.0", "3", "gsm8k", True),
    ("The answer is 3.50", "3.5", "gsm8k", True),
    ("\\boxed{\\frac{1}{2}}", "0.5", "math", True),
    ("\\boxed{0.5}", "\\frac{1}{2}", "math", True),
    ("\\boxed{\\dfrac12}", "\\frac{1}{2}", "math", True),
    ("thus \\boxed{\\frac{a}{b}} and \\boxed{\\frac{\\sqrt{a^{2}}}{b}} last", "\\frac{\\sqrt{a^2}}{b}", "math", True),
    ("first \\boxed{7}, finally \\fbox{8}", "8", "math", True),
    ("The answer is 42.", "42", "gsm8k", True),
    ("The answer is 42.", "42", "math", True),
    ("He earns 12 dollars", "12", "gsm8k", True),
    ("\\boxed{12 \\text{ dollars}}", "12", "math", True),
    ("\\boxed{90^\\circ}", "90", "math", True),
    ("The answer is -7.", "-7", "gsm8k", True),
    ("\\boxed{-\\frac{3}{4}}", "-0.75", "math", True),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", "math", True),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)", "math", True),
    ("\\boxed{4210_{5}}", "4210_5", "math", True),
    # wrong answers
    ("The answer is 7.", "-7", "gsm8k", False),
    ("\\boxed{7}", "-7", "math", False),
    ("The answer is 41", "42", "gsm8k", False),
    ("#### 1,001", "1000", "gsm8k", False),
    ("\\boxed{\\frac{1}{3}}", "0.5", "math", False),
    ("\\boxed{x^2+1}", "(x+1)^2", "math", False),
    ("\\boxed{4210_{6}}", "4210_5", "math", False),
    ("\\boxed{\\left( 3, \\frac{\\pi}{3} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)", "math", False),
    ("no answer here", "42", "math", False),
    ("", "42", "gsm8k", False),
]


@pytest.mark.parametrize("response,gold,task,want", HAND)
def test_hand_cases(response, gold, task, want):
    assert grade(response, gold, task) is want


def test_extract_answer_canonical():
    assert extract_answer("so $1,000.00 in total", "gsm8k") == "1000"
    assert extract_answer("The answer is: -12.50", "gsm8k") == "-12.5"
    assert extract_answer("\\boxed{\\dfrac{1}{2}}", "math") == extract_answer("\\boxed{\\frac{1}{2}}", "math")
    assert extract_answer("\\boxed{\\frac{a}{\\sqrt{b}}}", "math") == "\\frac{a}{\\sqrt{b}}"
    assert extract_answer("steps 1 2 3 then 4", "gsm8k") == "4"  # last-number fallback
    assert extract_answer("no boxed answer", "math") is None
    assert extract_answer("\\boxed{1", "math") is None  # unclosed


def test_bad_arguments():
    with pytest.raises(RequestError, match="unknown grading task"):
        grade("1", "1", "aime")
    with pytest.raises(RequestError, match="unknown grading task"):
        extract_answer("1", "gsm")
    with pytest.raises(RequestError):
        grade(None, "1", "math")
    with pytest.raises(RequestError, match="2 responses but 1 golds"):
        grade_batch(["1", "2"], ["1"], "math", workers=0)
    with pytest.raises(DataError, match="####"):
        gsm8k_gold("no hash line")


# ---------------------------------------------------------------------------------------------
# Untrusted input: pathological answers are False, fast, and nothing raises


PATHOLOGICAL = [
    "\\boxed{10^{10^{10}}}",
    "\\boxed{9^9^9^9}",
    "The answer is 10**10**10",
    "\\boxed{{{9^{999}}^{999}}^{999}}",
    "\\boxed{(10^{100})!}",
    "\\boxed{1000000!}",
    "\\boxed{\\sum_{k=1}^{10^{9}} k^{k}}",
    "\\boxed{" + "{" * 200 + "1" + "}" * 200 + "}",
    "\\boxed{" + "\\sqrt{" * 300 + "2" + "}" * 300 + "}",
    "\\boxed{" * 200_000,
    "\\boxed{" + "9" * 100_000 + "}",
    "x" * 3_000_000 + "\\boxed{" + "(x+1)" * 2000 + "}",
]


@pytest.mark.parametrize("task", ["math", "gsm8k"])
def test_pathological_answers_false_fast(task):
    for resp in PATHOLOGICAL:
        t0 = time.monotonic()
        assert grade(resp, "1", task) is False
        assert time.monotonic() - t0 < BOUND, resp[:40]


FRAGMENTS = [
    "\\boxed{",
    "\\fbox{",
    "}",
    "{",
    "^",
    "**",
    "9",
    "10",
    "99999999",
    "!",
    "\\frac",
    "\\sqrt",
    "(",
    ")",
    "x",
    "+",
    "-",
    "*",
    "/",
    "#### ",
    "The answer is ",
    "$",
    "\\left(",
    "\\right)",
    ",",
    ".",
    "%",
    "e",
    "\\pi",
    "\\sum",
    "_",
    "\\text{",
    " ",
    "\n",
    "\\\\",
    "\\{",
    "\\}",
    "=",
    "\\infty",
    "\\cup",
    "[",
    "]",
    "&",
    "\\begin{pmatrix}",
    "\\end{pmatrix}",
]
FUZZ = settings(
    max_examples=120, deadline=timedelta(seconds=10), database=None, suppress_health_check=[HealthCheck.too_slow]
)


@FUZZ
@given(
    st.text(max_size=400), st.sampled_from(["1", "\\frac{1}{2}", "x+1", "(1,2)"]), st.sampled_from(["gsm8k", "math"])
)
def test_fuzz_arbitrary_text(response, gold, task):
    assert grade(response, gold, task, timeout=0.5) in (True, False)
    extract_answer(response, task)


@FUZZ
@given(
    st.lists(st.sampled_from(FRAGMENTS), max_size=80).map("".join),
    st.sampled_from(["1", "\\frac{1}{2}", "x+1", "(1,2)", "9^{9}"]),
    st.sampled_from(["gsm8k", "math"]),
)
@example("\\boxed{" * 5000, "1", "math")
@example("\\boxed{9^9^9^9}", "1", "math")
@example("\\boxed{10**10**10}", "1", "math")
@example("The answer is " + "9" * 50_000, "1", "gsm8k")
@example("\\boxed{" + "9" * 50_000 + "}", "1", "math")
@example("\\boxed{" + "-" * 300 + "1}", "1", "math")
def test_fuzz_adversarial_structure(response, gold, task):
    assert grade(response, gold, task, timeout=0.5) in (True, False)


# ---------------------------------------------------------------------------------------------
# The time limit: main thread, other threads, worker processes


def test_time_limit_main_thread():
    t0 = time.monotonic()
    assert rw._time_limited_equal(*SLOW, SHORT) is rw.TIMED_OUT
    assert time.monotonic() - t0 < BOUND
    # The same check given time is True: it was the limit, not the answer, that said no.
    assert rw._time_limited_equal(*SLOW, 120) is True


def test_outer_alarm_is_restored():
    """A caller's own SIGALRM handler and pending timer survive a grade() call."""
    fired = []
    old = signal.signal(signal.SIGALRM, lambda *_: fired.append(1))
    hook = sys.unraisablehook
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)
        assert grade("\\boxed{\\frac{2}{4}}", "0.5", "math") is True
        assert rw._time_limited_equal(*_slow(199), SHORT) is rw.TIMED_OUT
        assert sys.unraisablehook is hook
        assert signal.getsignal(signal.SIGALRM) is not rw._on_alarm
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 20.0 < left < 30.0
        signal.setitimer(signal.ITIMER_REAL, 0.01)
        time.sleep(0.2)
        assert fired == [1]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _in_thread(fn):
    out = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised on the test's thread
            out["error"] = e

    th = threading.Thread(target=run)
    th.start()
    th.join(300)
    assert not th.is_alive()
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_time_limit_other_thread():
    assert _in_thread(lambda: grade("\\boxed{\\frac{1}{2}}", "0.5", "math")) is True  # starts the helper

    def limited():
        t0 = time.monotonic()
        return rw._time_limited_equal(*SLOW, SHORT), time.monotonic() - t0

    ok, took = _in_thread(limited)
    assert ok is rw.TIMED_OUT and took < BOUND
    assert _in_thread(lambda: grade(PATHOLOGICAL[0], "1", "math")) is False
    assert _in_thread(lambda: rw._time_limited_equal(*SLOW, 120)) is True


def test_time_limit_in_worker_processes(monkeypatch):
    slow = _slow(203)  # (not SLOW: the retries run in this process, where other tests cached SLOW's result)
    responses = [f"\\boxed{{{slow[0]}}}", "\\boxed{0.5}", f"\\boxed{{{slow[0]}}}", PATHOLOGICAL[1]]
    golds = [slow[1], "\\frac12", slow[1], "1"]
    t0 = time.monotonic()
    # the workers' pre-screen passes the slow answer (a bound raised in them), so only the limit stops it
    code = "import bstar.loop.rewards as r; r.MAX_SYMBOLIC_EXPONENT = 10**4; r._worker_main()"
    monkeypatch.setattr(rw, "_CHILD_CODE", code)
    monkeypatch.setattr(rw, "MAX_SYMBOLIC_EXPONENT", 10**4)  # (the retries, alone, run in this process)
    stats = {}
    assert grade_batch(responses, golds, "math", workers=2, timeout=SHORT, progress=False, stats=stats) == [
        False,
        True,
        False,
        False,
    ]
    # retried alone once, then wrong for time; the pathological item refused as too large, not timed
    assert stats == {"timed_out": 2, "timed_out_twice": 2, "too_large": 1}
    assert rw.limited(stats) == 3
    # A user's own process pool (spawned workers run grade on their main thread).
    with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
        assert ex.submit(rw._time_limited_equal, *SLOW, SHORT).result(timeout=120) is rw.TIMED_OUT
        assert ex.submit(grade, "\\boxed{0.5}", "\\frac12", "math").result(timeout=120) is True
    print(f"\nworker-process time-limit checks: {time.monotonic() - t0:.1f}s")


class _StopsOnItem(rw._Worker):
    """A worker that freezes (SIGSTOP) when handed item 1: a hang no time limit inside it can end."""

    made = []

    def __init__(self):
        super().__init__()
        self.made.append(self)

    def send(self, idx, job, args, limit):
        if idx == 1:  # frozen before the item is written: it can never answer item 1 first (a race under load)
            os.kill(self.proc.pid, signal.SIGSTOP)
        super().send(idx, job, args, limit)


def test_hung_worker_is_killed(monkeypatch):
    """The frozen worker is killed and replaced; its item is graded again alone afterwards, so a hang (or a
    busy machine) does not change its reward, and the retry is counted."""
    monkeypatch.setattr(rw, "_Worker", _StopsOnItem)
    responses = ["\\boxed{0.5}", "\\boxed{0.5}", "\\boxed{7}", "\\boxed{x+1}"]
    golds = ["\\frac12", "\\frac12", "7", "1+x"]
    stats = {}
    got = grade_batch(responses, golds, "math", workers=1, timeout=0.5, progress=False, stats=stats)
    assert got == [True, True, True, True] and stats == {"timed_out": 1, "timed_out_twice": 0, "too_large": 0}
    assert len(_StopsOnItem.made) == 2  # the frozen worker was replaced
    assert all(w.proc.poll() is not None for w in _StopsOnItem.made)  # and none is left running


def test_script_without_main_guard(tmp_path):
    """Helper processes do not re-import the caller's __main__ (no `if __name__` guard needed)."""
    script = tmp_path / "grade_script.py"
    script.write_text(
        "import json, threading\n"
        "from bstar.loop.rewards import grade, grade_batch\n"
        "out = grade_batch(['\\\\boxed{0.5}', '#### 3'], ['\\\\frac12', '4'], 'math', workers=1, progress=False)\n"
        "box = []\n"
        "t = threading.Thread(target=lambda: box.append(grade('\\\\boxed{2/4}', '0.5', 'math')))\n"
        "t.start(); t.join()\n"
        "print(json.dumps(out + box))\n"
    )
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == [True, False, True]


def test_hung_sandbox_is_killed():
    box = rw._Sandbox()
    w = box._ensure()
    os.kill(w.proc.pid, signal.SIGSTOP)
    t0 = time.monotonic()
    assert box.call("symbolic", ("\\frac{1}{2}", "0.5", 0.3), 0.3) is rw.TIMED_OUT  # (grade() says False)
    assert time.monotonic() - t0 < BOUND
    assert w.proc.poll() is not None
    assert box.call("symbolic", ("\\frac{1}{2}", "0.5", 5.0), 5.0) is True  # a fresh helper
    box._worker.stop()


def test_grade_batch_matches_grade():
    rng = random.Random(3)
    responses, golds = [], []
    for _ in range(60):
        a, b = rng.randint(-50, 50), rng.randint(1, 9)
        responses.append(rng.choice([f"\\boxed{{\\frac{{{a}}}{{{b}}}}}", f"The answer is {a}.", f"#### {a * b}"]))
        golds.append(rng.choice([str(Fraction(a, b)), str(a), f"\\frac{{{a * b}}}{{{b}}}"]))
    want = [grade(r, g, "math") for r, g in zip(responses, golds)]
    assert 0 < sum(want) < len(want)
    assert grade_batch(responses, golds, "math", workers=2, progress=False) == want
    assert grade_batch(responses, golds, "math", workers=0, progress=False) == want
    assert grade_batch([], [], "math") == []


def test_concurrent_threads():
    cases = [(f"\\boxed{{\\frac{{{k}}}{{4}}}}", str(k / 4), k % 3 != 0) for k in range(1, 13)]
    responses = [r for r, _, _ in cases]
    golds = [g if ok else str(k / 4 + 1) for k, (_, g, ok) in enumerate(cases, start=1)]
    with cf.ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda rg: grade(*rg, "math"), zip(responses, golds)))
    assert got == [ok for _, _, ok in cases]


def test_has_final_answer():
    """An explicit answer step, what the PRM scores as the answer (without one a candidate gets the
    reference's -5): '#### N' / 'The answer is' / \\boxed{} for GSM8K, \\boxed{} / 'The answer is' for MATH."""
    assert has_final_answer("3 + 4 = 7\n#### 7", "gsm8k")
    assert has_final_answer("so the answer is 7.", "gsm8k") and has_final_answer("\\boxed{7}", "gsm8k")
    assert not has_final_answer("3 + 4 = 7", "gsm8k")  # grading would still read the last number
    assert not has_final_answer("3 + 4 = 7\n#### seven", "gsm8k")
    assert has_final_answer("so $\\boxed{\\frac{1}{2}}$", "math") and has_final_answer("The answer is $x$.", "math")
    assert not has_final_answer("#### 7", "math") and not has_final_answer("x = 7", "math")
    with pytest.raises(RequestError):
        has_final_answer("x", "chess")


def test_math_verify_is_imported_on_first_use():
    """The engine, the model factory and the GPU checks import this module (through the built-in
    task's tokenizer): they must run where math-verify is absent (a GPU machine's image), and
    grading imports it when it first needs it."""
    absent = (
        "import sys; sys.modules['math_verify'] = None; "
        "import bstar.testing.model_factory, bstar.engine, bstar.loop.controller; print('ok')"
    )
    r = subprocess.run([sys.executable, "-c", absent], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
    lazy = (
        "import sys, bstar.loop.rewards as rw; before = 'math_verify' in sys.modules; "
        "print(before, rw.grade('the answer is \\\\boxed{\\\\frac{1}{2}}', '0.5', 'math'), "
        "'math_verify' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", lazy], capture_output=True, text=True, timeout=300)
    assert r.stdout.split() == ["False", "True", "True"], (r.stdout, r.stderr[-2000:])


@pytest.mark.parametrize("workers", [0, 1])
def test_junk_around_a_right_answer_is_graded_wrong(workers):
    """The documented rule (docs/errors.md, rewards.is_junk): a right answer buried in a 10 MB response, or
    followed by 1,000 NUL bytes (more than 16 control characters but tab/newline/CR), gets no reward."""
    right = "Adding them gives $\\boxed{\\frac{1}{2}}$."
    noise = "".join(chr(c) for c in (0, 7, 0x0E, 0x1F, 0x7F))
    responses = [
        right,
        "x" * 10_000_000 + right,
        right + "\x00" * 1000,
        noise * 4 + right,  # 20 control characters
        "a" * (rw.MAX_RESPONSE_CHARS - len(right)) + right,  # at the limit: still graded
        noise * 3 + right + "\x00",  # 16, a byte-level model's noise: still graded
    ]
    golds = ["0.5"] * len(responses)
    got = grade_batch(responses, golds, "math", workers=workers, progress=False)
    assert got == [True, False, False, False, True, True]
    assert [grade(r, g, "math") for r, g in zip(responses, golds)] == got
    assert grade("#### 18\t\r\n", "18", "gsm8k") is True


def test_work_is_bounded_by_counts_not_the_clock(shared_data):
    """What could keep sympy busy is refused before it starts, whatever the time limit (a generous one here):
    the verdict is the same on any machine. Every MATH500 reference answer passes the same screen."""
    too_large = [
        "(x+1)^{10000}",  # expands for minutes: a symbolic base to a big power
        "(x+y+z)^{17}",
        "(x+1)(x+2)(x+3)(x+4)(x+5)(x+6)(x+7)(x+8)(x+9)",  # more groups than MAX_GROUPS
        "+".join(f"x_{{{k}}}" for k in range(40)),  # more operations than MAX_OPERATIONS
    ]
    responses = [f"\\boxed{{{a}}}" for a in too_large] + ["\\boxed{\\frac{2 \\cdot 7}{2}}", "\\boxed{(x+1)^{8}}"]
    golds = ["1"] * len(too_large) + ["7", "(1+x)^8"]
    t0 = time.monotonic()
    stats = {}
    got = grade_batch(responses, golds, "math", workers=0, timeout=60, progress=False, stats=stats)
    assert got == [False] * len(too_large) + [True, True]
    assert stats == {"timed_out": 0, "timed_out_twice": 0, "too_large": len(too_large)}
    assert time.monotonic() - t0 < 30  # (the refused ones cost nothing; the two checked ones well under 1 s idle)
    golds = [json.loads(x)["answer"] for x in (shared_data / "math500_test.jsonl").read_text().splitlines()]
    assert [g for g in golds if not rw._is_safe(rw._gold_answer(g, "math"))] == []
