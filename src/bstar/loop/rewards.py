"""Answer verification for GSM8K and MATH: extract the final answer, compare it with the gold one.

    grade(response, gold, task)            -> bool   one response
    grade_batch(responses, golds, task)    -> list   thousands, in worker processes
    extract_answer(text, task)             -> str    canonical answer string (or None)
    has_final_answer(text, task)           -> bool   an explicit answer step ('#### N', \\boxed{}, ...)
    gsm8k_gold(solution)                   -> str    the `#### N` answer of a GSM8K reference

Model output is untrusted input. Nothing in it is evaluated: extraction is linear-time regex and
brace matching; symbolic equivalence goes through `math-verify` (an ANTLR LaTeX parser into
unevaluated sympy trees; its expression fallback only sees digits and operators). sympy can
still be made to work forever (10^(10^10), 10^6!, deep nesting), so every comparison
  1. sees only the tail of the text (answers live at the end),
  2. is pre-screened: size, operation and group counts, nesting depth, digit runs, exponent
     towers, big exponents (on a symbolic base: small ones), factorials of big numbers and big
     operators are rejected (TOO_LARGE, graded wrong and counted) before sympy sees them, so the
     work and hence the verdict do not depend on the machine's load,
  3. runs under a time limit, a last resort the pre-screen keeps out of reach: SIGALRM
     (setitimer) when on the main thread, which is where grade_batch's workers call it; from any
     other thread, in a helper process that is killed when it overruns. An item that overran is
     graded again alone (grade_batch). math-verify's own timeouts are disabled because they use
     signal.alarm, which raises off the main thread and has whole-second resolution.
"""

from __future__ import annotations

import atexit
import functools
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from decimal import Decimal, InvalidOperation

from tqdm.auto import tqdm

from bstar.engine.errors import RequestError
from bstar.errors import DataError
from bstar.loop.tasks import last_boxed

log = logging.getLogger(__name__)

TASKS = ("gsm8k", "math")

# Seconds per symbolic comparison: a last resort behind the pre-screen. Realistic answers take far less
# (MATH500 references < 0.15 s idle: a 60x margin for a loaded machine), so load does not change their
# verdict. The screen cannot bound everything sympy does: an adversarial multivariate identity within it,
# (x+y+z+1)^{8}(x-y+z-1)^{8} against ((x+z)^2-(y-1)^2)^{8}, took 9.9 s idle; such an item is retried once
# alone and, if it runs out again, graded wrong and counted (grade_batch's stats, the run's grade_limited).
DEFAULT_TIMEOUT = 10.0
MAX_TEXT_CHARS = 16_384  # tail of a response that is searched for an answer
MAX_ANSWER_CHARS = 400  # longer extracted answers are rejected, not parsed (MATH500: <= 53)
MAX_DEPTH = 8  # bracket nesting (MATH500 answers: at most 2)
MAX_DIGITS = 64  # longest digit run
MAX_EXPONENT = 10_000  # largest integer literal inside an exponent
MAX_FACTORIAL = 1_000  # largest integer literal next to ! or binomials
# The work sympy may do is bounded by counts, not by the clock (the same verdict on any machine): MATH500's
# gold answers need at most 31 operations (commands, operators, numbers, letters), 2 bracket groups and
# exponent 8 on a symbolic base; expanding (x+1)^{10000} or a product of many sums is the unbounded part.
MAX_OPERATIONS = 64
MAX_GROUPS = 8  # ( and [ groups: each can be a factor of a product sympy expands
MAX_SYMBOLIC_EXPONENT = 8  # largest integer literal in an exponent of a base holding a letter (MATH500: 8)
MAX_RESPONSE_CHARS = 1 << 16  # a longer response is junk (is_junk): 16x any max_tokens the loop uses
# Control characters other than tab, newline and carriage return (NUL bytes...): a few are a byte-level
# model's noise (a tiny policy's right answers hold 2-3), more than this many are junk (is_junk).
MAX_CONTROL_CHARS = 16
_JUNK_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
TIMED_OUT = None  # what a comparison that ran past its limit gives (internally; grade() says False)
TOO_LARGE = "too_large"  # what an answer refused by the pre-screen gives (internally; grade() says False)
_GRACE = 1.0  # extra seconds before a helper process that overran is killed
_STARTUP_TIMEOUT = 120.0  # seconds for a helper process to import math-verify


@functools.cache
def _math_verify():
    """(parse, verify, extraction config) of math-verify, imported on first use: the engine, the
    model factory and the GPU checks import this module (through the built-in task's tokenizer)
    and must not need math-verify (a GPU machine's image may lack it)."""
    import math_verify.grader
    import math_verify.parser
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

    # We enforce time limits ourselves; stop math-verify warning that its own are off.
    math_verify.parser.TIMEOUT_WARNING_SHOWN = True
    math_verify.grader.TIMEOUT_WARNING_SHOWN = True
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return parse, verify, (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise RequestError(f"unknown grading task {task!r}; expected one of {', '.join(TASKS)}")


# ---------------------------------------------------------------------------------------------
# Extraction and normalisation (regex only, linear in the text length)

_NUM = r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|[+-]?\.\d+"
_NUM_RE = re.compile(rf"(?<![\w.])(?:{_NUM})(?![\d])")
_NUM_UNITS_RE = re.compile(rf"({_NUM})((?:\s*\\(?:text|mbox|mathrm|textbf)\s*\{{[^{{}}]*\}}|\s+[A-Za-z]{{2,}}\.?)*)")
_HASH_RE = re.compile(r"####\s*(.*)")
_ANSWER_IS_RE = re.compile(r"(?i)answer\s*(?:is|:)\s*:?\s*(.*)")
_BASE_RE = re.compile(r"(\w+)\s*_\s*\{?\s*(\d+)\s*\}?")  # a numeral in base b: 4210_{5}
_MATH_SPAN_RE = re.compile(r"\$+([^$]+)\$+")


def is_junk(text: str) -> bool:
    """A response the reward refuses whatever answer it holds: longer than MAX_RESPONSE_CHARS (a right
    answer buried in 10 MB of text), or holding more than MAX_CONTROL_CHARS control characters (an answer
    followed by 1,000 NUL bytes). An RL policy must not learn that padding around an answer is free."""
    if len(text) > MAX_RESPONSE_CHARS:
        return True
    found = 0
    for _ in _JUNK_RE.finditer(text):
        found += 1
        if found > MAX_CONTROL_CHARS:
            return True
    return False


def _tail(text: str) -> str:
    return text[-MAX_TEXT_CHARS:]


def _strip_decorations(s: str) -> str:
    """Drop what is never part of the value: $, thin spaces, percent, degrees, trailing dot."""
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("{,}", ",")
    s = re.sub(r"\\[,;:!]", "", s)
    s = s.replace("\\ ", " ").replace("~", " ")
    s = s.replace("\\%", "").replace("%", "")
    s = re.sub(r"\^\s*\{?\\circ\}?|\\circ|°|\\degree", "", s)
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\s+", " ", s).strip()
    s = re.sub(r"(?:\s*\\text\s*\{\s*\.?\s*\})+$", "", s)  # "\text{ }" leftovers
    return s.rstrip(".").strip()


def _canonical_number(s: str) -> str | None:
    """'$1,000.50 dollars' -> '1000.5'; None when s is not a plain number (with optional units)."""
    m = _NUM_UNITS_RE.fullmatch(s.strip())
    if not m or len(m.group(1)) > MAX_DIGITS + 16:
        return None
    try:
        d = Decimal(m.group(1).replace(",", ""))
    except InvalidOperation:
        return None
    if d == d.to_integral_value():
        return str(int(d))
    return format(d.normalize(), "f")


def _normalize(s: str) -> str:
    s = _strip_decorations(s)
    num = _canonical_number(s)
    return num if num is not None else s


def _first_math(s: str) -> str:
    """The answer part of the text after 'The answer is': a $...$ span, else up to the sentence end."""
    m = _MATH_SPAN_RE.search(s)
    if m:
        return m.group(1)
    return re.split(r"\.(?:\s|$)|\n", s, maxsplit=1)[0].strip().strip("*")  # markdown bold


def _extract_gsm8k(text: str) -> str | None:
    hashes = _HASH_RE.findall(text)
    for cand in reversed(hashes):
        m = _NUM_RE.search(cand.replace("$", " "))
        if m:
            return _normalize(m.group())
    answers = _ANSWER_IS_RE.findall(text)
    if answers:
        rest = answers[-1]
        boxed = last_boxed(rest)
        if boxed is not None:
            return _normalize(boxed)
        m = _NUM_RE.search(rest.replace("$", " "))
        if m:
            return _normalize(m.group())
    boxed = last_boxed(text)
    if boxed is not None:
        return _normalize(boxed)
    nums = _NUM_RE.findall(text.replace("$", " "))
    return _normalize(nums[-1]) if nums else None


def _extract_math(text: str) -> str | None:
    boxed = last_boxed(text)
    if boxed is None:
        answers = _ANSWER_IS_RE.findall(text)
        if not answers:
            return None
        boxed = _first_math(answers[-1])
    out = _normalize(boxed)
    return out or None


def extract_answer(text: str, task: str) -> str | None:
    """The final answer in `text`, normalised (numbers canonical: '1,000.0' -> '1000'), or None.

    gsm8k: last `#### N`, else 'The answer is N', else last \\boxed{}, else the last number.
    math:  last \\boxed{...} / \\fbox{...} (nested braces), else 'The answer is ...'.
    Equal strings mean equal answers; the converse needs `grade` (e.g. '\\frac{1}{2}' vs '0.5').
    """
    _check_task(task)
    if not isinstance(text, str):
        raise RequestError(f"extract_answer expects a str, got {type(text).__name__}")
    text = _tail(text)
    return _extract_gsm8k(text) if task == "gsm8k" else _extract_math(text)


def has_final_answer(text: str, task: str) -> bool:
    """Whether `text` has an answer step: a '#### N' line, 'The answer is ...' or a \\boxed{} (gsm8k), a
    \\boxed{} or 'The answer is ...' (math). A response without one has no step the PRM can score as its
    answer (the reference gives it the step reward -5)."""
    _check_task(task)
    text = _tail(text)
    if task == "gsm8k" and any(_NUM_RE.search(h.replace("$", " ")) for h in _HASH_RE.findall(text)):
        return True
    return last_boxed(text) is not None or bool(_ANSWER_IS_RE.search(text))


def gsm8k_gold(solution: str) -> str:
    """The `#### N` answer of a GSM8K reference solution, canonical ('1,234' -> '1234')."""
    m = re.search(r"####\s*(.+?)\s*$", solution)
    if not m:
        raise DataError(f"GSM8K reference solution has no '#### answer' line: {solution[-80:]!r}")
    return _normalize(m.group(1))


def _gold_answer(gold: str, task: str) -> str:
    if task == "gsm8k" and "####" in gold:
        return gsm8k_gold(gold)
    if task == "math" and ("\\boxed" in gold or "\\fbox" in gold):
        boxed = last_boxed(gold)
        if boxed is not None:
            return _normalize(boxed)
    return _normalize(gold)


# ---------------------------------------------------------------------------------------------
# Pre-screen: reject what could make sympy run for long before it sees it

_BIG_OPS_RE = re.compile(r"\\(?:sum|prod|int|iint|oint|lim|bigcup|bigcap)\b|\*\*\s*\*")
_FACT_RE = re.compile(r"!|\\binom|\\dbinom|\\tbinom|\\choose|factorial|binomial|gamma")
_INT_RE = re.compile(r"\d+")
_EXP_RE = re.compile(r"\^|\*\*")
_OPEN, _CLOSE = "{([", "})]"


def _group_end(s: str, i: int) -> int:
    """Index after the bracket group opening at s[i] (the string is known to be shallow)."""
    depth = 0
    for j in range(i, len(s)):
        if s[j] in _OPEN:
            depth += 1
        elif s[j] in _CLOSE:
            depth -= 1
            if depth == 0:
                return j + 1
    return len(s)


def _group_start(s: str, j: int) -> int:
    """Index of the bracket opening the group that closes at s[j]."""
    depth = 0
    for k in range(j, -1, -1):
        if s[k] in _CLOSE:
            depth += 1
        elif s[k] in _OPEN:
            depth -= 1
            if depth == 0:
                return k
    return 0


_OPERATION_RE = re.compile(r"\\[A-Za-z]+|[-+*/^_=<>,!|]|\d+(?:\.\d+)?|[A-Za-z]")


def _is_safe(s: str) -> bool:
    """False for answers that could keep sympy busy for long (checked before parsing): the work is bounded
    by counts (size, operations, groups, nesting, digits, exponents), never by how busy the machine is."""
    if len(s) > MAX_ANSWER_CHARS or re.search(rf"\d{{{MAX_DIGITS + 1}}}", s):
        return False
    if len(_OPERATION_RE.findall(s)) > MAX_OPERATIONS or s.count("(") + s.count("[") > MAX_GROUPS:
        return False
    depth = 0
    braces = 0
    for m in re.finditer(r"\\[{}]|[{}()\[\]]", s):
        c = m.group()
        if len(c) == 2:
            continue
        depth += 1 if c in _OPEN else -1
        braces += 1 if c == "{" else -1 if c == "}" else 0
        if depth > MAX_DEPTH or braces < 0:
            return False
    if braces != 0 or _BIG_OPS_RE.search(s):
        return False
    has_exp = _EXP_RE.search(s) is not None
    # Factorials and binomials evaluate eagerly in C: only of small literals, never of powers.
    if s.count("!") > 3 or _FACT_RE.search(s) and (has_exp or any(int(x) > MAX_FACTORIAL for x in _INT_RE.findall(s))):
        return False
    if not has_exp:
        return True
    # Exponents (Python's int pow runs in C, where no signal interrupts it): no towers (an
    # exponent or a base containing an exponent), no chains (a^b^c), and no exponent with an
    # integer literal beyond MAX_EXPONENT.
    for m in _EXP_RE.finditer(s):
        j = m.start()
        if j > 0 and s[j - 1] in _CLOSE and _EXP_RE.search(s[_group_start(s, j - 1) : j]):
            return False
        i = m.end()
        while i < len(s) and s[i] == " ":
            i += 1
        if i >= len(s):
            continue
        if s[i] in _OPEN:
            end = _group_end(s, i)
        else:
            t = re.match(r"[+-]?\s*(?:\d+(?:\.\d*)?|\\[A-Za-z]+|.)", s[i:], re.S)
            end = i + len(t.group())
        operand = s[i:end]
        if _EXP_RE.search(operand) or _EXP_RE.match(s[end:].lstrip()):
            return False
        limit = MAX_SYMBOLIC_EXPONENT if re.search(r"[A-Za-z]", _base(s, j)) else MAX_EXPONENT
        if any(int(x) > limit for x in _INT_RE.findall(operand)):
            return False
    return True


def _base(s: str, j: int) -> str:
    """The base of the power whose ^ (or **) is at s[j]: the group or the token before it."""
    k = j
    while k > 0 and s[k - 1] == " ":
        k -= 1
    if k > 0 and s[k - 1] in _CLOSE:
        return s[_group_start(s, k - 1) : k]
    m = re.search(r"(?:\\[A-Za-z]+|\d+(?:\.\d*)?|.)$", s[:k], re.S)
    return m.group() if m else ""


# ---------------------------------------------------------------------------------------------
# Symbolic comparison under a time limit


class _Timeout(BaseException):
    """Raised by our SIGALRM handler. BaseException so that `except Exception` in math-verify or
    sympy cannot swallow it and carry on past the deadline."""


_alarm_armed = False


def _on_alarm(signum, frame):
    if _alarm_armed:
        raise _Timeout()


def _symbolic_equal(pred: str, ref: str) -> bool:
    parse, verify, config = _math_verify()
    gold = parse("\\boxed{" + ref + "}", extraction_config=config, parsing_timeout=None)
    got = parse("\\boxed{" + pred + "}", extraction_config=config, parsing_timeout=None)
    if not gold or not got:
        return False
    return bool(verify(gold, got, timeout_seconds=None))


def _alarm_usable() -> bool:
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


def _with_alarm(fn, args, timeout: float) -> bool | None:
    """fn(*args) on the main thread, None (TIMED_OUT) if it runs past `timeout` seconds."""
    global _alarm_armed
    t0 = time.monotonic()
    old_hook = sys.unraisablehook
    sys.unraisablehook = lambda u: None if isinstance(u.exc_value, _Timeout) else old_hook(u)
    old_handler = signal.signal(signal.SIGALRM, _on_alarm)
    # The interval re-fires the alarm in case something swallowed the first _Timeout (an alarm
    # landing in a gc callback or __del__ is dropped as "unraisable"; the hook keeps that quiet).
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, timeout, 0.05)
    _alarm_armed = True
    try:
        return fn(*args)
    except _Timeout:
        return TIMED_OUT
    finally:
        while True:  # a late alarm may land inside this block; retry until disarmed
            try:
                _alarm_armed = False
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, old_handler)
                if old_delay > 0:  # give back an outer timer what is left of it
                    left = max(old_delay - (time.monotonic() - t0), 1e-3)
                    signal.setitimer(signal.ITIMER_REAL, left, old_interval)
                sys.unraisablehook = old_hook
                break
            except _Timeout:
                continue


def _time_limited_equal(pred: str, ref: str, timeout: float) -> bool | None:
    if _alarm_usable():
        _math_verify()  # imported outside the time limit (seconds on a cold start)
        return _with_alarm(_symbolic_equal, (pred, ref), timeout)
    return _SANDBOX.call("symbolic", (pred, ref, timeout), timeout)


def _symbolic_job(pred: str, ref: str, timeout: float) -> bool | None:
    _math_verify()
    return _with_alarm(_symbolic_equal, (pred, ref), timeout)


def grade(response: str, gold: str, task: str, *, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """True when the final answer in `response` equals `gold` for `task` ('gsm8k' or 'math').

    `gold` is the reference answer ('18', '\\frac{1}{2}') or a reference solution (GSM8K
    `#### N`, MATH `\\boxed{}`). Never raises on any response text; returns False when no answer
    is found, the response is junk (see is_junk), the answer is rejected as pathological, or the
    comparison exceeds `timeout` seconds. Works from any thread (off the main thread the comparison
    runs in a helper process).
    """
    return _grade(response, gold, task, timeout) is True


def _grade(response: str, gold: str, task: str, timeout: float) -> bool | str | None:
    """grade(), or TIMED_OUT (None) when the comparison ran past `timeout`, or TOO_LARGE when the answer
    was refused before it (the work it could take is not bounded)."""
    _check_task(task)
    if not isinstance(response, str) or not isinstance(gold, str):
        raise RequestError(
            f"grade expects str response and gold, got {type(response).__name__} and {type(gold).__name__}"
        )
    if not timeout > 0:
        raise RequestError(f"grade timeout must be > 0 seconds, got {timeout}")
    if is_junk(response):
        return False
    pred = extract_answer(response, task)
    ref = _gold_answer(gold, task)
    if not pred or not ref:
        return False
    if pred == ref:
        return True
    a, b = _canonical_number(pred), _canonical_number(ref)
    if a is not None and b is not None:
        return False  # both plain numbers in canonical form, and they differ
    a, b = _BASE_RE.fullmatch(pred), _BASE_RE.fullmatch(ref)
    if a and b:  # '52_8': math-verify drops the base subscript, so compare digits and base here
        return a.group(1, 2) == b.group(1, 2)
    if not _is_safe(pred):
        return TOO_LARGE
    return _time_limited_equal(pred, ref, timeout)


# ---------------------------------------------------------------------------------------------
# Helper processes: the off-main-thread sandbox and grade_batch's workers.
# Plain `python -c` subprocesses speaking JSON lines over stdin/stdout: unlike multiprocessing's
# spawn they do not re-import the caller's __main__ (scripts need no main guard), they work from
# daemonic processes, and nothing is unpickled.

_JOBS = {"grade": _grade, "symbolic": _symbolic_job}
_CHILD_CODE = "from bstar.loop.rewards import _worker_main; _worker_main()"


def _worker_main() -> None:
    """Helper process loop: read [idx, job, args] lines, write [idx, bool or null (timed out)] lines. Runs on its main
    thread, so SIGALRM time limits work; the parent kills it if it still overruns."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints from libraries go to stderr, not into the protocol
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and kills us
    _symbolic_equal("1", "1")  # warm up the ANTLR parser before reporting ready

    def send(msg):
        out.write(json.dumps(msg).encode() + b"\n")
        out.flush()

    send(["ready", None])
    for line in sys.stdin.buffer:  # EOF (parent closed or died): exit
        idx, job, args = json.loads(line)
        try:
            ok = _verdict(_JOBS[job](*args))
        except BaseException:  # noqa: BLE001 - an item that fails is graded wrong, the worker lives on
            ok = False
        send([idx, ok])


def _verdict(ok) -> bool | str | None:
    """A grade as it crosses the worker protocol: True / False, TIMED_OUT or TOO_LARGE kept as they are."""
    return ok if ok is TIMED_OUT or ok == TOO_LARGE else bool(ok)


def _child_env() -> dict:
    # The child sees the parent's import path, as multiprocessing's spawn would give it.
    paths = [p or os.getcwd() for p in sys.path]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


class _Worker:
    """One helper process; items go one at a time, so killing it loses at most one."""

    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD_CODE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=_child_env()
        )
        self.fd = self.proc.stdout.fileno()
        self._buf = b""
        self.started = time.monotonic()
        self.ready = False
        self.item: int | None = None  # index in flight
        self.deadline = 0.0

    def send(self, idx: int, job: str, args: tuple, limit: float) -> None:
        self.item, self.deadline = idx, time.monotonic() + limit
        self.proc.stdin.write(json.dumps([idx, job, list(args)]).encode() + b"\n")
        self.proc.stdin.flush()

    def read(self) -> list | None:
        """Messages available now (call when readable); None once the process has gone."""
        data = os.read(self.fd, 1 << 16)
        if not data:
            return None
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        return [json.loads(line) for line in lines]

    def recv(self, timeout: float) -> list | None:
        """Wait up to `timeout` s for messages: [] if none came, None if the process has gone."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                return []
            msgs = self.read()
            if msgs != []:
                return msgs

    def stop(self, kill: bool = False) -> None:
        if not kill and self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # EOF: the loop ends
                self.proc.wait(1.0)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


class _Sandbox:
    """A helper process per calling process for grade() off the main thread, where SIGALRM is
    unavailable. Calls are serialised by a lock; a call that overruns kills the process."""

    def __init__(self):
        self._lock = threading.Lock()
        self._worker: _Worker | None = None
        self._pid = 0

    def _ensure(self) -> _Worker:
        w = self._worker
        if w is not None and self._pid == os.getpid() and w.proc.poll() is None:
            return w
        self._worker, self._pid = None, os.getpid()  # a forked child must not reuse ours
        w = _Worker()
        if w.recv(_STARTUP_TIMEOUT) != [["ready", None]]:
            w.stop(kill=True)
            raise RuntimeError("bstar.loop.rewards: grading helper process failed to start")
        self._worker = w
        return w

    def call(self, job: str, args: tuple, timeout: float) -> bool | None:
        with self._lock:
            w = self._ensure()
            try:
                w.send(0, job, args, timeout + _GRACE)
                msgs = w.recv(timeout + _GRACE)
                if msgs:
                    return msgs[0][1]  # (True, False, or None: timed out)
            except OSError:  # it died under us
                pass
            w.stop(kill=True)  # overran (or died)
            self._worker = None
            return TIMED_OUT

    def reset_after_fork(self) -> None:
        # The parent's helper and a lock some other thread may have held are not ours to use.
        self._lock = threading.Lock()
        self._worker, self._pid = None, os.getpid()

    def close(self) -> None:
        with self._lock:
            if self._worker is not None and self._pid == os.getpid():
                self._worker.stop()
            self._worker = None


_SANDBOX = _Sandbox()
atexit.register(_SANDBOX.close)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_SANDBOX.reset_after_fork)


def grade_batch(
    responses: list[str],
    golds: list[str],
    task: str,
    workers: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    progress: bool = True,
    stats: dict | None = None,
) -> list[bool]:
    """grade() over many responses; golds[i] is the gold answer of responses[i].

    workers: helper processes (None: one per CPU, at most 8; 0: grade in this process).
    The work of a comparison is bounded before it starts (the pre-screen: an answer beyond it is False,
    counted as "too_large"), so the time limit is a last resort: an item whose comparison overruns
    `timeout` (a worker that overruns it by 1 s is replaced) is graded again once, alone, after the
    others; only if it overruns again is it False. stats, when given, receives "timed_out" (items
    retried), "timed_out_twice" (those graded False for time) and "too_large"; the last two are the items
    a limit decided (`limited`).
    """
    _check_task(task)
    if len(responses) != len(golds):
        raise RequestError(f"grade_batch got {len(responses)} responses but {len(golds)} golds")
    for i, (r, g) in enumerate(zip(responses, golds)):
        if not isinstance(r, str) or not isinstance(g, str):
            raise RequestError(f"grade_batch item {i}: response and gold must be str")
    if not timeout > 0:
        raise RequestError(f"grade_batch timeout must be > 0 seconds, got {timeout}")
    n = len(responses)
    if n == 0:
        return []
    if workers is None:
        workers = min(os.cpu_count() or 1, 8)
    if workers < 0:
        raise RequestError(f"grade_batch workers must be >= 0, got {workers}")
    workers = min(workers, n)
    bar = tqdm(total=n, desc=f"grading {task}", unit="resp", disable=not progress)
    try:
        if workers == 0:
            out = []
            for r, g in zip(responses, golds):
                out.append(_grade(r, g, task, timeout))
                bar.update(1)
        else:
            # The tails are all grade() reads (junk is judged on the whole text): no megabytes to the workers.
            junk = [is_junk(r) for r in responses]
            items = [("", "") if j else (_tail(r), _tail(g)) for r, g, j in zip(responses, golds, junk)]
            out = _run_pool(items, task, workers, timeout, bar)
    finally:
        bar.close()
    late = [i for i, ok in enumerate(out) if ok is TIMED_OUT]
    for i in late:  # alone now: no other grading competes for the CPU
        out[i] = _grade(responses[i], golds[i], task, timeout)
    twice = sum(out[i] is TIMED_OUT for i in late)
    if stats is not None:
        stats.update(timed_out=len(late), timed_out_twice=twice, too_large=sum(ok == TOO_LARGE for ok in out))
    if twice:
        log.warning("grading: %d of %d items ran past the %.1f s limit twice (graded wrong)", twice, n, timeout)
    return [ok is True for ok in out]


def limited(stats: dict) -> int:
    """The items of a grade_batch call whose verdict a limit decided (refused as too large, timed out twice)."""
    return stats.get("timed_out_twice", 0) + stats.get("too_large", 0)


def _run_pool(items, task, n_workers, timeout, bar) -> list[bool | str | None]:
    """Each item's grade, or TIMED_OUT for one whose comparison (or worker) ran past the limit."""
    results: list[bool | None] = [False] * len(items)
    pending = deque(range(len(items)))
    done = 0
    start_failures = 0
    pool = [_Worker() for _ in range(n_workers)]
    try:
        while done < len(items):
            gone = set()
            for w in pool:
                if w.ready and w.item is None and pending:
                    i = pending.popleft()
                    try:
                        w.send(i, "grade", (*items[i], task, timeout), timeout + _GRACE)
                    except OSError:
                        gone.add(w)
            now = time.monotonic()
            deadlines = [
                w.deadline if w.ready else w.started + _STARTUP_TIMEOUT
                for w in pool
                if w.item is not None or not w.ready
            ]
            wait_s = max(min(deadlines) - now, 0.0) if deadlines else 1.0
            readable = set(select.select([w.fd for w in pool], [], [], wait_s)[0]) if not gone else set()
            now = time.monotonic()
            for k, w in enumerate(pool):
                if w.fd in readable and w not in gone:
                    msgs = w.read()
                    if msgs is None:
                        gone.add(w)
                    for idx, ok in msgs or ():
                        if idx == "ready":
                            w.ready = True
                        else:
                            results[idx] = _verdict(ok)
                            w.item = None
                            done += 1
                            bar.update(1)
                overran = w.item is not None and now > w.deadline
                slow_start = not w.ready and now > w.started + _STARTUP_TIMEOUT
                if not (w in gone or overran or slow_start):
                    continue
                if w.item is not None:  # its item is graded again, alone, afterwards
                    results[w.item] = TIMED_OUT
                    done += 1
                    bar.update(1)
                elif not w.ready:
                    start_failures += 1
                    if start_failures > 2 * n_workers:
                        raise RuntimeError("bstar.loop.rewards: grading worker processes fail to start")
                w.stop(kill=True)
                pool[k] = _Worker()
    finally:
        for w in pool:
            w.stop()
    return results
