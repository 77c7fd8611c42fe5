"""The B-STaR loop: search, generate, reward and select, fine-tune, hand off, evaluate.

Each iteration t, with policy P(t-1), as the reference (hkust-nlp/B-STaR, train_bstar.sh) does it:
  1. temperature search (mode bstar): on a fixed random subset of training queries, sample K
     candidates per query at every temperature of a grid, grade and PRM-score them once, and take the
     temperature of the (temperature, threshold) pair with the best mean balance score (bstar.loop.search);
  2. generate N candidates per training query at that temperature;
  3. score = correctness + min step logit / 5 (a candidate without an answer step: -5); re-search the
     threshold on this full pool with the cap grown to target_per_query x queries, select with the best
     one (bstar.loop.search.search_threshold; other modes: their fixed threshold, the same cap rule);
  4. fine-tune on the selection for exactly train_steps optimizer steps of batch_size sequences,
     continuing the model, AdamW state and LR schedule (one warmup + cosine over all iterations) of the
     previous iteration (rest-em / star restart from the base model with a schedule of their own);
  5. hand the new weights to the live engine in process and evaluate.

Every iteration record carries the tokens it generated (search and pool; evaluation is not a cost of the
method) and trained on, and their running totals, so modes are compared at equal cost.

An iteration is the phases of PHASES, in order (iteration 0: ITERATION_0). Each phase commits atomically or
leaves nothing a resume mistakes for progress; the record in iterations.jsonl, written last, commits the
iteration (docs/resume.md, "Consistency model"). A run killed at any instant (SIGKILL included) resumes
from what was committed and, with the same seed, ends bit-identical to an uninterrupted run: every random
stream is derived from (run seed, iteration, phase[, query]), each sampling phase starts with cold prefix
caches (PRM scores do not depend on what an earlier phase left cached), and each iteration's trainer
continues the checkpoint (weights, optimizer, schedule step) that the previous iteration committed. The
fault-injection tests (tests/integration/test_resume_faults.py) kill a run at every point `kill_points` names.
Under torchrun every rank generates for its shard of the queries with its own engine;
training is FSDP2 across ranks; every rank's engine receives the new weights.
"""

import contextlib
import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch

from bstar.engine import LLM, PRM, SamplingParams
from bstar.engine.config import EngineConfig, resolve_device
from bstar.engine.model.loader import iter_weights
from bstar.errors import BStarError, DataError
from bstar.loop import run_dir
from bstar.loop.balance import mean_balance_score
from bstar.loop.config import RunConfig
from bstar.loop.memory import run_memory_plan, train_phase
from bstar.loop.memory_plan import DeviceMemory, MemoryPlan
from bstar.loop.metrics import greedy_accuracy, sample_metrics, step_auc, within_question_auc
from bstar.loop.rewards import grade_batch, has_final_answer, limited
from bstar.loop.search import SearchConfig, choose_subset, search_config, search_threshold, target_size
from bstar.loop.selection import BROKEN, BROKEN_PROB, Candidate, select
from bstar.loop.tasks import Example, format_prompt, load_task_examples
from bstar.loop.verifier import SIGMAS, StepVerifier, sigma_key
from bstar.train import SFTConfig, SFTExample, SFTTrainer
from bstar.train.checkpoint import STATE_DIR, atomic_replace
from bstar.utils import distributed as dist_utils
from bstar.utils import failpoint
from bstar.utils.jsonl import atomic_write_json, read_json, read_jsonl, temp_path, write_jsonl

_SEED_MASK = (1 << 62) - 1
REFERENCE_BETAS = (0.9, 0.999)  # the reference's AdamW (train_sft_step.py arguments)


def _seed(*parts) -> int:
    """A request seed from the run seed and where it is used (stable across processes)."""
    h = hashlib.sha256(json.dumps(parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & _SEED_MASK


class Phase(NamedTuple):
    name: str
    commits: str  # what commits it (docs/resume.md lists these)
    points: tuple[str, ...]  # its kill points in order (bstar.utils.failpoint): "start" ... "done"


# The sampling phases' points inside Controller._sample: after generation, after grading and PRM scoring.
_SAMPLING = ("sampled", "scored")

# One iteration, in order: the one source of the consistency model (docs/resume.md) and the kill points.
PHASES = (
    Phase("search", "iter_NNN/search.json", ("start", *_SAMPLING, "commit", "mid-write", "done")),
    Phase(
        "generate",
        "iter_NNN/candidates.jsonl (generate.json is written just before it)",
        ("start", *_SAMPLING, "commit", "mid-write", "done"),
    ),
    Phase("select", "nothing: recomputed from the pool; selection.json", ("start", "commit", "mid-write", "done")),
    Phase(
        "train",
        "policy/ swapped in whole: weights, AdamW state, schedule step and iteration.json together",
        ("start", "trained", "commit", "mid-write", "staged", "swap", "done"),
    ),
    Phase(
        "evaluate",
        "nothing: recomputed until the record commits (eval_samples.jsonl rewritten)",
        ("start", *_SAMPLING, "commit", "mid-write", "done"),
    ),
    Phase("record", "iterations.jsonl, the manifest: commits the iteration", ("start", "commit", "mid-write", "done")),
    Phase("report", "nothing: plots/ and report.md are redrawn on resume", ("start", "redraw", "done")),
)
ITERATION_0 = ("evaluate", "record", "report")  # the starting policy's evaluation
_PHASE = {p.name: p for p in PHASES}
POLICY_MARKER = "iteration.json"  # in policy/: the iteration whose train phase committed it, and its train info


def kill_points(iterations: int) -> list[str]:
    """Every named kill point of a run of `iterations` iterations, in order ("t<iteration>/<phase>:<point>")."""
    names = lambda t: ITERATION_0 if t == 0 else [p.name for p in PHASES]
    return [f"t{t}/{n}:{x}" for t in range(iterations + 1) for n in names(t) for x in _PHASE[n].points]


class TaskLabels:
    """What a task with a known solution structure can say about a response (the built-in task:
    bstar.embedded.task): true step labels and whether it is a valid solution, and distinct valid
    solutions of a query (its distinct correct styles)."""

    def __init__(self, step_labels, is_valid, distinct_valid):
        self.step_labels, self.is_valid, self.distinct_valid = step_labels, is_valid, distinct_valid


def builtin_labels() -> TaskLabels:
    from bstar.embedded import task

    return TaskLabels(task.step_labels, task.is_valid, task.distinct_valid)


class Controller:
    def __init__(
        self,
        cfg: RunConfig,
        out_dir: str,
        policy: str,
        base: str,
        prm: str | None,
        train: list[Example],
        test: list[Example],
        labels: TaskLabels | None = None,
        on_record: Callable[[str], object] | None = None,
        stop: run_dir.Stop | None = None,
    ):
        self.cfg, self.out, self.stop = cfg, Path(out_dir), stop
        self.on_record = on_record  # called with the run directory after each record (rank 0): the CLI redraws
        self.base, self.policy_dir = base, self.out / "policy"
        self.rank, self.world = dist_utils.world()
        self.train, self.test, self.labels = train, test, labels
        device = resolve_device(cfg.device)
        self.sleep = _sleeps(cfg, device)
        # before anything loads: the plan sizes both KV caches, or refuses (MemoryPlanError, one line)
        self.plan = self._memory_plan(device, policy, prm)
        kv = {}
        if self.plan is not None:
            if self.rank == 0 and cfg.progress:
                print(self.plan.table(), flush=True)
            kv = {name: self.plan.kv_cache_memory_bytes(name) for name in self.plan.engines}
        engine_kw = dict(dtype=cfg.dtype, device=cfg.device, num_kv_blocks=cfg.num_kv_blocks)
        self.llm = LLM(
            policy,
            seed=cfg.seed,
            kv_cache_memory_bytes=kv.get("policy"),
            async_scheduling=cfg.async_scheduling,
            **engine_kw,
        )
        self.tok = self.llm.get_tokenizer()
        if self.tok is None:
            raise BStarError(f"the policy {policy} has no tokenizer.json; B-STaR needs text")
        self.eos = sorted(self.llm.engine.eos_ids)
        self.prm = None
        if prm:
            self.prm = PRM(
                prm,
                aggregate=cfg.prm_aggregate,
                scale=cfg.prm_scale,
                kv_cache_memory_bytes=kv.get("prm"),
                **engine_kw,
            )
        # the reward selection reads: the PRM, or the built-in task's step verifier (cfg.verifier_noise)
        self.reward = self.prm
        if cfg.verifier_noise is not None:
            if labels is None:
                raise BStarError("--verifier-noise needs the built-in task's true step labels")
            self.reward = StepVerifier(labels.step_labels, cfg.verifier_noise, seed=cfg.seed)
        self._gen_tokens = 0
        self._grade_limited = 0  # this phase's answers whose grade a limit decided (rewards.limited)

    def _memory_plan(self, device, policy: str, prm: str | None) -> MemoryPlan | None:
        return memory_plan(self.cfg, device, policy, prm, self.world)

    # -- generation, grading, PRM -------------------------------------------------------------
    def _sample(self, examples: list[Example], idx: list[int], n: int, temperature: float, tag: str) -> list[dict]:
        """n graded (and PRM-scored) candidates for each example in `idx` (this rank's share):
        one record per query {"query": i, "texts", "token_ids", "correct", "prm", "step_scores"}."""
        if not idx:
            return []
        cfg = self.cfg
        prompts = [format_prompt(examples[i], cfg.prompt_template) for i in idx]
        params = [
            SamplingParams(
                n=n,
                temperature=temperature,
                max_tokens=cfg.max_tokens,
                stop=cfg.stop or None,
                seed=_seed(cfg.seed, tag, i),
            )
            for i in idx
        ]
        outs = self.llm.generate(prompts, params, use_tqdm=cfg.progress)
        failpoint.hit("sampled")
        self._gen_tokens += sum(len(c.token_ids) for o in outs for c in o.outputs)
        texts = [[c.text for c in o.outputs] for o in outs]
        flat = [t for ts in texts for t in ts]
        owner = [i for i in idx for _ in range(n)]
        correct = [False] * len(flat)
        for task in sorted({examples[i].task for i in idx}):  # one grading call per task
            ks = [k for k, i in enumerate(owner) if examples[i].task == task]
            stats: dict = {}
            res = grade_batch(
                [flat[k] for k in ks],
                [examples[owner[k]].gold_answer for k in ks],
                task,
                workers=0 if len(ks) < 512 or self.labels is not None else None,
                progress=cfg.progress,
                stats=stats,
            )
            self._grade_limited += limited(stats)
            for k, ok in zip(ks, res):
                correct[k] = ok
        prm_scores = [[0.0] * n for _ in idx]
        steps = [[[] for _ in range(n)] for _ in idx]
        if self.reward is not None:
            prm_scores, steps = self._reward_scores(self.reward, [examples[i] for i in idx], texts)
        failpoint.hit("scored")
        recs = []
        for k, (i, o) in enumerate(zip(idx, outs)):
            recs.append(
                {
                    "query": i,
                    "prompt_token_ids": o.prompt_token_ids,
                    "texts": texts[k],
                    "token_ids": [c.token_ids for c in o.outputs],
                    "correct": correct[k * n : (k + 1) * n],
                    "prm": prm_scores[k],
                    "step_scores": steps[k],
                }
            )
        return recs

    def _reward_scores(self, reward, examples: list[Example], texts: list[list[str]]):
        """(scores, step scores) per example and candidate from `reward` (a PRM or the step verifier); a
        candidate without a final answer gets at most BROKEN (the reference's reward for an unscorable one)."""
        scored = reward.score_batch([e.question for e in examples], texts, progress=self.cfg.progress)
        broken = BROKEN if self.cfg.prm_scale == "logit" else BROKEN_PROB
        scores = [
            [s.score if has_final_answer(t, e.task) else min(s.score, broken) for s, t in zip(qs, ts)]
            for e, qs, ts in zip(examples, scored, texts)
        ]
        return scores, [[s.step_scores for s in qs] for qs in scored]

    def _sample_all(self, examples, idx, n, temperature, tag) -> list[dict]:
        """All ranks' records for `idx`, in query order; self._gen_tokens counts all ranks' tokens."""
        before, limited_before = self._gen_tokens, self._grade_limited
        mine = self._sample(
            examples, [i for j, i in enumerate(idx) if j % self.world == self.rank], n, temperature, tag
        )
        limited_here = self._grade_limited - limited_before
        parts = dist_utils.all_gather_json({"recs": mine, "tokens": self._gen_tokens - before, "limited": limited_here})
        self._gen_tokens = before + sum(p["tokens"] for p in parts)
        self._grade_limited = limited_before + sum(p["limited"] for p in parts)
        return sorted((r for p in parts for r in p["recs"]), key=lambda r: r["query"])

    def _candidates(self, recs: list[dict]) -> list[list[Candidate]]:
        return [
            [Candidate(r["query"], t, bool(ok), float(p)) for t, ok, p in zip(r["texts"], r["correct"], r["prm"])]
            for r in recs
        ]

    def _golds(self, recs: list[dict]):
        if not self.cfg.include_gold:
            return None
        return [Candidate.gold(r["query"], self.train[r["query"]].gold_solution) for r in recs]

    def queries(self, t: int) -> list[int]:
        """Iteration t's training queries (indices into self.train, sorted): all of them, or with
        queries_per_iteration q the t-th block of q (fresh queries; it wraps around a set that runs out)."""
        n, q = len(self.train), self.cfg.queries_per_iteration
        if q is None:
            return list(range(n))
        return sorted({((t - 1) * q + j) % n for j in range(min(q, n))})

    def search_subset(self, t: int) -> list[int]:
        """The temperature search's queries: a seeded random subset of iteration t's queries (fixed over the
        run when every iteration trains on every query, as the reference's dev subset is)."""
        cfg = self.cfg
        qs = self.queries(t)
        seed = cfg.seed if cfg.queries_per_iteration is None else _seed(cfg.seed, "subset", t)
        return [qs[i] for i in choose_subset(len(qs), cfg.search_subset, seed)]

    def _search_config(self) -> SearchConfig:
        cfg = self.cfg
        return SearchConfig(
            temperatures=tuple(cfg.temperatures),
            thresholds=tuple(cfg.thresholds),
            k=cfg.search_k,
            n_star=cfg.n_star,
            subset_size=cfg.search_subset,
            target_per_query=cfg.search_target_per_query,
            max_per_query=cfg.max_per_query,
            prm_divisor=cfg.prm_divisor,
        )

    # -- phases -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _phase(self, t: int, name: str):
        """Phase `name` of iteration t: its kill points' scope; the sampling phases start with cold prefix
        caches (so that a phase redone after a resume scores in the same batches, from the same cache state,
        as the uninterrupted run: bit-identical PRM scores); a stop request is honoured once it committed."""
        if name not in _PHASE:
            raise AssertionError(f"phase {name!r} is not in PHASES (the consistency model and the fault tests)")
        if "sampled" in _PHASE[name].points:
            self.llm.reset_prefix_cache()
            if self.prm is not None:
                self.prm.engine.reset_prefix_cache()
        with failpoint.scope(f"t{t}/{name}"):
            failpoint.hit("start")
            yield
            failpoint.hit("done")
        if self.stop is not None:
            self.stop.check(f"iteration {t}'s {name} phase")

    def _phase_file(self, t: int, name: str) -> Path:
        d = self.out / f"iter_{t:03d}"
        d.mkdir(parents=True, exist_ok=True)
        return d / name

    def search(self, t: int) -> dict:
        """The sampling temperature of iteration t (mode bstar: searched on the subset)."""
        cfg = self.cfg
        path = self._phase_file(t, "search.json")
        if path.exists():
            return read_json(path)
        t0, self._gen_tokens, self._grade_limited = time.perf_counter(), 0, 0
        if cfg.mode != "bstar":
            res = {"temperature": cfg.temperature}
        else:
            subset = self.search_subset(t)
            samples = {
                temp: self._candidates(self._sample_all(self.train, subset, cfg.search_k, temp, f"search-{t}-{temp}"))
                for temp in cfg.temperatures
            }
            golds = self._golds([{"query": i} for i in subset])
            r = search_config(samples, self._search_config(), golds=golds)
            res = {
                "temperature": r.temperature,
                "threshold": r.threshold,  # the subset's best threshold: recorded, not used (reference)
                "balance_score": r.balance_score,
                "cap": r.cap,
                "table": [asdict(row) for row in r.table],
            }
        res["time_s"] = time.perf_counter() - t0
        res["gen_tokens"] = self._gen_tokens
        res["grade_limited"] = self._grade_limited
        res["tokens_per_s"] = self._gen_tokens / max(res["time_s"], 1e-9)
        failpoint.hit("commit")
        if self.rank == 0:
            atomic_write_json(path, res)
        dist_utils.barrier()
        return res

    def generate(self, t: int, temperature: float) -> tuple[list[dict], dict]:
        path = self._phase_file(t, "candidates.jsonl")
        if path.exists():
            return read_jsonl(path), read_json(self._phase_file(t, "generate.json"))
        t0, self._gen_tokens, self._grade_limited = time.perf_counter(), 0, 0
        recs = self._sample_all(self.train, self.queries(t), self.cfg.num_samples, temperature, f"generate-{t}")
        if self.cfg.rationalize and self.cfg.mode == "star":
            recs = self._rationalize(t, recs)
        dt = time.perf_counter() - t0
        info = {"time_s": dt, "gen_tokens": self._gen_tokens, "tokens_per_s": self._gen_tokens / max(dt, 1e-9)}
        info["grade_limited"] = self._grade_limited
        failpoint.hit("commit")
        if self.rank == 0:
            atomic_write_json(self._phase_file(t, "generate.json"), info)
            write_jsonl(str(path), recs)
        dist_utils.barrier()
        return recs, info

    def _rationalize(self, t: int, recs: list[dict]) -> list[dict]:
        """STaR rationalisation: unsolved queries are retried with the answer as a hint; a
        correct rationale is trained on with the original prompt."""
        unsolved = [r["query"] for r in recs if not any(r["correct"])]
        if not unsolved:
            return recs
        hinted = [
            dataclasses.replace(e, question=f"{e.question} (Hint: the answer is {e.gold_answer}.)") for e in self.train
        ]
        extra = {r["query"]: r for r in self._sample_all(hinted, unsolved, 1, 0.0, f"rationalize-{t}")}
        for r in recs:
            x = extra.get(r["query"])
            if x and x["correct"][0]:
                r["texts"].append(x["texts"][0])
                r["token_ids"].append(x["token_ids"][0])
                r["correct"].append(True)
                r["prm"].append(x["prm"][0])
                r["step_scores"].append(x["step_scores"][0])
        return recs

    def select(self, recs: list[dict]) -> tuple:
        """(selection, info): mode bstar re-searches the threshold on the full pool (reference
        metric_modiacc_auto.py); the other modes use their fixed threshold. Every mode grows the cap to the
        same target size (star: one per query)."""
        cfg = self.cfg
        groups, golds = self._candidates(recs), self._golds(recs)
        if cfg.mode == "online-rft-answer":  # the answer check alone: the reward does not enter the score
            groups = [[dataclasses.replace(c, prm=0.0) for c in g] for g in groups]
        info = {}
        if cfg.mode == "bstar":
            r = search_threshold(groups, self._search_config(), golds=golds, target_per_query=cfg.target_per_query)
            threshold = r.threshold
            info["table"] = [asdict(row) for row in r.table]
        else:
            threshold = cfg.threshold
        if cfg.mode == "star":
            kw = {"max_per_query": 1}
        elif cfg.max_per_query is not None:
            kw = {"max_per_query": cfg.max_per_query}
        else:
            kw = {"target_size": target_size(cfg.target_per_query, len(groups))}
        sel = select(groups, threshold, golds=golds, prm_divisor=cfg.prm_divisor, **kw)
        info.update(threshold=threshold, cap=sel.cap, balance_score=mean_balance_score(sel.per_query, cfg.n_star))
        return sel, info

    def _sft_examples(self, recs: list[dict], selection) -> list:
        """Selected candidates as token-level SFT examples: the exact prompt and completion ids."""
        by_query = {r["query"]: r for r in recs}
        out = []
        for c in selection.selected:
            r = by_query[c.query_id]
            if c.is_gold:
                ids = self.tok.encode(c.text, add_special_tokens=False) + self.eos[:1]
            else:
                ids = r["token_ids"][r["texts"].index(c.text)]
            if ids:
                out.append(
                    SFTExample(tuple(r["prompt_token_ids"]) + tuple(ids), len(r["prompt_token_ids"]), len(out) + 1)
                )
        return out

    def _sft_config(self, t: int) -> SFTConfig:
        metrics = str(self._phase_file(t, "train_metrics.jsonl")) if self.rank == 0 else None
        return sft_config(self.cfg, t, metrics)

    def _policy_marker(self) -> dict | None:
        """policy/iteration.json: {"iteration": the iteration whose train phase committed the policy, "train":
        that phase's info}; None before the first commit."""
        path = self.policy_dir / POLICY_MARKER
        return read_json(path) if path.exists() else None

    def train_policy(self, t: int, examples: list) -> dict:
        """Fine-tune for train_steps steps; commit the policy checkpoint (weights, optimizer state, schedule
        step and the iteration marker, swapped in as one directory); hand the weights to the engine."""
        marker = self._policy_marker()
        held = marker and marker["iteration"]
        if held == t:  # committed before a kill: the engine loaded the policy dir at start
            info = marker.get("train") or read_json(self._phase_file(t, "train.json"))
            self.llm.load_weights(iter_weights(str(self.policy_dir)))
        elif (held or 0) != t - 1:
            raise BStarError(f"{self.policy_dir} holds iteration {held}'s policy, not iteration {t - 1}'s")
        else:
            info = self._train(t, examples)
        if self.rank == 0:
            atomic_write_json(self._phase_file(t, "train.json"), info)  # a copy for readers; the marker commits
        dist_utils.barrier()
        return info

    def _train(self, t: int, examples: list) -> dict:
        cfg = self.cfg
        carry = not cfg.restart_from_base and (self.policy_dir / STATE_DIR / "state.json").exists()
        start = str(self.policy_dir) if carry else self.base
        t0 = time.perf_counter()
        info = {"examples": len(examples), "steps": 0, "final_loss": None, "train_tokens": 0, "lr_last": None}
        metrics = self._phase_file(t, "train_metrics.jsonl")
        if metrics.exists() and self.rank == 0:
            metrics.unlink()  # a killed earlier attempt of this phase
        marker = lambda: json.dumps({"iteration": t, "train": info}, indent=1)
        if examples:
            # engines asleep (weights in host memory, KV freed) while the trainer holds the device; the
            # trainer is freed before they wake (bstar.loop.memory.train_phase)
            with self._train_phase() as phase:
                trainer = SFTTrainer(start, self._sft_config(t))
                result = trainer.train(examples, continue_from=start if carry else None)
                failpoint.hit("trained")
                tokens = sum(m["tokens"] for m in result.metrics)
                info.update(
                    steps=len(result.losses),
                    global_step=trainer.step_offset + trainer.step,
                    final_loss=result.losses[-1] if result.losses else None,
                    train_tokens=tokens,
                    lr_last=result.metrics[-1]["lr"] if result.metrics else None,
                    tokens_per_s=tokens / max(time.perf_counter() - t0, 1e-9),
                    time_s=time.perf_counter() - t0,
                )
                failpoint.hit("commit")
                # weights, AdamW state, schedule step and the marker: one directory, swapped in whole
                trainer.save(self.policy_dir, trainer_state=True, extra_files={POLICY_MARKER: marker()})
                if phase is not None:  # in process: no disk round trip
                    phase.hand_off("policy", trainer.named_weights())
                else:
                    self.llm.load_weights(trainer.named_weights())
                del trainer
            return info
        # nothing selected: the policy (and its optimizer state) stays as it is
        info["time_s"] = time.perf_counter() - t0
        failpoint.hit("commit")
        if self.rank == 0:
            if start != str(self.policy_dir):  # the base model becomes the policy
                tmp = Path(temp_path(self.policy_dir))
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(start, tmp)
                (tmp / POLICY_MARKER).write_text(marker())
                atomic_replace(tmp, self.policy_dir)
            else:
                atomic_write_json(self.policy_dir / POLICY_MARKER, json.loads(marker()))
        dist_utils.barrier()
        self.llm.load_weights(iter_weights(str(self.policy_dir)))
        return info

    def _train_phase(self):
        if not self.sleep:
            return contextlib.nullcontext()
        engines = {"policy": self.llm} if self.prm is None else {"policy": self.llm, "prm": self.prm}
        return train_phase(engines)

    def _truth(self, examples: list[Example], recs: list[dict], prefix: str) -> dict:
        """Metrics that need true step labels (the built-in task): the PRM's step AUC against them, the
        share of answer-correct samples with a bad step (false positives for the reward to filter), and
        distinct valid solutions (styles) per query."""
        if self.labels is None:
            return {}
        lab = [[self.labels.step_labels(examples[r["query"]].question, x) for x in r["texts"]] for r in recs]
        out = {}
        if self.reward is not None:
            scores = [s for r in recs for s in r["step_scores"]]
            out[f"{prefix}prm_step_auc"] = step_auc(scores, [x for q in lab for x in q])
        correct = [(ok, all(ls)) for r, q in zip(recs, lab) for ok, ls in zip(r["correct"], q)]
        right = [valid for ok, valid in correct if ok]
        out[f"{prefix}false_positive_rate"] = (1 - sum(right) / len(right)) if right else None
        out[f"{prefix}distinct_styles"] = sum(
            self.labels.distinct_valid(examples[r["query"]].question, r["texts"]) for r in recs
        ) / max(1, len(recs))
        return out

    def _reward_axis(self, sampled: list[dict]) -> dict:
        """With true step labels (the built-in task): the within-question AUC against answer correctness of the
        learned PRM and of the step verifier at every noise level of verifier.SIGMAS, on the same eval samples:
        where the learned PRM sits on the reliability axis, iteration by iteration."""
        if self.labels is None or not sampled:
            return {}
        correct = [r["correct"] for r in sampled]
        examples = [self.test[r["query"]] for r in sampled]
        texts = [r["texts"] for r in sampled]
        out = {}
        if self.prm is not None:
            learned = [r["prm"] for r in sampled]
            if self.reward is not self.prm:
                learned, _ = self._reward_scores(self.prm, examples, texts)
            out["learned_prm_within_auc"] = within_question_auc(correct, learned)[0]
        for sigma in SIGMAS:
            verifier = StepVerifier(self.labels.step_labels, sigma, seed=self.cfg.seed)
            out[sigma_key(sigma)] = within_question_auc(correct, self._reward_scores(verifier, examples, texts)[0])[0]
        return out

    def evaluate(self, t: int) -> dict:
        """Greedy accuracy on all eval queries; Pass@1 / Pass@K / Reward@K / exploration and the PRM's
        quality from eval_k samples of the first eval_sample_queries."""
        cfg = self.cfg
        t0, self._gen_tokens, self._grade_limited = time.perf_counter(), 0, 0
        idx = list(range(len(self.test)))
        if 0 < t < cfg.iterations and cfg.mid_eval_queries:
            idx = idx[: cfg.mid_eval_queries]
        greedy = self._sample_all(self.test, idx, 1, 0.0, f"eval-greedy-{t}")
        sampled_idx = idx[: cfg.eval_sample_queries] if cfg.eval_sample_queries else idx
        sampled = self._sample_all(self.test, sampled_idx, cfg.eval_k, cfg.eval_temperature, f"eval-sample-{t}")
        m = {
            "greedy_acc": greedy_accuracy([r["correct"][0] for r in greedy]),
            "eval_greedy_queries": len(greedy),
            "eval_sampled_queries": len(sampled),
        }
        m.update(
            sample_metrics(
                [r["correct"] for r in sampled],
                [r["prm"] for r in sampled] if self.reward is not None else None,
                [r["texts"] for r in sampled],
                cfg.eval_k,
            )
        )
        m.update(self._truth(self.test, sampled, ""))
        m.update(self._reward_axis(sampled))
        m["eval_grade_limited"] = self._grade_limited
        m["eval_time_s"] = time.perf_counter() - t0
        m["eval_tokens_per_s"] = self._gen_tokens / max(m["eval_time_s"], 1e-9)
        failpoint.hit("commit")
        if self.rank == 0:
            rows = [dict(r, kind="greedy") for r in greedy] + [dict(r, kind="sampled") for r in sampled]
            write_jsonl(str(self._phase_file(t, "eval_samples.jsonl")), rows)
        return m

    # -- the loop -----------------------------------------------------------------------------
    def completed(self) -> list[dict]:
        path = self.out / "iterations.jsonl"
        return read_jsonl(path) if path.exists() else []

    def _record(self, t: int, rec: dict):
        """The record phase (iterations.jsonl, the manifest: it commits iteration t), then the report."""
        # answers whose grade a limit decided, over the iteration's phases (search, generate, evaluate)
        rec["grade_limited"] = sum(v for k, v in rec.items() if k.endswith("_grade_limited"))
        with self._phase(t, "record"):
            failpoint.hit("commit")
            if self.rank == 0:
                write_jsonl(str(self.out / "iterations.jsonl"), self.completed() + [rec])
            dist_utils.barrier()
        self._print(rec)
        self._report(t)

    def _report(self, t: int):
        with self._phase(t, "report"):
            failpoint.hit("redraw")
            if self.rank == 0 and self.on_record is not None:
                self.on_record(str(self.out))
            dist_utils.barrier()

    def run(self) -> list[dict]:
        cfg = self.cfg
        done = self.completed()
        if done:  # a resume: a redraw that a kill interrupted is redone
            self._report(done[-1]["iteration"])
        else:  # iteration 0: the starting policy
            rec = {"iteration": 0, "mode": cfg.mode, "seed": cfg.seed, "gen_tokens_total": 0, "train_tokens_total": 0}
            with self._phase(0, "evaluate"):
                rec.update(self.evaluate(0))
            self._record(0, rec)
        for t in range(len(self.completed()), cfg.iterations + 1):
            self._iteration(t, self.completed()[-1])
        return self.completed()

    def _iteration(self, t: int, prev: dict):
        """Iteration t's phases (PHASES), given the previous iteration's record."""
        cfg = self.cfg
        rec = {"iteration": t, "mode": cfg.mode, "seed": cfg.seed}
        with self._phase(t, "search"):
            s = self.search(t)
        rec.update(
            temperature=s["temperature"],
            search_threshold=s.get("threshold"),
            search_balance_score=s.get("balance_score"),
            search_cap=s.get("cap"),
            search_gen_tokens=s["gen_tokens"],
            search_grade_limited=s.get("grade_limited", 0),
            search_time_s=s["time_s"],
            search_tokens_per_s=s["tokens_per_s"],
        )
        with self._phase(t, "generate"):
            recs, g = self.generate(t, s["temperature"])
        rec.update(
            generate_gen_tokens=g["gen_tokens"],
            generate_grade_limited=g.get("grade_limited", 0),
            generate_time_s=g["time_s"],
            generate_tokens_per_s=g["tokens_per_s"],
        )
        with self._phase(t, "select"):
            t0 = time.perf_counter()
            sel, si = self.select(recs)
            rec.update(
                threshold=si["threshold"],
                cap=si["cap"],
                balance_score=si["balance_score"],
                selected_size=sel.size,
                selected_acc=sel.accuracy,
                select_time_s=time.perf_counter() - t0,
                train_frac_any_correct=sum(any(r["correct"]) for r in recs) / max(1, len(recs)),
            )
            failpoint.hit("commit")
            if self.rank == 0 and "table" in si:
                table = {k: si[k] for k in ("threshold", "cap", "table")}
                atomic_write_json(self._phase_file(t, "selection.json"), table)
        if self.reward is not None:
            auc, _ = within_question_auc([r["correct"] for r in recs], [r["prm"] for r in recs])
            rec["pool_prm_within_auc"] = auc
        rec.update(self._truth(self.train, recs, "pool_"))
        if self.labels is not None and sel.size:
            rec["selected_valid"] = sum(
                self.labels.is_valid(self.train[c.query_id].question, c.text) for c in sel.selected
            ) / len(sel.selected)
        with self._phase(t, "train"):
            tr = self.train_policy(t, self._sft_examples(recs, sel))
        rec.update(
            train_time_s=tr["time_s"],
            train_steps=tr["steps"],
            train_loss=tr["final_loss"],
            train_lr_last=tr.get("lr_last"),
            train_tokens=tr.get("train_tokens", 0),
            train_tokens_per_s=tr.get("tokens_per_s"),
        )
        rec["gen_tokens"] = rec["search_gen_tokens"] + rec["generate_gen_tokens"]
        rec["gen_tokens_total"] = prev.get("gen_tokens_total", 0) + rec["gen_tokens"]
        rec["train_tokens_total"] = prev.get("train_tokens_total", 0) + rec["train_tokens"]
        with self._phase(t, "evaluate"):
            rec.update(self.evaluate(t))
        self._record(t, rec)

    def _print(self, rec: dict):
        if self.rank != 0 or not self.cfg.progress:
            return
        keys = (
            "iteration",
            "greedy_acc",
            "pass_at_1",
            "pass_at_k",
            "reward_at_k",
            "distinct_styles",
            "prm_within_auc",
            "temperature",
            "threshold",
            "cap",
            "balance_score",
            "selected_size",
            "selected_acc",
        )
        cells = []
        for k in keys:
            v = rec.get(k)
            if v is not None:
                cells.append(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}")
        print("  ".join(cells), flush=True)


def sft_config(cfg: RunConfig, t: int, metrics_path: str | None = None) -> SFTConfig:
    """Iteration t's trainer config (its data order's seed from (run seed, t)); metrics to metrics_path."""
    return SFTConfig(
        lr=cfg.lr,
        steps=cfg.train_steps,
        schedule_steps=cfg.train_steps if cfg.restart_from_base else cfg.train_steps * cfg.iterations,
        batch_examples=cfg.batch_size,
        micro_batch_tokens=max(4096, cfg.max_seq_len),
        max_seq_len=cfg.max_seq_len,
        warmup_ratio=cfg.warmup_ratio,
        min_lr_ratio=cfg.min_lr_ratio,
        betas=REFERENCE_BETAS,
        seed=_seed(cfg.seed, "train", t) % (1 << 31),
        progress=cfg.progress,
        metrics_path=metrics_path,
        device=None if cfg.device == "auto" else cfg.device,
        offload_optimizer=cfg.offload_optimizer,
    )


def _sleeps(cfg: RunConfig, device: torch.device) -> bool:
    """Whether the engines sleep while the trainer holds the device."""
    return cfg.sleep_engines == "on" or (cfg.sleep_engines == "auto" and device.type == "cuda")


def memory_plan(cfg: RunConfig, device: torch.device, policy: str, prm: str | None, world: int) -> MemoryPlan | None:
    """The run's memory plan on a CUDA device (None elsewhere), or MemoryPlanError (one line) when the run
    cannot fit: policy and PRM engines with their defaults, the trainer as sft_config builds it, engines
    asleep while training when they sleep. Pure: it reads the checkpoints' configs, writes nothing."""
    mem = device_memory(device)
    if mem is None:
        return None
    e = EngineConfig()
    return run_memory_plan(
        policy,
        prm,
        device=mem,
        sft=sft_config(cfg, 1),
        dtype=cfg.dtype,
        max_num_seqs=e.max_num_seqs,
        max_num_batched_tokens=e.max_num_batched_tokens,
        sleep=_sleeps(cfg, device),
        world_size=world,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
    )


# -- entry points ---------------------------------------------------------------------------


def _load_data(cfg: RunConfig) -> tuple[list[Example], list[Example]]:
    if not cfg.train_data:
        raise DataError("--train-data is required with --model")
    train = load_task_examples(cfg.train_data)
    test = load_task_examples(cfg.eval_data) if cfg.eval_data else []
    train, test = _limit(cfg, train, test)
    if not test:
        raise DataError("--eval-data is required (and must hold at least one example)")
    return train, test


def _limit(cfg: RunConfig, train: list[Example], test: list[Example]) -> tuple[list[Example], list[Example]]:
    """The first max_train_queries / max_eval_queries of each split (the built-in task's too)."""
    return train[: cfg.max_train_queries or None], test[: cfg.max_eval_queries or None]


def _writable_dir(out: str) -> None:
    try:
        p = Path(out)
        p.mkdir(parents=True, exist_ok=True)
        probe = Path(temp_path(p / "write-test"))
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise BStarError(f"cannot write to out dir {out}: {e.strerror or e}") from None


def _check_resumable(out: str) -> None:
    if not (Path(out) / "config.json").exists():
        raise BStarError(f"cannot resume: {out} holds no run (no config.json)")


def check_inputs(cfg: RunConfig) -> tuple[list[Example], list[Example]] | None:
    """What a new run reads, checked before its directory is made: the device, the checkpoints' configs,
    (with --model) the data files, which it returns, and on a GPU the memory need against the device."""
    from bstar.engine.config import ModelConfig, resolve_device

    device = resolve_device(cfg.device)
    for path in (cfg.model, cfg.prm):
        if path is not None:
            if not Path(path).is_dir():
                raise BStarError(f"model directory {path} does not exist")
            ModelConfig.from_dir(path)
    data = None if cfg.model is None else _load_data(cfg)
    if device_memory(device) is not None:  # the memory need against the device (MemoryPlanError: one line)
        memory_plan(cfg, device, *_models(cfg), dist_utils.world()[1])
    return data


def _models(cfg: RunConfig) -> tuple[str, str | None]:
    """(starting policy, PRM) checkpoint dirs of a new run: --model / --prm, or the built-in task's (built
    into the cache, outside any run directory, when not there yet)."""
    if cfg.model is not None:
        return cfg.model, cfg.prm
    from bstar.embedded import EmbeddedConfig, build_assets

    assets = build_assets(EmbeddedConfig.preset(cfg.embedded_preset), progress=cfg.progress)
    return str(assets.policy_path), str(assets.prm_path)


def prepare_out_dir(out: str, cfg: RunConfig | None, resume: bool) -> RunConfig:
    """Create (or, with resume, reopen) a run directory; returns the run's config."""
    p = Path(out)
    cfg_file = p / "config.json"
    if resume:
        _check_resumable(out)
        return RunConfig.from_json(str(cfg_file))
    _writable_dir(out)
    if cfg_file.exists() and (p / "iterations.jsonl").exists():
        raise BStarError(f"{out} already holds a run; use --resume {out} to continue it, or another --out")
    rank, _ = dist_utils.world()
    if rank == 0:
        atomic_write_json(cfg_file, asdict(cfg))
    dist_utils.barrier()
    return cfg


def run(
    cfg: RunConfig | None, out: str, resume: bool = False, on_record: Callable[[str], object] | None = None
) -> list[dict]:
    """Run (or, with resume, continue) a whole B-STaR run in `out`; returns the per-iteration records. The run
    holds the directory (bstar.loop.run_dir: one writer, recovery after a kill, SIGINT / SIGTERM stop it
    between phases with run_dir.RunStopped). on_record(out) is the report phase's work after each record (the
    CLI redraws plots/ and report.md with bstar.results.report.redraw)."""
    dist_utils.init_from_env()
    data = None
    if resume:
        _check_resumable(out)
    else:
        data = check_inputs(cfg)  # before anything is written under out
        _writable_dir(out)
    with run_dir.open_run(out) as stop:
        cfg = prepare_out_dir(out, cfg, resume)
        return _run(cfg, out, stop, on_record, data)


def _run(cfg: RunConfig, out: str, stop: run_dir.Stop, on_record=None, data=None) -> list[dict]:
    from bstar.embedded import EmbeddedConfig, build_assets, fresh_queries

    labels = None
    if cfg.model is None:
        # Tiny models on a small CPU: one thread avoids OpenMP overhead that costs more than it saves.
        if cfg.device in ("auto", "cpu") and not torch.cuda.is_available():
            torch.set_num_threads(1)
        ecfg = EmbeddedConfig.preset(cfg.embedded_preset)
        assets = build_assets(ecfg, progress=cfg.progress)
        policy_base, prm = str(assets.policy_path), str(assets.prm_path)
        train = assets.train
        if cfg.queries_per_iteration:  # a pool of new questions, none seen twice
            train = fresh_queries(ecfg, cfg.iterations * cfg.queries_per_iteration, cfg.seed)
        train, test = _limit(cfg, train, assets.test)
        labels = builtin_labels()
    else:
        policy_base, prm = cfg.model, cfg.prm
        train, test = data or _load_data(cfg)
    policy_dir = Path(out) / "policy"
    start = str(policy_dir) if (policy_dir / "config.json").exists() else policy_base
    ctl = Controller(cfg, out, start, policy_base, prm, train, test, labels, on_record=on_record, stop=stop)
    return ctl.run()


def device_memory(device: torch.device) -> DeviceMemory | None:
    """What the memory plan plans on: a CUDA device's memory now, None for the CPU (no plan there)."""
    return DeviceMemory.of(device) if device.type == "cuda" else None
