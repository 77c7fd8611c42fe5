"""Sleep / wake (as vLLM's), loading straight into the serving dtype, and the CUDA device guard, on CPU.

Sleep is checked on storage, not attributes: the KV cache's and the weights' storages on the engine's device
must be empty after sleep, the level-1 backup a separate copy holding the bytes, and outputs after wake_up
identical to before (level 1) or to a fresh engine on the reloaded weights (level 2).
"""

import contextlib
import os

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from bstar import kernels
from bstar.engine import LLM, PRM, RequestError, SamplingParams
from bstar.engine.config import ModelConfig, resolve_device, resolve_dtype
from bstar.engine.core.llm_engine import LLMEngine
from bstar.engine.model.linear import Linear, packing_available
from bstar.engine.model.loader import iter_weights
from bstar.engine.runner.memory_plan import param_count, unique_storage_bytes
from bstar.engine.runner.model_runner import device_guard
from bstar.testing.model_factory import make_model

GREEDY = SamplingParams(n=3, temperature=0, max_tokens=20, ignore_eos=True)
PROMPTS = [[5, 17, 33, 9, 41, 8, 77, 12, 19, 20, 21, 60, 61, 62, 63, 64, 65, 66], [3, 4, 5, 6, 7]]
QUESTION = "Janet has 3 apples and buys 5 more. How many apples does she have?"
CANDIDATES = ["Step 1: 3 + 5 = 8.\nThe answer is 8.", "3 + 5 = 8\n8 * 2 = 16\nThe answer is 16."]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("sleep")
    return {
        "llama": make_model(str(root / "llama"), "llama", seed=11),
        "qwen2_tied": make_model(str(root / "qwen2"), "qwen2", seed=12, tie_word_embeddings=True),
        "other": make_model(str(root / "other"), "llama", seed=13),
        "lm_prm": make_model(str(root / "lm_prm"), "llama", seed=14, extra_tokens=("ки",)),
        "cls_prm": make_model(str(root / "cls_prm"), "qwen2", seed=15, head="token_cls", extra_tokens=("<extra_0>",)),
    }


def _tokens(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


def _storages(tensors):
    """{data_ptr: storage} of the distinct storages behind tensors."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage() for t in tensors}


@pytest.mark.parametrize("name", ["llama", "qwen2_tied"])
def test_sleep_level1_releases_device_memory_and_wakes_identical(models, name):
    # MKL packing where available: the sleep must drop the packed copies too
    llm = LLM(models[name], dtype="float32", device="cpu", cpu_gemm="mkl" if packing_available() else "aten")
    eng, runner = llm.engine, llm.engine.runner
    ref = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    # state the sleep must drop existed: cascade buffers (n=3 siblings) and, with MKL, packed weight copies
    assert runner.cpu_decode._buffers is not None
    linears = [m for m in eng.model.modules() if isinstance(m, Linear)]
    assert any(m.packed is not None for m in linears) or not packing_available()
    assert eng.block_manager.hash_to_block  # prompts' full blocks are in the prefix cache
    params = dict(eng.model.named_parameters())
    values = {n: p.detach().clone() for n, p in params.items()}
    kv = runner.kv
    weights_before = _storages(runner.weight_tensors())
    # tied weights: one storage for embed_tokens and lm_head
    assert len(weights_before) == len(params) == len(list(eng.model.parameters()))
    assert unique_storage_bytes(runner.weight_tensors()) == param_count(eng.mcfg) * 4

    llm.sleep(1)
    assert llm.is_sleeping()
    assert runner.kv is kv and kv.untyped_storage().nbytes() == 0
    assert all(s.nbytes() == 0 for s in weights_before.values())
    assert all(p.untyped_storage().nbytes() == 0 for p in params.values())
    assert unique_storage_bytes(runner.weight_tensors()) == 0
    backups = [b for _, _, b in runner._slept_weights]
    assert len(backups) == len(weights_before)  # one backup per storage, the tied table once
    assert sum(b.numel() for b in backups) == param_count(eng.mcfg) * 4
    assert not {b.untyped_storage().data_ptr() for b in backups} & set(weights_before)  # a separate copy
    saved = torch.cat(backups).view(torch.float32)  # the backups hold the weights, in storage order
    assert torch.equal(saved, torch.cat([values[n].flatten() for n in params]))
    assert runner.cpu_decode._buffers is None and all(m.packed is None for m in linears)
    bm = eng.block_manager
    assert bm.num_free == bm.num_blocks and not bm.hash_to_block and all(h is None for h in bm.block_hash)
    with pytest.raises(RequestError, match=r"^add_request: the engine is asleep \(kv_cache, weights\)"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    with pytest.raises(RequestError, match="asleep"):
        llm.compute_logits(PROMPTS)

    llm.wake_up()
    assert not llm.is_sleeping() and runner._slept_weights is None
    assert dict(eng.model.named_parameters()) == params  # the same Parameter objects, refilled
    assert all(torch.equal(p, values[n]) for n, p in params.items())
    if name == "qwen2_tied":
        assert eng.model.lm_head.weight is eng.model.model.embed_tokens.weight
    assert kv.untyped_storage().nbytes() == kv.numel() * 4 and not kv.any()
    assert _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == _tokens(ref)


def test_sleep_handles_a_shared_storage_once(models):
    """Two distinct parameters over one storage (tying by data, not by object): one backup, one restore, and
    both see the restored bytes."""
    llm = LLM(models["qwen2_tied"], dtype="float32", device="cpu")
    ref = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    net, runner = llm.engine.model, llm.engine.runner
    net.lm_head.weight = torch.nn.Parameter(net.model.embed_tokens.weight.detach(), requires_grad=False)
    tensors = runner.weight_tensors()
    assert len(tensors) == len(_storages(tensors)) + 1  # the two share a storage
    llm.sleep(1)
    assert len(runner._slept_weights) == len(tensors) - 1
    assert sum(b.numel() for _, _, b in runner._slept_weights) == param_count(llm.engine.mcfg) * 4
    llm.wake_up()
    assert net.lm_head.weight.data_ptr() == net.model.embed_tokens.weight.data_ptr()
    assert _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == _tokens(ref)


def test_sleep_level2_reload_equals_a_fresh_engine(models):
    llm = LLM(models["llama"], dtype="float32", device="cpu")
    before = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    runner = llm.engine.runner
    params = list(llm.engine.model.parameters())
    llm.sleep(2)
    assert all(p.untyped_storage().nbytes() == 0 for p in params) and runner.kv.untyped_storage().nbytes() == 0
    assert all(b is None for _, _, b in runner._slept_weights)  # discarded, no host copy
    with pytest.raises(RequestError, match=r"^load_weights: the weights are asleep"):
        llm.load_weights(iter_weights(models["other"]))
    # vLLM's RL order: weights, load, then the KV cache
    llm.wake_up(tags=["weights"])
    assert all(p.untyped_storage().nbytes() == p.numel() * 4 for p in params)
    new = load_file(os.path.join(models["other"], "model.safetensors"))
    llm.load_weights([("model.embed_tokens.weight", new["model.embed_tokens.weight"])])  # one at a time is fine
    llm.wake_up(tags=["kv_cache"])
    with pytest.raises(RequestError, match=r"after sleep\(level=2\) the weights must be reloaded .* not loaded yet"):
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    llm.load_weights(new.items())
    fresh = LLM(models["other"], dtype="float32", device="cpu")
    assert _tokens(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == _tokens(
        fresh.generate(PROMPTS, GREEDY, use_tqdm=False)
    )
    assert _tokens(fresh.generate(PROMPTS, GREEDY, use_tqdm=False)) != _tokens(before)
    for a, b in zip(llm.compute_logits(PROMPTS), fresh.compute_logits(PROMPTS)):
        assert torch.equal(a, b)
    # level 2 after level 1 drops the host copy
    llm.sleep(1)
    assert all(b is not None for _, _, b in runner._slept_weights)
    llm.sleep(2)
    assert all(b is None for _, _, b in runner._slept_weights)


def test_sleep_and_wake_refusals_and_warnings(models):
    eng = LLMEngine(models["llama"], dtype="float32", device="cpu")
    eng.add_request("r0", [5, 6, 7], SamplingParams(max_tokens=4))
    with pytest.raises(RequestError, match=r"^cannot sleep with 1 unfinished request\(s\); finish or abort"):
        eng.sleep(1)
    while eng.has_unfinished_requests():
        eng.step()
    with pytest.raises(RequestError, match="sleep level must be 1 or 2, got 3"):
        eng.sleep(3)
    with pytest.warns(UserWarning, match="wake_up: weights, kv_cache already awake"):
        eng.wake_up()
    eng.sleep(1)
    with pytest.raises(RequestError, match=r"unknown wake_up tag\(s\) \['kv'\]"):
        eng.wake_up(["kv"])
    eng.wake_up(["kv_cache"])
    with pytest.warns(UserWarning, match="wake_up: kv_cache already awake"):
        eng.wake_up(["kv_cache", "weights"])
    assert not eng.is_sleeping()


@pytest.mark.parametrize("kind", ["lm_prm", "cls_prm"])
def test_prm_sleep_wake_gives_identical_scores(models, kind):
    prm = PRM(models[kind], dtype="float32", device="cpu")
    ref = prm.score(QUESTION, CANDIDATES)
    params = list(prm.engine.model.parameters())
    prm.sleep(1)
    assert all(p.untyped_storage().nbytes() == 0 for p in params)
    with pytest.raises(RequestError, match="forward: the engine is asleep"):
        prm.score(QUESTION, CANDIDATES)
    prm.wake_up()
    assert prm.score(QUESTION, CANDIDATES) == ref
    prm.sleep(2)
    prm.wake_up(["weights"])
    prm.load_weights(iter_weights(models[kind]))
    prm.wake_up(["kv_cache"])
    assert prm.score(QUESTION, CANDIDATES) == ref


# -- loading in the serving dtype -------------------------------------------------------------------------------


def test_resolve_dtype_without_cuda():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")

    def cfg(stored):
        return ModelConfig.from_dict(
            {
                "model_type": "llama",
                "hidden_size": 8,
                "intermediate_size": 16,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "vocab_size": 10,
                "torch_dtype": stored,
            }
        )

    # a float32 checkpoint (what the trainer saves) is served in bf16 on CUDA, as vLLM does
    assert resolve_dtype("auto", cfg("float32"), cuda) == torch.bfloat16
    assert resolve_dtype("auto", cfg(None), cuda) == torch.bfloat16
    assert resolve_dtype("auto", cfg("float16"), cuda) == torch.float16
    assert resolve_dtype("auto", cfg("bfloat16"), cuda) == torch.bfloat16
    assert resolve_dtype("auto", cfg("bfloat16"), cpu) == torch.float32
    assert resolve_dtype("float16", cfg("float32"), cuda) == torch.float16
    assert resolve_dtype(torch.bfloat16, cfg("float32"), cpu) == torch.bfloat16
    with pytest.raises(RequestError, match="unsupported dtype 'int8'"):
        resolve_dtype("int8", cfg(None), cpu)


class _Allocations(TorchDispatchMode):
    """Records (op, dtype, shape) of every tensor an op returns in new memory on a real device (views and
    in-place results share an input's storage and are left out)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            x.untyped_storage().data_ptr()
            for x in tree_flatten((args, kwargs))[0]
            if isinstance(x, torch.Tensor) and x.device.type != "meta"
        }
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.untyped_storage().data_ptr() not in inputs:
                self.seen.append((str(func), t.dtype, tuple(t.shape)))
        return out


def test_loading_bf16_never_materialises_float32(models):
    """A float32 checkpoint served in bf16: the model is created in bf16 (cast on the meta device) and each
    checkpoint tensor is copied in as it streams; no float32 tensor of a parameter's shape is ever made."""
    path = models["llama"]
    ckpt = load_file(os.path.join(path, "model.safetensors"))
    assert {t.dtype for t in ckpt.values()} == {torch.float32}
    rec = _Allocations()
    with rec:
        eng = LLMEngine(path, dtype="bfloat16", device="cpu")
    shapes = {tuple(p.shape) for p in eng.model.parameters()}
    made = [(f, s) for f, d, s in rec.seen if d == torch.float32 and s in shapes]
    assert not made, made[:3]
    assert {p.dtype for p in eng.model.parameters()} == {torch.bfloat16}
    creations = [(f, s) for f, d, s in rec.seen if d == torch.bfloat16 and f.startswith("aten.empty") and s in shapes]
    assert len(creations) >= len(shapes)  # the parameters were created, in bf16, by this build
    for name, p in eng.model.weight_map().items():
        t, sl = p
        assert torch.equal((t if sl is None else t[sl]).float(), ckpt[name].bfloat16().float())


# -- the CUDA device guard --------------------------------------------------------------------------------------


class _FakeCudaDevice:
    entered = []

    def __init__(self, device):
        self.index = device.index

    def __enter__(self):
        self.entered.append(self.index)

    def __exit__(self, *exc):
        return False


def test_device_guard(monkeypatch):
    assert isinstance(device_guard(torch.device("cpu")), contextlib.nullcontext)
    monkeypatch.setattr(torch.cuda, "device", _FakeCudaDevice)
    g = device_guard(torch.device("cuda", 1))
    assert isinstance(g, _FakeCudaDevice) and g.index == 1
    # "cuda" is pinned to the current device, so the guard and all allocations name one device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(RequestError, match="device 'cuda:2' does not exist: 2 CUDA device"):
        resolve_device("cuda:2")


def test_every_kernel_call_runs_inside_the_engine_guard(models, monkeypatch):
    """Triton launches on the current device: generation (forward, logits, sampling), prompt forwards and the
    PRM head must all run inside the runner's guard."""
    llm = LLM(models["llama"], dtype="float32", device="cpu")
    prm = PRM(models["cls_prm"], dtype="float32", device="cpu")
    depth = {"n": 0}

    @contextlib.contextmanager
    def counting_guard():
        depth["n"] += 1
        try:
            yield
        finally:
            depth["n"] -= 1

    calls = []

    def spy(name):
        real = getattr(kernels, name)

        def wrapped(*a, **k):
            calls.append((name, depth["n"] > 0))
            return real(*a, **k)

        monkeypatch.setattr(kernels, name, wrapped)

    for name in ("rms_norm", "apply_rotary", "paged_prefill_attention", "paged_decode_attention", "sample"):
        spy(name)
    spy("prm_step_scores")
    for eng in (llm.engine, prm.engine):
        monkeypatch.setattr(eng.runner, "guard", counting_guard)
    llm.generate(PROMPTS, SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
    llm.compute_logits(PROMPTS)
    prm.score(QUESTION, CANDIDATES)
    names = {n for n, _ in calls}
    assert {"rms_norm", "apply_rotary", "paged_prefill_attention", "sample", "prm_step_scores"} <= names
    outside = [n for n, inside in calls if not inside]
    assert not outside, outside[:5]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
def test_sleep_on_the_gpu_path_drops_and_recaptures_graphs(models, monkeypatch):
    """The Triton path (interpreter; the CUDA graphs' CPU stand-in): the graphs are dropped while the
    weights and the cache still hold their memory, asked to capture again once both are back, and
    greedy output after sleep(1) / wake_up() equals that before."""
    from bstar.engine.runner.gpu.cuda_graphs import DecodeGraphs

    monkeypatch.setenv("BSTAR_KERNELS", "triton")
    llm = LLM(models["llama"], dtype="float32", device="cpu", max_num_seqs=4)
    runner = llm.engine.runner
    assert runner.graphs is not None
    greedy = SamplingParams(n=2, temperature=0, max_tokens=8, ignore_eos=True)
    before = _tokens(llm.generate(PROMPTS, greedy, use_tqdm=False))
    events = []
    real_drop, real_capture = DecodeGraphs.drop, DecodeGraphs.capture

    def drop(self):
        events.append(("drop", runner.kv.untyped_storage().nbytes() > 0))
        real_drop(self)

    def capture(self, force=False):
        events.append(("capture", runner.kv.untyped_storage().nbytes() > 0))
        real_capture(self, force)

    monkeypatch.setattr(DecodeGraphs, "drop", drop)
    monkeypatch.setattr(DecodeGraphs, "capture", capture)
    llm.sleep(1)
    assert events == [("drop", True)]
    llm.wake_up(tags=["weights"])
    assert events == [("drop", True)]  # the cache is still asleep: nothing to capture against
    llm.wake_up(tags=["kv_cache"])
    assert events == [("drop", True), ("capture", True)]
    assert _tokens(llm.generate(PROMPTS, greedy, use_tqdm=False)) == before
