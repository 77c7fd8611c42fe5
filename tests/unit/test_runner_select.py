"""The kernel backend and the runner are chosen once, when the engine is built, and overridden in one place
(EngineConfig.kernels, else BSTAR_KERNELS); the CPU runner writes back its kept K/V before the paged cache is
read or copied (against transformers' own cache)."""

import os

import pytest
import torch

from bstar.engine import LLM, SamplingParams
from bstar.engine.config import EngineConfig
from bstar.engine.core.llm_engine import LLMEngine
from bstar.engine.errors import RequestError
from bstar.engine.runner import runners
from bstar.engine.runner.cpu.runner import CpuRunner
from bstar.engine.runner.gpu.runner import GpuRunner
from bstar.kernels.launch import record_variants
from bstar.testing.model_factory import hf_model, make_model

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),  # numpy inf/nan in masked interpreter lanes
]
CPU = torch.device("cpu")
needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="Triton kernels on CPU tensors need TRITON_INTERPRET=1"
)
PROMPTS = [[5, 9, 17, 3], [40, 2, 11]]
GREEDY = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("runner_select") / "llama"
    return make_model(str(path), "llama", seed=2, tokenizer=False, max_position_embeddings=256)


def _tokens(llm) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)]


@pytest.mark.parametrize(
    ("kernels", "env", "want"),
    [
        ("auto", None, CpuRunner),  # the device: CPU
        ("auto", "triton", GpuRunner),  # the environment override
        ("auto", "torch", CpuRunner),
        ("auto", "auto", CpuRunner),
        ("triton", "torch", GpuRunner),  # the config wins over the environment
        ("torch", "triton", CpuRunner),
    ],
)
def test_the_runner_follows_the_config_then_the_environment_then_the_device(monkeypatch, kernels, env, want):
    if env is None:
        monkeypatch.delenv("BSTAR_KERNELS", raising=False)
    else:
        monkeypatch.setenv("BSTAR_KERNELS", env)
    assert runners.runner_class(EngineConfig(kernels=kernels), CPU) is want


def test_a_bad_choice_is_one_line(tiny, monkeypatch):
    with pytest.raises(RequestError, match="kernels must be one of auto, triton, torch, got 'cuda'"):
        LLM(tiny, dtype="float32", device="cpu", kernels="cuda")
    monkeypatch.setenv("BSTAR_KERNELS", "bogus")
    with pytest.raises(RequestError, match="BSTAR_KERNELS must be 'triton', 'torch' or 'auto', got 'bogus'") as e:
        LLM(tiny, dtype="float32", device="cpu")
    assert "\n" not in str(e.value)


def test_the_cpu_engine_chooses_once_and_ignores_the_environment_after(tiny, monkeypatch):
    """The choice is read once per engine; BSTAR_KERNELS set afterwards (to Triton, or to a value any per-call
    read would refuse) changes nothing: no Triton launch, the same tokens."""
    calls = []
    real = runners.triton_on
    monkeypatch.setattr(runners, "triton_on", lambda *a: calls.append(a) or real(*a))
    monkeypatch.delenv("BSTAR_KERNELS", raising=False)
    llm = LLM(tiny, dtype="float32", device="cpu")
    want = _tokens(llm)
    for env in ("triton", "bogus"):
        monkeypatch.setenv("BSTAR_KERNELS", env)
        with record_variants() as launched:
            assert _tokens(llm) == want
        assert not launched
    assert len(calls) == 1 and type(llm.engine.runner) is CpuRunner
    assert not llm.engine.model.backend.triton and llm.engine.sampler.triton is False
    _one_backend(llm.engine.model)


def _one_backend(model):
    """Every attention layer holds the one backend object; the norms and MLPs follow its kernels."""
    from bstar.engine.model.decoder import MLP, Attention, RMSNorm

    backend = model.backend
    assert all(m.backend is backend for m in model.modules() if isinstance(m, Attention))
    assert all(m.triton is backend.triton for m in model.modules() if isinstance(m, (MLP, RMSNorm)))


@needs_interpreter
def test_the_triton_engine_keeps_its_backend_when_the_environment_changes(tiny, monkeypatch):
    """An engine built with BSTAR_KERNELS=triton runs every step on the Triton kernels after the variable
    says torch; its greedy tokens equal the CPU runner's."""
    want = _tokens(LLM(tiny, dtype="float32", device="cpu"))
    monkeypatch.setenv("BSTAR_KERNELS", "triton")
    llm = LLM(tiny, dtype="float32", device="cpu", max_num_seqs=4)
    assert type(llm.engine.runner) is GpuRunner and llm.engine.model.backend.triton and llm.engine.sampler.triton
    _one_backend(llm.engine.model)
    monkeypatch.setenv("BSTAR_KERNELS", "torch")
    with record_variants() as launched:
        assert _tokens(llm) == want
    names = set(launched)
    assert "_rope_store_kv_kernel" in names and any("decode" in n for n in names), names
    assert {"_sample_kernel", "_chunk_draw_kernel"} & names, names  # (the sampler's kernels: its own choice)


def _write_back_engine(tiny, steps: int) -> LLMEngine:
    """An engine whose running candidates' newest K/V is only in the CPU runner's cascade buffers."""
    eng = LLMEngine(tiny, dtype="float32", device="cpu", engine_config=EngineConfig(block_size=4))
    eng.add_request("a", [3, 8, 21, 5, 13, 2, 34], SamplingParams(n=2, temperature=1.0, max_tokens=40, seed=4))
    for _ in range(steps):
        eng.step()
    assert type(eng.runner) is CpuRunner and eng.runner.cpu_decode._dirty > 1
    return eng


def _slots(seq, block_size: int, n: int) -> torch.Tensor:
    return torch.tensor([seq.block_table[p // block_size] * block_size + p % block_size for p in range(n)])


def _keys(kv: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """Every layer's K at `slots`: [layers, T, Hkv, D]."""
    L, _, blocks, bs, h, d = kv.shape
    return kv[:, 0].reshape(L, blocks * bs, h, d)[:, slots]


def test_the_cpu_runner_writes_back_before_the_cache_is_read(tiny):
    """read_kv: the paged cache holds every computed token's K, equal to transformers' cache of the same
    tokens; the cache as it stood before (the write-back steps' tokens missing) did not."""
    eng = _write_back_engine(tiny, steps=12)
    seq = eng.scheduler.running[0]
    n = len(seq.token_ids) - 1  # the newest token is sampled, not yet forwarded
    slots = _slots(seq, 4, n)
    with torch.no_grad():
        cache = hf_model(tiny)(torch.tensor([seq.token_ids[:n]]), use_cache=True).past_key_values
    want = torch.stack([layer.keys[0].transpose(0, 1) for layer in cache.layers])
    stale = _keys(eng.runner.kv, slots).clone()
    got = _keys(eng.runner.read_kv(), slots)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert eng.runner.cpu_decode._dirty == 0
    assert not torch.allclose(stale[:, -2:], want[:, -2:], atol=1e-3)  # what a read without the flush saw


def test_the_cpu_runner_writes_back_before_a_block_copy(tiny):
    """copy_blocks of the block that holds the newest (written-back-later) tokens copies them too."""
    eng = _write_back_engine(tiny, steps=11)
    runner, seq = eng.runner, eng.scheduler.running[0]
    src = seq.block_table[(len(seq.token_ids) - 2) // 4]
    used = {b for s in eng.scheduler.running for b in s.block_table}
    dst = max(set(range(runner.num_blocks)) - used)
    runner.copy_blocks([(src, dst)])
    kv = runner.read_kv()
    assert torch.equal(kv[:, :, dst], kv[:, :, src]) and kv[:, :, src].abs().sum() > 0


def test_only_the_cpu_runner_touches_its_decode_state():
    """The write-back rule lives in one class: no module outside runner/cpu/ reaches the decode state."""
    import bstar

    root = os.path.dirname(bstar.__file__)
    outside = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            path = os.path.join(dirpath, f)
            if f.endswith(".py") and os.sep + os.path.join("runner", "cpu") + os.sep not in path:
                with open(path) as fh:
                    if "cpu_decode" in fh.read():
                        outside.append(os.path.relpath(path, root))
    assert outside == []
