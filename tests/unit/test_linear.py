"""The CPU GEMMs of bstar/engine/model/linear.py: oneDNN and MKL-packed weights equal a float64 reference, are used
only when they apply, the choice follows the rule, and the engine on each matches transformers;
packed copies are dropped when the weights change."""

import pytest
import torch
import torch.nn.functional as F

from bstar.engine import LLM, SamplingParams
from bstar.engine.config import EngineConfig
from bstar.engine.errors import UnsupportedError
from bstar.engine.model.linear import (
    Linear,
    onednn_available,
    pack_linears,
    packing_available,
    resolve_cpu_gemm,
    set_cpu_gemm,
    unpack_linears,
)
from bstar.testing.model_factory import hf_model, make_model

needs_mkl = pytest.mark.skipif(not packing_available(), reason="torch built without MKL")
needs_onednn = pytest.mark.skipif(not onednn_available(), reason="torch built without oneDNN")
GEMMS = [g for g, ok in (("onednn", onednn_available()), ("mkl", packing_available()), ("aten", True)) if ok]


def test_auto_rule_and_refusals():
    if onednn_available():
        assert resolve_cpu_gemm("auto", vendor="AuthenticAMD") == "onednn"
        assert resolve_cpu_gemm("auto", vendor="") == "onednn"
    if packing_available():
        assert resolve_cpu_gemm("auto", vendor="GenuineIntel") == "mkl"  # the path measured on Intel
    for g in GEMMS:
        assert resolve_cpu_gemm(g) == g
    with pytest.raises(UnsupportedError, match="cpu_gemm must be one of"):
        resolve_cpu_gemm("blas")
    with pytest.raises(ValueError, match="cpu_gemm must be one of"):
        EngineConfig(cpu_gemm="blas").validate()


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
def test_onednn_linear_matches_float64_and_keeps_autograd(bias):
    gen = torch.Generator().manual_seed(1)
    lin = Linear(96, 160, bias=bias)
    set_cpu_gemm(torch.nn.Sequential(lin), "onednn")
    assert lin.gemm == "onednn"
    w, b = lin.weight.detach().double(), None if not bias else lin.bias.detach().double()
    inputs = [
        torch.randn(1, 96, generator=gen),
        torch.randn(37, 96, generator=gen),
        torch.randn(3, 5, 96, generator=gen),  # a leading batch dim
        torch.randn(96, 11, generator=gen).t(),  # non-contiguous rows
        torch.randn(0, 96, generator=gen),
    ]
    with torch.no_grad():
        for x in inputs:
            torch.testing.assert_close(lin(x).double(), F.linear(x.double(), w, b), atol=1e-4, rtol=1e-5)
    # With grad on, the layer is an ordinary nn.Linear (oneDNN's op has no autograd).
    x = inputs[1].requires_grad_()
    lin(x).square().sum().backward()
    want = F.linear(x.double(), w, b).mul(2) @ w
    torch.testing.assert_close(x.grad.double(), want, atol=1e-3, rtol=1e-4)
    assert lin.weight.grad is not None


@needs_mkl
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_equals_plain(bias):
    gen = torch.Generator().manual_seed(0)
    lin = Linear(96, 160, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(160, 96, generator=gen))
        if bias:
            lin.bias.copy_(torch.randn(160, generator=gen))
    holder = torch.nn.Sequential(lin)
    used = pack_linears(holder, 24, 1 << 30)
    assert used > 0 and lin.packed[0] == 24
    for rows in (24, 7, 1):  # the packed row count, then the fallback
        x = torch.randn(rows, 96, generator=gen)
        want = F.linear(x.double(), lin.weight.double(), None if not bias else lin.bias.double())
        torch.testing.assert_close(lin(x).double(), want, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), atol=1e-6, rtol=1e-6)
    unpack_linears(holder)
    assert lin.packed is None


@needs_mkl
def test_budget_limits_packing():
    holder = torch.nn.Sequential(*(Linear(64, 64) for _ in range(4)))
    one = pack_linears(torch.nn.Sequential(Linear(64, 64)), 8, 1 << 30)
    used = pack_linears(holder, 8, 2 * one)
    assert used == 2 * one
    assert [m.packed is not None for m in holder] == [True, True, False, False]
    assert pack_linears(holder, 8, 0) == 0 and all(m.packed is None for m in holder)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_model(str(tmp_path_factory.mktemp("pk") / "m"), "llama", seed=9, tokenizer=False)


def _packed_rows(llm):
    return {m.packed[0] for m in llm.engine.model.modules() if isinstance(m, Linear) and m.packed is not None}


@pytest.mark.parametrize("gemm", GEMMS)
def test_engine_on_each_gemm_matches_transformers(tiny, gemm):
    """Logits, the sampled candidates' log-probabilities (decode rows batched, weights packed or reordered
    after 3 steady steps) and then greedy tokens (another row count) against transformers' float32
    forward, whichever GEMM the Linear layers use."""
    llm = LLM(tiny, dtype="float32", device="cpu", cpu_gemm=gemm)
    assert llm.engine.runner.cpu_decode.gemm == gemm
    assert {m.gemm for m in llm.engine.model.modules() if isinstance(m, Linear)} == {gemm}
    hf = hf_model(tiny)
    prompts = [list(range(3, 3 + 21)), list(range(40, 40 + 9))]
    with torch.no_grad():
        for p, got in zip(prompts, llm.compute_logits(prompts)):
            torch.testing.assert_close(got, hf(torch.tensor([p])).logits[0], atol=1e-4, rtol=1e-4)
    params = SamplingParams(n=4, temperature=1.0, max_tokens=12, ignore_eos=True, seed=3, logprobs=0)
    for p, o in zip(prompts, llm.generate(prompts, params, use_tqdm=False)):
        for c in o.outputs:
            with torch.no_grad():
                logits = hf(torch.tensor([p + c.token_ids])).logits[0, len(p) - 1 : -1].double()
            ref = torch.log_softmax(logits, -1)[torch.arange(len(c.token_ids)), c.token_ids]
            assert c.cumulative_logprob == pytest.approx(ref.sum().item(), abs=1e-3)
    assert _packed_rows(llm) == (set() if gemm == "aten" else {8})
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for p, o in zip(prompts, llm.generate(prompts, greedy, use_tqdm=False)):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=12, min_new_tokens=12, do_sample=False)[0, len(p) :]
        assert o.outputs[0].token_ids == ref.tolist()
    # oneDNN's reordered copy serves the 2 greedy rows as it is; MKL repacks for them
    assert _packed_rows(llm) == {"aten": set(), "onednn": {8}, "mkl": {2}}[gemm]


@needs_mkl
def test_engine_packs_for_the_decode_batch_and_outputs_do_not_change(tiny):
    prompts = [list(range(3, 3 + 21)), list(range(40, 40 + 9))]
    params = SamplingParams(n=4, temperature=1.0, max_tokens=12, ignore_eos=True, seed=3, logprobs=0)
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)

    def run(llm):
        outs = [c for o in llm.generate(prompts, params, use_tqdm=False) for c in o.outputs]
        rows = _packed_rows(llm)
        g = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
        return [c.token_ids for c in outs], [c.cumulative_logprob for c in outs], g, rows, _packed_rows(llm)

    packed_llm = LLM(tiny, dtype="float32", device="cpu", cpu_gemm="mkl")
    got = run(packed_llm)
    assert got[3] == {8} and got[4] == {2}  # 2 prompts x 4 candidates, then 2 greedy rows, decoding together
    plain = run(LLM(tiny, dtype="float32", device="cpu", cpu_gemm="mkl", cpu_packed_weights_bytes=0))
    assert plain[3] == plain[4] == set()
    assert got[0] == plain[0] and got[2] == plain[2]
    assert got[1] == pytest.approx(plain[1], abs=1e-5)

    # A weight update drops the packed copies; outputs then follow the new weights.
    hf = hf_model(tiny)
    with torch.no_grad():
        new = {k: v + 0.05 * torch.randn_like(v) for k, v in hf.state_dict().items()}
    packed_llm.load_weights(new.items())
    assert _packed_rows(packed_llm) == set()
    after = packed_llm.generate(prompts, greedy, use_tqdm=False)
    ref = LLM(tiny, dtype="float32", device="cpu", cpu_gemm="mkl", cpu_packed_weights_bytes=0)
    ref.load_weights(new.items())
    assert [o.outputs[0].token_ids for o in after] == [
        o.outputs[0].token_ids for o in ref.generate(prompts, greedy, use_tqdm=False)
    ]
