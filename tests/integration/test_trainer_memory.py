"""The trainer's memory features (bstar/train/loss.py, config.py, parallelize.py, dist_utils.py) on CPU:
chunked cross-entropy against a float64 reference, the per-device defaults as pure functions, FSDP2 with
CPUOffloadPolicy in one process against the plain module, the saved dtype, records as bytes, and torchrun:
the byte exchange on 2 ranks and a two-node run simulated on this machine against one process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from bstar.cli import main
from bstar.errors import BStarError
from bstar.testing.model_factory import make_model, make_records, write_lines
from bstar.train.config import SFTConfig, adamw_options, resolve_grad_checkpointing
from bstar.train.data import IGNORE, collate_packed, load_sft_examples
from bstar.train.loss import chunked_cross_entropy, sft_loss_sum
from bstar.train.trainer import SFTTrainer
from bstar.utils import distributed as dist_utils

REPO = Path(__file__).resolve().parents[2]
SMALL = dict(micro_batch_tokens=256, max_seq_len=256, progress=False)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def no_group():
    """Tests that create a one-rank process group leave none behind."""
    yield
    dist_utils.destroy()


# -- chunked cross-entropy ---------------------------------------------------------------------------


def _ce_inputs(n=37, d=16, v=50, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, d, generator=g) * 2).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) * 0.7).to(dtype).requires_grad_()
    y = torch.randint(0, v, (n,), generator=g)
    y[torch.rand(n, generator=g) < 0.3] = IGNORE
    return h, w, y


def _reference(h, w, y):
    """The plain loss in float64: full logits, F.cross_entropy summed over the valid rows."""
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    loss = F.cross_entropy(h64 @ w64.t(), y, ignore_index=IGNORE, reduction="sum")
    gh, gw = torch.autograd.grad(loss, (h64, w64))
    return loss.detach(), gh, gw


@pytest.mark.parametrize("chunk", [1, 8, 37, 1024])
def test_chunked_ce_equals_float64_loss_and_gradient(chunk):
    h, w, y = _ce_inputs()
    ref, rgh, rgw = _reference(h, w, y)
    loss = chunked_cross_entropy(h, w, y, chunk)
    (loss * 0.37).backward()  # a non-unit upstream gradient
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-13, atol=0)
    torch.testing.assert_close(h.grad, 0.37 * rgh, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(w.grad, 0.37 * rgw, rtol=1e-12, atol=1e-14)
    assert h.grad[y == IGNORE].abs().max() == 0  # ignored rows get no gradient
    # the test can fail: counting the ignored rows too changes the loss
    counted = F.cross_entropy(h.detach() @ w.detach().t(), y.clamp_min(0), reduction="sum")
    assert abs(float(counted) - float(ref)) > 1e-3 * abs(float(ref))


def test_chunked_ce_gradcheck_and_float32():
    h, w, y = _ce_inputs(n=9, d=4, v=7)
    assert torch.autograd.gradcheck(lambda a, b: chunked_cross_entropy(a, b, y, 4), (h, w))
    h32, w32, y = _ce_inputs(dtype=torch.float32, seed=1)
    ref, rgh, rgw = _reference(h32, w32, y)
    loss = chunked_cross_entropy(h32, w32, y, 8)
    loss.backward()
    assert loss.dtype == torch.float32 and h32.grad.dtype == w32.grad.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(h32.grad.double(), rgh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w32.grad.double(), rgw, rtol=1e-4, atol=1e-5)


def test_chunked_ce_bf16_compute():
    """bf16 GEMMs (the CUDA path's compute dtype; float32 softmax and accumulation): close to float64."""
    h, w, y = _ce_inputs(dtype=torch.float32, seed=2)
    ref, rgh, rgw = _reference(h, w, y)
    loss = chunked_cross_entropy(h, w, y, 8, compute_dtype=torch.bfloat16)
    loss.backward()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=2e-2, atol=0)
    torch.testing.assert_close(h.grad.double(), rgh, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(w.grad.double(), rgw, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("chunk", [None, 7])
def test_sft_loss_chunked_equals_plain_in_float64(llama_dir, chunk):
    """The trainer's loss (decoder, then the head on the target rows) against transformers' full forward
    with float64 logits; gradients of every parameter too."""
    from transformers import AutoTokenizer

    ex = load_sft_examples(make_records(5, seed=2), AutoTokenizer.from_pretrained(llama_dir), 256)
    mb = collate_packed(ex)
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float64, attn_implementation="sdpa")
    ref_model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float64, attn_implementation="sdpa")
    loss = sft_loss_sum(model, mb, chunk)
    loss.backward()
    # reference: each example alone, full logits, F.cross_entropy
    ref = 0
    for x in ex:
        ids = torch.tensor([x.input_ids])
        t = torch.tensor([list(x.input_ids[1:]) + [IGNORE]])
        t[0, : x.prompt_len - 1] = IGNORE
        ref = ref + F.cross_entropy(ref_model(ids).logits[0], t[0], ignore_index=IGNORE, reduction="sum")
    ref.backward()
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss.detach(), ref.detach(), rtol=1e-10, atol=0)
    ref_grads = dict(ref_model.named_parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[n].grad, rtol=1e-8, atol=1e-10, msg=n)


class _LargestOutput(TorchDispatchMode):
    """Records the largest tensor any aten op produces while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_chunked_ce_never_materialises_full_logits():
    n, d, v, chunk = 512, 16, 300, 64
    h, w, y = _ce_inputs(n=n, d=d, v=v, dtype=torch.float32)
    with _LargestOutput() as rec:
        chunked_cross_entropy(h, w, y, chunk).backward()
    assert rec.largest == chunk * v  # one chunk's logits; the head's gradient is v * d = 4800
    with _LargestOutput() as rec:  # the plain loss, for contrast: the test can fail
        F.cross_entropy(h @ w.t(), y, ignore_index=IGNORE, reduction="sum").backward()
    assert rec.largest == n * v


def test_chunked_ce_refuses_a_bad_chunk():
    h, w, y = _ce_inputs()
    with pytest.raises(ValueError, match="chunk"):
        chunked_cross_entropy(h, w, y, 0)
    with pytest.raises(Exception, match="ce_chunk"):
        SFTConfig(ce_chunk=-1)


# -- per-device defaults ----------------------------------------------------------------------------


def test_activation_checkpointing_default_per_device():
    assert resolve_grad_checkpointing(None, "cuda") is True
    assert resolve_grad_checkpointing(None, "cpu") is False
    assert resolve_grad_checkpointing(False, "cuda") is False
    assert resolve_grad_checkpointing(True, "cpu") is True
    assert SFTConfig().grad_checkpointing is None  # the trainer resolves it on its device


def test_adamw_fused_where_supported_else_for_loop(llama_dir):
    supported = ["cuda", "cpu"]
    assert adamw_options(True, {"cuda"}, supported) == {"fused": True}
    assert adamw_options(True, {"cpu", "cuda"}, supported) == {"fused": True}
    assert adamw_options(True, {"mps"}, supported) == {"foreach": False}  # no fused kernel: never foreach
    assert adamw_options(True, {"cuda", "mps"}, supported) == {"foreach": False}
    assert adamw_options(False, {"cuda"}, supported) == {"foreach": False}
    # on this CPU: the fused kernel (torch has one for CPU), and the fallback trains the same
    recs = make_records(6, seed=3)
    kw = dict(lr=1e-3, batch_examples=3, max_steps=2, **SMALL)
    a, b = SFTTrainer(llama_dir, SFTConfig(**kw)), SFTTrainer(llama_dir, SFTConfig(**kw, fused_optimizer=False))
    ra, rb = a.train(recs), b.train(recs)
    assert a.optimizer.defaults["fused"] is True
    assert not b.optimizer.defaults["fused"] and b.optimizer.defaults["foreach"] is False
    assert ra.losses == pytest.approx(rb.losses, rel=1e-6)
    wb = dict(b.named_weights())
    for n, t in a.named_weights():
        torch.testing.assert_close(t, wb[n], rtol=1e-5, atol=1e-6)


# -- FSDP2 CPU offload in one process ---------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2_dir ties lm_head to the embeddings
def test_offload_one_process_matches_plain_module(arch, llama_dir, qwen2_dir, tmp_path, no_group):
    model_dir = llama_dir if arch == "llama" else qwen2_dir
    recs = make_records(12, seed=5)
    kw = dict(lr=2e-3, batch_examples=4, epochs=1, **SMALL)
    # both on ATen's GEMM (FSDP modules never take oneDNN), so they can agree to float rounding of the same ops
    plain = SFTTrainer(model_dir, SFTConfig(**kw, cpu_gemm="aten"))
    off = SFTTrainer(model_dir, SFTConfig(**kw, offload_optimizer=True, grad_checkpointing=True))
    if arch == "qwen2":  # the tie survives meta init and to_empty
        assert off.model.lm_head.weight is off.model.model.embed_tokens.weight
    assert dist.is_initialized() and dist.get_world_size() == 1  # the one-rank group FSDP2 needs
    assert type(off.model).__name__.startswith("FSDP") and off.fsdp and not off.distributed
    p = next(off.model.parameters())
    assert p.to_local().device.type == "cpu"
    rp, ro = plain.train(recs), off.train(recs)
    assert ro.losses == pytest.approx(rp.losses, rel=1e-6) and len(ro.losses) == 3
    assert off.optimizer.defaults["fused"] is True
    state = off.optimizer.state[p]
    assert state["exp_avg"].to_local().device.type == "cpu"
    wp = dict(plain.named_weights())
    moved = 0.0
    start = load_file(str(model_dir / "model.safetensors"))
    for n, t in off.named_weights():
        torch.testing.assert_close(t, wp[n], rtol=1e-5, atol=1e-6)
        moved = max(moved, float((t - start[n]).abs().max()))
    assert moved > 1e-3  # it trained
    out = off.save(tmp_path / "ck")
    saved = load_file(str(out / "model.safetensors"))
    assert saved.keys() == wp.keys()
    for n in saved:
        torch.testing.assert_close(saved[n], wp[n], rtol=1e-5, atol=1e-6)


def test_offload_resume_and_continue(llama_dir, tmp_path, no_group):
    """Checkpoints of the offloaded (sharded, one-rank) trainer: a resume retraces the run exactly, and a
    continued call carries AdamW state and the schedule as the plain trainer does."""
    recs = make_records(16, seed=9)
    kw = dict(lr=2e-3, batch_examples=4, warmup_steps=1, **SMALL)
    cfg = SFTConfig(**kw, epochs=2, offload_optimizer=True)
    full = SFTTrainer(llama_dir, cfg)
    r_full = full.train(recs, checkpoint_dir=tmp_path, save_every=3)
    resumed = SFTTrainer(llama_dir, cfg)
    r_res = resumed.train(recs, resume_from=tmp_path / "step-000003")
    assert r_res.losses == r_full.losses[3:]
    wf = dict(full.named_weights())
    for n, t in resumed.named_weights():
        assert torch.equal(t, wf[n]), n
    # two calls of one schedule, offloaded vs plain
    losses = {}
    for off in (False, True):
        c = SFTConfig(**kw, steps=2, schedule_steps=4, offload_optimizer=off)
        t = SFTTrainer(llama_dir, c)
        a = t.train(recs[:8]).losses
        t.save(tmp_path / f"it1-{off}")
        t2 = SFTTrainer(tmp_path / f"it1-{off}", c)
        losses[off] = a + t2.train(recs[8:], continue_from=tmp_path / f"it1-{off}").losses
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)


def test_save_keeps_the_base_checkpoint_dtype(tmp_path, no_group):
    bf = Path(make_model(str(tmp_path / "bf16"), "qwen2", seed=3, dtype=torch.bfloat16))
    recs = make_records(4, seed=1)
    for offload in (False, True):
        t = SFTTrainer(bf, SFTConfig(lr=1e-3, batch_examples=4, max_steps=1, offload_optimizer=offload, **SMALL))
        t.train(recs)
        assert all(p.dtype == torch.float32 for p in t.model.parameters())  # float32 master weights
        out = t.save(tmp_path / f"out-{offload}")
        with safe_open(str(out / "model.safetensors"), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
        assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
        want = {n: w.to(torch.bfloat16) for n, w in t.named_weights()}
        got = load_file(str(out / "model.safetensors"))
        assert all(torch.equal(got[n], want[n]) for n in want)
        # an explicit save_dtype wins
        t.cfg.save_dtype = "float32"
    t32 = SFTTrainer(bf, SFTConfig(save_dtype="float32", **SMALL))
    out = t32.save(tmp_path / "f32", trainer_state=False)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"


def test_cli_sft_offload_and_bad_timeout(llama_dir, tmp_path, monkeypatch, no_group):
    data = write_lines(tmp_path / "d.jsonl", make_records(6, seed=1))
    args = ["sft", "--model", str(llama_dir), "--data", str(data), "--out", str(tmp_path / "run")]
    args += ["--batch-examples", "3", "--micro-batch-tokens", "256", "--max-seq-len", "256", "--lr", "1e-3"]
    args += ["--offload-optimizer", "--no-grad-checkpointing", "--ce-chunk", "16"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output + repr(r.exception)
    assert "2 steps" in r.output and (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert not dist.is_initialized()  # the command tears its group down
    monkeypatch.setenv("BSTAR_DIST_TIMEOUT_MIN", "soon")
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "BSTAR_DIST_TIMEOUT_MIN must be a number" in r.output
    assert "Traceback" not in r.output


# -- process-group helpers ----------------------------------------------------------------------------


def test_records_as_bytes_round_trip(monkeypatch):
    obj = [
        {"ids": list(range(1000)), "big": [2**40, 1, 2, 3, 4, 5, 6, 7], "neg": [-5] * 9, "short": [1, 2]},
        {"text": "ünï ✓", "scores": [0.5, 1.0], "nested": [[3] * 10, []], "flags": [True] * 9, "none": None},
        [],
    ]
    data = dist_utils.encode(obj)
    assert dist_utils.decode(data) == json.loads(json.dumps(obj))
    assert len(data) < len(json.dumps(obj).encode())  # the ids travel as int32, not text
    assert dist_utils.decode(dist_utils.encode({"x": 1})) == {"x": 1}
    assert dist_utils.timeout().total_seconds() == 60 * dist_utils.DEFAULT_TIMEOUT_MIN
    monkeypatch.setenv("BSTAR_DIST_TIMEOUT_MIN", "240")
    assert dist_utils.timeout().total_seconds() == 240 * 60
    monkeypatch.setenv("BSTAR_DIST_TIMEOUT_MIN", "0")
    with pytest.raises(BStarError, match="BSTAR_DIST_TIMEOUT_MIN"):
        dist_utils.timeout()


def _torchrun(args, port, nproc=2, extra=(), env=None, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *extra]
    if not extra:
        cmd += ["--master_addr=127.0.0.1", f"--master_port={port}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return subprocess.Popen(cmd + args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_torchrun_exchange_as_bytes(tmp_path, free_port):
    worker = [str(REPO / "tests" / "dist_worker.py"), str(tmp_path)]
    p = _torchrun(worker, free_port, env={"BSTAR_DIST_TIMEOUT_MIN": "90"})
    _, err = p.communicate(timeout=240)
    assert p.returncode == 0, err[-4000:]
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for g in got:
        assert g["timeout_s"] == 90 * 60
        assert g["gathered"] == [{"rank": k, "ids": list(range(k * 7, k * 7 + 300 * (k + 1)))} for k in range(2)]
        assert g["broadcast"] == {"from": 0, "ids": list(range(50))}
        assert g["raw"] == ["", "x" * 1001]


def test_two_nodes_simulated_match_one_process(llama_dir, tmp_path, free_port):
    """Two torchrun 'nodes' (--nnodes 2, one process each, c10d rendezvous on 127.0.0.1) run one `sft`
    training run; it matches one process. (The loop across two nodes: tests/integration/test_controller.py.)"""
    recs = make_records(20, seed=8)
    data = write_lines(tmp_path / "d.jsonl", recs)
    opts = ["--batch-examples", "5", "--micro-batch-tokens", "256", "--max-seq-len", "256", "--lr", "3e-3"]
    opts += ["--epochs", "2", "--warmup-steps", "1", "--save-dtype", "float32"]
    rdzv = ["--nnodes=2", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port}", "--rdzv-id=bstar-test"]
    procs = []
    for node in (0, 1):
        args = ["-m", "bstar.cli", "sft", "--model", str(llama_dir), "--data", str(data)]
        args += ["--out", str(tmp_path / "multi"), *opts]
        procs.append(_torchrun(args, free_port, nproc=1, extra=[*rdzv, f"--node-rank={node}"]))
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    assert "8 steps" in outs[0][0] + outs[1][0]
    single = tmp_path / "single"
    r = CliRunner().invoke(main, ["sft", "--model", str(llama_dir), "--data", str(data), "--out", str(single), *opts])
    assert r.exit_code == 0, r.output
    m1 = [json.loads(x) for x in (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()]
    m0 = [json.loads(x) for x in (single / "metrics.jsonl").read_text().splitlines()]
    assert len(m1) == len(m0) == 8
    for a, b in zip(m1, m0):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    got = load_file(str(tmp_path / "multi" / "final" / "model.safetensors"))
    ref = load_file(str(single / "final" / "model.safetensors"))
    start = load_file(str(llama_dir / "model.safetensors"))
    assert got.keys() == ref.keys()
    for n in ref:
        assert (got[n] - ref[n]).norm() <= 1e-3 * (ref[n] - start[n]).norm(), n
