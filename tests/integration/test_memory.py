"""bstar/loop/memory.py: the run's memory plan from a run's options (config dirs with real shapes, no weights), and
the train phase on CPU with tiny engines (sleep, the trainer freed before waking, hand-off, level 2 reload);
bench/memory_check.py's CPU dry run.
"""

import gc
import json
import weakref
from pathlib import Path

import bench_scripts
import pytest
import torch
from transformers import Qwen2Config

from bstar.engine import LLM, PRM, SamplingParams
from bstar.engine.config import ModelConfig
from bstar.engine.errors import MemoryPlanError, RequestError
from bstar.engine.model.loader import iter_weights
from bstar.engine.runner.memory_plan import GiB
from bstar.loop.memory import run_memory_plan, train_phase, trainer_spec
from bstar.loop.memory_plan import DeviceMemory
from bstar.testing.model_factory import QWEN25_7B
from bstar.train.config import SFTConfig
from bstar.train.memory_estimate import offload_host_bytes

REPO = Path(__file__).resolve().parents[2]
GREEDY = SamplingParams(n=2, temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = [[5, 9, 17, 33, 40], [7, 8, 9]]


@pytest.fixture(scope="module")
def q7_dir(tmp_path_factory) -> Path:
    """Qwen2.5-7B's config.json (float32 as a trainer saves it) and no weights: the plan needs shapes only."""
    d = tmp_path_factory.mktemp("q7")
    Qwen2Config(**QWEN25_7B, torch_dtype="float32", architectures=["Qwen2ForCausalLM"]).save_pretrained(d)
    return d


def test_run_plan_resolves_dtype_and_trainer_defaults_per_device(q7_dir):
    gpu = DeviceMemory(total=80 * GiB, free=80 * GiB, name="cuda:0")
    plan = run_memory_plan(q7_dir, device=gpu, sft=SFTConfig(offload_optimizer=True), host_memory_bytes=256 * GiB)
    # a float32 checkpoint serves bf16 on CUDA: 7,615,616,512 params * 2 bytes
    assert plan.engines["policy"].spec.dtype == torch.bfloat16
    assert plan.engines["policy"].weights == 15_231_233_024
    s = plan.trainer_spec
    assert s.activation_checkpointing and s.compute_dtype == torch.bfloat16 and s.offload and s.ce_chunk == 1024
    # (the per-tensor pinned figure, hand-checked in test_memory_plan; at least 16 bytes a parameter)
    assert plan.trainer.host_state == offload_host_bytes(s) >= 7_615_616_512 * 16 and plan.trainer.gpu_state == 0
    assert [p.phase.name for p in plan.phases] == ["generate", "train"]
    assert "offload on" in plan.table()
    # on the CPU: float32, no activation checkpointing, the plain loss when ce_chunk=0
    cpu = DeviceMemory(total=512 * GiB, free=512 * GiB, name="cpu")
    plan = run_memory_plan(q7_dir, device=cpu, sft=SFTConfig(ce_chunk=0, offload_optimizer=True), check=False)
    assert plan.engines["policy"].spec.dtype == torch.float32
    s = plan.trainer_spec
    assert not s.activation_checkpointing and s.compute_dtype == torch.float32 and s.ce_chunk is None
    # explicit choices win over the defaults
    s = trainer_spec(ModelConfig.from_dir(str(q7_dir)), SFTConfig(grad_checkpointing=False, precision="fp32"))
    assert not s.activation_checkpointing and s.compute_dtype == torch.float32


def test_run_plan_refuses_7b_full_fine_tuning_and_sizes_two_engines(q7_dir, prm_dir):
    gpu = DeviceMemory(total=80 * GiB, free=80 * GiB, name="cuda:0")
    with pytest.raises(MemoryPlanError, match="use 3 GPUs under torchrun or --offload-optimizer$"):
        run_memory_plan(q7_dir, q7_dir, device=gpu)
    # 4 ranks share the state: 113.5 GiB / 4 = 28.4 GiB each, and it fits
    plan = run_memory_plan(q7_dir, q7_dir, device=gpu, world_size=4, max_model_len=4096)
    assert plan.trainer.gpu_state == -(-7_615_616_512 * 16 // 4)
    assert [p.phase.name for p in plan.phases] == ["generate", "score", "train"]
    # without sleep both engines stay resident, so each gets less KV than with sleep
    awake = run_memory_plan(q7_dir, q7_dir, device=gpu, world_size=4, max_model_len=4096, sleep=False, train=False)
    assert awake.kv_cache_memory_bytes("prm") < plan.kv_cache_memory_bytes("prm")
    # a tiny PRM dir next to the 7B policy: its own shapes
    plan = run_memory_plan(q7_dir, prm_dir, device=gpu, world_size=4, max_model_len=4096)
    assert plan.engines["prm"].spec.mcfg.hidden_size == ModelConfig.from_dir(str(prm_dir)).hidden_size


# -- the train phase on CPU ----------------------------------------------------------------------------


def _llm(d):
    return LLM(str(d), device="cpu", num_kv_blocks=64)


def _out(llm):
    return [[c.token_ids for c in o.outputs] for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


class _Trainer:
    """Stands in for SFTTrainer: holds tensors, in a reference cycle (as transformers models are), so only
    gc.collect() frees it."""

    def __init__(self, weights):
        self.weights = weights
        self.me = self


def test_train_phase_sleeps_frees_trainer_then_wakes(llama_dir, prm_dir, monkeypatch):
    llm, prm = _llm(llama_dir), PRM(str(prm_dir), device="cpu", num_kv_blocks=64)
    ref, ref_scores = _out(llm), prm.score("2 + 2?", ["2 + 2 = 4\nThe answer is 4."])
    order, alive = [], {}
    for name, e in (("policy", llm), ("prm", prm)):
        real = e.wake_up
        monkeypatch.setattr(e, "wake_up", lambda tags=None, real=real, name=name: (order.append(name), real(tags)))
    with train_phase({"policy": llm, "prm": prm}) as phase:
        assert llm.is_sleeping() and prm.is_sleeping()
        assert llm.engine.runner.kv.untyped_storage().nbytes() == 0  # the KV cache is released
        t = _Trainer({n: w.clone() for n, w in iter_weights(str(llama_dir))})
        alive["trainer"] = weakref.ref(t)
        monkeypatch.setattr(gc, "collect", _checked_collect(alive, order))
        del t
        assert alive["trainer"]() is not None  # a cycle: still alive until gc runs
    assert order == ["gc", "policy", "prm"]  # freed first, then woken
    assert not llm.is_sleeping() and not prm.is_sleeping()
    assert _out(llm) == ref
    assert prm.score("2 + 2?", ["2 + 2 = 4\nThe answer is 4."]) == ref_scores
    assert phase.handed_off == set()


def _checked_collect(alive, order, real=gc.collect):
    def collect(*a):
        n = real(*a)
        if alive["trainer"]() is None:
            order.append("gc")
        return n

    return collect


def test_train_phase_hand_off_and_level_2(llama_dir, tmp_path):
    from bstar.testing.model_factory import make_model

    other = Path(make_model(str(tmp_path / "other"), "llama", seed=7, max_position_embeddings=1024))
    new_weights = dict(iter_weights(str(other)))
    fresh = _out(_llm(other))
    for level in (1, 2):
        llm = _llm(llama_dir)
        before = _out(llm)
        with train_phase({"policy": llm}, level=level) as phase:
            phase.hand_off("policy", iter(new_weights.items()))
            assert llm.is_sleeping()  # the KV cache waits for the trainer to be freed
        assert not llm.is_sleeping() and phase.handed_off == {"policy"}
        got = _out(llm)
        assert got == fresh and got != before  # the engine serves the handed-off weights
    # level 2 without new weights: reload from disk, or a clear refusal
    llm = _llm(llama_dir)
    before = _out(llm)
    with train_phase({"policy": llm}, level=2, reload={"policy": lambda: iter_weights(str(llama_dir))}):
        pass
    assert _out(llm) == before
    with pytest.raises(RequestError, match=r"slept at level 2 .*phase.hand_off\('policy'"):
        with train_phase({"policy": llm}, level=2):
            pass
    with pytest.raises(RequestError, match="sleep level must be 1 or 2"):
        with train_phase({"policy": llm}, level=3):
            pass
    # a failing body still wakes level-1 engines
    llm = _llm(llama_dir)
    with pytest.raises(KeyError, match="boom"):
        with train_phase({"policy": llm}):
            raise KeyError("boom")
    assert not llm.is_sleeping() and _out(llm) == before


# -- bench/memory_check.py --------------------------------------------------------------------------------


def test_memory_check_dry_run(tmp_path, capsys):
    """The GPU script's phases on CPU with tiny shapes (no memory figures): it runs end to end, prints the
    plan first and writes its table and JSON."""
    memory_check = bench_scripts.load("memory_check")
    memory_check.main(["--dry-run", "--out", str(tmp_path / "mem.json")])
    out = capsys.readouterr().out
    assert out.index("memory plan on") < out.index("phase")
    rows = json.loads((tmp_path / "mem.json").read_text())
    assert rows["dry_run"] is True
    for shapes in ("qwen2.5-0.5b", "qwen2.5-7b-4layers"):
        phases = [r["phase"] for r in rows["runs"][shapes]["rows"]]
        assert phases[:4] == ["start", "policy loaded", "prm (lm head) loaded", "prm (token-cls head) loaded"]
        assert "train step" in phases and "hand-off" in phases and phases[-1] == "generated after hand-off"
        assert rows["runs"][shapes]["changed"]  # the policy's output changed after the hand-off
