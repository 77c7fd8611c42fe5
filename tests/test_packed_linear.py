"""MKL-packed linear weights (CPU float32): equal to the plain path, used only when they apply,
dropped when the weights change."""

import pytest
import torch
import torch.nn.functional as F
from model_factory import hf_model, make_model

from engine import LLM, SamplingParams
from engine.packed_linear import Linear, pack_linears, packing_available, unpack_linears

pytestmark = pytest.mark.skipif(not packing_available(), reason="torch built without MKL")


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


def test_budget_limits_packing():
    holder = torch.nn.Sequential(*(Linear(64, 64) for _ in range(4)))
    one = pack_linears(torch.nn.Sequential(Linear(64, 64)), 8, 1 << 30)
    used = pack_linears(holder, 8, 2 * one)
    assert used == 2 * one
    assert [m.packed is not None for m in holder] == [True, True, False, False]
    assert pack_linears(holder, 8, 0) == 0 and all(m.packed is None for m in holder)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_model(
        str(tmp_path_factory.mktemp("pk") / "m"),
        "llama",
        seed=9,
        vocab_size=320,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tokenizer=False,
    )


def _packed_rows(llm):
    return {m.packed[0] for m in llm.engine.model.modules() if isinstance(m, Linear) and m.packed is not None}


def test_engine_packs_for_the_decode_batch_and_outputs_do_not_change(tiny):
    prompts = [list(range(3, 3 + 21)), list(range(40, 40 + 9))]
    params = SamplingParams(n=4, temperature=1.0, max_tokens=12, ignore_eos=True, seed=3, logprobs=0)
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)

    def run(llm):
        outs = [c for o in llm.generate(prompts, params, use_tqdm=False) for c in o.outputs]
        rows = _packed_rows(llm)
        g = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy, use_tqdm=False)]
        return [c.token_ids for c in outs], [c.cumulative_logprob for c in outs], g, rows, _packed_rows(llm)

    packed_llm = LLM(tiny, dtype="float32", device="cpu")
    got = run(packed_llm)
    assert got[3] == {8} and got[4] == {2}  # 2 prompts x 4 candidates, then 2 greedy rows, decoding together
    plain = run(LLM(tiny, dtype="float32", device="cpu", cpu_packed_weights_bytes=0))
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
    ref = LLM(tiny, dtype="float32", device="cpu", cpu_packed_weights_bytes=0)
    ref.load_weights(new.items())
    assert [o.outputs[0].token_ids for o in after] == [
        o.outputs[0].token_ids for o in ref.generate(prompts, greedy, use_tqdm=False)
    ]
