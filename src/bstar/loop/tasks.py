"""Training / eval queries: GSM8K and MATH JSONL files, normalised to one Example type, and the prompt.

    GSM8K: {"question": ..., "answer": "...steps...\\n#### 72"}
    MATH:  {"problem": ..., "solution": "...\\boxed{...}...", "answer": ...}  (answer optional
           when the solution has a \\boxed{})

The format is detected per file from its first record (or forced with task=). A bad line raises
DataError naming file and line: "data.jsonl:7: malformed JSON (...)", "data.jsonl:3: missing
field 'question'".
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path

from bstar.errors import BStarError, DataError
from bstar.utils.jsonl import iter_jsonl

DEFAULT_PROMPT = "Question: {question}\nAnswer: Let's think step by step.\n"

_FIELDS = {"gsm8k": ("question", "answer"), "math": ("problem", "solution")}
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\b\s*")
_BRACE_RE = re.compile(r"\\.|[{}]", re.S)
_TOKEN_RE = re.compile(r"[^\s$]+")


@dataclass(frozen=True)
class Example:
    id: str
    question: str
    gold_answer: str  # final answer only ('72', '\\frac{1}{2}'): what grading compares
    gold_solution: str  # full reference solution (a gold candidate for selection)
    task: str  # 'gsm8k' or 'math': bstar.loop.rewards.grade's task


def check_template(template: str) -> None:
    """A prompt template is str.format text whose only field is {question} (use {{ }} for
    literal braces)."""
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise BStarError(f"prompt template is not valid str.format text: {e}") from None
    if fields != {"question"}:
        extra = sorted(fields - {"question"})
        why = f"unknown field(s) {', '.join('{' + f + '}' for f in extra)}" if extra else "it has no {question} field"
        raise BStarError(f"prompt template must use exactly the field {{question}}: {why}")


def format_prompt(example: Example | str, template: str = DEFAULT_PROMPT) -> str:
    """The prompt for one example (or a bare question string)."""
    check_template(template)
    q = example.question if isinstance(example, Example) else example
    return template.format(question=q)


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} / \\fbox{...} whose braces close (nested braces allowed; escaped
    \\{ \\} skipped), or the token after a brace-less "\\boxed 5"; None when there is none."""
    starts = [m.end() for m in _BOXED_RE.finditer(text)]
    if not starts:
        return None
    # One pass over braces (escaped \\{ \\} skipped) gives every '{' its matching '}'.
    close: dict[int, int] = {}
    stack: list[int] = []
    for m in _BRACE_RE.finditer(text):
        c = m.group()
        if c == "{":
            stack.append(m.start())
        elif c == "}" and stack:
            close[stack.pop()] = m.start()
    for s in reversed(starts):
        if s < len(text) and text[s] == "{":
            if s in close:
                return text[s + 1 : close[s]]
        else:  # "\\boxed 5": one token
            m = _TOKEN_RE.match(text, s)
            if m:
                return m.group()
    return None


def _gsm8k_answer(answer: str) -> str | None:
    if "####" not in answer:
        return None
    a = answer.rsplit("####", 1)[1].strip().replace(",", "")
    return a or None


def _detect(rec: dict, where: str) -> str:
    if "question" in rec:
        return "gsm8k"
    if "problem" in rec:
        return "math"
    raise DataError(
        f"{where}: cannot tell the format: expected GSM8K fields 'question'/'answer' "
        "or MATH fields 'problem'/'solution'/'answer'"
    )


def load_task_examples(path: str | Path, task: str | None = None) -> list[Example]:
    """Every example of a GSM8K or MATH JSONL file (format auto-detected unless task is given)."""
    path = Path(path)
    if task is not None and task not in _FIELDS:
        raise DataError(f"unknown data format {task!r}; expected gsm8k or math")
    out: list[Example] = []
    for lineno, rec in iter_jsonl(path):
        where = f"{path}:{lineno}"
        if task is None:
            task = _detect(rec, where)
        for k in _FIELDS[task]:
            if k not in rec:
                raise DataError(f"{where}: missing field {k!r}")
            if not isinstance(rec[k], str) or not rec[k].strip():
                raise DataError(f"{where}: field {k!r} must be a non-empty string")
        if task == "gsm8k":
            question, solution = rec["question"], rec["answer"]
            gold = _gsm8k_answer(solution)
            if gold is None:
                raise DataError(f"{where}: field 'answer' has no final '#### N' line")
        else:
            question, solution = rec["problem"], rec["solution"]
            gold = rec.get("answer")
            if gold is None:
                gold = last_boxed(solution)
                if gold is None:
                    raise DataError(f"{where}: missing field 'answer' (and no \\boxed{{}} in 'solution')")
            elif not isinstance(gold, (str, int, float)) or isinstance(gold, bool):
                raise DataError(f"{where}: field 'answer' must be a string or a number")
            gold = str(gold).strip()
            if not gold:
                raise DataError(f"{where}: field 'answer' is empty")
        ex_id = rec.get("id", rec.get("unique_id", f"{path.stem}:{lineno}"))
        out.append(Example(str(ex_id), question, gold, solution, task))
    if not out:
        raise DataError(f"data file {path} has no examples")
    return out
