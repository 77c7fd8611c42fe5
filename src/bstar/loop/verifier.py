"""A step verifier with a reliability knob: the built-in task's true step labels read through noise.

Each step's logit is +margin (a good step) or -margin (a bad one) plus Gaussian noise of scale sigma,
clipped to +-LOGIT_CLIP as the PRM's are, and the candidate's value is the minimum over its steps (the
PRM's "min" aggregate). sigma = 0 is an oracle (it ranks exactly as the true labels: every valid solution
above every invalid one); as sigma grows its ranking tends to chance. It answers `score_batch` as bstar.PRM
does, so it goes through the same scoring, threshold and selection path as any PRM.

The noise of a candidate is a fixed function of (seed, question, text): the same text scores the same
wherever it appears (in the search, the pool or an evaluation, before or after a resume), and two noise
levels share their draws (a larger sigma scales the same standard normals), so a sweep over sigma is a
sweep over reliability alone.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable

from bstar.engine.entrypoints.prm import LOGIT_CLIP, PRMScore, split_steps
from bstar.errors import BStarError

MARGIN = 3.0  # |logit| of a noiseless step: a right answer with a bad step scores 1 - 3/5 = 0.4 > threshold 0
SIGMAS = (0.0, 2.0, 4.0, 8.0, 16.0)  # the levels every built-in evaluation reports an AUC for (16: near chance)


class StepVerifier:
    """Noisy true step labels, scored like a PRM (logit scale, min over the steps)."""

    def __init__(
        self, step_labels: Callable[[str, str], list[bool]], sigma: float, seed: int = 0, margin: float = MARGIN
    ):
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma >= 0):
            raise BStarError(f"verifier noise must be a finite number >= 0, got {sigma!r}")
        self.step_labels, self.sigma, self.seed, self.margin = step_labels, float(sigma), seed, margin

    def noise(self, question: str, text: str, n: int) -> list[float]:
        """n standard normal draws, a function of (seed, question, text) only."""
        key = hashlib.sha256(json.dumps([self.seed, question, text]).encode()).digest()
        rng = random.Random(int.from_bytes(key[:8], "little"))
        return [rng.gauss(0.0, 1.0) for _ in range(n)]

    def step_logits(self, question: str, text: str) -> list[float]:
        labels = self.step_labels(question, text)
        z = self.noise(question, text, len(labels)) if self.sigma else [0.0] * len(labels)
        return [
            max(-LOGIT_CLIP, min(LOGIT_CLIP, (self.margin if ok else -self.margin) + self.sigma * e))
            for ok, e in zip(labels, z)
        ]

    def score(self, question: str, text: str) -> PRMScore:
        logits = self.step_logits(question, text)
        return PRMScore(step_scores=logits, score=min(logits), steps=split_steps(text))

    def score_batch(self, questions: list[str], candidates: list[list[str]], progress: bool = False):
        """Per question, per candidate: a PRMScore, as bstar.PRM.score_batch returns."""
        if len(questions) != len(candidates):
            raise BStarError(f"{len(questions)} questions but {len(candidates)} candidate lists")
        return [[self.score(q, c) for c in cs] for q, cs in zip(questions, candidates)]


def sigma_key(sigma: float) -> str:
    """The record key of the verifier's within-question AUC at noise sigma: 'verifier_within_auc_s2'."""
    return f"verifier_within_auc_s{sigma:g}".replace(".", "p")
