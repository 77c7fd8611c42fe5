"""Engine memory on CUDA (issue 11, the engine's side), in one run of a few minutes on one GPU:

1. a float32 checkpoint with dtype "auto" loads as bf16, and loading raises the allocator peak by the bf16
   weights only (no float32 copy on the device);
2. a policy (LM head) and a token-classification PRM on one card, each sized by gpu_memory_utilization against
   its own allocations: the policy's KV capped at what it can use, the PRM's = its share minus its own weights
   and measured activation peak (the profiling step used to crash on a head without lm_head);
3. an engine asking for more KV than is free is refused at construction (MemoryPlanError), not by an OOM;
4. sleep(1) returns the policy's weights and KV to the driver (mem_get_info), wake_up() gives identical greedy
   output; sleep(2) + wake_up(["weights"]) + load_weights + wake_up(["kv_cache"]) too; PRM scores identical;
5. on a second GPU (when there is one) the engine runs on cuda:1 under the device guard, same output.

Prints mem_get_info and the allocator's readings after each phase.
Run: pytest bench/test_memory_gpu.py -s   (skips without CUDA; BSTAR_GPU_DRY_RUN=1 runs it on CPU with tiny
shapes and no memory assertions, to check the script itself)
"""

import gc
import os

import pytest
import torch

from bstar.engine import LLM, PRM, SamplingParams
from bstar.engine.errors import MemoryPlanError
from bstar.engine.model.loader import iter_weights
from bstar.engine.runner.memory_plan import (
    GiB,
    engine_activation_bytes,
    kv_cap_blocks,
    param_count,
    unique_storage_bytes,
)
from bstar.testing.model_factory import QWEN25_05B, make_model

CUDA = torch.cuda.is_available()
DRY = not CUDA and os.environ.get("BSTAR_GPU_DRY_RUN") == "1"
pytestmark = pytest.mark.skipif(not (CUDA or DRY), reason="needs CUDA (or BSTAR_GPU_DRY_RUN=1 for a CPU dry run)")

# Qwen2.5-0.5B shapes on CUDA; tiny ones for the dry run
SHAPES = (
    {k: v for k, v in QWEN25_05B.items() if k not in ("tie_word_embeddings", "max_position_embeddings")}  # set below
    if CUDA
    else dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
)
QUESTION = "Janet has 3 apples and buys 5 more. How many apples does she have?"
CANDIDATES = ["Step 1: 3 + 5 = 8.\nThe answer is 8.", "3 + 5 = 8\n8 * 2 = 16\nThe answer is 16."]
GREEDY = SamplingParams(n=4, temperature=0, max_tokens=32, ignore_eos=True)


class Log:
    def __init__(self, dev):
        self.dev, self.rows = dev, []

    def __call__(self, phase):
        if CUDA:
            torch.cuda.synchronize(self.dev)
            free, total = torch.cuda.mem_get_info(self.dev)
            row = (phase, free, torch.cuda.memory_allocated(self.dev), torch.cuda.max_memory_allocated(self.dev))
        else:
            row = (phase, 0, 0, 0)
        self.rows.append(row)
        return row

    def print(self):
        print(f"\n{'phase':<34} {'free':>10} {'allocated':>10} {'peak':>10}")
        for phase, free, alloc, peak in self.rows:
            print(f"{phase:<34} {free / GiB:>8.2f}Gi {alloc / GiB:>8.2f}Gi {peak / GiB:>8.2f}Gi")


def _tokens(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


def test_engine_memory_on_one_card(tmp_path):
    dev = torch.device("cuda", torch.cuda.current_device()) if CUDA else torch.device("cpu")
    log = Log(dev)
    pol_path = make_model(
        str(tmp_path / "policy"), "qwen2", seed=0, tie_word_embeddings=True, max_position_embeddings=4096, **SHAPES
    )
    prm_path = make_model(
        str(tmp_path / "prm"),
        "qwen2",
        seed=1,
        head="token_cls",
        extra_tokens=("<extra_0>",),
        max_position_embeddings=32768,  # uncapped KV: sized by gpu_memory_utilization
        **SHAPES,
    )
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (40, 200, 513)]
    total = torch.cuda.mem_get_info(dev)[1] if CUDA else 0
    log("start")

    # 1. loading: float32 checkpoint, dtype auto -> bf16, no float32 copy on the device
    if CUDA:
        torch.cuda.reset_peak_memory_stats(dev)
    base = log("before load")[2]
    llm = LLM(pol_path, device=str(dev), num_kv_blocks=512)  # explicit KV: no profiling in the peak
    _, _, alloc, peak = log("policy loaded (auto dtype)")
    net = llm.engine.model
    if CUDA:
        assert llm.engine.dtype == torch.bfloat16
        weights = unique_storage_bytes(llm.engine.runner.weight_tensors())
        assert weights == param_count(llm.engine.mcfg) * 2
        kv = llm.engine.runner.kv.numel() * 2
        largest = max(p.numel() for p in net.parameters()) * 4  # one checkpoint tensor in flight at most
        assert peak - base <= weights + kv + largest + 64 * 2**20, (peak - base, weights)  # float32: + 2x weights
    assert net.lm_head.weight is net.model.embed_tokens.weight
    ref_small = _tokens(llm.generate(prompts, GREEDY, use_tqdm=False))
    del llm, net
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()

    # 2. two engines, one card, each against its own allocations
    pol = LLM(pol_path, device=str(dev), gpu_memory_utilization=0.35, max_model_len=2048)
    log("policy built (util 0.35)")
    prm = PRM(prm_path, device=str(dev), gpu_memory_utilization=0.35)
    log("prm built (util 0.35)")
    r, pr = pol.engine.runner, prm.engine.runner
    if CUDA:
        assert r.num_blocks == kv_cap_blocks(256, 2048, 16)  # capped: what 256 sequences of 2048 tokens can use
        own = unique_storage_bytes(pr.weight_tensors())
        kv = pr.kv.numel() * pr.kv.element_size()
        share = int(total * 0.35)
        est = engine_activation_bytes(prm.engine.mcfg, pr.dtype, 4096, 256, pr.max_model_len)
        print(
            f"\nPRM: share {share / GiB:.2f} GiB, weights {own / GiB:.2f}, KV {kv / GiB:.2f}, activations "
            f"measured {pr.activation_bytes / GiB:.2f} (plan's estimate {est / GiB:.2f})"
        )
        # the policy's memory does not count against the PRM: KV = share - own weights - own activation peak
        assert share - own - 4 * GiB <= kv <= share - own
    ref = _tokens(pol.generate(prompts, GREEDY, use_tqdm=False))
    assert ref == ref_small  # same model, same greedy output whatever the cache size
    scores = prm.score(QUESTION, CANDIDATES)
    log("generated + scored")

    # 3. more KV than is free: refused at construction
    if CUDA:
        free = torch.cuda.mem_get_info(dev)[0]
        with pytest.raises(MemoryPlanError, match="does not fit in the"):
            PRM(prm_path, device=str(dev), kv_cache_memory_bytes=free + GiB)
        gc.collect()
        torch.cuda.empty_cache()
        log("oversized engine refused")

    # 4. sleep / wake
    weights = unique_storage_bytes(r.weight_tensors())
    kv_bytes = r.kv.numel() * r.kv.element_size()
    _, free0, alloc0, _ = log("before policy sleep(1)")
    pol.sleep(1)
    _, free1, alloc1, _ = log("policy asleep (level 1)")
    if CUDA:
        assert alloc0 - alloc1 >= weights + kv_bytes - 2**20
        assert free1 - free0 >= 0.9 * (weights + kv_bytes)  # returned to the driver (segments may be shared)
    pol.wake_up()
    log("policy awake")
    assert _tokens(pol.generate(prompts, GREEDY, use_tqdm=False)) == ref
    pol.sleep(2)
    log("policy asleep (level 2)")
    pol.wake_up(["weights"])
    pol.load_weights(iter_weights(pol_path))
    log("policy weights reloaded")
    pol.wake_up(["kv_cache"])
    log("policy awake (level 2)")
    assert _tokens(pol.generate(prompts, GREEDY, use_tqdm=False)) == ref
    prm.sleep(1)
    log("prm asleep (level 1)")
    prm.wake_up()
    assert prm.score(QUESTION, CANDIDATES) == scores
    log("prm awake")

    # 5. a second device: every kernel must launch there (the device guard)
    if CUDA and torch.cuda.device_count() > 1:
        other = LLM(pol_path, device="cuda:1", num_kv_blocks=2048)
        assert torch.cuda.current_device() == dev.index
        assert _tokens(other.generate(prompts, GREEDY, use_tqdm=False)) == ref
        assert torch.cuda.current_device() == dev.index  # the guard restored the caller's device
        log("cuda:1 engine generated")
    log.print()
