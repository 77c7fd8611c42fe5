"""The built-in experiment's design (issue 30): the step verifier's noise model, fresh queries per iteration
(and their resume identity), the per-iteration reward axis in the records, and the reward sweep's report."""

import json
import random
import subprocess
import sys
import types

import pytest

from bstar.embedded import EmbeddedConfig, fresh_queries
from bstar.embedded import task as T
from bstar.embedded.build import make_data
from bstar.errors import BStarError
from bstar.loop import controller
from bstar.loop.config import embedded_run_config
from bstar.loop.metrics import auc, within_question_auc
from bstar.loop.verifier import SIGMAS, StepVerifier, sigma_key

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _candidates(n_questions: int, seed: int = 0):
    """Per question: (question, texts, valid flags): the distinct valid styles and some wrong solutions."""
    rng = random.Random(seed)
    out = []
    for e in T.generate(n_questions, seed=f"verifier-{seed}"):
        p = T.parse_question(e.question)
        texts = list(T.solutions(p))[:3] + [T.wrong_solution(p, rng) for _ in range(4)]
        out.append((e.question, texts, [T.is_valid(e.question, t) for t in texts]))
    return out


def _validity_auc(verifier, data) -> float:
    scores = [[verifier.score(q, t).score for t in ts] for q, ts, _ in data]
    return within_question_auc([v for _, _, v in data], scores)[0]


def test_noiseless_verifier_ranks_exactly_as_the_true_labels():
    v = StepVerifier(T.step_labels, 0.0)
    data = _candidates(60)
    assert any(not all(f) for _, _, f in data) and any(any(f) for _, _, f in data)
    for q, texts, _ in data:
        for t in texts:
            logits = v.step_logits(q, t)
            assert logits == [3.0 if ok else -3.0 for ok in T.step_labels(q, t)]
    assert _validity_auc(v, data) == 1.0  # every valid solution above every invalid one of its question


def test_noise_takes_the_ranking_to_chance():
    data = _candidates(300)
    aucs = [_validity_auc(StepVerifier(T.step_labels, s, seed=1), data) for s in (0.0, 2.0, 8.0, 100.0)]
    assert aucs[0] == 1.0
    assert aucs[0] > aucs[1] > aucs[2] > aucs[3]  # reliability falls with sigma
    assert abs(aucs[3] - 0.5) < 0.05, aucs  # large sigma: chance


def test_verifier_noise_is_a_function_of_seed_question_and_text():
    q, texts, _ = _candidates(1)[0]
    a, b = StepVerifier(T.step_labels, 2.0, seed=5), StepVerifier(T.step_labels, 2.0, seed=5)
    assert [a.score(q, t) for t in texts] == [b.score(q, t) for t in texts]
    other = StepVerifier(T.step_labels, 2.0, seed=6)
    assert [a.score(q, t).step_scores for t in texts] != [other.score(q, t).step_scores for t in texts]
    # the levels share their draws: sigma 4's logits are +-3 + 4 z for the z of sigma 2 (within the clip)
    c = StepVerifier(T.step_labels, 4.0, seed=5)
    for t in texts:
        z = a.noise(q, t, len(T.step_labels(q, t)))
        want = [max(-10, min(10, (3.0 if ok else -3.0) + 4.0 * e)) for ok, e in zip(T.step_labels(q, t), z)]
        assert c.step_logits(q, t) == pytest.approx(want)
    # scored as a PRM: one PRMScore per candidate, min over the steps
    rows = a.score_batch([q], [texts])
    assert [r.score for r in rows[0]] == [min(r.step_scores) for r in rows[0]]
    assert [len(r.steps) for r in rows[0]] == [len(T.solution_lines(t)) for t in texts]


@pytest.mark.parametrize("sigma", [-1.0, float("nan"), float("inf")])
def test_verifier_refuses_a_bad_noise_level(sigma):
    with pytest.raises(BStarError, match="noise"):
        StepVerifier(T.step_labels, sigma)


def test_sigma_keys_are_distinct_record_keys():
    keys = [sigma_key(s) for s in SIGMAS]
    assert len(set(keys)) == len(keys) and sigma_key(0.5) == "verifier_within_auc_s0p5"


def test_fresh_queries_are_new_questions_of_a_seeded_stream():
    cfg = EmbeddedConfig.tiny()
    train, test, seed_set = make_data(cfg)
    built = {e.question for e in train + test + seed_set}
    a = fresh_queries(cfg, 50, run_seed=0)
    assert len({e.question for e in a}) == 50 and not built & {e.question for e in a}
    assert [e.question for e in fresh_queries(cfg, 50, run_seed=0)] == [e.question for e in a]
    assert [e.question for e in fresh_queries(cfg, 50, run_seed=1)] != [e.question for e in a]


def test_iterations_take_disjoint_blocks_of_queries():
    def ctl(n, q, subset=3):
        cfg = types.SimpleNamespace(queries_per_iteration=q, search_subset=subset, seed=0)
        return types.SimpleNamespace(cfg=cfg, train=[None] * n)

    c = ctl(12, 4)
    blocks = [controller.Controller.queries(c, t) for t in (1, 2, 3)]
    assert blocks == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert controller.Controller.queries(c, 4) == [0, 1, 2, 3]  # the set ran out: it wraps around
    c.queries = lambda t: controller.Controller.queries(c, t)
    for t, block in zip((1, 2, 3), blocks):
        sub = controller.Controller.search_subset(c, t)
        assert len(sub) == 3 and set(sub) <= set(block)
    assert controller.Controller.queries(ctl(5, None), 3) == [0, 1, 2, 3, 4]  # the reference: every query


def test_verifier_noise_needs_the_builtin_task():
    with pytest.raises(BStarError, match="built-in"):
        embedded_run_config(model="some/dir", verifier_noise=1.0)
    with pytest.raises(BStarError, match="verifier-noise"):
        embedded_run_config(verifier_noise=-1.0)


# -- the loop: fresh queries and the verifier through the same paths, resumed bit-identically -----------------


def _cfg(**kw):
    from test_resume_faults import _cfg as base

    cfg = base()
    cfg.max_train_queries = None
    cfg.queries_per_iteration = 6
    cfg.verifier_noise = 1.0
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="module")
def fresh_baseline(tmp_path_factory):
    from test_resume_faults import _contents, _fork, _fresh

    out = tmp_path_factory.mktemp("fresh") / "baseline"
    assert _fork(_fresh(out, _cfg())) == 0
    return out, _contents(out)


def test_fresh_queries_train_on_new_questions_each_iteration(fresh_baseline):
    from bstar.utils.jsonl import read_jsonl

    out, _ = fresh_baseline
    pools = [{r["query"] for r in read_jsonl(out / f"iter_{t:03d}" / "candidates.jsonl")} for t in (1, 2)]
    assert pools[0] == set(range(6)) and pools[1] == set(range(6, 12))
    recs = read_jsonl(out / "iterations.jsonl")
    for r in recs:  # the reward axis is in every record (None where no question had both outcomes)
        assert all(sigma_key(s) in r for s in SIGMAS) and "learned_prm_within_auc" in r
    assert json.loads((out / "config.json").read_text())["verifier_noise"] == 1.0


@pytest.mark.parametrize(  # one point in CI: the pool of fresh queries redrawn; the other two with -m slow
    "point",
    [
        pytest.param("t1/search:scored", marks=pytest.mark.slow),
        "t2/generate:scored",
        pytest.param("t2/evaluate:sampled", marks=pytest.mark.slow),
    ],
)
def test_a_killed_fresh_query_run_resumes_identically(fresh_baseline, tmp_path, point):
    import signal

    from test_resume_faults import _contents, _fork, _fresh, _resume

    out = tmp_path / "run"
    assert _fork(_fresh(out, _cfg()), point) == -signal.SIGKILL
    assert _fork(_resume(out)) == 0
    got, want = _contents(out), fresh_baseline[1]
    assert got.keys() == want.keys()
    assert [k for k in got if got[k] != want[k]] == []


def test_reward_axis_uses_the_learned_prm_and_every_noise_level():
    """_reward_axis on hand-made samples: the verifier's AUCs are those of its scores, the learned PRM's are
    those of the PRM's scores (re-scored when the reward is the verifier)."""
    data = _candidates(20, seed=3)
    test = [types.SimpleNamespace(question=q, task="gsm8k") for q, _, _ in data]
    sampled = [
        {"query": i, "texts": ts, "correct": [T.is_valid(q, t) or k % 2 == 0 for k, t in enumerate(ts)], "prm": []}
        for i, (q, ts, _) in enumerate(data)
    ]

    class FakePRM:
        def score_batch(self, questions, texts, progress=False):
            return [[types.SimpleNamespace(score=float(len(t)), step_scores=[0.0]) for t in ts] for ts in texts]

    labels = controller.builtin_labels()
    ctl = types.SimpleNamespace(
        labels=labels, test=test, prm=FakePRM(), cfg=types.SimpleNamespace(seed=0, prm_scale="logit", progress=False)
    )
    ctl.reward = StepVerifier(labels.step_labels, 1.0)
    ctl._reward_scores = lambda reward, ex, texts: controller.Controller._reward_scores(ctl, reward, ex, texts)
    got = controller.Controller._reward_axis(ctl, sampled)
    correct = [r["correct"] for r in sampled]
    want_prm = within_question_auc(correct, [[float(len(t)) for t in r["texts"]] for r in sampled])[0]
    assert got["learned_prm_within_auc"] == pytest.approx(want_prm)
    for s in SIGMAS:
        v = StepVerifier(labels.step_labels, s, seed=0)
        want = within_question_auc(correct, [[v.score(q, t).score for t in ts] for q, ts, _ in data])[0]
        assert got[sigma_key(s)] == pytest.approx(want)
    assert got[sigma_key(0.0)] > got[sigma_key(8.0)]
    assert auc([1.0], [0.0]) == 1.0


def test_reward_sweep_runs_and_reports_on_the_tiny_preset(tmp_path):
    """`run --reward-sweep` on the tiny preset (one iteration, one seed, one noise level): every (mode, reward)
    run, the sweep's table and both figures."""
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "bstar", "run", "--embedded-preset", "tiny", "--reward-sweep", "--sweep-noises", "0"]
    cmd += ["--seeds", "1", "--iterations", "1", "--out", str(out), "--quiet", "--num-samples", "2"]
    cmd += ["--search-k", "2", "--temperatures", "0.7,1.0", "--eval-k", "2", "--eval-sample-queries", "4"]
    cmd += ["--max-eval-queries", "8", "--train-steps", "2", "--batch-size", "4", "--max-tokens", "24"]
    cmd += ["--queries-per-iteration", "6"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    names = sorted(p.name for p in out.iterdir() if p.is_dir() and p.name != "plots")
    assert names == sorted(f"{m}-{lv}-seed0" for m in ("bstar", "online-rft") for lv in ("prm", "s0"))
    assert json.loads((out / "bstar-s0-seed0" / "config.json").read_text())["verifier_noise"] == 0.0
    assert json.loads((out / "bstar-prm-seed0" / "config.json").read_text())["verifier_noise"] is None
    text = (out / "report.md").read_text()
    assert "## Reward sweep" in text and "| prm |" in text and "| s0 |" in text
    assert (out / "plots" / "reward_sweep.png").stat().st_size > 0
    assert (out / "plots" / "reward_sweep_curves.png").stat().st_size > 0
    assert "reward s0:" in r.stdout


def test_reward_sweep_refuses_bad_levels_and_a_model(tmp_path):
    for args, says in (
        (["--reward-sweep", "--sweep-noises", "x"], "--sweep-noises"),
        (["--reward-sweep", "--sweep-noises", "-1"], "--sweep-noises"),
        (["--reward-sweep", "--model", str(tmp_path)], "--reward-sweep"),
    ):
        r = subprocess.run([sys.executable, "-m", "bstar", "run", *args, "--out", str(tmp_path / "x")],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
        assert r.returncode == 1 and says in r.stderr and "Traceback" not in r.stderr
        assert not (tmp_path / "x").exists()
