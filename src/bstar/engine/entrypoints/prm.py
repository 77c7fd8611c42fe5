"""Process reward model scoring: P(step is good) at every step of every candidate, or its logit.

Two conventions:
- LM-style (Math-Shepherd): a causal LM; each step is followed by a step-tag token (default "ки")
  and P(good) is the softmax over the logits of the good/bad tokens (default "+" / "-") there.
- Classification head (Qwen2.5-Math-PRM, or transformers' *ForTokenClassification): a 2-class head
  read at the step-separator token; class `good_label` (default 1) is "good".

The question's tokens come first and are identical for all of its candidates, so its KV blocks are
computed once and shared through the paged cache's prefix matching; only the tag positions go
through the two-row head (kernels.prm_step_scores), never a [tokens, vocab] logits matrix.

scale="prob" (default) reports P(good); scale="logit" reports log p - log(1 - p) (the good-vs-bad logit
difference, what a BCE-with-logits PRM head outputs: B-STaR's step reward), clipped to +-LOGIT_CLIP; the
aggregate is then the logit of the probability aggregate (for "min", the minimum step logit).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from bstar import kernels
from bstar.engine.config import EngineConfig
from bstar.engine.core.llm_engine import LLMEngine
from bstar.engine.core.prompt_forward import forward_prompts
from bstar.engine.errors import RequestError, UnsupportedError
from bstar.engine.model.tokenizer import require

QWEN_PRM_SEPARATOR = "<extra_0>"
SCALES = ("prob", "logit")
LOGIT_CLIP = 10.0  # |logit| bound: P(good) within 4.5e-5 of 0 or 1 reads as +-10


def to_logit(p: torch.Tensor) -> torch.Tensor:
    """log p - log(1 - p) in float64, clipped to [-LOGIT_CLIP, LOGIT_CLIP]."""
    p = p.double()
    return (torch.log(p) - torch.log1p(-p)).clamp(-LOGIT_CLIP, LOGIT_CLIP)


def split_steps(candidate: str, delimiter: str = "\n") -> list[str]:
    """A candidate's steps: its non-empty stripped pieces between delimiters (the whole stripped
    candidate when there are none)."""
    steps = [s.strip() for s in candidate.split(delimiter)]
    steps = [s for s in steps if s]
    return steps or [candidate.strip()]


def tagged_step_ids(
    steps: list[str], encode: Callable[[str], list[int]], tag_id: int, delimiter: str = "\n"
) -> tuple[list[int], list[int]]:
    """The PRM input of a candidate after its question: each step's tokens (`encode` adds no special
    tokens) followed by " " and the step tag, steps joined by the delimiter's tokens; returns (ids,
    offsets of the tags in ids). The one definition of the format, for scoring and PRM training."""
    ids, tags = [], []
    delim = encode(delimiter)
    for i, step in enumerate(steps):
        if i:
            ids += delim
        ids += encode(step + " ")
        tags.append(len(ids))
        ids.append(tag_id)
    return ids, tags


@dataclass
class PRMScore:
    step_scores: list[float]  # P(good) of each step (scale="logit": its logit)
    score: float  # aggregate over the steps (min / last / prod / mean)
    steps: list[str]


class PRM:
    def __init__(
        self,
        model: str,
        kind: str | None = None,
        step_tag: str | None = None,
        good_token: str = "+",
        bad_token: str = "-",
        good_label: int = 1,
        step_delimiter: str = "\n",
        aggregate: str = "min",
        scale: str = "prob",
        question_template: str = "{question} ",
        dtype: str = "auto",
        device: str = "auto",
        **engine_kwargs,
    ):
        """engine_kwargs: EngineConfig's fields (num_kv_blocks, gpu_memory_utilization, kv_cache_memory_bytes, ...)."""
        if aggregate not in kernels.prm_scoring.AGGREGATES:
            raise RequestError(f"unknown PRM aggregate {aggregate!r}; choose one of {kernels.prm_scoring.AGGREGATES}")
        if scale not in SCALES:
            raise RequestError(f"unknown PRM scale {scale!r}; choose one of {SCALES}")
        self.scale = scale
        # a PRM never decodes: no decode graphs to capture, no pool to hold
        cfg, unknown = EngineConfig.split_kwargs({**engine_kwargs, "enforce_eager": True})
        if unknown:
            raise UnsupportedError(f"PRM got unknown keyword(s) {', '.join(sorted(unknown))}")
        self.engine = LLMEngine(model, dtype=dtype, device=device, engine_config=cfg)
        head = self.engine.mcfg.head
        self.kind = kind or ("lm" if head == "lm" else "classifier")
        if self.kind not in ("lm", "classifier"):
            raise RequestError(f"unknown PRM kind {kind!r}; use 'lm' or 'classifier'")
        if (self.kind == "lm") != (head == "lm"):
            raise RequestError(f"PRM kind {self.kind!r} does not match the checkpoint's {head!r} head")
        self.tokenizer = require(self.engine.tokenizer, "PRM scoring")
        self.step_delimiter, self.aggregate, self.question_template = step_delimiter, aggregate, question_template
        self.step_tag = step_tag or ("ки" if self.kind == "lm" else QWEN_PRM_SEPARATOR)
        self.tag_id = self.tokenizer.single_token_id(self.step_tag)
        if self.kind == "lm":
            self.label_rows = [self.tokenizer.single_token_id(good_token), self.tokenizer.single_token_id(bad_token)]
        else:
            if self._last_layer().out_features != 2:
                raise RequestError(
                    f"classification PRM needs a 2-class head, this one has {self._last_layer().out_features}"
                )
            self.label_rows = [good_label, 1 - good_label]
        if self.engine.runner.triton:  # the Triton path: compile the scoring kernels now, not mid-run
            with torch.inference_mode():
                h = torch.zeros(2, self.engine.mcfg.hidden_size, dtype=self.engine.dtype, device=self.engine.device)
                self._score_hidden(h, torch.zeros(2, dtype=torch.long, device=h.device), 1)

    def _last_layer(self) -> torch.nn.Linear:
        score = self.engine.model.score
        return score if isinstance(score, torch.nn.Linear) else score[2]

    def _head(self):
        """(layers before the two-row head or None, weight [2, H] good row first, bias [2] or None).
        Read at every call: load_weights may have replaced the parameters."""
        net = self.engine.model
        if self.kind == "lm":
            return None, net.lm_head.weight[self.label_rows], None
        last = self._last_layer()
        pre = None if isinstance(net.score, torch.nn.Linear) else net.score[:2]
        return pre, last.weight[self.label_rows], None if last.bias is None else last.bias[self.label_rows]

    def _score_hidden(self, hidden, step_cand, num_candidates):
        """Step scores [S] and per-candidate aggregates from the tag positions' hidden states [S, H]
        (step_cand [S]: each step's candidate, non-decreasing)."""
        with self.engine.runner.guard():
            pre, weight, bias = self._head()
            if pre is not None:
                hidden = pre(hidden)
            tags = torch.arange(hidden.shape[0], device=hidden.device)
            p_good, agg = kernels.prm_step_scores(
                hidden, tags, weight, bias, step_cand, num_candidates, self.aggregate, triton=self.engine.runner.triton
            )
            if self.scale == "logit":
                p_good, agg = to_logit(p_good), to_logit(agg)
        return p_good, agg

    # -- text -> tokens -----------------------------------------------------------------------
    def split_steps(self, candidate: str) -> list[str]:
        return split_steps(candidate, self.step_delimiter)

    def _candidate_ids(self, steps: list[str]) -> tuple[list[int], list[int]]:
        """Tokens of the tagged candidate and the offsets of its tags within them."""
        encode = lambda text: self.tokenizer.encode(text, add_special_tokens=False)
        return tagged_step_ids(steps, encode, self.tag_id, self.step_delimiter)

    # -- scoring ------------------------------------------------------------------------------
    def score(self, question: str, candidates: list[str]) -> list[PRMScore]:
        return self.score_batch([question], [candidates])[0]

    @torch.inference_mode()
    def score_batch(
        self, questions: list[str], candidates: list[list[str]], progress: bool = False, share_prefix: bool = True
    ) -> list[list[PRMScore]]:
        """Per question, per candidate: step scores and their aggregate."""
        if len(questions) != len(candidates):
            raise RequestError(f"{len(questions)} questions but {len(candidates)} candidate lists")
        q_ids = [self.tokenizer.encode(self.question_template.format(question=q)) for q in questions]
        seqs, tag_pos, steps_of, owner = [], [], [], []
        for qi, cands in enumerate(candidates):
            for c in cands:
                steps = self.split_steps(c)
                ids, tags = self._candidate_ids(steps)
                seqs.append(q_ids[qi] + ids)
                tag_pos.append([len(q_ids[qi]) + t for t in tags])
                steps_of.append(steps)
                owner.append(qi)
        eng = self.engine
        if share_prefix and eng.ecfg.enable_prefix_caching:
            for _ in forward_prompts(eng, q_ids, use_prefix_cache=True):  # fills the cache with the questions
                pass
            limits = [len(q_ids[o]) for o in owner]
            stream = forward_prompts(eng, seqs, use_prefix_cache=True, prefix_limits=limits)
        else:
            stream = forward_prompts(eng, seqs, use_prefix_cache=False)
        rows = [None] * len(seqs)
        for k, first, h in tqdm(stream, total=len(seqs), desc="PRM", disable=not progress, leave=False):
            rows[k] = h[torch.tensor([p - first for p in tag_pos[k]], device=h.device)]
        hidden = torch.cat(rows) if rows else torch.empty(0, eng.mcfg.hidden_size, device=eng.device)
        step_cand = torch.tensor([i for i, t in enumerate(tag_pos) for _ in t], device=hidden.device)
        p_good, agg = self._score_hidden(hidden, step_cand, len(seqs))
        p_good, agg = p_good.tolist(), agg.tolist()
        out = [[] for _ in questions]
        i = 0
        for k, steps in enumerate(steps_of):
            n = len(steps)
            out[owner[k]].append(PRMScore(step_scores=p_good[i : i + n], score=agg[k], steps=steps))
            i += n
        return out

    def load_weights(self, named_tensors) -> set[str]:
        return self.engine.load_weights(named_tensors)

    def sleep(self, level: int = 1):
        """As LLM.sleep: free the device memory between scoring rounds (level 1 keeps the weights on the host)."""
        self.engine.sleep(level)

    def wake_up(self, tags: list[str] | None = None):
        self.engine.wake_up(tags)

    def is_sleeping(self) -> bool:
        return self.engine.is_sleeping()
