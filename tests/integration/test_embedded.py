"""bstar.embedded: the built-in tiny policy + PRM, built once per module with the tiny preset."""

import json
import math
import os
import random
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

import bstar.embedded.build as build_mod
from bstar.embedded import EmbeddedConfig, build_assets, load_assets
from bstar.embedded import task as T
from bstar.embedded.config import VERSION
from bstar.embedded.prm import _batches, prm_inputs, prm_quality
from bstar.embedded.tokenizer import BOS, EOS, PAD
from bstar.engine import LLM, PRM, SamplingParams
from bstar.engine.entrypoints.prm import split_steps
from bstar.engine.errors import CheckpointError
from bstar.errors import BStarError
from bstar.loop.config import RunConfig
from bstar.loop.rewards import grade
from bstar.loop.tasks import format_prompt

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    t = time.perf_counter()
    assets = build_assets(EmbeddedConfig.tiny(), cache_dir=root, progress=False)
    return root, assets, time.perf_counter() - t


def _tok(path):
    return Tokenizer.from_file(str(Path(path) / "tokenizer.json"))


def test_splits_and_manifest(built):
    root, a, _ = built
    cfg = EmbeddedConfig.tiny()
    assert len(a.train) == cfg.n_train and len(a.test) == cfg.n_test
    assert not {e.question for e in a.train} & {e.question for e in a.test}
    m = json.loads((a.policy_path.parent / "manifest.json").read_text())
    assert m == a.manifest
    assert m["config"] == asdict(cfg) and m["version"] == VERSION
    assert a.policy_path.parent.name == f"embedded-{cfg.key()}"
    acc = m["metrics"]["warm_test_accuracy"]
    assert 0.0 <= acc <= 1.0 and acc * cfg.n_test == pytest.approx(round(acc * cfg.n_test))
    for k in ("data", "tokenizer", "policy", "prm", "total"):
        assert m["seconds"][k] >= 0
    assert set(m["versions"]) >= {"torch", "transformers", "tokenizers"}
    # quality is measured where the build ran (CPU kernels differ between machines): the machine is recorded
    assert m["machine"]["cpu_count"] >= 1 and m["machine"]["platform"]
    # nothing but the finished dir is left in the cache root
    assert [p.name for p in root.iterdir()] == [a.policy_path.parent.name]


def test_tokenizer_round_trip_and_grade(built):
    _, a, _ = built
    tok = _tok(a.policy_path)
    for s in ("ки", "+", "-", "*", "=", "#", "\n"):
        assert len(tok.encode(s, add_special_tokens=False).ids) == 1, s
    for e in a.train + a.test:
        ids = tok.encode(e.gold_solution, add_special_tokens=False).ids
        back = tok.decode(ids)
        assert back == e.gold_solution
        assert grade(back, e.gold_answer, "gsm8k")
        # digits are one token each: every number costs as many tokens as it has digits
        assert all(not t.strip("Ġ").isdigit() or len(t.strip("Ġ")) == 1 for t in tok.encode(e.gold_solution).tokens)
    # a wrong answer does not grade as right after the round trip (the check can fail)
    e = a.test[0]
    wrong = e.gold_solution.rsplit("####", 1)[0] + f"#### {int(e.gold_answer) + 1}"
    assert not grade(tok.decode(tok.encode(wrong, add_special_tokens=False).ids), e.gold_answer, "gsm8k")
    assert tok.encode("x").ids[0] == BOS and tok.token_to_id("</s>") == EOS


def test_policy_engine_matches_transformers(built):
    _, a, _ = built
    prompt = format_prompt(a.test[0]) + "3 * 4 = 12\n"
    hf_tok = AutoTokenizer.from_pretrained(a.policy_path)
    ids = hf_tok(prompt)["input_ids"]
    assert ids == _tok(a.policy_path).encode(prompt).ids  # same tokenisation through transformers
    hf = AutoModelForCausalLM.from_pretrained(a.policy_path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].double()
    llm = LLM(str(a.policy_path), device="cpu", dtype="float32")
    got = llm.compute_logits([ids])[0].double()
    assert got.shape == ref.shape
    assert ref.std() > 0.1  # trained weights: logits are not flat
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    assert hf.config.eos_token_id == EOS


def test_prm_loads_and_scores(built):
    _, a, _ = built
    m = a.manifest["metrics"]
    assert 0.0 <= m["prm_step_accuracy"] <= 1.0 and m["prm_eval_steps"] > 0
    assert 0.5 <= m["prm_majority_rate"] <= 1.0
    assert 0.0 <= m["prm_valid_at_1"] <= m["prm_pass_at_1"] <= 1.0  # a valid sample has the right answer
    assert m["prm_lucky_share"] is None or 0.0 <= m["prm_lucky_share"] <= 1.0
    # the oracle picks a valid sample wherever there is one: at least a random pick's validity
    assert m["prm_valid_at_1"] <= m["prm_oracle_reward_at_k"] <= 1.0
    prm = PRM(str(a.prm_path), device="cpu", scale="logit")
    e = a.test[1]
    wrong = e.gold_solution.replace("=", "= 1", 1)
    scores = prm.score(e.question, [e.gold_solution, wrong])
    for s, cand in zip(scores, [e.gold_solution, wrong]):
        assert len(s.step_scores) == len(cand.splitlines())
        assert all(-10.0 <= p <= 10.0 and math.isfinite(p) for p in s.step_scores)
        assert s.score == pytest.approx(min(s.step_scores), abs=1e-6)


def _gold_vs_corrupted(prm, examples) -> tuple[float, float, float]:
    """(mean min-step logit of the gold solutions, of copies whose first result is wrong, fraction of problems
    where the gold one scores higher)."""
    gold, bad = [], []
    for e in examples:
        s = prm.score(e.question, [e.gold_solution, e.gold_solution.replace("=", "= 1", 1)])  # 12 -> 1 12
        gold.append(s[0].score)
        bad.append(s[1].score)
    return sum(gold) / len(gold), sum(bad) / len(bad), sum(g > b for g, b in zip(gold, bad)) / len(gold)


@pytest.mark.slow
def test_default_prm_prefers_gold_to_corrupted_solutions():
    """The built-in PRM at its default size (a build of several minutes on 2 cores, hence only under
    `pytest -m slow`) scores each test problem's gold solution above a copy with a wrong first result."""
    a = build_assets(EmbeddedConfig(), progress=False)
    gold, bad, frac = _gold_vs_corrupted(PRM(str(a.prm_path), device="cpu", scale="logit"), a.test[:300])
    assert gold > bad + 2.0 and frac > 0.9, (gold, bad, frac)


def test_prm_batches_are_length_bucketed_passes_over_the_rows():
    """Every pass over the rows visits each once; a batch holds rows of similar length, so padding to its longest
    costs far less than in random batches of the same rows."""
    rng = random.Random(0)
    encoded = [([0] * rng.randint(40, 140), i) for i in range(32 * 16 * 3)]
    batches = list(_batches(encoded, 32, 16 * 3 * 2, seed=1))
    assert all(len(b) == 32 for b in batches)
    for k in (0, 1):  # two passes, each a permutation of the rows
        seen = sorted(i for b in batches[k * 48 : (k + 1) * 48] for _, i in b)
        assert seen == list(range(len(encoded)))
    assert [[i for _, i in b] for b in batches[:48]] != [[i for _, i in b] for b in batches[48:]]
    padded = lambda bs: sum(len(b) * max(len(ids) for ids, _ in b) for b in bs)
    real = sum(len(ids) for ids, _ in encoded) * 2
    shuffled = list(range(len(encoded)))
    rng.shuffle(shuffled)
    random_batches = [[encoded[i] for i in shuffled[k : k + 32]] for k in range(0, len(encoded), 32)] * 2
    assert padded(batches) / real < 1.05 < 1.2 < padded(random_batches) / real
    assert list(_batches(encoded, 32, 10, seed=1)) == batches[:10]  # deterministic by seed


def _rows(a):
    return [json.loads(line) for line in (a.policy_path.parent / "prm_data.jsonl").read_text().splitlines()]


def test_prm_data_carries_the_true_step_labels(built):
    _, a, _ = built
    rows = _rows(a)
    train = {e.question for e in a.train}
    assert rows and {r["question"] for r in rows} <= train  # PRM data from the train split, never the test split
    for r in rows:
        assert r["labels"] == T.label_lines(T.parse_question(r["question"]), r["steps"])
    labels = [x for r in rows for x in r["labels"]]
    assert 0 < sum(labels) < len(labels)  # both classes


def test_manifest_prm_quality_matches_engine_prm(built):
    """The recorded quality is recomputed here with bstar.PRM on the same held-out questions."""
    _, a, _ = built
    cfg = EmbeddedConfig.tiny()
    got = prm_quality(cfg, a.prm_path, a.policy_path, a.test[: cfg.prm_eval_questions])
    m = a.manifest["metrics"]
    assert {k: m[k] for k in got} == pytest.approx(got)


def test_policy_greedy_matches_transformers_generate(built):
    """The engine (which measured the manifest's accuracy) and transformers decode the saved policy
    identically, eos included."""
    _, a, _ = built
    tok = _tok(a.policy_path)
    hf = AutoModelForCausalLM.from_pretrained(a.policy_path, dtype=torch.float32).eval()
    llm = LLM(str(a.policy_path), device="cpu", dtype="float32")
    for e in a.test[:2]:
        ids = tok.encode(format_prompt(e)).ids
        got = llm.generate([ids], SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0].outputs[0]
        with torch.no_grad():
            ref = hf.generate(
                torch.tensor([ids]),
                max_new_tokens=24,
                do_sample=False,
                eos_token_id=EOS,
                pad_token_id=PAD,
            )[0, len(ids) :].tolist()
        if ref and ref[-1] == EOS:
            ref = ref[:-1]
        assert got.token_ids[: len(ref)] == ref


def test_prm_inputs_match_engine_tokenisation(built):
    """The PRM's training inputs are tokenised exactly as bstar.PRM tokenises at scoring time."""
    _, a, _ = built
    prm = PRM(str(a.prm_path), device="cpu")
    tok = _tok(a.prm_path)
    e = a.train[0]
    steps = split_steps(e.gold_solution)
    ids, tags = prm_inputs(tok, e.question, steps)
    q = prm.tokenizer.encode(prm.question_template.format(question=e.question))
    c_ids, c_tags = prm._candidate_ids(prm.split_steps(e.gold_solution))
    assert ids == q + c_ids and tags == [len(q) + t for t in c_tags]
    assert all(ids[t] == tok.token_to_id("ки") for t in tags) and len(tags) == len(steps)
    assert T.solution_lines(e.gold_solution) == steps  # the labels' steps are bstar.PRM's steps


def test_second_call_hits_cache(built, monkeypatch):
    root, a, _ = built
    before = {p: p.stat().st_mtime_ns for p in a.policy_path.parent.rglob("*")}

    def no_build(*args, **kw):
        raise AssertionError("rebuilt although the cache holds this config")

    monkeypatch.setattr(build_mod, "_build", no_build)
    b = build_assets(EmbeddedConfig.tiny(), cache_dir=root, progress=False)
    assert b.policy_path == a.policy_path and b.manifest == a.manifest
    assert b.train == a.train and b.test == a.test
    assert {p: p.stat().st_mtime_ns for p in a.policy_path.parent.rglob("*")} == before
    # $BSTAR_CACHE is the default location
    monkeypatch.setenv("BSTAR_CACHE", str(root))
    assert build_assets(EmbeddedConfig.tiny(), progress=False).policy_path == a.policy_path


def test_failed_build_leaves_no_partial_cache(tmp_path, monkeypatch):
    def boom(*args, **kw):
        raise RuntimeError("killed in the PRM phase")

    monkeypatch.setattr(build_mod, "train_prm", boom)
    seen, real_warm_start = [], build_mod.warm_start

    def warm_start(*args, **kw):
        seen.append(torch.get_num_threads())
        return real_warm_start(*args, **kw)

    monkeypatch.setattr(build_mod, "warm_start", warm_start)
    cfg = EmbeddedConfig.tiny()
    torch.set_num_threads(2)  # the build runs on 1 (threads=1) and puts 2 back; the module fixture restores 1
    with pytest.raises(RuntimeError, match="killed in the PRM phase"):
        build_assets(cfg, cache_dir=tmp_path, progress=False, threads=1)
    assert list(tmp_path.iterdir()) == []  # neither the final dir nor the temp dir
    assert seen == [1] and torch.get_num_threads() == 2  # the build's thread setting applied, then undone


def test_stale_temp_dir_of_dead_build_is_swept(tmp_path):
    cfg = EmbeddedConfig.tiny()
    # pids that cannot be alive: above the kernel's pid_max; of this config, another one, an old version
    dead = [tmp_path / f".embedded-{key}.tmp-{2**22 + 1}-abc" for key in (cfg.key(), "0123456789abcdef")]
    for d in dead:
        d.mkdir()
        (d / "half.safetensors").write_bytes(b"\0" * 8)
    alive = tmp_path / f".embedded-{cfg.key()}.tmp-{os.getpid()}-abc"
    alive.mkdir()
    other = tmp_path / ".unrelated.tmp-1-abc"
    other.mkdir()
    build_mod._sweep_stale(tmp_path)
    assert not any(d.exists() for d in dead)
    assert alive.exists() and other.exists()


def test_config_key_and_validation():
    assert EmbeddedConfig().key() == EmbeddedConfig().key()
    assert EmbeddedConfig().key() != EmbeddedConfig(seed=1).key()
    with pytest.raises(BStarError, match="prm_questions"):
        EmbeddedConfig(n_train=4, prm_questions=8)
    with pytest.raises(BStarError, match="num_heads"):
        EmbeddedConfig(hidden_size=30, num_heads=4)
    with pytest.raises(BStarError, match="prm_eval_questions"):
        EmbeddedConfig(n_test=10, prm_eval_questions=20)
    with pytest.raises(BStarError, match="warm_lr"):
        EmbeddedConfig(warm_lr=0.0)
    with pytest.raises(BStarError, match="threads"):
        build_assets(EmbeddedConfig.tiny(), cache_dir="/nonexistent", threads=0)
    assert (
        EmbeddedConfig.preset("tiny") == EmbeddedConfig.tiny() and EmbeddedConfig.preset("default") == EmbeddedConfig()
    )
    with pytest.raises(BStarError, match="unknown embedded preset 'small'"):
        EmbeddedConfig.preset("small")
    with pytest.raises(BStarError, match="unknown embedded preset"):
        RunConfig(embedded_preset="small")


def test_uncreatable_cache_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a dir")
    with pytest.raises(BStarError, match="cannot create the embedded-model cache dir"):
        build_assets(EmbeddedConfig.tiny(), cache_dir=blocker / "cache", progress=False)


def test_corrupt_cache_is_a_clear_error(tmp_path):
    d = tmp_path / "x"
    d.mkdir()
    (d / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="delete it to rebuild"):
        load_assets(d)


def test_two_torchrun_ranks_on_a_cold_cache_build_it_once(tmp_path, free_port):
    """Under torchrun the node's local rank 0 builds in a one-rank child process (the build's trainer joins
    no process group) and the other rank waits for its manifest: a 2-rank run on an empty cache ends well,
    with one finished build and no temporaries (before the fix rank 1 failed inside the build's trainer)."""
    import subprocess
    import sys

    cache = tmp_path / "cache"
    cache.mkdir()
    env = {**os.environ, "BSTAR_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port}"]
    cmd += ["-m", "bstar", "run", "--embedded-preset", "tiny", "--iterations", "1", "--quiet"]
    r = subprocess.run(cmd + ["--out", str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    built = sorted(p.name for p in cache.iterdir() if p.name.startswith((".embedded", "embedded")))
    assert built == [f"embedded-{EmbeddedConfig.tiny().key()}"]
    assert (tmp_path / "run" / "iterations.jsonl").is_file()
    assert r.stdout.count("greedy accuracy:") == 1  # the summary line from rank 0 only


def test_a_waiting_rank_loads_what_local_rank_0_builds(tmp_path, monkeypatch, built):
    """A rank other than the node's first builds nothing: it waits until the manifest appears, then loads."""
    import shutil
    import threading

    root, assets, _ = built
    src = assets.policy_path.parent
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(build_mod, "_build", lambda *a, **k: pytest.fail("a waiting rank must not build"))

    def finish():  # as a build ends: the whole directory renamed into place at once
        shutil.copytree(src, tmp_path / "staged")
        os.replace(tmp_path / "staged", tmp_path / src.name)

    later = threading.Timer(1.0, finish)
    later.start()
    got = build_assets(EmbeddedConfig.tiny(), cache_dir=tmp_path, progress=False)
    later.join()
    assert got.manifest == assets.manifest and got.policy_path == tmp_path / src.name / "policy"
