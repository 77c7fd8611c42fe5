"""EmbeddedConfig: the sizes and training settings of the built-in task's data, tokenizer, policy and PRM.
Its hash (with VERSION) names the cache directory of a build."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from bstar.errors import BStarError
from bstar.loop.config import EMBEDDED_PRESETS

VERSION = "embedded-3"  # bump when the build procedure changes: old caches are then ignored


@dataclass
class EmbeddedConfig:
    seed: int = 0
    # data: the loop's train split, the held-out test split, and a disjoint warm-start seed set
    n_train: int = 512
    n_test: int = 1000
    n_seed: int = 2000
    vocab_size: int = 400  # BPE target; the task's word set is small, so training may stop below it
    # tiny Llama (GQA)
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 256
    # warm start: 14 epochs of the seed set (1,750 steps) leave the policy weak but clearly non-zero: 0.172
    # greedy on the 1,000 test problems in the build of 2026-11-27 (AMD EPYC). Each build measures its own
    # (manifest.json, metrics.warm_test_accuracy): torch's CPU kernels differ between CPUs, so the weights can
    # too. A longer warm start reached 0.33 in one experiment, at several times the build's cost
    warm_epochs: int = 14
    warm_lr: float = 3e-3
    warm_batch: int = 16
    max_new_tokens: int = 80  # solutions are at most ~50 tokens
    # PRM: the warm policy fine-tuned on true step labels (bstar.embedded.prm)
    prm_questions: int = 512  # train questions whose solutions it learns from
    prm_samples: int = 4  # warm-policy samples per question, at each of temperatures 0.8 and 1.2
    prm_valid: int = 2  # valid solutions in random styles per question
    prm_wrong: int = 6  # synthetic wrong solutions per question (task.wrong_solution)
    prm_steps: int = 900  # optimizer steps; 1,500 cost 170 s more for no better AUC (0.562 vs 0.564, 2026-12-07)
    prm_lr: float = 1e-3
    prm_batch: int = 32
    prm_eval_questions: int = 300  # test questions its quality is measured on (never trained on)
    prm_eval_k: int = 8  # policy samples per question for that measurement

    @classmethod
    def preset(cls, name: str) -> EmbeddedConfig:
        """The named size (EMBEDDED_PRESETS): "default", the built-in task as `bstar-engine run` uses it, or
        "tiny", which builds in about a second (a smoke test; its models learn little)."""
        if name not in EMBEDDED_PRESETS:
            raise BStarError(f"unknown embedded preset {name!r}; choose one of {', '.join(EMBEDDED_PRESETS)}")
        return cls() if name == "default" else cls.tiny()

    @classmethod
    def tiny(cls) -> EmbeddedConfig:
        """CI preset: builds in seconds; the models are too small to learn much."""
        return cls(
            n_train=24,
            n_test=16,
            n_seed=32,
            vocab_size=300,
            hidden_size=32,
            intermediate_size=64,
            num_layers=2,
            num_heads=2,
            num_kv_heads=1,
            warm_epochs=2,
            warm_batch=16,
            max_new_tokens=40,
            prm_questions=8,
            prm_samples=1,
            prm_valid=1,
            prm_wrong=2,
            prm_steps=4,
            prm_batch=16,
            prm_eval_questions=8,
            prm_eval_k=2,
        )

    def __post_init__(self):
        def bad(name, why):
            raise BStarError(f"EmbeddedConfig.{name}={getattr(self, name)!r}: {why}")

        for f in (
            "n_train",
            "n_test",
            "n_seed",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "warm_epochs",
            "warm_batch",
            "max_new_tokens",
            "prm_questions",
            "prm_samples",
            "prm_steps",
            "prm_batch",
            "prm_eval_questions",
            "prm_eval_k",
        ):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                bad(f, "must be an integer >= 1")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            bad("num_heads", "hidden_size must divide by num_heads and num_heads by num_kv_heads")
        if self.prm_questions > self.n_train:
            bad("prm_questions", f"must be <= n_train ({self.n_train})")
        if self.prm_eval_questions > self.n_test:
            bad("prm_eval_questions", f"must be <= n_test ({self.n_test})")
        for f in ("prm_valid", "prm_wrong"):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 0:
                bad(f, "must be an integer >= 0")
        for f in ("warm_lr", "prm_lr"):
            if not getattr(self, f) > 0:
                bad(f, "must be > 0")
        if self.vocab_size < 300:
            bad("vocab_size", "must be >= 300 (256 byte symbols + specials + some merges)")

    def key(self) -> str:
        """Cache key: a hash of the config and the build procedure's version."""
        blob = json.dumps({"version": VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
