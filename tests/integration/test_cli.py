"""bstar.cli: `bstar-engine run` on the built-in task (the tiny preset) and with --compare, grid options, and
the user errors each command turns into one line."""

import json
import os
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from bstar.cli import main
from bstar.embedded import EmbeddedConfig
from bstar.errors import BStarError
from bstar.loop.config import embedded_run_config
from bstar.loop.search import SearchConfig, grid, parse_grid

# the built-in task's run, CI-sized: the tiny preset builds in about a second
SMALL = [
    "--embedded-preset",
    "tiny",
    "--max-train-queries",
    "20",
    "--iterations",
    "1",
    "--num-samples",
    "4",
    "--search-k",
    "4",
    "--search-subset",
    "8",
    "--temperatures",
    "0.7,1.0",
    "--thresholds=-1:1:0.5",
    "--eval-k",
    "4",
    "--max-tokens",
    "24",
    "--train-steps",
    "2",
    "--batch-size",
    "4",
    "--quiet",
]


# a built-in run sets torch to one thread for its tiny models: the fixture restores the count afterwards
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _ours(output: str) -> list[str]:
    """The command's own lines (transformers may draw progress bars in between)."""
    ours = r"run directory|greedy accuracy: iteration|(?:bstar|online-rft): final greedy|bstar - online-rft|comparison"
    return re.findall(rf"(?:{ours}).*", output)


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_line_error(r, *fragments):
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and r.output.count("\n") == 1, r.output
    assert r.output.startswith("error: "), r.output
    for f in fragments:
        assert f in r.output, r.output


def test_run_builtin_task_through_the_cli(tmp_path):
    out = tmp_path / "demo"
    r = _invoke("run", "--out", out, *SMALL)
    assert r.exit_code == 0, r.output + repr(r.exception)
    records = _lines(out / "iterations.jsonl")
    assert [x["iteration"] for x in records] == [0, 1]
    assert _ours(r.output) == [
        f"greedy accuracy: iteration 0 {records[0]['greedy_acc']:.3f} -> iteration 1 {records[1]['greedy_acc']:.3f}",
    ]
    assert "Loading weights" not in r.output and "Writing model" not in r.output  # --quiet: transformers' too
    # the options reached the run; everything else is the built-in task's setting
    cfg = json.loads((out / "config.json").read_text())
    want = embedded_run_config(
        embedded_preset="tiny",
        iterations=1,
        num_samples=4,
        search_k=4,
        search_subset=8,
        eval_k=4,
        max_tokens=24,
        train_steps=2,
        batch_size=4,
    )
    assert cfg["model"] is None and cfg["embedded_preset"] == "tiny"
    assert cfg["temperatures"] == [0.7, 1.0] and cfg["thresholds"] == [-1.0, -0.5, 0.0, 0.5, 1.0]
    for k in (
        "lr",
        "train_steps",
        "batch_size",
        "include_gold",
        "n_star",
        "target_per_query",
        "search_target_per_query",
        "iterations",
        "num_samples",
        "eval_k",
        "eval_sample_queries",
        "prm_scale",
    ):
        assert cfg[k] == getattr(want, k), k
    assert cfg["prm_scale"] == "logit" and cfg["train_steps"] == 2 and records[1]["train_steps"] == 2
    # the tiny preset was built in $BSTAR_CACHE (a temp dir here); the run trained on fresh queries, its test split
    tiny = EmbeddedConfig.tiny()
    assert (Path(os.environ["BSTAR_CACHE"]) / f"embedded-{tiny.key()}" / "manifest.json").is_file()
    assert len(_lines(out / "iter_001" / "candidates.jsonl")) == 20 < tiny.n_train  # --max-train-queries
    assert len(_lines(out / "iter_001" / "eval_samples.jsonl")) == 2 * tiny.n_test  # greedy + sampled
    assert "distinct_styles" in records[1] and "pool_prm_step_auc" in records[1]  # the task's true labels
    assert len(json.loads((out / "iter_001" / "search.json").read_text())["table"]) == 2 * 5
    assert (out / "policy" / "model.safetensors").is_file() and (out / "report.md").is_file()
    # resuming a finished run trains nothing and reports the same
    before = (out / "policy" / "model.safetensors").stat().st_mtime_ns
    r2 = _invoke("run", "--resume", out)
    assert r2.exit_code == 0 and _ours(r2.output) == _ours(r.output)
    assert _lines(out / "iterations.jsonl") == records
    assert (out / "policy" / "model.safetensors").stat().st_mtime_ns == before


def test_compare_runs_modes_and_seeds_on_the_same_budget(tmp_path):
    out = tmp_path / "cmp"
    r = _invoke("run", "--out", out, "--compare", "--seeds", "1", *SMALL)
    assert r.exit_code == 0, r.output + repr(r.exception)
    names = {"bstar": "bstar-seed0", "online-rft": "online-rft-seed0"}
    runs = {m: _lines(out / d / "iterations.jsonl") for m, d in names.items()}
    lines = _ours(r.output)
    assert lines[-1] == f"comparison plots and report in {out}"
    for m, records in runs.items():
        assert [x["iteration"] for x in records] == [0, 1] and records[1]["mode"] == m
        assert any(x.startswith(f"{m}: final greedy accuracy {records[1]['greedy_acc']:.3f} [") for x in lines)
    assert any(x.startswith("bstar - online-rft greedy accuracy: ") for x in lines)
    cfgs = {m: json.loads((out / d / "config.json").read_text()) for m, d in names.items()}
    assert cfgs["bstar"]["mode"] == "bstar" and cfgs["online-rft"]["mode"] == "online-rft"
    assert {**cfgs["bstar"], "mode": None} == {**cfgs["online-rft"], "mode": None}  # the same budget
    assert runs["bstar"][1]["train_steps"] == runs["online-rft"][1]["train_steps"] == 2
    # online-rft keeps the fixed configuration; bstar searched its grid
    assert (runs["online-rft"][1]["temperature"], runs["online-rft"][1]["threshold"]) == (1.0, 0.0)
    assert "table" not in json.loads((out / names["online-rft"] / "iter_001" / "search.json").read_text())
    assert len(json.loads((out / names["bstar"] / "iter_001" / "search.json").read_text())["table"]) == 10
    # reported together, with intervals, and drawn against iterations and tokens spent
    report = (out / "report.md").read_text()
    assert "## bstar" in report and "## online-rft" in report and "bootstrap interval" in report
    assert "\n| 1 | " in report and "\n| 1.0 | " not in report  # iterations stay integers in the tables
    for png in (
        "exploration.png",
        "exploitation.png",
        "exploration_vs_tokens.png",
        "config.png",
        "bstar-search_iter_001.png",
    ):
        assert (out / "plots" / png).stat().st_size > 1000, png
    # a second --compare resumes the runs: nothing is trained again
    mtimes = {m: (out / d / "policy" / "model.safetensors").stat().st_mtime_ns for m, d in names.items()}
    r2 = _invoke("run", "--out", out, "--compare", "--seeds", "1", *SMALL)
    assert r2.exit_code == 0 and _ours(r2.output) == _ours(r.output)
    assert {m: (out / d / "policy" / "model.safetensors").stat().st_mtime_ns for m, d in names.items()} == mtimes


def test_run_without_options_starts_in_a_new_runs_folder(tmp_path, monkeypatch):
    """No --out: a fresh runs/<date-time>/ under the current directory, printed first. (The built-in task's
    default size is too slow for the test suite: the tiny preset stands in, with the other options as they
    are.)"""
    monkeypatch.chdir(tmp_path)
    r = _invoke("run", *SMALL)
    assert r.exit_code == 0, r.output + repr(r.exception)
    first = _ours(r.output)[0]
    assert re.fullmatch(r"run directory: runs/\d{8}-\d{6}", first), first
    d = tmp_path / first.split(": ", 1)[1]
    assert (d / "iterations.jsonl").is_file()


def test_parse_grid():
    assert parse_grid("0.5:1.2:0.05") == list(SearchConfig().temperatures)  # the reference's 15 values
    assert parse_grid("-1:0.99:0.01") == list(SearchConfig().thresholds)  # the reference's 200 values
    assert parse_grid("0.5,0.7,1") == [0.5, 0.7, 1.0]
    assert parse_grid("0.8") == [0.8] and parse_grid("1:1:0.1") == [1.0]
    assert parse_grid("0:1:0.3") == list(grid(0, 1, 0.3)) == [0.0, 0.3, 0.6, 0.9]
    for spec, why in [
        ("2:1:0.1", "stop 1 is below start 2"),
        ("0:1:0", "step must be > 0"),
        ("0:1:-0.1", "step must be > 0"),
        ("0:1", "start:stop:step"),
        ("0:1:0.1:2", "start:stop:step"),
        ("a,b", "comma-separated"),
        ("", "comma-separated"),
        ("0.5,,0.7", "comma-separated"),
        ("nan:1:0.1", "start:stop:step"),
        ("0.5,inf", "comma-separated"),
    ]:
        with pytest.raises(BStarError, match=why):
            parse_grid(spec)


@pytest.mark.parametrize(
    "option, spec, why",
    [
        ("--temperatures", "2:1:0.1", "stop 1 is below start 2"),
        ("--temperatures", "0.5:1:0", "step must be > 0"),
        ("--thresholds", "low,high", "use start:stop:step"),
    ],
)
def test_bad_grid_is_refused_with_one_line(tmp_path, option, spec, why):
    r = _invoke("run", "--out", tmp_path / "o", option, spec)
    _one_line_error(r, f"bad grid {spec!r}", why)
    assert not (tmp_path / "o").exists()  # refused before anything ran


def test_run_option_errors(tmp_path):
    _one_line_error(_invoke("run", "--resume", tmp_path / "a", "--out", tmp_path / "b"), "not both")
    _one_line_error(_invoke("run", "--out", tmp_path / "o", "--prm", tmp_path), "need --model")
    _one_line_error(
        _invoke("run", "--out", tmp_path / "o", "--model", tmp_path, "--embedded-preset", "tiny"),
        "does not go with --model",
    )
    _one_line_error(
        _invoke("run", "--out", tmp_path / "o", "--prompt-template", "Q: {q}"), "exactly the field {question}"
    )
    assert not (tmp_path / "o").exists()
    done = tmp_path / "done"  # a directory that already holds a run is not overwritten
    done.mkdir()
    (done / "config.json").write_text("{}")
    (done / "iterations.jsonl").write_text('{"iteration": 0}\n')
    _one_line_error(_invoke("run", "--out", done, *SMALL), "already holds a run", f"--resume {done}")
    assert (done / "iterations.jsonl").read_text() == '{"iteration": 0}\n'


def test_report_generate_score_errors(tmp_path):
    _one_line_error(_invoke("report", tmp_path), "holds no run (no iterations.jsonl)")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    _one_line_error(
        _invoke("generate", "--model", tmp_path, "--prompts", bad), "bad.jsonl:2: record has neither 'prompt' nor"
    )
    bad.write_text('{"question": "q", "candidates": ["a"]}\n{"question": "q", "candidates": "a"}\n')
    _one_line_error(_invoke("score", "--prm", tmp_path, "--data", bad), "bad.jsonl:2: needs 'candidates'")
    bad.write_text('{"question": "q"}\n{not json\n')
    _one_line_error(_invoke("score", "--prm", tmp_path, "--data", bad), "bad.jsonl:2: malformed JSON")
    _one_line_error(_invoke("generate", "--model", tmp_path, "--prompts", tmp_path / "none.jsonl"), "does not exist")
