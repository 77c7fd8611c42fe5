"""The B-STaR loop end to end on tiny models: metrics recomputed from the run's files, resume, the modes,
STaR rationalisation, MATH data, 2 ranks against 1, CLI errors."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from reference_selection import C, naive_select
from safetensors.torch import load_file

import bstar.train.trainer as trainer_mod
from bstar.cli import main
from bstar.engine import LLM, PRM
from bstar.engine.entrypoints.outputs import CompletionOutput, RequestOutput
from bstar.engine.errors import MemoryPlanError
from bstar.engine.model.tokenizer import load_tokenizer
from bstar.loop import controller
from bstar.loop.config import RunConfig
from bstar.loop.rewards import grade
from bstar.loop.selection import Candidate
from bstar.results.report import redraw
from bstar.train import SFTTrainer
from bstar.train.config import SFTConfig, lr_at

TIMING = ("time_s", "tokens_per_s")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# Gold answers the random policy's texts sometimes end with (their last number is what GSM8K grading
# reads), so that grades, selections and metrics are not all zero; 7777 / 9999 are never hit.
TRAIN_ANSWERS = ["8", "2", "7777", "3", "5", "1"]
TEST_ANSWERS = ["8", "2", "9999"]


def _with_answers(lines: list[str], answers: list[str]) -> str:
    out = []
    for line, a in zip(lines, answers):
        rec = json.loads(line)
        rec["answer"] = rec["answer"].rsplit("####", 1)[0] + f"#### {a}"
        out.append(json.dumps(rec))
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shared_data, llama_dir, prm_dir):
    root = tmp_path_factory.mktemp("run")
    train, test = root / "train.jsonl", root / "test.jsonl"
    train.write_text(_with_answers((shared_data / "gsm8k_train.jsonl").read_text().splitlines(), TRAIN_ANSWERS))
    test.write_text(_with_answers((shared_data / "gsm8k_test.jsonl").read_text().splitlines(), TEST_ANSWERS))
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
        thresholds=[-1.0, -0.5, 0.1, 0.5, 0.99],
        search_target_per_query=1.5,
        max_tokens=24,
        eval_k=3,
        mid_eval_queries=2,  # iteration 1 evaluates the first 2 of the 3 eval queries; 0 and 2 all of them
        lr=1e-3,
        train_steps=2,
        batch_size=4,
        max_seq_len=1024,
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
    records = controller.run(_cfg(setup), str(out), on_record=redraw)  # as the CLI runs it
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
        "cap",
        "balance_score",
        "search_threshold",
        "search_balance_score",
        "search_time_s",
        "generate_tokens_per_s",
        "train_time_s",
        "eval_time_s",
        "search_gen_tokens",
        "generate_gen_tokens",
        "gen_tokens",
        "gen_tokens_total",
        "train_tokens",
        "train_tokens_total",
        "pool_prm_within_auc",
    ):
        assert key in r1, key
    assert r1["temperature"] in (0.7, 1.0) and r1["threshold"] in (-1.0, -0.5, 0.1, 0.5, 0.99)
    assert r1["selected_size"] > 0  # the gold solutions at least (include_gold is on by default)
    assert (out / "config.json").exists() and (out / "iterations.jsonl").exists()
    for f in ("candidates.jsonl", "search.json", "selection.json", "train.json"):
        assert (out / "iter_001" / f).exists()
    cands = [json.loads(x) for x in (out / "iter_001" / "candidates.jsonl").read_text().splitlines()]
    assert len(cands) == 6 and all(len(c["texts"]) == 3 for c in cands)
    # logit scale: min step logit, clipped to +-10; -5 (or less) without an answer step
    assert all(-10 <= p <= 10 for c in cands for p in c["prm"]) and any(p < 0 for c in cands for p in c["prm"])
    # the cost of each iteration: tokens generated (search + pool) and trained on, and their running totals
    gen = [
        json.loads((out / f"iter_{t:03d}" / n).read_text())["gen_tokens"]
        for t in (1, 2)
        for n in ("search.json", "generate.json")
    ]
    assert records[2]["gen_tokens_total"] == sum(gen) and records[1]["gen_tokens"] == gen[0] + gen[1] > 0
    steps = [
        json.loads(x) for t in (1, 2) for x in (out / f"iter_{t:03d}" / "train_metrics.jsonl").read_text().splitlines()
    ]
    assert records[2]["train_tokens_total"] == sum(m["tokens"] for m in steps) > 0
    for png in (
        "exploration.png",
        "exploitation.png",
        "config.png",
        "selection.png",
        "cost.png",
        "exploitation_vs_tokens.png",
    ):
        assert (out / "plots" / png).stat().st_size > 1000
    assert "| iteration |" in (out / "report.md").read_text()
    # the policy was fine-tuned and saved; it differs from the base weights
    new = load_file(str(out / "policy" / "model.safetensors"))
    old = load_file(os.path.join(setup["policy"], "model.safetensors"))
    assert any(not torch.equal(new[k], old[k]) for k in old)


def _records(path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines()]


def _golds(path) -> list[tuple[str, str]]:
    """(gold answer, gold solution) per line of a GSM8K file, read here without bstar.loop.tasks."""
    return [(r["answer"].rsplit("####", 1)[1].strip(), r["answer"]) for r in _records(path)]


def test_full_run_metrics_recomputed_from_sample_files(setup, full_run, prm_dir):
    """Every reported metric is recomputed from the run's own sample files, with the texts graded again
    here and selection done by the naive re-implementation (tests/reference_selection.py)."""
    out, records = full_run
    train, test = _golds(setup["train"]), _golds(setup["test"])
    seen_correct = seen_wrong = 0
    for rec in records:
        t = rec["iteration"]
        samples = _records(out / f"iter_{t:03d}" / "eval_samples.jsonl")
        greedy = [r for r in samples if r["kind"] == "greedy"]
        sampled = [r for r in samples if r["kind"] == "sampled"]
        assert len(greedy) + len(sampled) == len(samples)
        n = 2 if t == 1 else len(test)
        assert [r["query"] for r in greedy] == [r["query"] for r in sampled] == list(range(n))
        assert (rec["eval_greedy_queries"], rec["eval_sampled_queries"]) == (n, n)
        assert all(len(r["texts"]) == 1 for r in greedy) and all(len(r["texts"]) == 3 for r in sampled)
        for r in samples:  # the stored grades are right
            assert r["correct"] == [grade(x, test[r["query"]][0], "gsm8k") for x in r["texts"]]
            seen_correct += sum(r["correct"])
            seen_wrong += len(r["correct"]) - sum(r["correct"])
        cs = [r["correct"] for r in sampled]
        best = [max(range(3), key=lambda j: (r["prm"][j], -j)) for r in sampled]  # ties: earlier sample
        want = {
            "greedy_acc": sum(r["correct"][0] for r in greedy) / n,
            "pass_at_1": sum(sum(c) / 3 for c in cs) / n,
            "pass_at_k": sum(any(c) for c in cs) / n,  # k = n = 3 samples
            "frac_any_correct": sum(any(c) for c in cs) / n,
            "reward_at_k": sum(r["correct"][j] for r, j in zip(sampled, best)) / n,
            "diversity_distinct_correct": sum(
                len({" ".join(x.split()) for x, ok in zip(r["texts"], r["correct"]) if ok}) for r in sampled
            )
            / n,
        }
        both = [r for r in sampled if 0 < sum(r["correct"]) < 3]
        if both:  # the PRM's AUC within a question: correct vs wrong samples of the same question
            aucs = []
            for r in both:
                pos = [p for p, ok in zip(r["prm"], r["correct"]) if ok]
                neg = [p for p, ok in zip(r["prm"], r["correct"]) if not ok]
                aucs.append(sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg)))
            want["prm_within_auc"] = sum(aucs) / len(aucs)
        assert {k: rec[k] for k in want} == pytest.approx(want, abs=1e-12), t
        if t == 0:
            continue
        cands = _records(out / f"iter_{t:03d}" / "candidates.jsonl")
        assert [r["query"] for r in cands] == list(range(len(train)))
        for r in cands:
            assert r["correct"] == [grade(x, train[r["query"]][0], "gsm8k") for x in r["texts"]]
        groups = [[C(r["query"], x, ok, p) for x, ok, p in zip(r["texts"], r["correct"], r["prm"])] for r in cands]
        golds = [Candidate.gold(q, sol) for q, (_, sol) in enumerate(train)]
        search = json.loads((out / f"iter_{t:03d}" / "search.json").read_text())
        assert rec["temperature"] == search["temperature"]
        # the threshold is re-searched on the full pool: the best balance over the grid, the cap grown until
        # 9 x queries are selected (duplicates removed after the cap), the lowest threshold on ties
        best = None
        for thr in (-1.0, -0.5, 0.1, 0.5, 0.99):
            sel, m = naive_select(groups, thr, target=9 * len(train), golds=golds)
            present = [(len(g), sum(c.correct for c in g)) for g in sel if g]
            bal = sum(min(c / 8, 1) * c / s for s, c in present) / len(present) if present else 0.0
            if best is None or bal > best[0]:
                best = (bal, thr, m)
        assert (rec["threshold"], rec["cap"]) == best[1:] and rec["balance_score"] == pytest.approx(best[0])
        sel, _ = naive_select(groups, rec["threshold"], cap=rec["cap"], golds=golds)
        size = sum(len(g) for g in sel)
        assert rec["selected_size"] == size > 0
        assert rec["selected_acc"] == pytest.approx(sum(c.correct for g in sel for c in g) / size)
        assert rec["train_frac_any_correct"] == pytest.approx(sum(any(r["correct"]) for r in cands) / len(cands))
        assert json.loads((out / f"iter_{t:03d}" / "train.json").read_text())["examples"] == size
    # the run's grades are neither all right nor all wrong, so the comparisons above can fail
    assert seen_correct > 0 and seen_wrong > 0
    # the stored PRM values are bstar.PRM's min step logits of the stored texts, -5 at most for a text
    # without an answer step (the reference's value for a candidate whose answer cannot be scored)
    prm = PRM(str(prm_dir), dtype="float32", device="cpu", scale="logit")
    qs = [json.loads(x)["question"] for x in Path(setup["train"]).read_text().splitlines()]
    broken = 0
    for r in _records(out / "iter_001" / "candidates.jsonl"):
        got = [s.score for s in prm.score(qs[r["query"]], r["texts"])]
        want = [g if re.search(r"####\s*\d", x) else min(g, -5.0) for g, x in zip(got, r["texts"])]
        assert want == pytest.approx(r["prm"], abs=1e-4)
        broken += sum(w <= -5.0 < g for w, g in zip(want, got))
    assert broken > 0


def test_search_reuses_samples_across_thresholds(setup, full_run):
    out, _ = full_run
    s = json.loads((out / "iter_001" / "search.json").read_text())
    assert len(s["table"]) == 2 * 5  # every (temperature, threshold) pair evaluated from one sampling
    best = max(s["table"], key=lambda r: r["balance_score"])
    assert best["balance_score"] == s["balance_score"]
    pool = json.loads((out / "iter_001" / "selection.json").read_text())
    assert [r["threshold"] for r in pool["table"]] == [-1.0, -0.5, 0.1, 0.5, 0.99]


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
    # the model, the AdamW state and the LR schedule went on across the kill: one warmup + cosine over both
    # iterations' steps (the run's config), and the same optimizer state as the uninterrupted run
    cfg = _cfg(setup)
    sft = SFTConfig(lr=cfg.lr, warmup_ratio=cfg.warmup_ratio, min_lr_ratio=cfg.min_lr_ratio, batch_examples=4)
    total = cfg.train_steps * cfg.iterations
    for d in (out, out_full):
        rows = [m for t in (1, 2) for m in _records(d / f"iter_{t:03d}" / "train_metrics.jsonl")]
        assert [m["global_step"] for m in rows] == list(range(1, total + 1))
        assert [m["lr"] for m in rows] == pytest.approx([lr_at(s, total, sft) for s in range(total)], rel=1e-12)
        state = json.loads((d / "policy" / "trainer_state" / "state.json").read_text())
        assert (state["global_step"], state["schedule_steps"]) == (total, total)
    oa = load_file(str(out / "policy" / "trainer_state" / "optimizer.safetensors"))
    ob = load_file(str(out_full / "policy" / "trainer_state" / "optimizer.safetensors"))
    assert oa.keys() == ob.keys() and all(torch.equal(oa[k], ob[k]) for k in oa)
    assert {float(v) for k, v in oa.items() if k.endswith("/step")} == {float(total)}


def test_online_rft_mode_uses_fixed_configuration(setup):
    out = setup["root"] / "rft"
    records = controller.run(_cfg(setup, mode="online-rft", iterations=1, temperature=0.8), str(out))
    assert records[1]["temperature"] == 0.8 and records[1]["threshold"] == 0.0
    assert records[1]["search_gen_tokens"] == 0  # no search: its cost is the pool alone
    assert not (out / "iter_001" / "search.json").read_text().count('"table"')
    assert not (out / "iter_001" / "selection.json").exists()


def test_math_data_through_the_loop(setup, shared_data, tmp_path, monkeypatch):
    """MATH-format files (problem / solution with \\boxed{} / answer, one line without answer) run through
    search, generation, MATH grading, selection with gold solutions, training and evaluation."""
    _, trained = _spy_training(monkeypatch)
    questions = [json.loads(x)["question"] for x in (shared_data / "gsm8k_test.jsonl").read_text().splitlines()[:6]]

    def write(path, rows):
        lines = []
        for q, a in rows:
            rec = {"problem": q, "solution": f"Count them.\nThe answer is $\\boxed{{{a}}}$."}
            if a != "2":  # this one's answer comes from the \\boxed{} of its solution
                rec["answer"] = a
            lines.append(json.dumps(rec))
        path.write_text("\n".join(lines) + "\n")
        return str(path)

    golds = {"train": ["8", "2", "8", "3"], "test": ["8", "2"]}
    train = write(tmp_path / "math_train.jsonl", zip(questions[:4], golds["train"]))
    test = write(tmp_path / "math_test.jsonl", zip(questions[4:], golds["test"]))
    out = tmp_path / "math"
    cfg = _cfg(setup, mode="online-rft", train_data=train, eval_data=test, iterations=1, num_samples=4)
    graded, real_grade_batch = [], controller.grade_batch

    def grade_batch(responses, golds, task, **kw):
        graded.append(task)
        return real_grade_batch(responses, golds, task, **kw)

    monkeypatch.setattr(controller, "grade_batch", grade_batch)
    records = controller.run(cfg, str(out))
    assert [r["iteration"] for r in records] == [0, 1]
    for name, split in (("iter_001/candidates.jsonl", "train"), ("iter_001/eval_samples.jsonl", "test")):
        for r in _records(out / name):
            gold = golds[split][r["query"]]
            assert r["correct"] == [grade(x, gold, "math") for x in r["texts"]]
    # the files' task reached the grader: every grading call of the run was a MATH one
    assert graded and set(graded) == {"math"}
    # the gold solutions (graded correct: score 1 > the fixed threshold 0) are trained on, after the
    # MATH problem
    tok = load_tokenizer(setup["policy"])
    texts = [tok.decode(list(x.input_ids)) for x in trained[0]]
    for q, a in zip(questions[:4], golds["train"]):
        assert any(q in t and f"\\boxed{{{a}}}" in t for t in texts), a
    assert records[1]["selected_acc"] == 1.0 and records[1]["selected_size"] >= 4


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


@pytest.mark.parametrize("layout", ["one node", "two nodes"])
def test_two_ranks_match_one_process(setup, full_run, tmp_path, free_port, layout):
    """Two ranks under torchrun (gloo), on one node (--nproc_per_node=2) or as two simulated nodes (--nnodes 2,
    one process each, c10d rendezvous on 127.0.0.1, as the README's multi-node command): sharded generation,
    FSDP2 training, weights to both engines; the same run as full_run in one process, iteration by iteration."""
    out = tmp_path / "two"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(_cfg(setup).__dict__))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = ["-m", "bstar.cli", "run", "--resume", str(out)]
    launch = [sys.executable, "-m", "torch.distributed.run"]
    if layout == "one node":
        cmds = [launch + ["--nproc_per_node=2", f"--master_port={free_port}"] + run]
    else:
        rdzv = ["--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port}"]
        cmds = [launch + rdzv + ["--rdzv-id=bstar-loop", f"--node-rank={n}"] + run for n in (0, 1)]
    repo = Path(__file__).resolve().parents[2]
    procs = [
        subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=repo) for c in cmds
    ]
    for p in procs:
        o, e = p.communicate(timeout=400)
        assert p.returncode == 0, o[-2000:] + e[-3000:]
    one_dir, one = full_run
    two = _records(out / "iterations.jsonl")
    assert [r["iteration"] for r in two] == [0, 1, 2]
    keys = ("greedy_acc", "pass_at_1", "pass_at_k", "reward_at_k", "frac_any_correct", "diversity_distinct_correct")
    for t in (0, 1, 2):
        # evaluation of both engines (each rank's share, gathered), before and after each hand-off
        assert {k: two[t][k] for k in keys} == pytest.approx({k: one[t][k] for k in keys}, abs=1e-9), t
        if t == 0:
            continue
        # generation seeds depend on the query, not on the rank: the same candidates and selection, also
        # in iteration 2, which both ranks' engines generate with the weights handed over in iteration 1
        a, b = (
            _records(out / f"iter_{t:03d}" / "candidates.jsonl"),
            _records(one_dir / f"iter_{t:03d}" / "candidates.jsonl"),
        )
        assert [(r["query"], r["texts"], r["correct"]) for r in a] == [
            (r["query"], r["texts"], r["correct"]) for r in b
        ]
        assert max(abs(x - y) for r, q in zip(a, b) for x, y in zip(r["prm"], q["prm"])) < 1e-5
        assert (two[t]["selected_size"], two[t]["threshold"]) == (one[t]["selected_size"], one[t]["threshold"])
        # training: the same per-step losses and grad norms (FSDP2 over 2 ranks vs one process)
        m2, m1 = (
            _records(out / f"iter_{t:03d}" / "train_metrics.jsonl"),
            _records(one_dir / f"iter_{t:03d}" / "train_metrics.jsonl"),
        )
        assert len(m2) == len(m1) == two[t]["train_steps"] >= 1
        assert [m["loss"] for m in m2] == pytest.approx([m["loss"] for m in m1], rel=1e-4)
        assert [m["grad_norm"] for m in m2] == pytest.approx([m["grad_norm"] for m in m1], rel=1e-3)
    # the final policies agree far below the size of the updates (Adam amplifies rounding differences where
    # a gradient is near zero, so this is a bound in norm; a wrong gradient scale gives ~50%)
    w2, w1 = (load_file(str(d / "policy" / "model.safetensors")) for d in (out, one_dir))
    w0 = load_file(os.path.join(setup["policy"], "model.safetensors"))
    for k in w0:
        assert (w2[k] - w1[k]).norm() <= 2e-2 * (w1[k] - w0[k]).norm() + 1e-7, k


def _spy_training(monkeypatch):
    """(model dirs each SFTTrainer started from, SFT examples of each train_policy call)."""
    starts, examples = [], []
    real_init, real_train = trainer_mod.SFTTrainer.__init__, controller.Controller.train_policy

    def init(self, model, *a, **kw):
        starts.append(str(model))
        return real_init(self, model, *a, **kw)

    def train_policy(self, t, exs):
        examples.append(list(exs))
        return real_train(self, t, exs)

    monkeypatch.setattr(trainer_mod.SFTTrainer, "__init__", init)
    monkeypatch.setattr(controller.Controller, "train_policy", train_policy)
    return starts, examples


def test_rest_em_restarts_from_the_base_model(setup, monkeypatch):
    starts, _ = _spy_training(monkeypatch)
    records = controller.run(_cfg(setup, mode="rest-em"), str(setup["root"] / "rest-em"))
    assert len(records) == 3 and starts == [setup["policy"]] * 2


def test_star_trains_a_hinted_rationale_with_the_unhinted_prompt(setup, monkeypatch):
    """STaR with rationalisation: an unsolved query is retried with the answer as a hint. The policy's
    answer to the hinted prompt is stubbed here (a random policy never finds one); it must be graded
    correct, kept, and trained on after the original, unhinted prompt. star restarts from the base model
    every iteration and keeps at most one candidate per query."""
    starts, trained = _spy_training(monkeypatch)
    hinted = {}  # query text -> (hinted prompt ids, stubbed answer ids)
    real_generate = LLM.generate

    def generate(self, prompts, params, **kw):
        if not any("(Hint: the answer is" in p for p in prompts):
            return real_generate(self, prompts, params, **kw)
        tok, outs = self.get_tokenizer(), []
        for i, p in enumerate(prompts):
            answer = re.search(r"\(Hint: the answer is (.+?)\.\)", p)[1]
            text = f"The hint says {answer}.\n#### {answer}"
            ids = tok.encode(text, add_special_tokens=False)
            hinted[p.split("(Hint:")[0]] = (tok.encode(p), ids)
            outs.append(
                RequestOutput(f"stub-{i}", p, tok.encode(p), [CompletionOutput(0, text, ids, 0.0, None, "stop")])
            )
        return outs

    monkeypatch.setattr(LLM, "generate", generate)
    out = setup["root"] / "star"
    records = controller.run(_cfg(setup, mode="star", rationalize=True, include_gold=False), str(out))
    assert len(records) == 3 and starts == [setup["policy"]] * 2
    cands = _records(out / "iter_001" / "candidates.jsonl")
    unsolved = {r["query"] for r in cands if not any(r["correct"][:3])}
    assert unsolved and len(hinted) == len(unsolved)  # the rationalisation branch ran, for these
    examples = trained[0]
    assert len(examples) == records[1]["selected_size"] <= len(cands)  # at most one per query
    for r in cands:
        if r["query"] in unsolved:  # the stubbed rationale joined the candidates as a correct one ...
            assert len(r["texts"]) == 4 and r["correct"][3] and "The hint says" in r["texts"][3]
            prompt, completion = r["prompt_token_ids"], r["token_ids"][3]
            # ... and is trained on after the original prompt, not the hinted one
            x = next(x for x in examples if list(x.input_ids[: x.prompt_len]) == prompt)
            assert list(x.input_ids[x.prompt_len :]) == completion
            hinted_ids = next(h for q, (h, c) in hinted.items() if c == completion)
            assert hinted_ids != prompt and list(x.input_ids[: len(hinted_ids)]) != hinted_ids
        else:
            assert len(r["texts"]) == 3
    tok = load_tokenizer(setup["policy"])
    for x in examples:  # nothing is trained with a hint in its prompt
        assert "Hint" not in tok.decode(list(x.input_ids[: x.prompt_len]))


def test_engines_asleep_while_training_give_the_same_run(setup, full_run, monkeypatch):
    """sleep_engines="on" (the CUDA default) on CPU: policy and PRM are asleep (storage released) whenever the
    trainer runs, the new weights reach the policy by hand-off, and the run equals the one without sleep."""
    out_full, records = full_run
    seen = []
    real_train = SFTTrainer.train

    def spy(self, *a, **kw):
        ctl = spy.ctl
        seen.append(
            (
                ctl.llm.is_sleeping(),
                ctl.prm.is_sleeping(),
                ctl.llm.engine.runner.kv.untyped_storage().nbytes(),
                ctl.prm.engine.runner.kv.untyped_storage().nbytes(),
            )
        )
        return real_train(self, *a, **kw)

    real_init = controller.Controller.__init__

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        spy.ctl = self

    monkeypatch.setattr(SFTTrainer, "train", spy)
    monkeypatch.setattr(controller.Controller, "__init__", init)
    slept = controller.run(_cfg(setup, sleep_engines="on"), str(setup["root"] / "asleep"))
    assert seen == [(True, True, 0, 0)] * 2  # both iterations trained with both engines asleep
    assert not spy.ctl.llm.is_sleeping() and not spy.ctl.prm.is_sleeping()
    assert _strip(slept) == _strip(records)


def test_async_scheduling_gives_the_same_run(setup, full_run):
    """The policy engine with async scheduling (`--async-scheduling`): the whole run (samples, selection,
    training, evaluation) equals the synchronous one."""
    _, records = full_run
    ctl = []
    real_init = controller.Controller.__init__

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        ctl.append(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(controller.Controller, "__init__", init)
        overlapped = controller.run(_cfg(setup, async_scheduling=True), str(setup["root"] / "async"))
    assert ctl[0].llm.engine.ecfg.async_scheduling
    assert _strip(overlapped) == _strip(records)


def test_memory_plan_sizes_the_engines_and_refuses_up_front(setup, tmp_path, monkeypatch, capsys):
    """The run's memory plan (CUDA only; here a pretend device on the CPU): printed first, its KV budgets given
    to both engines; a device too small for a phase is refused with one line before any engine loads."""
    from bstar.loop.memory_plan import DeviceMemory

    monkeypatch.setattr(controller, "device_memory", lambda dev: DeviceMemory(total=8 << 30, free=8 << 30, name="cpu"))
    built = []
    real_llm_init = controller.LLM.__init__

    def llm_init(self, *a, **kw):
        built.append(kw.get("kv_cache_memory_bytes"))
        real_llm_init(self, *a, **kw)

    monkeypatch.setattr(controller.LLM, "__init__", llm_init)
    cfg = _cfg(setup, iterations=1, progress=True)
    ctl = controller.Controller(cfg, str(tmp_path / "planned"), setup["policy"], setup["policy"], setup["prm"], [], [])
    assert "memory plan on cpu" in capsys.readouterr().out
    assert built == [ctl.plan.kv_cache_memory_bytes("policy")] and built[0] > 0
    assert ctl.prm.engine.runner.num_blocks * ctl.prm.engine.runner.block_bytes() <= ctl.plan.kv_cache_memory_bytes(
        "prm"
    )
    built.clear()
    monkeypatch.setattr(controller, "device_memory", lambda dev: DeviceMemory(total=1 << 20, free=1 << 20, name="cpu"))
    with pytest.raises(MemoryPlanError):
        controller.Controller(cfg, str(tmp_path / "refused"), setup["policy"], setup["policy"], setup["prm"], [], [])
    assert built == []  # refused before the policy engine was built
    r = CliRunner().invoke(
        main,
        ["run", "--model", setup["policy"], "--prm", setup["prm"], "--train-data", setup["train"]]
        + ["--eval-data", setup["test"], "--device", "cpu", "--out", str(tmp_path / "cli"), "--quiet"],
    )
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1 and r.output.startswith("error: phase generate:"), r.output
