"""RunConfig: everything a B-STaR run depends on (saved as config.json in the run directory), and the
built-in task's run settings. Light to import: the command line builds one before anything heavy loads."""

import dataclasses
import json
import math
import typing
from dataclasses import dataclass

from bstar.engine.choices import DTYPE_NAMES
from bstar.errors import BStarError
from bstar.loop.search import MAX_GRID, REFERENCE_TEMPERATURES, REFERENCE_THRESHOLDS, format_grid, grid, parse_grid
from bstar.loop.selection import PRM_DIVISOR, PRM_SCALES
from bstar.loop.tasks import DEFAULT_PROMPT, check_template
from bstar.utils.settings import check_settings, field_type, setting

# online-rft: a fixed temperature and the same reward at a fixed threshold; online-rft-answer: the answer check
# alone (RFT's rule: every right answer, no reward); rest-em and star restart from the base model each iteration
MODES = ("bstar", "online-rft", "online-rft-answer", "rest-em", "star")
SLEEP_ENGINES = ("auto", "on", "off")
EMBEDDED_PRESETS = ("default", "tiny")  # sizes of the built-in task: bstar.embedded.EmbeddedConfig.preset
DTYPES = ("auto", *DTYPE_NAMES)


@dataclass
class RunConfig:
    """Everything a run depends on; saved as config.json in the run directory.

    Defaults are the reference's (hkust-nlp/B-STaR) where it has one; the embedded default scales
    them down (see embedded_run_config). Each field's help is its `bstar-engine run` option's (bstar.cli.options)."""

    mode: str = setting(
        "bstar",
        "bstar: the temperature and threshold searched every iteration; or a baseline with a fixed configuration.",
        choices=MODES,
    )
    model: str | None = setting(None, "Policy checkpoint (HF dir).", unset="the built-in task and models")
    prm: str | None = setting(None, "PRM checkpoint (HF dir).", unset="none: selection by correctness alone")
    train_data: str | None = setting(None, "Training queries, JSONL (GSM8K or MATH format); needs --model.")
    eval_data: str | None = setting(None, "Evaluation queries, JSONL (GSM8K or MATH format); needs --model.")
    prompt_template: str = setting(DEFAULT_PROMPT, "Prompt around each query; holds exactly the field {question}.")
    iterations: int = setting(5, "Iterations of sample, score, select, train.", low=1)
    seed: int = setting(0, "Seed of the run's random streams (sampling, subsets, shuffles).")
    max_train_queries: int | None = setting(None, "Use only the first N training queries.", unset="all", low=1)
    max_eval_queries: int | None = setting(None, "Use only the first N evaluation queries.", unset="all", low=1)
    # fresh queries: nothing is seen twice while the set lasts (then it wraps around); the built-in task draws a
    # pool of iterations x q new questions from its generator
    queries_per_iteration: int | None = setting(
        None,
        "Fresh queries: iteration t trains on the t-th block of this many training queries.",
        unset="every query, every iteration (the reference)",
        low=1,
    )
    # generation
    num_samples: int = setting(64, "N candidates per training query.", low=1)
    max_tokens: int = setting(768, "Most tokens generated per candidate.", low=1)
    stop: list[str] = setting(help="Stop string of generation (repeatable).", factory=list)
    # configuration search (mode bstar): the temperature from a subset, then the threshold and cap
    # re-searched on the full pool (bstar.loop.search)
    temperatures: list[float] = setting(
        help="Temperature search grid (mode bstar), start:stop:step or a comma-separated list.",
        factory=lambda: list(REFERENCE_TEMPERATURES),
        parse=parse_grid,
        show=format_grid,
    )
    thresholds: list[float] = setting(
        help="Threshold search grid (mode bstar), start:stop:step or a comma-separated list.",
        factory=lambda: list(REFERENCE_THRESHOLDS),
        parse=parse_grid,
        show=format_grid,
    )
    search_k: int = setting(64, "K samples per query and temperature in the search.", low=1)
    search_subset: int = setting(1000, "Training queries in the temperature search's subset.", low=1)
    n_star: int = setting(8, "n*: correct candidates per query at which the balance score saturates.", low=1)
    search_target_per_query: float | None = setting(  # the reference: 3,550 / 1,000
        3.55, "Subset selection's target size per query (off with --max-per-query)."
    )
    # training set, every mode: the cap M grown until target_per_query x queries are selected (the
    # reference: 67,500 / 7,500 = 9); or a fixed max_per_query (then both targets are off)
    target_per_query: float | None = setting(
        9.0, "Training set target size per query: the cap M grows until it is reached (off with --max-per-query)."
    )
    max_per_query: int | None = setting(
        None, "A fixed cap M of selected candidates per query, instead of the target sizes.", unset="none", low=1
    )
    # fixed configuration (online-rft, rest-em, star)
    temperature: float = setting(1.0, "Fixed temperature (online-rft, rest-em, star).")
    # score = correct + min step logit / 5: correct ones above -5, wrong ones above 0
    threshold: float = setting(
        0.0, "Fixed score threshold (online-rft, rest-em, star); score = correct + PRM / divisor."
    )
    include_gold: bool = setting(True, "Add the gold solution as a candidate (as the reference does).")
    rationalize: bool = setting(False, "STaR rationalisation: retry unsolved queries with the answer as a hint.")
    prm_aggregate: str = setting("min", "How the PRM's step scores make one (min, last, prod or mean).")
    prm_scale: str = setting(
        "logit", "The PRM value: its aggregate step logit (the reference), or prob: P(good).", choices=PRM_SCALES
    )
    prm_divisor: float = setting(PRM_DIVISOR, "score = correct + PRM value / divisor.")
    # bstar.loop.verifier: true step labels, each step's logit +-3 plus Gaussian noise of scale sigma
    verifier_noise: float | None = setting(
        None,
        "Built-in task: select with the step verifier (true step labels read through Gaussian noise of this scale; "
        "0 is an oracle, 16 near chance) instead of the learned PRM.",
        unset="the learned PRM",
    )
    # evaluation
    eval_k: int = setting(16, "Samples per evaluation query for Pass@K, Reward@K and diversity.", low=1)
    eval_temperature: float = setting(1.0, "Temperature of the evaluation's K samples.")
    eval_sample_queries: int | None = setting(
        None, "The first N evaluation queries get the K samples.", unset="all", low=1
    )
    # Evaluation is most of a small run's cost, and the curves' end points are what the intervals are reported
    # for: the starting policy and the final one always get the full evaluation
    mid_eval_queries: int | None = setting(
        None, "Evaluation queries (the first N) between the first and the last iteration.", unset="all", low=1
    )
    # training: train_steps optimizer steps of batch_size sequences per iteration in every mode; model,
    # AdamW state and one warmup + cosine schedule (iterations x train_steps long) carried across
    # iterations (the reference: 500 steps of 128, lr 4.12e-6 -> 2e-7)
    train_steps: int = setting(500, "Optimizer steps per iteration (every mode).", low=1)
    batch_size: int = setting(128, "Sequences per optimizer step.", low=1)
    lr: float = setting(4.12e-6, "Peak LR of the run's one warmup + cosine schedule.")
    min_lr_ratio: float = setting(2e-7 / 4.12e-6, "The cosine's floor, as a fraction of --lr.")
    # the reference: 0.2 epoch of its 9-epoch horizon
    warmup_ratio: float = setting(0.022, "Linear warmup, as a fraction of the whole run's schedule.")
    max_seq_len: int = setting(2048, "Longest training sequence (prompt and completion), in tokens.", low=2)
    restart_from_base: bool | None = setting(
        None, "Train every iteration from the base model, on a schedule of its own.", unset="on for rest-em and star"
    )
    # engine and device memory (bstar.loop.memory): on CUDA the run's memory plan sizes both engines' KV caches
    # within gpu_memory_utilization of the device and refuses, before loading anything, a phase that cannot fit
    dtype: str = setting("auto", "Weights and compute dtype of the engines.", choices=DTYPES)
    device: str = setting("auto", "auto, cpu, cuda or cuda:N.")
    num_kv_blocks: int | None = setting(
        None, "A fixed KV budget per engine, in blocks (overrides the memory plan's).", unset="the memory plan's", low=1
    )
    gpu_memory_utilization: float = setting(
        0.9, "Share of the GPU the run may use (policy, PRM and trainer; the memory plan splits it)."
    )
    sleep_engines: str = setting(
        "auto", "Policy and PRM asleep while the trainer runs (auto: on CUDA).", choices=SLEEP_ENGINES
    )
    offload_optimizer: bool = setting(  # FSDP2 CPUOffloadPolicy
        False, "AdamW state and master weights in host memory (a 7B policy on one 80 GB GPU)."
    )
    async_scheduling: bool = setting(
        False, "Generation steps launched before the previous step's tokens reach the host (the same samples)."
    )
    progress: bool = setting(True, "Progress bars.")
    embedded_preset: str = setting(
        "default",
        "Built-in task size (without --model): 'tiny' builds in seconds, a smoke test whose models learn little.",
        choices=EMBEDDED_PRESETS,
    )

    def __post_init__(self):
        self._check_types()
        if self.embedded_preset not in EMBEDDED_PRESETS:
            raise BStarError(
                f"unknown embedded preset {self.embedded_preset!r}; choose one of {', '.join(EMBEDDED_PRESETS)}"
            )
        check_settings(self)  # each field's choices and bounds, as its option checks them
        check_template(self.prompt_template)
        if not 0 < self.gpu_memory_utilization <= 1:
            raise BStarError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if not self.temperatures or not self.thresholds:
            raise BStarError("the temperature and threshold grids need at least one value each")
        self._check_ranges()
        if self.max_per_query is not None:
            self.target_per_query = self.search_target_per_query = None
        if self.restart_from_base is None:
            self.restart_from_base = self.mode in ("rest-em", "star")
        self.temperatures = sorted(float(t) for t in self.temperatures)

    def _check_types(self):
        """Each field of its annotated type (a hand-edited or truncated config.json, a bad option)."""
        for f in dataclasses.fields(self):
            v, (kind, optional) = getattr(self, f.name), field_type(RunConfig, f.name)
            want = _ACCEPTS.get(typing.get_origin(kind) or kind)
            if want is None or v is None and optional:
                continue
            ok = isinstance(v, want) and not (isinstance(v, bool) and bool not in want)
            item = _ACCEPTS.get(typing.get_args(kind)[0]) if ok and list in want else None
            if item is not None:
                ok = all(isinstance(x, item) and not (isinstance(x, bool) and bool not in item) for x in v)
            if not ok:
                raise BStarError(f"{f.name} must be {' or '.join(t.__name__ for t in want)}, got {v!r}")

    def _check_ranges(self):
        """Values the loop can run with, checked before anything is written (the corrected command then works)."""

        def need(ok: bool, name: str, what: str):
            if not ok:
                raise BStarError(f"--{name.replace('_', '-')} must be {what}, got {getattr(self, name)!r}")

        for name in ("target_per_query", "search_target_per_query"):
            v = getattr(self, name)
            need(v is None or (math.isfinite(v) and v > 0), name, "a number > 0")
        need(math.isfinite(self.lr) and self.lr > 0, "lr", "a finite number > 0")
        need(math.isfinite(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "in [0, 1]")
        need(math.isfinite(self.warmup_ratio) and 0 <= self.warmup_ratio < 1, "warmup_ratio", "in [0, 1)")
        for name in ("temperature", "eval_temperature"):
            need(math.isfinite(getattr(self, name)) and getattr(self, name) >= 0, name, "a finite number >= 0")
        need(math.isfinite(self.threshold), "threshold", "a finite number")
        need(math.isfinite(self.prm_divisor) and self.prm_divisor > 0, "prm_divisor", "a finite number > 0")
        v = self.verifier_noise
        need(v is None or (math.isfinite(v) and v >= 0), "verifier_noise", "a finite number >= 0")
        need(all(math.isfinite(t) and t >= 0 for t in self.temperatures), "temperatures", "finite numbers >= 0")
        need(all(math.isfinite(t) for t in self.thresholds), "thresholds", "finite numbers")
        for name in ("temperatures", "thresholds"):
            need(len(getattr(self, name)) <= MAX_GRID, name, f"a grid of at most {MAX_GRID} values")
        need(isinstance(self.device, str) and _device_ok(self.device), "device", "auto, cpu, cuda or cuda:N")
        if self.model is None and (self.prm or self.train_data or self.eval_data):
            raise BStarError("--prm/--train-data/--eval-data need --model (without it the built-in task runs)")
        if self.model is not None and self.verifier_noise is not None:
            raise BStarError("--verifier-noise reads the built-in task's true step labels; it does not go with --model")

    @classmethod
    def from_json(cls, path: str) -> "RunConfig":
        """A run directory's config.json; a truncated or hand-broken file is one line naming it."""
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except (ValueError, RecursionError) as e:  # (JSON, UTF-8)
            raise BStarError(f"{path} is corrupt ({str(e)[:80]}); restore it or start a new run") from None
        if not isinstance(d, dict):
            raise BStarError(f"{path} is corrupt (not a JSON object); restore it or start a new run")
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in d.items() if k in names})
        except BStarError as e:
            raise BStarError(f"{path} is corrupt ({e}); restore it or start a new run") from None


_ACCEPTS = {bool: (bool,), int: (int,), float: (float, int), str: (str,), list: (list,)}  # a field's type -> values


def _device_ok(device: str) -> bool:
    """auto, cpu, cuda or cuda:N (the engine's resolve_device says whether that GPU exists)."""
    return device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())


def embedded_run_config(**overrides) -> RunConfig:
    """The built-in task's run: the reference's procedure scaled down to a tiny model on a 2-core CPU."""
    # sizes chosen so that a fresh `bstar-engine run` (build included) and `--compare` (2 modes x 2 seeds on
    # 2 one-thread processes) fit a 2-core CPU; sampling is most of the cost, evaluation (greedy on 1,000
    # questions, K samples on 300) a third of it (README, "The B-STaR loop", has the measured times)
    # the design (issue 30, docs/experiments/2026-12-07-fresh-queries.md): fresh questions every iteration (256
    # new ones from the task's generator: nothing is trained on twice, so the policy can be trained hard enough to
    # sharpen on its own samples without memorising its questions), no gold solutions in the selection (the policy
    # learns from its own samples only: a gold solution per fresh question would be plain SFT on new data, the same
    # in every mode)
    base = dict(
        iterations=5,
        queries_per_iteration=256,
        include_gold=False,
        num_samples=8,
        max_tokens=64,
        search_k=8,
        search_subset=24,
        temperatures=list(grid(0.4, 1.6, 0.3)),
        n_star=4,
        search_target_per_query=3.55,
        target_per_query=9.0,
        eval_k=4,
        eval_sample_queries=300,
        mid_eval_queries=150,
        train_steps=10,  # about 2 epochs of online-rft's selection (no gold solutions: 40 over-trained)
        batch_size=32,
        lr=1e-3,  # with fresh questions (with a fixed set of 256, 1e-3 memorised it: docs/experiments)
        min_lr_ratio=0.05,
        warmup_ratio=0.02,
        max_seq_len=256,
    )
    if overrides.get("embedded_preset") == "tiny":  # a smoke test: as many queries as the tiny build's split, and
        base.update(queries_per_iteration=24, include_gold=True)  # gold solutions, so that every phase has work
    base.update({k: v for k, v in overrides.items() if v is not None})
    return RunConfig(**base)
