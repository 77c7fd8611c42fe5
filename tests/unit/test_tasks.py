"""bstar.loop.tasks: GSM8K and MATH files into Examples, line-numbered errors, prompt templates."""

import json
from decimal import Decimal

import pytest

from bstar.errors import BStarError, DataError
from bstar.loop.rewards import gsm8k_gold
from bstar.loop.tasks import DEFAULT_PROMPT, Example, check_template, format_prompt, last_boxed, load_task_examples


def test_load_gsm8k_files(shared_data):
    for name, n in (("gsm8k_test.jsonl", 1319), ("gsm8k_train.jsonl", 7473)):
        exs = load_task_examples(shared_data / name)
        raw = [json.loads(line) for line in (shared_data / name).read_text().splitlines() if line.strip()]
        assert len(exs) == len(raw) == n
        assert all(e.task == "gsm8k" for e in exs)
        assert len({e.id for e in exs}) == n
        for e, r in zip(exs, raw):
            assert e.question == r["question"] and e.gold_solution == r["answer"]
            Decimal(e.gold_answer)  # a plain number
            assert r["answer"].splitlines()[-1].replace(",", "").endswith(e.gold_answer)
    assert exs[0].gold_answer == "72"
    assert load_task_examples(shared_data / "gsm8k_test.jsonl")[0].gold_answer == "18"


def test_load_gsm8k_agrees_with_rewards_gold(shared_data):
    for e in load_task_examples(shared_data / "gsm8k_test.jsonl"):
        assert gsm8k_gold(e.gold_solution) == e.gold_answer


def test_load_math500(shared_data):
    exs = load_task_examples(shared_data / "math500_test.jsonl")
    raw = [json.loads(line) for line in (shared_data / "math500_test.jsonl").read_text().splitlines()]
    assert len(exs) == 500 and all(e.task == "math" for e in exs)
    for e, r in zip(exs, raw):
        assert (e.id, e.question, e.gold_solution, e.gold_answer) == (
            r["unique_id"],
            r["problem"],
            r["solution"],
            r["answer"],
        )
    assert exs[0].gold_answer == "\\left( 3, \\frac{\\pi}{2} \\right)"


def write(tmp_path, name, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return p


GOOD_GSM = json.dumps({"question": "1+1?", "answer": "1 + 1 = 2\n#### 2"})


@pytest.mark.parametrize(
    "content, where, msg",
    [
        (GOOD_GSM + "\n{not json\n", 2, "malformed JSON"),
        (GOOD_GSM + "\n\n" + GOOD_GSM + "\n[1, 2]\n", 4, "expected a JSON object"),
        (GOOD_GSM + "\n" + json.dumps({"question": "q"}) + "\n", 2, "missing field 'answer'"),
        (json.dumps({"answer": "#### 1"}) + "\n", 1, "cannot tell the format"),
        (GOOD_GSM + "\n" + json.dumps({"question": "q", "answer": "no final line"}), 2, "'#### N'"),
        (GOOD_GSM + "\n" + json.dumps({"question": 5, "answer": "#### 1"}), 2, "non-empty string"),
        (json.dumps({"problem": "p", "solution": "no box"}) + "\n", 1, "missing field 'answer'"),
        (json.dumps({"problem": "p", "answer": "1"}) + "\n", 1, "missing field 'solution'"),
        (json.dumps({"problem": "p", "solution": "s", "answer": "  "}) + "\n", 1, "is empty"),
    ],
)
def test_malformed_files_name_file_and_line(tmp_path, content, where, msg):
    p = write(tmp_path, "data.jsonl", content.encode())
    with pytest.raises(DataError) as e:
        load_task_examples(p)
    assert f"data.jsonl:{where}: " in str(e.value) and msg in str(e.value)


def test_non_utf8_line(tmp_path):
    p = write(tmp_path, "bad.jsonl", GOOD_GSM.encode() + b"\n" + GOOD_GSM.encode() + b"\n\xff\xfe{}\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: line is not valid UTF-8"):
        load_task_examples(p)


def test_data_misc(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_task_examples(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="no examples"):
        load_task_examples(write(tmp_path, "empty.jsonl", b"\n\n"))
    p = write(tmp_path, "g.jsonl", (GOOD_GSM + "\n").encode())
    with pytest.raises(DataError, match=r"g\.jsonl:1: missing field 'problem'"):
        load_task_examples(p, task="math")
    with pytest.raises(DataError, match="unknown data format"):
        load_task_examples(p, task="arc")
    boxed = json.dumps({"problem": "p", "solution": "so $\\boxed{\\frac{1}{2}}$.", "id": 7})
    (e,) = load_task_examples(write(tmp_path, "m.jsonl", boxed.encode()))
    assert (e.id, e.gold_answer, e.task) == ("7", "\\frac{1}{2}", "math")
    gsm = json.dumps({"question": "q", "answer": "x\n#### 1,234"})
    assert load_task_examples(write(tmp_path, "c.jsonl", gsm.encode()))[0].gold_answer == "1234"


def test_prompt_template():
    ex = Example("1", "What is 2+2?", "4", "2 + 2 = 4\n#### 4", "gsm8k")
    assert format_prompt(ex) == DEFAULT_PROMPT.format(question="What is 2+2?")
    assert format_prompt(ex) == "Question: What is 2+2?\nAnswer: Let's think step by step.\n"
    assert format_prompt("Q", "[{question}] {{json}}") == "[Q] {json}"
    for bad in ("{q}", "no field", "{question} {answer}", "{question"):
        with pytest.raises(BStarError):
            check_template(bad)


def test_last_boxed():
    """The one brace matcher: the MATH loader's gold answers and bstar.loop.rewards' extraction both use it."""
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert last_boxed("so \\fbox{x^{2}}.") == "x^{2}"
    assert last_boxed("\\boxed{a \\} b}") == "a \\} b"  # an escaped brace does not close it
    assert last_boxed("\\boxed 5 apples") == "5"
    assert last_boxed("\\boxed{1} then \\boxed{2") == "1"  # an unclosed last box: the one before
    assert last_boxed("no box here") is None and last_boxed("\\boxed{") is None
