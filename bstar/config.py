"""RunConfig: everything a B-STaR run depends on (saved as config.json in the run directory), and the
built-in task's run settings. Light to import: the command line builds one before anything heavy loads."""

import dataclasses
import json
from dataclasses import dataclass, field

from bstar.search import SearchConfig, grid
from bstar.selection import PRM_SCALE
from bstar.tasks import DEFAULT_PROMPT, check_template
from engine.errors import BStarError

MODES = ("bstar", "online-rft", "rest-em", "star")
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
    # generation
    num_samples: int = 64  # N candidates per training query
    max_tokens: int = 768
    stop: list[str] = field(default_factory=list)
    # configuration search (mode bstar)
    temperatures: list[float] = field(default_factory=lambda: list(SearchConfig().temperatures))
    thresholds: list[float] = field(default_factory=lambda: list(SearchConfig().thresholds))
    search_k: int = 64
    search_subset: int = 1000
    n_star: int = 8
    target_size: int | None = 3550  # auto-M: smallest per-query cap reaching this many (on the subset)
    max_per_query: int | None = None  # fixed M instead of target_size
    # fixed configuration (online-rft, rest-em, star)
    temperature: float = 1.0
    threshold: float = 0.5  # score = correct + prm_scale * prm, so > 0.5 keeps exactly the correct ones
    include_gold: bool = True  # add the gold solution as a candidate (reference behaviour)
    rationalize: bool = False  # star: retry unsolved queries with the answer as a hint
    prm_aggregate: str = "min"
    prm_scale: float = PRM_SCALE
    # evaluation
    eval_k: int = 16  # samples per eval query for Pass@K / Reward@K / diversity
    eval_temperature: float = 1.0
    # training
    lr: float = 1e-5
    epochs: int = 1
    batch_tokens: int = 16384
    max_seq_len: int = 2048
    restart_from_base: bool | None = None  # default: True for rest-em and star
    # engine
    dtype: str = "auto"
    device: str = "auto"
    num_kv_blocks: int | None = None
    progress: bool = True
    # the built-in task (model None): "default", or "tiny" (builds in seconds; a smoke test, the models
    # learn little)
    embedded_preset: str = "default"

    def __post_init__(self):
        if self.mode not in MODES:
            raise BStarError(f"unknown mode {self.mode!r}; choose one of {', '.join(MODES)}")
        if self.embedded_preset not in EMBEDDED_PRESETS:
            raise BStarError(
                f"unknown embedded preset {self.embedded_preset!r}; choose one of {', '.join(EMBEDDED_PRESETS)}"
            )
        check_template(self.prompt_template)
        if self.iterations < 1 or self.num_samples < 1 or self.search_k < 1 or self.eval_k < 1:
            raise BStarError("iterations, num_samples, search_k and eval_k must be >= 1")
        if self.max_per_query is not None:
            self.target_size = None
        if self.restart_from_base is None:
            self.restart_from_base = self.mode in ("rest-em", "star")
        self.temperatures = sorted(float(t) for t in self.temperatures)

    @classmethod
    def from_json(cls, path: str) -> "RunConfig":
        with open(path) as f:
            d = json.load(f)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def embedded_run_config(**overrides) -> RunConfig:
    """The built-in task's run: the reference's settings scaled down to a tiny model on a 2-core CPU."""
    base = dict(
        iterations=3,
        num_samples=16,
        max_tokens=64,
        search_k=8,
        search_subset=64,
        temperatures=list(grid(0.5, 1.2, 0.1)),
        thresholds=list(grid(-1.0, 1.0, 0.05)),
        n_star=4,
        target_size=3 * 64,
        eval_k=8,
        include_gold=False,
        lr=1e-4,
        epochs=3,
        batch_tokens=4096,
        max_seq_len=256,
    )
    base.update({k: v for k, v in overrides.items() if v is not None})
    return RunConfig(**base)
