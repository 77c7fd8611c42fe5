"""The loop's memory on one GPU (issue 11), in one process and one prepared run of at most ~8 minutes:
a policy (LM head), a PRM with an LM head and a PRM with a token-classification head, generation and
scoring, one training step with the engines asleep, the hand-off of the new weights to the policy, and
generation again. Twice: random models with Qwen2.5-0.5B shapes, then Qwen2.5-7B shapes cut to 4 decoder
layers (the full 152k vocabulary and 3584 hidden: the embeddings, LM head and logits are a 7B model's; the
trainer runs with --offload-optimizer, as a 7B model needs on one 80 GB GPU).

Before anything loads it prints the memory plan (bstar.loop.memory_plan via bstar.loop.memory) and sizes
each engine's KV cache from it. After each phase it logs torch.cuda.mem_get_info and the allocator's current and peak
bytes (the peak reset after each row), and at the end prints one table and writes the rows as JSON.

    python bench/memory_check.py --out bench/memory_check.json       # on a CUDA machine
    python bench/memory_check.py --dry-run                           # CPU, tiny shapes: checks the script

The dry run (tests/integration/test_memory.py runs it) uses a pretend 80 GiB device for the plan and reports no memory.
"""

import argparse
import gc
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

from bstar.engine import LLM, PRM, SamplingParams
from bstar.engine.config import ModelConfig
from bstar.engine.runner.memory_plan import GiB
from bstar.loop.memory import train_phase, trainer_spec
from bstar.loop.memory_plan import DeviceMemory, EngineSpec, Phase, plan_memory
from bstar.testing.model_factory import QWEN25_05B, QWEN25_7B, build_tokenizer, make_config, make_records
from bstar.train import SFTConfig, SFTTrainer
from bstar.utils import distributed as dist_utils

SHAPES = {
    "qwen2.5-0.5b": QWEN25_05B,
    "qwen2.5-7b-4layers": {**QWEN25_7B, "num_hidden_layers": 4},
}
OFFLOAD = {"qwen2.5-0.5b": False, "qwen2.5-7b-4layers": True}
TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
MAX_MODEL_LEN = 2048
STEP_TAG, CLS_SEP = "ки", "<extra_0>"
QUESTION = "Janet has 3 apples and buys 5 more. How many apples does she have?"
CANDIDATES = ["Step 1: 3 + 5 = 8.\nThe answer is 8.", "3 + 5 = 8\n8 * 2 = 16\nThe answer is 16."]


class Log:
    """Rows of (phase, free, allocated, peak since the last row, seconds since start)."""

    def __init__(self, dev: torch.device):
        self.dev, self.rows, self.t0 = dev, [], time.perf_counter()
        self.cuda = dev.type == "cuda"

    def __call__(self, phase: str) -> dict:
        free = alloc = peak = 0
        if self.cuda:
            torch.cuda.synchronize(self.dev)
            free = torch.cuda.mem_get_info(self.dev)[0]
            alloc, peak = torch.cuda.memory_allocated(self.dev), torch.cuda.max_memory_allocated(self.dev)
            torch.cuda.reset_peak_memory_stats(self.dev)
        row = dict(phase=phase, free=free, allocated=alloc, peak=peak, s=round(time.perf_counter() - self.t0, 1))
        self.rows.append(row)
        print(
            f"  {phase:<34} free {free / GiB:7.2f} GiB  allocated {alloc / GiB:7.2f} GiB  peak {peak / GiB:7.2f} GiB"
            f"  {row['s']:7.1f} s",
            flush=True,
        )
        return row


def make_random(path: Path, shapes: dict, head: str, dev: torch.device, seed: int, extra=()) -> str:
    """A random Qwen2 checkpoint in bf16 (built on `dev`, float32 for the dry run) and the test suite's tiny
    tokenizer (ids < 300: prompts stay inside every vocabulary)."""
    cfg = make_config("qwen2", **{**shapes, "max_position_embeddings": MAX_MODEL_LEN})
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(seed)
    with torch.device(dev):
        if head == "token_cls":
            cfg.num_labels = 2
            model = AutoModelForTokenClassification.from_config(cfg, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    std = 0.08 if shapes is TINY else 0.02
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, std)
            elif "norm" in name:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0, 0.02)
    model.save_pretrained(path)
    del model
    build_tokenizer(str(path), vocab_size=300 - len(extra), extra_tokens=extra)
    return str(path)


def device_memory(dev: torch.device, dry: bool) -> DeviceMemory:
    if dry:
        return DeviceMemory(total=80 * GiB, free=80 * GiB, name="cuda:0 (dry run: pretend 80 GiB)")
    return DeviceMemory.of(dev)


SEQS = 64


def sft_config(name: str, dry: bool) -> SFTConfig:
    """One optimizer step on ~4096 tokens (160 short examples) in one micro-batch."""
    return SFTConfig(
        lr=1e-2,
        max_steps=1,
        batch_examples=8 if dry else 160,
        micro_batch_tokens=256 if dry else 4096,
        max_seq_len=256,
        offload_optimizer=OFFLOAD[name],
        progress=False,
    )


def real_plan(name: str, device: DeviceMemory):
    """bstar.engine.runner.memory_plan's plan for `name`'s real shapes: policy, PRM (LM head), PRM (token-cls head), as
    built below; refuses (MemoryPlanError) when a phase cannot fit."""
    base = make_config("qwen2", **{**SHAPES[name], "max_position_embeddings": MAX_MODEL_LEN}).to_dict()
    mcfgs = {
        "policy": ModelConfig.from_dict(dict(base, architectures=["Qwen2ForCausalLM"])),
        "prm_lm": ModelConfig.from_dict(dict(base, architectures=["Qwen2ForCausalLM"])),
        "prm_cls": ModelConfig.from_dict(dict(base, architectures=["Qwen2ForTokenClassification"], num_labels=2)),
    }
    engines = [  # (bstar.PRM never decodes: only the policy captures decode graphs)
        EngineSpec(n, m, max_num_seqs=SEQS, max_model_len=MAX_MODEL_LEN, cuda_graphs=n == "policy")
        for n, m in mcfgs.items()
    ]
    phases = [Phase("generate", ("policy",)), Phase("score", ("prm_lm", "prm_cls")), Phase("train", (), train=True)]
    spec = trainer_spec(mcfgs["policy"], sft_config(name, False), "cuda")
    return plan_memory(device, engines, spec, phases)


def run_shapes(name: str, shapes: dict, dev: torch.device, dry: bool, tmp: Path) -> dict:
    print(f"\n== {name} on {dev}", flush=True)
    # the plan first, from the real shapes (also in the dry run, where it is pure arithmetic): three engines,
    # each asleep outside its own phase, the trainer alone in the train phase
    plan = real_plan(name, device_memory(dev, dry))
    print(plan.table(), flush=True)
    kv = {n: (plan.kv_cache_memory_bytes(n) if not dry else None) for n in plan.engines}
    blocks = None if not dry else 64
    seqs = SEQS
    sft = sft_config(name, dry)

    pol_dir = make_random(tmp / f"{name}-policy", shapes, "lm", dev, 0)
    prm_lm_dir = make_random(tmp / f"{name}-prm-lm", shapes, "lm", dev, 1, extra=(STEP_TAG,))
    prm_cls_dir = make_random(tmp / f"{name}-prm-cls", shapes, "token_cls", dev, 2, extra=(CLS_SEP,))
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    log = Log(dev)
    log("start")
    kw = dict(device=str(dev), max_num_seqs=seqs, num_kv_blocks=blocks)
    policy = LLM(pol_dir, max_model_len=MAX_MODEL_LEN, kv_cache_memory_bytes=kv["policy"], **kw)
    log("policy loaded")
    kw.pop("max_num_seqs")
    prm_lm = PRM(prm_lm_dir, kv_cache_memory_bytes=kv["prm_lm"], **kw)
    log("prm (lm head) loaded")
    prm_cls = PRM(prm_cls_dir, kv_cache_memory_bytes=kv["prm_cls"], **kw)
    log("prm (token-cls head) loaded")

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 290, (n,), generator=g).tolist() for n in (40, 200, 500, 1000)]
    greedy = SamplingParams(n=8 if not dry else 2, temperature=0, max_tokens=128 if not dry else 8, ignore_eos=True)

    def tokens(llm):
        return [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, greedy, use_tqdm=False)]

    before = tokens(policy)
    log("generated")
    prm_lm.score(QUESTION, CANDIDATES)
    prm_cls.score(QUESTION, CANDIDATES)
    log("scored (both prms)")

    records = make_records(sft.batch_examples, seed=3)
    with train_phase({"policy": policy, "prm_lm": prm_lm, "prm_cls": prm_cls}) as phase:
        log("engines asleep")
        trainer = SFTTrainer(pol_dir, sft)
        log("trainer built")
        res = trainer.train(records)
        log("train step")
        phase.hand_off("policy", trainer.named_weights())
        log("hand-off")
        del trainer
    dist_utils.destroy()  # the offloaded trainer's one-rank group
    log("trainer freed, engines awake")
    after = tokens(policy)
    log("generated after hand-off")
    out = dict(rows=log.rows, loss=res.losses[0], changed=after != before, plan=plan.table())
    del policy, prm_lm, prm_cls
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def table(runs: dict) -> str:
    lines = ["| shapes | phase | free GiB | allocated GiB | peak GiB | s |", "|---|---|---|---|---|---|"]
    for name, run in runs.items():
        for r in run["rows"]:
            lines.append(
                f"| {name} | {r['phase']} | {r['free'] / GiB:.2f} | {r['allocated'] / GiB:.2f} | "
                f"{r['peak'] / GiB:.2f} | {r['s']} |"
            )
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, no memory figures")
    ap.add_argument("--out", default="memory_check.json", help="JSON rows (default: ./memory_check.json)")
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES), choices=list(SHAPES))
    args = ap.parse_args(argv)
    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        ap.error("needs CUDA (or --dry-run)")
    dev = torch.device("cpu") if dry else torch.device("cuda", torch.cuda.current_device())
    info = dict(dry_run=dry, device=torch.cuda.get_device_name(dev) if not dry else "cpu", date=time.strftime("%F"))
    runs = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BSTAR_TMP")) as tmp:
        for name in args.shapes:
            runs[name] = run_shapes(name, TINY if dry else SHAPES[name], dev, dry, Path(tmp))
    print("\n" + table(runs), flush=True)
    result = dict(info, runs=runs)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
