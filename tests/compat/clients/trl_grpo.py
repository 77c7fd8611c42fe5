"""TRL's GRPOTrainer, 2 steps in colocate mode, with `vllm` = bstar.vllm (install()). argv: out dir, and
"plain", "sleep" (sleep mode on) or "regex" (TRL's structured-outputs regex and a no-op generation
kwarg). Prints one RESULT line of JSON."""

import json
import re
import sys
import time

import bstar.vllm

bstar.vllm.install()
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import bstar.engine as E  # noqa: E402
from bstar.testing.model_factory import make_qwen3_model  # noqa: E402

out, mode = sys.argv[1], sys.argv[2]
REGEX = "[a-z]{2,6}( [a-z]{1,5})?"
path = make_qwen3_model(out + "/model", seed=3, tie_word_embeddings=True)
ds = Dataset.from_dict({"prompt": ["the cat", "a dog ran", "once upon", "she said"] * 2})
seen = []


def reward_len(completions, **kw):
    seen.extend(completions)
    return [float(len(c)) / 10 for c in completions]


extra = dict(vllm_structured_outputs_regex=REGEX, generation_kwargs={"spaces_between_special_tokens": False})
cfg = GRPOConfig(
    output_dir=out + "/run",
    use_vllm=True,
    vllm_mode="colocate",
    vllm_enable_sleep_mode=mode == "sleep",
    per_device_train_batch_size=4,
    num_generations=4,
    max_completion_length=8,
    max_steps=2,
    logging_steps=1,
    report_to=[],
    use_cpu=True,
    bf16=False,
    save_strategy="no",
    learning_rate=1e-3,
    vllm_gpu_memory_utilization=0.3,
    **(extra if mode == "regex" else {}),
)
t0 = time.time()
trainer = GRPOTrainer(model=path, reward_funcs=reward_len, args=cfg, train_dataset=ds)
before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
trainer.train()
logs = [h for h in trainer.state.log_history if "loss" in h]
llm = trainer.vllm_generation.llm
result = {
    "steps": trainer.state.global_step,
    "changed": sum(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters()),
    "n_params": len(before),
    "is_bstar": type(llm) is E.LLM,
    "logp_diff_max": max(float(h["sampling/sampling_logp_difference/max"]) for h in logs),
    "completions": len(seen),
    "regex_ok": all(re.fullmatch(REGEX, c) for c in seen) if mode == "regex" else None,
    "seconds": round(time.time() - t0, 1),
}
print("RESULT", json.dumps(result))
