"""The built-in task and its models, built by the project's own code and cached, so `bstar-engine run`
needs no downloaded model:

    task.py       seeded multi-step arithmetic word problems (GSM8K-style '#### N' answers)
    tokenizer.py  byte-level BPE trained on the task text
    policy.py     a random tiny Llama warm-started by SFT on a seed set, and its greedy accuracy
    prm.py        Math-Shepherd step labels from the policy's rollouts, the PRM trained on them
    config.py     EmbeddedConfig: sizes and settings (the "default" and "tiny" presets)
    build.py      build_assets: the phases below, cached under $BSTAR_CACHE

Build phases (each logs one line with its time; the slow ones show tqdm bars):
  1. data:      make_splits(n_train, n_test) plus a disjoint warm-start seed set from the same stream.
  2. tokenizer: byte-level BPE trained on the task text, digits split one per token (so arithmetic
                is learnable), "ки" (the PRM step tag) added; "+", "-", "*", "=", "#" are one token each.
  3. policy:    random tiny Llama, warm-started by SFT on the seed set so that it starts weak;
                greedy accuracy on the test split is measured with the engine.
  4. prm:       Math-Shepherd labels: candidates sampled from the warm policy, each step labelled "+"
                when some rollout from its prefix reaches the gold answer (hard estimation), else "-";
                the PRM (initialised from the warm policy) learns to predict the label at each step
                tag, on inputs in bstar.PRM's format (bstar.engine.entrypoints.prm.tagged_step_ids); accuracy is
                measured on held-out questions' steps with bstar.PRM.
"""

from bstar.embedded.build import EmbeddedAssets, build_assets, default_cache_dir, fresh_queries, load_assets
from bstar.embedded.config import EmbeddedConfig

__all__ = ["EmbeddedAssets", "EmbeddedConfig", "build_assets", "default_cache_dir", "fresh_queries", "load_assets"]
