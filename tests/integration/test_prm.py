"""PRM scoring against a transformers forward with full logits at the tag positions."""

import json
import os

import pytest
import torch

from bstar.engine import PRM, RequestError
from bstar.engine.entrypoints.prm import LOGIT_CLIP, to_logit
from bstar.testing.model_factory import make_model, make_qwen3_model

QUESTION = (
    "Janet has 3 apples and buys 5 more. A train travels 60 miles per hour for 2 hours. How many apples does she have?"
)
CANDIDATES = [
    "Step 1: 3 + 5 = 8.\nStep 2: multiply by 4.\nThe answer is 8.",
    "3 + 5 = 8\n\n8 * 2 = 16\nThe answer is 16.",
    "The answer is 8.",
    "Step 1: add the numbers.\nStep 2: subtract 7.\nStep 3: 60 * 2 = 120 miles.\nThe answer is 120.",
]


@pytest.fixture(scope="module")
def lm_prm_path(tmp_path_factory):
    return make_model(str(tmp_path_factory.mktemp("prm") / "lm"), "llama", seed=5, extra_tokens=("ки",))


@pytest.fixture(scope="module")
def cls_prm_path(tmp_path_factory):
    return make_model(
        str(tmp_path_factory.mktemp("prm") / "cls"), "qwen2", seed=6, head="token_cls", extra_tokens=("<extra_0>",)
    )


def _sequences(prm, question, candidates):
    q = prm.tokenizer.encode(prm.question_template.format(question=question))
    out = []
    for c in candidates:
        ids, tags = prm._candidate_ids(prm.split_steps(c))
        seq = q + ids
        pos = [len(q) + t for t in tags]
        assert all(seq[p] == prm.tag_id for p in pos) and seq.count(prm.tag_id) == len(pos)
        out.append((seq, pos))
    return out


def _agg(p, how):
    return {
        "min": min(p),
        "last": p[-1],
        "prod": float(torch.tensor(p, dtype=torch.float64).prod()),
        "mean": sum(p) / len(p),
    }[how]


@pytest.mark.parametrize("aggregate", ["min", "last", "prod", "mean"])
def test_lm_prm_matches_full_logits(lm_prm_path, aggregate):
    from transformers import AutoModelForCausalLM

    prm = PRM(lm_prm_path, dtype="float32", device="cpu", aggregate=aggregate)
    scores = prm.score(QUESTION, CANDIDATES)
    hf = AutoModelForCausalLM.from_pretrained(lm_prm_path, dtype=torch.float32).eval()
    good, bad = prm.tokenizer.single_token_id("+"), prm.tokenizer.single_token_id("-")
    for (seq, pos), s in zip(_sequences(prm, QUESTION, CANDIDATES), scores):
        with torch.no_grad():
            logits = hf(torch.tensor([seq])).logits[0].double()  # [T, vocab], the full thing
        ref = torch.softmax(logits[pos][:, [good, bad]], -1)[:, 0].tolist()
        assert len(s.step_scores) == len(ref) == len(s.steps)
        assert max(abs(a - b) for a, b in zip(s.step_scores, ref)) < 1e-4
        assert abs(s.score - _agg(ref, aggregate)) < 1e-4
    assert len({round(x, 6) for s in scores for x in s.step_scores}) > 4  # real, varied probabilities


@pytest.fixture(scope="module")
def qwen3_cls_prm_path(tmp_path_factory):
    """Qwen3ForTokenClassification: q/k norms and head_dim 24 != 64 / 4 under the 2-class head."""
    return make_qwen3_model(
        str(tmp_path_factory.mktemp("prm") / "q3cls"), seed=7, head="token_cls", extra_tokens=("<extra_0>",)
    )


@pytest.mark.parametrize("which", ["cls_prm_path", "qwen3_cls_prm_path"])
def test_classifier_prm_matches_transformers(request, which):
    from transformers import AutoModelForTokenClassification

    cls_prm_path = request.getfixturevalue(which)
    prm = PRM(cls_prm_path, dtype="float32", device="cpu")
    assert prm.kind == "classifier" and prm.step_tag == "<extra_0>"
    scores = prm.score(QUESTION, CANDIDATES)
    hf = AutoModelForTokenClassification.from_pretrained(cls_prm_path, dtype=torch.float32).eval()
    for (seq, pos), s in zip(_sequences(prm, QUESTION, CANDIDATES), scores):
        with torch.no_grad():
            logits = hf(torch.tensor([seq])).logits[0].double()  # [T, 2]
        ref = torch.softmax(logits[pos], -1)[:, 1].tolist()
        assert max(abs(a - b) for a, b in zip(s.step_scores, ref)) < 1e-4
        assert abs(s.score - min(ref)) < 1e-4


def test_logit_scale_is_the_good_minus_bad_logit(lm_prm_path, cls_prm_path):
    """scale="logit": log p - log(1 - p), i.e. the difference of the good and bad logits (LM rows or classifier
    classes), the aggregate is the minimum step logit, and extreme values are clipped."""
    from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

    lm = PRM(lm_prm_path, dtype="float32", device="cpu", scale="logit")
    hf = AutoModelForCausalLM.from_pretrained(lm_prm_path, dtype=torch.float32).eval()
    good, bad = lm.tokenizer.single_token_id("+"), lm.tokenizer.single_token_id("-")
    for (seq, pos), s in zip(_sequences(lm, QUESTION, CANDIDATES), lm.score(QUESTION, CANDIDATES)):
        with torch.no_grad():
            logits = hf(torch.tensor([seq])).logits[0].double()[pos]
        ref = (logits[:, good] - logits[:, bad]).tolist()
        assert max(abs(a - b) for a, b in zip(s.step_scores, ref)) < 1e-3
        assert abs(s.score - min(ref)) < 1e-3
    assert any(x < 0 for s in lm.score(QUESTION, CANDIDATES) for x in s.step_scores)  # not probabilities
    cls = PRM(cls_prm_path, dtype="float32", device="cpu", scale="logit")
    hfc = AutoModelForTokenClassification.from_pretrained(cls_prm_path, dtype=torch.float32).eval()
    for (seq, pos), s in zip(_sequences(cls, QUESTION, CANDIDATES), cls.score(QUESTION, CANDIDATES)):
        with torch.no_grad():
            logits = hfc(torch.tensor([seq])).logits[0].double()[pos]
        ref = (logits[:, 1] - logits[:, 0]).tolist()
        assert max(abs(a - b) for a, b in zip(s.step_scores, ref)) < 1e-3
    p = torch.tensor([1.0, 0.0, 0.5, torch.sigmoid(torch.tensor(3.0)).item(), 1e-30])
    assert to_logit(p).tolist() == pytest.approx([LOGIT_CLIP, -LOGIT_CLIP, 0.0, 3.0, -LOGIT_CLIP], abs=1e-5)
    with pytest.raises(RequestError, match="unknown PRM scale"):
        PRM(lm_prm_path, device="cpu", scale="log")


def test_qwen_math_prm_mlp_head(tmp_path):
    """Qwen2.5-Math-PRM layout: Qwen2 decoder + score = Linear -> ReLU -> Linear(2)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel

    path = make_model(str(tmp_path / "q"), "qwen2", seed=8, extra_tokens=("<extra_0>",))
    w = {k: v for k, v in load_file(os.path.join(path, "model.safetensors")).items() if not k.startswith("lm_head")}
    g = torch.Generator().manual_seed(0)
    H = 64
    head = {
        "score.0.weight": torch.randn(H, H, generator=g) * 0.2,
        "score.0.bias": torch.randn(H, generator=g) * 0.1,
        "score.2.weight": torch.randn(2, H, generator=g) * 0.5,
        "score.2.bias": torch.randn(2, generator=g) * 0.1,
    }
    save_file({**w, **head}, os.path.join(path, "model.safetensors"))
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["architectures"] = ["Qwen2ForProcessRewardModel"]
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    prm = PRM(path, dtype="float32", device="cpu", aggregate="last")
    scores = prm.score(QUESTION, CANDIDATES)
    cfg["architectures"] = ["Qwen2Model"]
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    base = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    hd = {k: v.double() for k, v in head.items()}
    for (seq, pos), s in zip(_sequences(prm, QUESTION, CANDIDATES), scores):
        with torch.no_grad():
            h = base(torch.tensor([seq])).last_hidden_state[0].double()[pos]
        z = torch.relu(h @ hd["score.0.weight"].T + hd["score.0.bias"]) @ hd["score.2.weight"].T + hd["score.2.bias"]
        ref = torch.softmax(z, -1)[:, 1].tolist()
        assert max(abs(a - b) for a, b in zip(s.step_scores, ref)) < 1e-4
        assert abs(s.score - ref[-1]) < 1e-4


def test_shared_prefix_equals_alone(lm_prm_path):
    prm = PRM(lm_prm_path, dtype="float32", device="cpu")
    questions = [QUESTION, QUESTION + " Then she eats 2 of them."]
    cands = [CANDIDATES, CANDIDATES[::-1] * 3]
    bm = prm.engine.block_manager
    hits = bm.prefix_hits
    shared = prm.score_batch(questions, cands)
    q_blocks = [len(prm.tokenizer.encode(prm.question_template.format(question=q))) // 16 for q in questions]
    assert q_blocks[0] >= 1
    # every candidate reused its question's full blocks instead of recomputing them
    assert bm.prefix_hits - hits >= 16 * sum(b * len(c) for b, c in zip(q_blocks, cands))
    alone_prm = PRM(lm_prm_path, dtype="float32", device="cpu")
    for q, cs, got in zip(questions, cands, shared):
        for c, s in zip(cs, got):
            a = alone_prm.score_batch([q], [[c]], share_prefix=False)[0][0]
            assert max(abs(x - y) for x, y in zip(a.step_scores, s.step_scores)) < 1e-5


def test_prm_errors(lm_prm_path, cls_prm_path):
    with pytest.raises(RequestError, match="not a single token"):
        PRM(lm_prm_path, dtype="float32", device="cpu", step_tag="<<tag>>")
    with pytest.raises(RequestError, match="unknown PRM aggregate"):
        PRM(lm_prm_path, dtype="float32", device="cpu", aggregate="max")
    with pytest.raises(RequestError, match="does not match"):
        PRM(cls_prm_path, dtype="float32", device="cpu", kind="lm")
    from bstar.engine import LLM

    with pytest.raises(RequestError, match="reward model"):
        LLM(cls_prm_path, dtype="float32", device="cpu").generate([[5, 6]], use_tqdm=False)


def test_cli_score(lm_prm_path, tmp_path):
    from click.testing import CliRunner

    from bstar.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text(
        json.dumps({"question": QUESTION, "candidates": CANDIDATES[:2]})
        + "\n"
        + json.dumps({"question": "What is 2 + 2?", "response": "2 + 2 = 4\nThe answer is 4."})
        + "\n"
    )
    out = tmp_path / "s.jsonl"
    r = CliRunner().invoke(
        main,
        [
            "score",
            "--prm",
            lm_prm_path,
            "--data",
            str(data),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--aggregate",
            "mean",
        ],
    )
    assert r.exit_code == 0, r.output
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(recs[0]["scores"]) == 2 and len(recs[1]["scores"]) == 1
    s = recs[1]["scores"][0]
    assert len(s["step_scores"]) == 2 and abs(s["score"] - sum(s["step_scores"]) / 2) < 1e-6
    data.write_text('{"question": "q"}\n')
    r = CliRunner().invoke(main, ["score", "--prm", lm_prm_path, "--data", str(data), "--device", "cpu"])
    assert r.exit_code == 1 and "d.jsonl:1" in r.output
