"""bstar.engine.runner.memory_plan on real model shapes (config only, no weights) against hand-computed figures, and the
engine's KV sizing from it on CPU.

Every expected number below is written out by hand from the shapes (the arithmetic is in the comments); the
parameter counts are also checked against transformers models built on the meta device.
"""

import dataclasses

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForTokenClassification,
    MistralConfig,
    Qwen2Config,
)

from bstar.engine import LLM, PRM
from bstar.engine.config import ModelConfig
from bstar.engine.errors import MemoryPlanError
from bstar.engine.runner.memory_plan import (
    GiB,
    activation_peak_bytes,
    engine_activation_bytes,
    engine_kv_blocks,
    kv_bytes_per_token,
    kv_cap_blocks,
    layer_activation_bytes_per_token,
    layer_param_count,
    param_count,
    unique_storage_bytes,
    weight_bytes,
)
from bstar.loop.memory_plan import DeviceMemory, EngineSpec, Phase, plan_memory
from bstar.testing.model_factory import QWEN25_05B, QWEN25_7B, make_model
from bstar.train.memory_estimate import TrainerSpec, trainer_estimate

BF16 = torch.bfloat16
HF_CONFIGS = {
    "qwen2.5-0.5b": Qwen2Config(**{**QWEN25_05B, "max_position_embeddings": 32768}),
    "qwen2.5-7b": Qwen2Config(**QWEN25_7B),
    "mistral-7b": MistralConfig(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        vocab_size=32000,
        max_position_embeddings=32768,
        sliding_window=4096,
    ),
}
# Per model: (layer params, total params, KV bytes/token in bf16, one layer's activations/token in bf16).
# Qwen2.5-0.5B: q = 896, kv = 2*64 = 128.
#   layer = 896*(896+2*128) + 896*896 + (896+2*128) [qkv bias] + 3*896*4864 + 2*896 = 14,912,384
#   total = 151936*896 [embed, tied head] + 24*14,912,384 + 896 [norm] = 494,032,768
#   KV/token = 2*24*2*64*2 = 12,288; activations/token/layer = (4*896 + 2*896 + 2*128 + 4*4864)*2 = 50,176
# Qwen2.5-7B: q = 3584, kv = 4*128 = 512.
#   layer = 3584*4608 + 3584*3584 + 4608 + 3*3584*18944 + 2*3584 = 233,057,792
#   total = 2*152064*3584 [embed + lm_head] + 28*233,057,792 + 3584 = 7,615,616,512
#   KV/token = 2*28*4*128*2 = 57,344; activations = (4*3584 + 2*3584 + 2*512 + 4*18944)*2 = 196,608
# Mistral-7B: q = 4096, kv = 8*128 = 1024, no biases.
#   layer = 4096*6144 + 4096*4096 + 3*4096*14336 + 2*4096 = 218,112,000
#   total = 2*32000*4096 + 32*218,112,000 + 4096 = 7,241,732,096
#   KV/token = 2*32*8*128*2 = 131,072; activations = (4*4096 + 2*4096 + 2*1024 + 4*14336)*2 = 167,936
EXPECTED = {
    "qwen2.5-0.5b": (14_912_384, 494_032_768, 12_288, 50_176),
    "qwen2.5-7b": (233_057_792, 7_615_616_512, 57_344, 196_608),
    "mistral-7b": (218_112_000, 7_241_732_096, 131_072, 167_936),
}


def mcfg(name: str, **changes) -> ModelConfig:
    return ModelConfig.from_dict({**HF_CONFIGS[name].to_dict(), **changes})


def meta_numel(model) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() lists a tied tensor once


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_shapes_against_hand_counts_and_transformers(name):
    layer, total, kv, act = EXPECTED[name]
    m = mcfg(name)
    assert layer_param_count(m) == layer
    assert param_count(m) == total
    assert weight_bytes(m, BF16) == 2 * total
    assert kv_bytes_per_token(m, BF16) == kv
    assert layer_activation_bytes_per_token(m, BF16) == act
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(HF_CONFIGS[name])
    assert meta_numel(hf) == total


def test_reward_heads_counted_as_transformers_and_qwen_prm():
    # token classification: the LM head (152064*3584) replaced by score = Linear(3584, 2) with bias
    tok = mcfg("qwen2.5-7b", architectures=["Qwen2ForTokenClassification"], num_labels=2)
    assert tok.head == "token_cls"
    assert param_count(tok) == 7_615_616_512 - 152064 * 3584 + 3584 * 2 + 2 == 7_070_626_306
    cfg = Qwen2Config(**{**HF_CONFIGS["qwen2.5-7b"].to_dict(), "num_labels": 2})
    with torch.device("meta"):
        assert meta_numel(AutoModelForTokenClassification.from_config(cfg)) == 7_070_626_306
    # Qwen2.5-Math-PRM: score = Linear(3584, 3584) -> ReLU -> Linear(3584, 2), both with bias
    prm = mcfg("qwen2.5-7b", architectures=["Qwen2ForProcessRewardModel"], num_labels=2)
    assert param_count(prm) == 7_615_616_512 - 152064 * 3584 + 3584 * 3584 + 3584 + 3584 * 2 + 2
    # a tied LM: the head adds nothing
    assert param_count(mcfg("qwen2.5-0.5b")) == param_count(mcfg("qwen2.5-0.5b", tie_word_embeddings=False)) - (
        151936 * 896
    )


def test_engine_activation_estimate():
    m = mcfg("qwen2.5-0.5b")
    # 2048-token prefill (max_model_len < max_num_batched_tokens), logits on min(2048, 64) rows:
    # 2048*50,176 + 64*151936*(2 bf16 logits + 4 float32 copy + 16 sampler) = 102,760,448 + 213,925,888
    assert engine_activation_bytes(m, BF16, 4096, 64, 2048) == 316_686_336
    # a classification head reads 64 rows of 2 labels: 64*2*2
    cls = mcfg("qwen2.5-0.5b", architectures=["Qwen2ForTokenClassification"], num_labels=2)
    assert engine_activation_bytes(cls, BF16, 4096, 64, 2048) == 102_760_448 + 256


def test_kv_cap_blocks():
    # 64 sequences x ceil(2048/16) = 8192 blocks, + ceil(8192 * 0.1) = 820 for the prefix cache
    assert kv_cap_blocks(64, 2048, 16) == 9012
    assert kv_cap_blocks(64, 2048, 16, enable_prefix_caching=False) == 8192
    assert kv_cap_blocks(3, 33, 16) == 9 + 1  # ceil(33/16) = 3 blocks a sequence


def test_engine_kv_blocks_per_instance():
    bb = 57_344 * 16  # Qwen2.5-7B bf16 block: 917,504 bytes
    total = 80 * GiB
    # gpu_memory_utilization=0.45 of 80 GiB = 38,654,705,664; minus weights 15,231,233,024 and activations
    # 1 GiB = 22,349,730,816 -> 24,359 blocks (22,349,730,816 / 917,504 = 24,359.2)
    kw = dict(block_bytes=bb, total_bytes=total, gpu_memory_utilization=0.45, weights_bytes=15_231_233_024)
    assert engine_kv_blocks(cap_blocks=10**9, activation_bytes=GiB, **kw) == 24_359
    # a second engine on the same card gets the same: only its own allocations count, the first's do not
    # (free memory after the first: 80 GiB - 38.6e9 - ... still holds this one)
    assert engine_kv_blocks(cap_blocks=10**9, activation_bytes=GiB, free_bytes=40 * GiB, **kw) == 24_359
    assert engine_kv_blocks(cap_blocks=1000, activation_bytes=GiB, **kw) == 1000  # never more than it can use
    # explicit bytes win, still capped
    assert engine_kv_blocks(block_bytes=bb, cap_blocks=10**9, kv_cache_memory_bytes=10 * bb + 5) == 10
    assert engine_kv_blocks(block_bytes=bb, cap_blocks=7, kv_cache_memory_bytes=10 * bb) == 7
    with pytest.raises(MemoryPlanError, match="no memory left for the KV cache on cuda:1.*weights take 14.2 GiB"):
        engine_kv_blocks(cap_blocks=10**9, activation_bytes=24 * GiB, device="cuda:1", **kw)
    # 24,359 blocks = 22,349,479,936 bytes (20.8 GiB) + 1 GiB of activations > 20 GiB free
    with pytest.raises(
        MemoryPlanError, match=r"KV cache of 20.8 GiB plus .* 1.0 GiB does not fit in the 20.0 GiB free"
    ):
        engine_kv_blocks(cap_blocks=10**9, activation_bytes=GiB, free_bytes=20 * GiB, **kw)
    with pytest.raises(MemoryPlanError, match="less than one KV block"):
        engine_kv_blocks(block_bytes=bb, cap_blocks=10, kv_cache_memory_bytes=bb - 1)
    # the decode graphs' pool is set aside as the activations are: 22,349,730,816 - 64 MiB = 22,282,621,952
    # -> 24,286 blocks (24,286.1)
    assert engine_kv_blocks(cap_blocks=10**9, activation_bytes=GiB, graph_pool_bytes=64 << 20, **kw) == 24_286
    with pytest.raises(MemoryPlanError, match=r"activation peak 1.0 GiB, decode graphs 24.0 GiB; raise"):
        engine_kv_blocks(cap_blocks=10**9, activation_bytes=GiB, graph_pool_bytes=24 * GiB, **kw)
    # explicit bytes: 10 GiB of KV + 1 GiB + 2 GiB of graphs > 12 GiB free
    with pytest.raises(MemoryPlanError, match=r"1.0 GiB and the decode graphs' 2.0 GiB does not fit in the 12.0"):
        engine_kv_blocks(
            block_bytes=bb,
            cap_blocks=10**9,
            kv_cache_memory_bytes=10 * GiB,
            activation_bytes=GiB,
            graph_pool_bytes=2 * GiB,
            free_bytes=12 * GiB,
        )
    assert activation_peak_bytes(10 * GiB, 12 * GiB) == 2 * GiB
    assert activation_peak_bytes(10 * GiB, 9 * GiB) == 0


def test_plan_caps_kv_at_what_the_engine_can_use():
    dev = DeviceMemory(total=80 * GiB, free=80 * GiB)
    pol = EngineSpec("policy", mcfg("qwen2.5-0.5b"), max_num_seqs=64, max_model_len=2048)
    plan = plan_memory(dev, [pol])
    # budget = int(0.9 * 80 GiB) - 1 GiB reserve = 76,235,669,504: far more than the cap
    assert plan.budget == 76_235_669_504
    e = plan.engines["policy"]
    assert e.weights == 988_065_536 and e.activations == 316_686_336
    assert e.num_blocks == 9012 and e.kv == 9012 * 12_288 * 16 == plan.kv_cache_memory_bytes("policy")
    assert e.kv_tokens == 144_192
    assert [p.phase.name for p in plan.phases] == ["generate"]
    # decode graphs' pool: bucket 64 x one layer's 50,176 bytes a row (h 896, q 896, kv 128, I 4864, bf16)
    # + partials 4 x 14 heads x (64 x min(max(64, 4 waves x 3 x 132 // 2), 64 x 8) + 64 x 64) + 24 MiB rounding
    # + 32 MiB cuBLAS workspace + 32 MiB cuBLASLt workspace (Qwen2's qkv bias takes addmm's cuBLASLt path)
    assert e.graph_pool == 64 * 50_176 + 56 * (64 * 512 + 4096) + (88 << 20) == 97_550_336
    assert plan.phases[0].total == 988_065_536 + 316_686_336 + 97_550_336 + 1_771_831_296
    eager = plan_memory(dev, [dataclasses.replace(pol, cuda_graphs=False)]).engines["policy"]
    assert eager.graph_pool == 0 and eager.num_blocks == e.num_blocks
    table = plan.table()
    assert "policy" in table and "144192" in table and "generate" in table


def test_plan_splits_what_is_left_between_resident_engines():
    # Mistral-7B policy + Mistral-7B (Math-Shepherd, LM head) PRM, both resident (no sleep), no trainer.
    dev = DeviceMemory(total=80 * GiB, free=80 * GiB)
    m = mcfg("mistral-7b")
    engines = [EngineSpec("policy", m, max_model_len=4096), EngineSpec("prm", m, max_model_len=4096, cuda_graphs=False)]
    plan = plan_memory(dev, engines, sleep=False)
    # each: weights 7,241,732,096*2 = 14,483,464,192; activations 4096*167,936 + 256*32000*22 = 868,089,856
    # the policy's decode graphs (the PRM never decodes): bucket 256 x 167,936 = 42,991,616, partials
    # 4 x 32 heads x (128 x max(256, 4 waves x 3 x 132 // 8) + 64 x 256) = 6,291,456, + 56 MiB = 108,003,328 (no
    # bias: no cuBLASLt workspace); left = 76,235,669,504 - 2*(14,483,464,192 + 868,089,856) - 108,003,328
    # = 45,424,558,080, half each = 22,712,279,040; blocks = 22,712,279,040 // (131,072*16) = 10,830
    for name, pool in (("policy", 108_003_328), ("prm", 0)):
        e = plan.engines[name]
        assert (e.weights, e.activations, e.graph_pool, e.num_blocks) == (14_483_464_192, 868_089_856, pool, 10_830)
    assert [p.phase.engines for p in plan.phases] == [("policy", "prm"), ("policy", "prm")]
    # an explicit budget for one engine: the other takes the rest
    engines[1] = dataclasses.replace(engines[1], kv_cache_memory_bytes=10 * GiB)
    plan = plan_memory(dev, engines, sleep=False)
    assert plan.engines["prm"].num_blocks == 10 * GiB // 2_097_152 == 5120
    assert plan.engines["policy"].num_blocks == (45_424_558_080 - 10 * GiB) // 2_097_152 == 16_540


def test_plan_refuses_full_fine_tuning_of_7b_on_one_gpu():
    dev = DeviceMemory(total=80 * GiB, free=80 * GiB)
    q7 = mcfg("qwen2.5-7b")
    engines = [
        EngineSpec("policy", q7),
        EngineSpec("prm", mcfg("qwen2.5-7b", architectures=["Qwen2ForProcessRewardModel"])),
    ]
    spec = TrainerSpec(q7)  # 4096 tokens, activation checkpointing, CE chunks of 1024
    est = trainer_estimate(spec)
    # state: 7,615,616,512 * 16 = 121,849,864,192 (113.5 GiB), all on the one GPU
    assert est.state_bytes == est.gpu_state == 121_849_864_192 and est.host_state == 0
    # root = 2*152064*3584 + 3584 = 1,089,998,336; layer = 233,057,792
    assert est.unsharded == (1_089_998_336 + 2 * 233_057_792) * 2 == 3_112_227_840
    assert est.grad_transient == 1_089_998_336 * (2 + 4) == 6_539_990_016
    assert est.activations == 4096 * 28 * 3584 * 2 + 2 * 4096 * 196_608 == 2_432_696_320
    assert est.logits == 2 * 1024 * 152064 * 4 + 152064 * 3584 * 4 == 3_425_697_792
    assert est.working == 15_510_611_968
    with pytest.raises(MemoryPlanError) as err:
        plan_memory(dev, engines, spec)
    msg = str(err.value)
    # GPUs: ceil(121,849,864,192 / (76,235,669,504 - 15,510,611,968)) = ceil(2.007) = 3
    assert msg == (
        "phase train: full fine-tuning of 7.6B params needs ~113.5 GiB for weights, gradients and AdamW state "
        "(16 B/param) plus 14.4 GiB of working memory, but the train phase has 71.0 GiB of GPU memory; use 3 "
        "GPUs under torchrun or --offload-optimizer"
    )
    assert "\n" not in msg
    assert "train" in err.value.plan.table()  # the plan is still there to print
    # with the optimizer offloaded it fits on the GPU; the host holds the state and the policy's level-1 weights.
    # Each parameter's shard is pinned twice (float32 master weights, float32 gradients), each request rounded up
    # to a power of two by the caching host allocator (the 271.6 MB MLP matrices take 512 MiB each); AdamW's
    # state (8 B/param) is plain memory: 2 x pow2(4n) + 8n per tensor
    p2 = lambda n: 1 << (n - 1).bit_length()
    h, q, kv, inter, V = 3584, 3584, 512, 18944, 152064
    layer = [q * h, kv * h, kv * h, h * q, inter * h, inter * h, h * inter, h, h, q, kv, kv]  # + qkv biases
    state = sum(2 * p2(4 * n) + 8 * n for n in [V * h, h, V * h]) + 28 * sum(2 * p2(4 * n) + 8 * n for n in layer)
    assert state == 176_757_846_016  # 164.6 GiB (113.5 GiB at 16 B/param without the rounding)
    off = TrainerSpec(q7, offload=True)
    plan = plan_memory(dev, engines[:1], off, host_memory_bytes=184 * GiB)
    est = plan.trainer
    assert est.gpu_state == 0 and est.host_state == state
    assert est.unsharded == 1_556_113_920 * (2 + 4)  # + the float32 shard copied up before the all-gather
    train = plan.phases[-1]
    assert train.trainer == est.gpu_total == 9_336_683_520 + 6_539_990_016 + 2_432_696_320 + 3_425_697_792
    assert train.host == state + 15_231_233_024
    # (a level-1 sleeper's flat buffer is kept while it is awake: the generate phase counts it too)
    assert [p.host for p in plan.phases] == [15_231_233_024, state + 15_231_233_024]
    # 128 GiB of host memory is not enough for that
    with pytest.raises(MemoryPlanError, match=r"^phase train needs ~178.8 GiB of host memory .* the host has 128.0"):
        plan_memory(dev, engines[:1], off, host_memory_bytes=128 * GiB)
    # ... and 184 GiB is not with the PRM's level-1 weights on the host as well: 7,083,474,946 params * 2 =
    # 14,166,949,892; 176,757,846,016 + 15,231,233,024 + 14,166,949,892 = 206,156,028,932 = 192.0 GiB
    with pytest.raises(MemoryPlanError, match=r"^phase train needs ~192.0 GiB of host memory .* the host has 184.0"):
        plan_memory(dev, engines, off, host_memory_bytes=184 * GiB)
    # the PRM at level 2 (reloaded from disk) leaves the host as with the policy alone
    engines[1] = EngineSpec("prm", engines[1].mcfg, sleep_level=2)
    assert plan_memory(dev, engines, off, host_memory_bytes=184 * GiB).phases[-1].host == train.host


def test_plan_refuses_a_kv_cache_below_one_sequence():
    dev = DeviceMemory(total=24 * GiB, free=24 * GiB)
    m = mcfg("mistral-7b")
    engines = [EngineSpec("policy", m, max_model_len=4096), EngineSpec("prm", m, max_model_len=4096, cuda_graphs=False)]
    # budget int(0.9*24 GiB) - 1 GiB = 22,119,081,574 < 2 x (weights + activations) = 30,703,108,096
    with pytest.raises(MemoryPlanError, match="phase generate: the policy engine's KV cache would get 0.0 GiB but"):
        plan_memory(dev, engines, sleep=False)
    # asleep in turn, each fits: the PRM 22,119,081,574 - 15,351,554,048 = 6,767,527,526 -> 3227 blocks of
    # 2,097,152; the policy also holds its decode graphs' pool (108,544,000): 6,658,983,526 -> 3175
    plan = plan_memory(dev, engines, sleep=True)
    assert [p.phase.engines for p in plan.phases] == [("policy",), ("prm",)]
    assert (plan.engines["policy"].num_blocks, plan.engines["prm"].num_blocks) == (3175, 3227)


def test_plan_rejects_unknown_engines():
    dev = DeviceMemory(total=80 * GiB, free=80 * GiB)
    with pytest.raises(ValueError, match="unknown engine"):
        plan_memory(dev, [EngineSpec("policy", mcfg("qwen2.5-0.5b"))], phases=[Phase("score", ("prm",))])


# -- the engine sizes its cache from the same functions --------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_model(str(tmp_path_factory.mktemp("tiny") / "m"), "llama", seed=3)


def test_engine_kv_capped_and_explicit(tiny):
    # tiny Llama: 2 layers, 2 KV heads of 16, float32: a block is 2*2*16*2*16*4 = 8,192 bytes
    llm = LLM(tiny, dtype="float32", device="cpu", max_num_seqs=4, max_model_len=64)
    assert llm.engine.runner.block_bytes() == 8192
    assert llm.engine.runner.num_blocks == 4 * 4 + 2  # capped (256 MiB would be 32,768 blocks)
    assert llm.engine.runner.kv.shape[2] == llm.engine.block_manager.num_blocks == 18
    llm = LLM(tiny, dtype="float32", device="cpu", kv_cache_memory_bytes=5 * 8192 + 100)
    assert llm.engine.runner.num_blocks == 5
    with pytest.raises(MemoryPlanError, match="less than one KV block"):
        LLM(tiny, dtype="float32", device="cpu", kv_cache_memory_bytes=100)


def test_weights_counted_once_per_storage(tmp_path):
    path = make_model(str(tmp_path / "q"), "qwen2", seed=4, tie_word_embeddings=True)
    llm = LLM(path, dtype="float32", device="cpu")
    net = llm.engine.model
    assert net.lm_head.weight is net.model.embed_tokens.weight
    m = llm.engine.mcfg
    assert unique_storage_bytes(llm.engine.runner.weight_tensors()) == param_count(m) * 4
    listed = sum(p.numel() for _, p in net.named_parameters(remove_duplicate=False))
    assert listed == param_count(m) + m.vocab_size * m.hidden_size  # naive counting: the tied table twice
    t = torch.zeros(10, 4)
    assert unique_storage_bytes([t, t[1:], t.view(-1), torch.zeros(3)]) == 160 + 12  # views share a storage


@pytest.mark.parametrize("head", ["lm", "token_cls", "prm_mlp"])
def test_profile_step_for_every_head(tmp_path, head):
    """The CUDA KV sizing runs this step; it used to call lm_head on models that have none."""
    extra = ("<extra_0>",)
    path = make_model(
        str(tmp_path / "m"), "qwen2", seed=7, head=head if head != "prm_mlp" else "lm", extra_tokens=extra
    )
    if head == "prm_mlp":  # Qwen2.5-Math-PRM layout: replace the LM head by Linear -> ReLU -> Linear(2)
        import json
        import os

        from safetensors.torch import load_file, save_file

        w = {k: v for k, v in load_file(os.path.join(path, "model.safetensors")).items() if k != "lm_head.weight"}
        g = torch.Generator().manual_seed(0)
        w |= {
            "score.0.weight": torch.randn(64, 64, generator=g),
            "score.0.bias": torch.randn(64, generator=g),
            "score.2.weight": torch.randn(2, 64, generator=g),
            "score.2.bias": torch.randn(2, generator=g),
        }
        save_file(w, os.path.join(path, "model.safetensors"))
        cfg = json.load(open(os.path.join(path, "config.json")))
        cfg["architectures"] = ["Qwen2ForProcessRewardModel"]
        json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    eng = (LLM(path, dtype="float32", device="cpu", max_num_seqs=8) if head == "lm" else PRM(path, device="cpu")).engine
    assert eng.mcfg.head == head
    runner = eng.runner
    out = runner.profile_step(40, runner._new_kv(3))
    rows = min(40, eng.ecfg.max_num_seqs)
    assert out.shape == (rows, eng.mcfg.vocab_size if head == "lm" else 2)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("enforce_eager", [False, True])
def test_engine_kv_sizing_on_cuda_sets_aside_activations_and_the_graph_pool(monkeypatch, enforce_eager):
    """GpuRunner._auto_num_blocks' CUDA branch, on CPU with the allocator's readings faked: the activation
    peak is read on the second profiling step (the first compiles and autotunes, and the autotuner's
    benchmark allocates a 256 MB flush buffer), and the decode graphs' pool estimated at the device's SM count
    is set aside beside it, unless enforce_eager (then no graph is captured)."""
    import types

    from bstar.engine.config import EngineConfig
    from bstar.engine.runner.gpu.runner import GpuRunner
    from bstar.engine.runner.memory_plan import decode_graph_pool_bytes

    r = object.__new__(GpuRunner)  # (its __init__ would allocate on the device)
    r.mcfg, r.max_model_len, r.block_size = mcfg("qwen2.5-0.5b"), 2048, 16
    r.ecfg = EngineConfig(max_num_seqs=64, gpu_memory_utilization=0.02, enforce_eager=enforce_eager)
    r.device, r.dtype = torch.device("cuda"), torch.bfloat16
    r.activation_bytes = r.graph_pool_budget = 0
    r.model = torch.nn.Module()
    r.model.w = torch.nn.Parameter(torch.empty(1000, dtype=torch.uint8), requires_grad=False)  # 1000 bytes
    mem = dict(allocated=5 * GiB, peak=5 * GiB)
    steps = []

    def profile_step(n, kv):
        steps.append(n)
        grown = (256 + 300 << 20) if len(steps) == 1 else 300 << 20  # first: + the autotuner's flush buffer
        mem["peak"] = max(mem["peak"], mem["allocated"] + grown)
        if len(steps) == 1:
            mem["allocated"] += 32 << 20  # the first GEMM's cuBLAS workspace stays

    r.profile_step, r._new_kv = profile_step, lambda blocks: torch.empty(0)
    for name in ("synchronize", "empty_cache"):
        monkeypatch.setattr(torch.cuda, name, lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: mem["allocated"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: mem.update(peak=mem["allocated"]))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: mem["peak"])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (70 * GiB, 80 * GiB))
    props = types.SimpleNamespace(multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)

    blocks = r._auto_num_blocks()
    assert steps == [2048, 2048] and r.activation_bytes == 332 << 20  # the second step's 300 + the workspace
    # share int(0.02 x 80 GiB) = 1,717,986,918 - weights 1000 - activations 348,127,232 (- the pool
    # 97,550,336: test_plan_caps_kv_at_what_the_engine_can_use), in blocks of 196,608 bytes
    pool = 0 if enforce_eager else 97_550_336
    assert r.graph_pool_budget == pool
    assert pool == 0 or pool == decode_graph_pool_bytes(r.mcfg, torch.bfloat16, 64, 2048)
    assert blocks == (1_717_986_918 - 1000 - 348_127_232 - pool) // 196_608 == (6967 if enforce_eager else 6471)
