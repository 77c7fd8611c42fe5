"""The B-STaR loop end to end on tiny models: iterations, resume, CLI errors, 2 ranks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import bstar.train.trainer as trainer_mod
from bstar import controller
from bstar.cli import main
from bstar.config import RunConfig

TIMING = ("time_s", "tokens_per_s")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shared_data, llama_dir, prm_dir):
    root = tmp_path_factory.mktemp("run")
    train, test = root / "train.jsonl", root / "test.jsonl"
    lines = (shared_data / "gsm8k_train.jsonl").read_text().splitlines()
    train.write_text("\n".join(lines[:6]) + "\n")
    test.write_text("\n".join((shared_data / "gsm8k_test.jsonl").read_text().splitlines()[:3]) + "\n")
    return dict(root=root, train=str(train), test=str(test), policy=str(llama_dir), prm=str(prm_dir))


def _cfg(s, **kw):
    base = dict(
        model=s["policy"],
        prm=s["prm"],
        train_data=s["train"],
        eval_data=s["test"],
        iterations=2,
        num_samples=3,
        search_k=3,
        search_subset=4,
        temperatures=[0.7, 1.0],
        thresholds=[-0.5, 0.1, 0.5, 1.0],
        target_size=6,
        max_tokens=24,
        eval_k=3,
        lr=1e-3,
        batch_tokens=2048,
        max_seq_len=512,
        device="cpu",
        dtype="float32",
        progress=False,
    )
    base.update(kw)
    return RunConfig(**base)


def _strip(records):
    return [{k: v for k, v in r.items() if not k.endswith(TIMING)} for r in records]


@pytest.fixture(scope="module")
def full_run(setup):
    out = setup["root"] / "full"
    records = controller.run(_cfg(setup), str(out))
    return out, records


def test_full_run_layout_and_metrics(setup, full_run):
    out, records = full_run
    assert [r["iteration"] for r in records] == [0, 1, 2]
    r1 = records[1]
    for key in (
        "greedy_acc",
        "pass_at_1",
        "pass_at_k",
        "reward_at_k",
        "diversity_distinct_correct",
        "frac_any_correct",
        "selected_size",
        "selected_acc",
        "temperature",
        "threshold",
        "balance_score",
        "search_time_s",
        "generate_tokens_per_s",
        "train_time_s",
        "eval_time_s",
    ):
        assert key in r1, key
    assert r1["temperature"] in (0.7, 1.0) and r1["threshold"] in (-0.5, 0.1, 0.5, 1.0)
    assert r1["selected_size"] > 0  # the gold solutions at least (include_gold is on by default)
    assert (out / "config.json").exists() and (out / "iterations.jsonl").exists()
    for f in ("candidates.jsonl", "search.json", "train.json"):
        assert (out / "iter_001" / f).exists()
    cands = [json.loads(x) for x in (out / "iter_001" / "candidates.jsonl").read_text().splitlines()]
    assert len(cands) == 6 and all(len(c["texts"]) == 3 for c in cands)
    assert all(0 <= p <= 1 for c in cands for p in c["prm"])
    for png in ("accuracy.png", "diversity.png", "config.png", "selection.png"):
        assert (out / "plots" / png).stat().st_size > 1000
    assert "| iteration |" in (out / "report.md").read_text()
    # the policy was fine-tuned and saved; it differs from the base weights
    new = load_file(str(out / "policy" / "model.safetensors"))
    old = load_file(os.path.join(setup["policy"], "model.safetensors"))
    assert any(not torch.equal(new[k], old[k]) for k in old)


def test_search_reuses_samples_across_thresholds(setup, full_run):
    out, _ = full_run
    s = json.loads((out / "iter_001" / "search.json").read_text())
    assert len(s["table"]) == 2 * 4  # every (temperature, threshold) pair evaluated from one sampling
    best = max(s["table"], key=lambda r: r["balance_score"])
    assert best["balance_score"] == s["balance_score"]


def test_resume_after_kill_equals_uninterrupted(setup, full_run, monkeypatch):
    out_full, records = full_run
    out = setup["root"] / "killed"
    real_train = controller.Controller.train_policy

    def dying(self, t, examples):
        if t == 2:
            raise KeyboardInterrupt("killed")  # after iteration 1 and iteration 2's generation
        return real_train(self, t, examples)

    monkeypatch.setattr(controller.Controller, "train_policy", dying)
    with pytest.raises(KeyboardInterrupt):
        controller.run(_cfg(setup), str(out))
    assert len(controller.Controller.completed.__get__(type("C", (), {"out": out})())()) == 2
    monkeypatch.setattr(controller.Controller, "train_policy", real_train)
    resumed = controller.run(None, str(out), resume=True)
    assert _strip(resumed) == _strip(records)
    a = load_file(str(out / "policy" / "model.safetensors"))
    b = load_file(str(out_full / "policy" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "iter_002" / "candidates.jsonl").read_text() == (
        out_full / "iter_002" / "candidates.jsonl"
    ).read_text()


def test_online_rft_mode_uses_fixed_configuration(setup):
    out = setup["root"] / "rft"
    records = controller.run(_cfg(setup, mode="online-rft", iterations=1, temperature=0.8), str(out))
    assert records[1]["temperature"] == 0.8 and records[1]["threshold"] == 0.5
    assert not (out / "iter_001" / "search.json").read_text().count('"table"')


def test_cli_errors(setup, tmp_path):
    r = CliRunner().invoke(
        main,
        [
            "run",
            "--model",
            str(tmp_path / "missing"),
            "--train-data",
            setup["train"],
            "--eval-data",
            setup["test"],
            "--out",
            str(tmp_path / "o1"),
        ],
    )
    assert r.exit_code == 1 and "does not exist" in r.output and "Traceback" not in r.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "#### 1"}\n{"question": "no answer field"}\n')
    r = CliRunner().invoke(
        main,
        [
            "run",
            "--model",
            setup["policy"],
            "--train-data",
            str(bad),
            "--eval-data",
            setup["test"],
            "--out",
            str(tmp_path / "o2"),
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 1 and "bad.jsonl:2" in r.output
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    target = ro / "sub"
    if os.access(ro, os.W_OK):  # running as root: make the out dir's parent a file instead
        target = tmp_path / "afile" / "sub"
        (tmp_path / "afile").write_text("")
    r = CliRunner().invoke(
        main,
        [
            "run",
            "--model",
            setup["policy"],
            "--train-data",
            setup["train"],
            "--eval-data",
            setup["test"],
            "--out",
            str(target),
        ],
    )
    assert r.exit_code == 1 and "cannot write to out dir" in r.output
    r = CliRunner().invoke(main, ["run", "--resume", str(tmp_path / "nothing")])
    assert r.exit_code == 1 and "cannot resume" in r.output


def test_report_command(full_run):
    out, _ = full_run
    (out / "report.md").unlink()
    r = CliRunner().invoke(main, ["report", str(out)])
    assert r.exit_code == 0 and (out / "report.md").exists() and "greedy" in r.output


def test_two_ranks_one_iteration(setup, full_run, tmp_path, free_port):
    """torchrun --nproc_per_node=2 (gloo): sharded generation, FSDP2 training, weights to both engines."""
    out = tmp_path / "two"
    cfg = _cfg(setup, iterations=1)
    out.mkdir()
    (out / "config.json").write_text(json.dumps(cfg.__dict__))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port}",
        "-m",
        "bstar.cli",
        "run",
        "--resume",
        str(out),
    ]
    p = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=400, cwd=Path(__file__).resolve().parents[1]
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    two = [json.loads(x) for x in (out / "iterations.jsonl").read_text().splitlines()]
    one = full_run[1]
    # generation seeds depend on the query, not on the rank: the same candidates and selection
    assert two[1]["selected_size"] == one[1]["selected_size"]
    a = [json.loads(x) for x in (out / "iter_001" / "candidates.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (full_run[0] / "iter_001" / "candidates.jsonl").read_text().splitlines()]
    assert [(r["query"], r["texts"], r["correct"]) for r in a] == [(r["query"], r["texts"], r["correct"]) for r in b]
    assert max(abs(x - y) for r, q in zip(a, b) for x, y in zip(r["prm"], q["prm"])) < 1e-5
    assert two[0]["greedy_acc"] == one[0]["greedy_acc"]
    assert (out / "policy" / "model.safetensors").exists()


@pytest.mark.parametrize("mode", ["rest-em", "star"])
def test_restart_modes(setup, mode, monkeypatch):
    """rest-em and star fine-tune from the base model every iteration; star keeps one per query."""
    starts = []
    real = trainer_mod.SFTTrainer.__init__

    def spy(self, model, *a, **kw):
        starts.append(str(model))
        return real(self, model, *a, **kw)

    monkeypatch.setattr(trainer_mod.SFTTrainer, "__init__", spy)
    out = setup["root"] / mode
    records = controller.run(_cfg(setup, mode=mode, rationalize=mode == "star"), str(out))
    assert len(records) == 3 and all(s == setup["policy"] for s in starts) and len(starts) == 2
    if mode == "star":
        cands = [json.loads(x) for x in (out / "iter_001" / "candidates.jsonl").read_text().splitlines()]
        assert records[1]["selected_size"] <= len(cands)  # at most one per query (gold included)
