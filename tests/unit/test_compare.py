"""The compare report's statistics on hand-made run directories: exploration change, paired over the questions
both iterations evaluated."""

import json
import random

import pytest

from bstar.results.compare import exploration_change, exploration_lines


def _write_eval(run, iteration, sampled: dict[int, list[bool]]):
    d = run / f"iter_{iteration:03d}"
    d.mkdir(parents=True, exist_ok=True)
    rows = [{"kind": "greedy", "query": q, "correct": [c[0]]} for q, c in sampled.items()]
    rows += [{"kind": "sampled", "query": q, "correct": c, "prm": [0.0] * len(c)} for q, c in sampled.items()]
    (d / "eval_samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _runs(tmp_path, seeds=2, k=4):
    rng = random.Random(0)
    runs, truth = [], []
    for s in range(seeds):
        run = tmp_path / f"bstar-seed{s}"
        first = {q: [rng.random() < 0.5 for _ in range(k)] for q in range(6)}
        last = {q: [rng.random() < 0.3 for _ in range(k)] for q in range(10)}  # the last iteration samples more
        _write_eval(run, 1, first)
        _write_eval(run, 3, last)
        (run / "iterations.jsonl").write_text("".join(json.dumps({"iteration": i}) + "\n" for i in range(4)))
        runs.append(str(run))
        truth.append(sum(any(last[q]) - any(first[q]) for q in range(6)) / 6)
    return runs, sum(truth) / seeds


def test_exploration_change_pairs_the_questions_both_iterations_evaluated(tmp_path):
    runs, want = _runs(tmp_path)
    ch = exploration_change(runs, 1, 3)
    assert ch["questions"] == 6
    mean, lo, hi = ch["pass_at_k"]
    assert mean == pytest.approx(want) and lo <= mean <= hi
    assert "distinct_styles" not in ch  # no task labels given


def test_exploration_change_ignores_questions_only_one_iteration_saw(tmp_path):
    runs, _ = _runs(tmp_path)
    before = exploration_change(runs, 1, 3)["pass_at_k"]
    _write_eval(tmp_path / "bstar-seed0", 3, {q: [q < 6 and q % 2 == 0] * 4 for q in range(10)})
    after = exploration_change(runs, 1, 3)["pass_at_k"]
    _write_eval(tmp_path / "bstar-seed0", 3, {q: [q % 2 == 0] * 4 for q in range(10)})  # q >= 6 change only
    assert exploration_change(runs, 1, 3)["pass_at_k"] == after != before


def test_exploration_lines_skip_runs_without_a_trained_iteration_to_compare(tmp_path):
    runs, _ = _runs(tmp_path)
    data = {f"bstar-seed{s}": [{"iteration": i} for i in range(4)] for s in range(2)}
    modes = {"bstar": list(data)}
    lines = exploration_lines(modes, data, dict(zip(data, runs)))
    assert len(lines) == 5 and lines[-1].startswith("| bstar | 1 → 3 | 6 |")
    short = {n: rs[:2] for n, rs in data.items()}
    assert exploration_lines(modes, short, dict(zip(data, runs))) == []
