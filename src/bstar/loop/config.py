"""RunConfig: everything a B-STaR run depends on (saved as config.json in the run directory), and the
built-in task's run settings. Light to import: the command line builds one before anything heavy loads."""

import dataclasses
import json
import math
from dataclasses import dataclass, field

from bstar.errors import BStarError
from bstar.loop.search import MAX_GRID, REFERENCE_TEMPERATURES, REFERENCE_THRESHOLDS, grid
from bstar.loop.selection import PRM_DIVISOR, PRM_SCALES
from bstar.loop.tasks import DEFAULT_PROMPT, check_template

# online-rft: a fixed temperature and the same reward at a fixed threshold; online-rft-answer: the answer check
# alone (RFT's rule: every right answer, no reward); rest-em and star restart from the base model each iteration
MODES = ("bstar", "online-rft", "online-rft-answer", "rest-em", "star")
SLEEP_ENGINES = ("auto", "on", "off")
EMBEDDED_PRESETS = ("default", "tiny")  # sizes of the built-in task: bstar.embedded.EmbeddedConfig.preset


@dataclass
class RunConfig:
    """Everything a run depends on; saved as config.json in the run directory.

    Defaults are the reference's (hkust-nlp/B-STaR) where it has one; the embedded default scales
    them down (see embedded_run_config)."""

    mode: str = "bstar"
    model: str | None = None  # policy checkpoint (HF dir); None: the built-in task and models
    prm: str | None = None  # PRM checkpoint; None: selection by correctness alone
    train_data: str | None = None
    eval_data: str | None = None
    prompt_template: str = DEFAULT_PROMPT
    iterations: int = 5
    seed: int = 0
    max_train_queries: int | None = None  # use the first N training queries (None: all)
    max_eval_queries: int | None = None
    # fresh queries: iteration t trains on the t-th block of q training queries (nothing is seen twice while the
    # set lasts; then it wraps around); None: every training query every iteration (the reference). The built-in
    # task draws a pool of iterations x q new questions from its generator
    queries_per_iteration: int | None = None
    # generation
    num_samples: int = 64  # N candidates per training query
    max_tokens: int = 768
    stop: list[str] = field(default_factory=list)
    # configuration search (mode bstar): the temperature from a subset, then the threshold and cap
    # re-searched on the full pool (bstar.loop.search)
    temperatures: list[float] = field(default_factory=lambda: list(REFERENCE_TEMPERATURES))
    thresholds: list[float] = field(default_factory=lambda: list(REFERENCE_THRESHOLDS))
    search_k: int = 64
    search_subset: int = 1000
    n_star: int = 8
    search_target_per_query: float | None = 3.55  # subset selection's target size / query (3,550 / 1,000)
    # training set, every mode: the cap M grown until target_per_query x queries are selected (the
    # reference: 67,500 / 7,500 = 9); or a fixed max_per_query (then both targets are off)
    target_per_query: float | None = 9.0
    max_per_query: int | None = None
    # fixed configuration (online-rft, rest-em, star)
    temperature: float = 1.0
    threshold: float = 0.0  # score = correct + min step logit / 5: correct ones above -5, wrong ones above 0
    include_gold: bool = True  # add the gold solution as a candidate (reference behaviour)
    rationalize: bool = False  # star: retry unsolved queries with the answer as a hint
    prm_aggregate: str = "min"
    prm_scale: str = "logit"  # the PRM value: min step logit (reference), or "prob": min P(good)
    prm_divisor: float = PRM_DIVISOR  # score = correct + prm / prm_divisor
    # the built-in task's reward: None, the learned PRM; sigma >= 0, the step verifier (bstar.loop.verifier: true
    # step labels, each step's logit +-3 plus Gaussian noise of scale sigma; 0 is an oracle, large is chance)
    verifier_noise: float | None = None
    # evaluation
    eval_k: int = 16  # samples per eval query for Pass@K / Reward@K / diversity
    eval_temperature: float = 1.0
    eval_sample_queries: int | None = None  # the first N eval queries get eval_k samples (None: all)
    # iterations between the first and the last evaluate only the first N eval queries (greedy and sampled;
    # None: all); the starting policy and the final one always get the full evaluation. Evaluation is most
    # of a small run's cost, and the curves' end points are what the intervals are reported for
    mid_eval_queries: int | None = None
    # training: train_steps optimizer steps of batch_size sequences per iteration in every mode; model,
    # AdamW state and one warmup + cosine schedule (iterations x train_steps long) carried across
    # iterations (the reference: 500 steps of 128, lr 4.12e-6 -> 2e-7)
    train_steps: int = 500
    batch_size: int = 128
    lr: float = 4.12e-6
    min_lr_ratio: float = 2e-7 / 4.12e-6
    warmup_ratio: float = 0.022  # of the whole schedule (the reference: 0.2 epoch of its 9-epoch horizon)
    max_seq_len: int = 2048
    restart_from_base: bool | None = None  # default: True for rest-em and star (then a schedule per iteration)
    # engine and device memory (bstar.loop.memory): on CUDA the run's memory plan sizes both engines' KV caches
    # within gpu_memory_utilization of the device and refuses, before loading anything, a phase that cannot fit
    dtype: str = "auto"
    device: str = "auto"
    num_kv_blocks: int | None = None  # a fixed KV budget per engine (overrides the plan's)
    gpu_memory_utilization: float = 0.9  # the share of the device the whole run may use (policy, PRM, trainer)
    sleep_engines: str = "auto"  # policy and PRM asleep while the trainer runs: "auto" (on CUDA), "on", "off"
    offload_optimizer: bool = False  # AdamW state and master weights in host memory (FSDP2 CPUOffloadPolicy)
    async_scheduling: bool = False  # the policy engine's async scheduling (engine.EngineConfig): same samples
    progress: bool = True
    # the built-in task (model None): "default", or "tiny" (builds in seconds; a smoke test, the models
    # learn little)
    embedded_preset: str = "default"

    def __post_init__(self):
        self._check_types()
        if self.mode not in MODES:
            raise BStarError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.embedded_preset not in EMBEDDED_PRESETS:
            raise BStarError(
                f"unknown embedded preset {self.embedded_preset!r}; choose one of {', '.join(EMBEDDED_PRESETS)}"
            )
        check_template(self.prompt_template)
        for name in ("iterations", "num_samples", "search_k", "eval_k", "train_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise BStarError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "max_train_queries",
            "max_eval_queries",
            "eval_sample_queries",
            "mid_eval_queries",
            "queries_per_iteration",
        ):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise BStarError(f"{name} must be >= 1 or unset, got {getattr(self, name)}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise BStarError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.sleep_engines not in SLEEP_ENGINES:
            raise BStarError(f"sleep_engines must be one of {', '.join(SLEEP_ENGINES)}, got {self.sleep_engines!r}")
        if self.prm_scale not in PRM_SCALES:
            raise BStarError(f"unknown PRM scale {self.prm_scale!r}; choose one of {', '.join(PRM_SCALES)}")
        if not self.temperatures or not self.thresholds:
            raise BStarError("the temperature and threshold grids need at least one value each")
        self._check_ranges()
        if self.max_per_query is not None:
            self.target_per_query = self.search_target_per_query = None
        if self.restart_from_base is None:
            self.restart_from_base = self.mode in ("rest-em", "star")
        self.temperatures = sorted(float(t) for t in self.temperatures)

    def _check_types(self):
        """Each field of the type its default has (a hand-edited or truncated config.json, a bad option)."""
        for f in dataclasses.fields(self):
            v, want = getattr(self, f.name), _FIELD_TYPES.get(f.name)
            if want is None or v is None and f.name in _OPTIONAL:
                continue
            ok = isinstance(v, want) and not (isinstance(v, bool) and bool not in want)
            if ok and list in want:
                ok = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v) or f.name == "stop"
            if not ok:
                raise BStarError(f"{f.name} must be {' or '.join(t.__name__ for t in want)}, got {v!r}")

    def _check_ranges(self):
        """Values the loop can run with, checked before anything is written (the corrected command then works)."""

        def need(ok: bool, name: str, what: str):
            if not ok:
                raise BStarError(f"--{name.replace('_', '-')} must be {what}, got {getattr(self, name)!r}")

        for name in ("search_subset", "n_star", "max_tokens", "max_seq_len"):
            need(getattr(self, name) >= 1, name, ">= 1")
        for name in ("target_per_query", "search_target_per_query"):
            v = getattr(self, name)
            need(v is None or (math.isfinite(v) and v > 0), name, "a number > 0")
        need(self.max_per_query is None or self.max_per_query >= 1, "max_per_query", ">= 1")
        need(self.num_kv_blocks is None or self.num_kv_blocks >= 1, "num_kv_blocks", ">= 1")
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
        need(self.dtype in DTYPES, "dtype", " or ".join(DTYPES))
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


DTYPES = ("auto", "float32", "bfloat16", "float16")  # as the engine's (bstar.engine.config.DTYPES), without torch
_OPTIONAL = {f.name for f in dataclasses.fields(RunConfig) if f.default is None or f.name in ("restart_from_base",)}
_FIELD_TYPES = {
    f.name: (
        (bool,)
        if isinstance(f.default, bool)
        else (int,)
        if isinstance(f.default, int)
        else (float, int)
        if isinstance(f.default, float)
        else (str,)
        if isinstance(f.default, str)
        else (list,)
        if f.default_factory is not dataclasses.MISSING
        else None
    )
    for f in dataclasses.fields(RunConfig)
}
_FIELD_TYPES.update(
    {
        n: (int,)
        for n in (
            "max_train_queries",
            "max_eval_queries",
            "eval_sample_queries",
            "mid_eval_queries",
            "max_per_query",
            "queries_per_iteration",
        )
    }
)
_FIELD_TYPES.update({n: (float, int) for n in ("search_target_per_query", "target_per_query", "verifier_noise")})
_FIELD_TYPES.update({n: (str,) for n in ("model", "prm", "train_data", "eval_data")})
_FIELD_TYPES.update(num_kv_blocks=(int,), restart_from_base=(bool,))


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
