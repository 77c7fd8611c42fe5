"""Builds and caches the built-in task's assets, so `bstar-engine run` needs no downloaded model.

    assets = build_assets()                 # first call builds (minutes), later calls load the cache
    assets.policy_path, assets.prm_path     # HF dirs for bstar.LLM / bstar.PRM / SFTTrainer
    assets.train, assets.test               # list[bstar.loop.tasks.Example]

Cache: `$BSTAR_CACHE` or ~/.cache/bstar-engine, subfolder `embedded-<hash of config + VERSION>`.
A build happens in a temp dir beside it and is renamed into place at the end, so a killed or failed
build never leaves a partial cache under the final name. Under torchrun the node's local rank 0 builds in a
child process of its own (the build's trainer must not join the ranks' process group) while the node's other
ranks wait for its manifest.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import tokenizers
import torch
import transformers
from tqdm.auto import tqdm

from bstar.embedded.config import VERSION, EmbeddedConfig
from bstar.embedded.policy import measure_greedy_accuracy, save_random_policy, warm_start
from bstar.embedded.prm import PRM_QUESTION_TEMPLATE, dump_rows, prm_data, prm_quality, train_prm
from bstar.embedded.task import generate, make_splits
from bstar.embedded.tokenizer import BAD, GOOD, STEP_TAG, build_tokenizer, check_round_trip
from bstar.engine.errors import CheckpointError
from bstar.errors import BStarError
from bstar.kernels.native import cache_root
from bstar.loop.tasks import DEFAULT_PROMPT, Example
from bstar.utils import distributed as dist_utils

_MANIFEST = "manifest.json"


@dataclass
class EmbeddedAssets:
    policy_path: Path
    prm_path: Path
    train: list[Example]
    test: list[Example]
    manifest: dict = field(default_factory=dict)


def default_cache_dir() -> Path:
    return cache_root()  # $BSTAR_CACHE or ~/.cache/bstar-engine, shared with the compiled CPU kernels


# -- public entry point ------------------------------------------------------------------------------


def build_assets(
    cfg: EmbeddedConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    threads: int | None = 1,
) -> EmbeddedAssets:
    """The cached assets for `cfg`, building them first when the cache has none.

    `threads`: torch intra-op threads during the build (restored after). 1 by default, whoever calls: the
    weights depend on it (2 threads sum in another order: on an idle Intel Xeon a build with 1,500 PRM steps took 456 s
    instead of 719 s but warm-started a policy of greedy accuracy 0.153 instead of 0.183), and on a busy
    2-core machine 2 threads spin against other processes and run ~15x slower (4.8 s vs 0.3 s per SFT
    step). The manifest records it. None: leave as is."""
    cfg = cfg or EmbeddedConfig()
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise BStarError(f"threads must be None or an integer >= 1, got {threads!r}")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    dest = root / f"embedded-{cfg.key()}"
    if (dest / _MANIFEST).is_file():
        return load_assets(dest)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BStarError(f"cannot create the embedded-model cache dir {root}: {e}") from None
    if not os.access(root, os.W_OK):
        raise BStarError(f"embedded-model cache dir {root} is not writable (set BSTAR_CACHE to another dir)")
    if dist_utils.launched_world_size() > 1:
        _build_once_per_node(cfg, root, dest, progress, threads)
        return load_assets(dest)
    _sweep_stale(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=root))
    before = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        _build(cfg, tmp, progress)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not (dest / _MANIFEST).is_file():  # not a concurrent builder's finished copy
                raise
    finally:
        torch.set_num_threads(before)
        shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
    return load_assets(dest)


# torchrun's variables: without them the child is one process, and its trainer joins no process group
_TORCHRUN_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                 "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT")  # fmt: skip


def _build_once_per_node(cfg: EmbeddedConfig, root: Path, dest: Path, progress: bool, threads: int | None) -> None:
    """Under torchrun: the node's local rank 0 builds in a child process (`_main`, a process of one rank);
    the node's other ranks wait for the manifest, at most the process-group timeout."""
    if dist_utils.local_rank() == 0:
        env = {k: v for k, v in os.environ.items() if k not in _TORCHRUN_ENV and not k.startswith("TORCHELASTIC")}
        args = [json.dumps(asdict(cfg)), str(root), "1" if progress else "0", str(threads or 0)]
        code = "import sys; from bstar.embedded.build import _main; sys.exit(_main(sys.argv[1:]))"
        r = subprocess.run([sys.executable, "-c", code, *args], env=env)
        if r.returncode != 0:
            raise BStarError(f"building the built-in task into {root} failed (exit {r.returncode}; its line is above)")
        return
    deadline = time.monotonic() + dist_utils.timeout().total_seconds()
    while not (dest / _MANIFEST).is_file():
        if time.monotonic() > deadline:
            raise BStarError(f"waited {dist_utils.timeout()} for local rank 0 to build the built-in task into {dest}")
        time.sleep(0.5)


def _main(argv: list[str]) -> int:
    """The child of _build_once_per_node: CONFIG_JSON CACHE_DIR PROGRESS(0/1) THREADS(0: leave as is)."""
    cfg_json, root, progress, threads = argv
    try:
        build_assets(EmbeddedConfig(**json.loads(cfg_json)), root, progress == "1", int(threads) or None)
    except BStarError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def load_assets(path: str | os.PathLike) -> EmbeddedAssets:
    """Assets of a finished build directory."""
    path = Path(path)
    try:
        manifest = json.loads((path / _MANIFEST).read_text())
        splits = json.loads((path / "splits.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"embedded-model cache {path} is unreadable ({e}); delete it to rebuild") from None
    if manifest.get("version") != VERSION:
        raise CheckpointError(
            f"embedded-model cache {path} has version {manifest.get('version')!r}, "
            f"expected {VERSION!r}; delete it to rebuild"
        )
    train = [Example(**e) for e in splits["train"]]
    test = [Example(**e) for e in splits["test"]]
    return EmbeddedAssets(path / "policy", path / "prm", train, test, manifest)


def _sweep_stale(root: Path) -> None:
    """Removes temp dirs (.embedded-*.tmp-<pid>-*) of builds whose process is gone (killed mid-build), of
    any config or version."""
    for d in root.glob(".embedded-*.tmp-*"):
        try:
            pid = int(d.name.split(".tmp-", 1)[1].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            pass


# -- the build ---------------------------------------------------------------------------------------


def _machine() -> dict:
    """Where the build ran: its measured quality (torch's CPU kernels differ between CPUs, so the weights and
    the numbers can too) belongs to this machine."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _log(progress: bool, msg: str) -> None:
    if progress:
        tqdm.write(f"[bstar embedded] {msg}", file=sys.stderr)


def _build(cfg: EmbeddedConfig, out: Path, progress: bool) -> None:
    t_all = time.perf_counter()
    times, metrics = {}, {}
    torch.manual_seed(cfg.seed)

    t = time.perf_counter()
    train, test, seed_set = make_data(cfg)
    times["data"] = time.perf_counter() - t
    _log(
        progress,
        f"data: {len(train)} train, {len(test)} test, {len(seed_set)} warm-start examples ({times['data']:.1f}s)",
    )

    t = time.perf_counter()
    tok_dir = out / "tokenizer"
    tok_dir.mkdir()
    tok = build_tokenizer(tok_dir, train + seed_set, cfg.vocab_size)
    check_round_trip(tok, train + test + seed_set)
    times["tokenizer"] = time.perf_counter() - t
    metrics["vocab_size"] = tok.get_vocab_size()
    _log(progress, f"tokenizer: {tok.get_vocab_size()} tokens, round trip ok ({times['tokenizer']:.1f}s)")

    t = time.perf_counter()
    init_dir = out / "init"
    save_random_policy(cfg, tok_dir, init_dir, tok.get_vocab_size())
    policy_dir = out / "policy"
    warm = warm_start(cfg, init_dir, tok, seed_set, policy_dir, progress)
    shutil.rmtree(init_dir)
    acc = measure_greedy_accuracy(policy_dir, test, cfg, progress)
    times["policy"] = time.perf_counter() - t
    metrics.update(warm_start_final_loss=warm, warm_test_accuracy=acc)
    _log(progress, f"policy: warm start done, greedy test accuracy {acc:.3f} ({times['policy']:.1f}s)")

    t = time.perf_counter()
    rows, data_stats = prm_data(cfg, policy_dir, train[: cfg.prm_questions])
    dump_rows(out / "prm_data.jsonl", rows)
    times["prm_data"] = time.perf_counter() - t
    _log(
        progress,
        f"prm data: {data_stats['candidates']} solutions ({data_stats['policy_candidates']} sampled from the policy), "
        f"{data_stats['steps']} steps, {data_stats['good_rate']:.2f} good ({times['prm_data']:.1f}s)",
    )
    prm_dir = out / "prm"
    t_train = time.perf_counter()
    prm_loss = train_prm(cfg, policy_dir, tok, rows, prm_dir, progress)
    times["prm_train"] = time.perf_counter() - t_train
    t_quality = time.perf_counter()
    quality = prm_quality(cfg, prm_dir, policy_dir, test[: cfg.prm_eval_questions])
    times["prm_quality"] = time.perf_counter() - t_quality
    times["prm"] = time.perf_counter() - t
    metrics.update(prm_data=data_stats, prm_final_loss=prm_loss, **quality)
    _log(
        progress,
        f"prm: on {quality['prm_eval_questions']} held-out questions x {quality['prm_eval_k']} policy samples, "
        f"within-question AUC {_f(quality['prm_within_auc'])} (vs validity {_f(quality['prm_within_auc_valid'])}), "
        f"Reward@{quality['prm_eval_k']} {quality['prm_reward_at_k']:.3f} vs Pass@1 {quality['prm_pass_at_1']:.3f}, "
        f"lucky share {_f(quality['prm_lucky_share'])}, step AUC {_f(quality['prm_step_auc'])} ({times['prm']:.1f}s)",
    )

    times["total"] = time.perf_counter() - t_all
    (out / "splits.json").write_text(
        json.dumps({"train": [asdict(e) for e in train], "test": [asdict(e) for e in test]})
    )
    manifest = {
        "version": VERSION,
        "key": cfg.key(),
        "config": asdict(cfg),
        "metrics": metrics,
        "seconds": {k: round(v, 2) for k, v in times.items()},
        "machine": _machine(),
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "prompt_template": DEFAULT_PROMPT,
        "prm": {"step_tag": STEP_TAG, "good": GOOD, "bad": BAD, "question_template": PRM_QUESTION_TEMPLATE},
    }
    # written last: a cache dir with a manifest is complete
    (out / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    _log(progress, f"built in {times['total']:.1f}s")


# -- 1. data -----------------------------------------------------------------------------------------


def make_data(cfg: EmbeddedConfig) -> tuple[list[Example], list[Example], list[Example]]:
    """(train, test, warm-start seed set). The seed set continues the train stream, so it is
    disjoint from both splits and the train split is exactly make_splits(n_train, n_test)."""
    train, test = make_splits(cfg.n_train + cfg.n_seed, cfg.n_test, cfg.seed)
    return train[: cfg.n_train], test, train[cfg.n_train :]


def fresh_queries(cfg: EmbeddedConfig, n: int, run_seed: int) -> list[Example]:
    """n new training questions for a run with fresh queries per iteration (RunConfig.queries_per_iteration): a
    stream of their own per run seed, disjoint from the build's splits and warm-start set, so neither the policy
    nor the PRM has seen them, and no eval question is among them."""
    train, test, seed_set = make_data(cfg)
    return generate(n, f"{cfg.seed}-run{run_seed}", exclude={e.question for e in train + test + seed_set}, split="loop")
