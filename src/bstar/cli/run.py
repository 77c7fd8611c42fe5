"""`bstar-engine run`: the B-STaR loop on a model and data, or on the built-in task; --compare runs bstar
and online-rft for several seeds (parallel one-thread processes) at the same budget and reports them
together with bootstrap confidence intervals; --resume continues a run."""

import dataclasses
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import click

from bstar.cli.checks import check_out_dir
from bstar.errors import BStarError
from bstar.loop.config import EMBEDDED_PRESETS, MODES, SLEEP_ENGINES, RunConfig, embedded_run_config
from bstar.loop.search import parse_grid

COMPARE_MODES = ("bstar", "online-rft")


def quiet_transformers() -> None:
    """No weight-loading / shard-writing progress bars or info logs from transformers and the HF hub."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


@click.command("run")
@click.option("--model", default=None, help="Policy checkpoint (HF dir). Default: the built-in task and models.")
@click.option("--prm", default=None, help="PRM checkpoint (HF dir).")
@click.option("--train-data", default=None, help="Training queries, JSONL (GSM8K or MATH format).")
@click.option("--eval-data", default=None, help="Evaluation queries, JSONL (GSM8K or MATH format).")
@click.option("--out", default=None, help="Run directory. Default: a new runs/<date-time>/ folder.")
@click.option("--resume", default=None, help="Continue the run in this directory from its last completed step.")
@click.option(
    "--compare", is_flag=True, help="Run bstar and online-rft (each for --seeds seeds) at the same budget; report both."
)
@click.option("--seeds", type=click.IntRange(min=1), default=2, show_default=True, help="Seeds per mode (--compare).")
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=None,
    help="Runs at a time under --compare, one thread each (default: the CPU count).",
)
@click.option("--mode", type=click.Choice(MODES), default=None)
@click.option("--iterations", type=int, default=None)
@click.option("--num-samples", type=int, default=None, help="N candidates per training query.")
@click.option("--search-k", type=int, default=None, help="K samples per query and temperature in the search.")
@click.option("--search-subset", type=int, default=None)
@click.option("--temperatures", default=None, help="Search grid, start:stop:step or a list.")
@click.option("--thresholds", default=None, help="Search grid, start:stop:step or a list.")
@click.option("--n-star", type=int, default=None)
@click.option("--search-target-per-query", type=float, default=None, help="Subset target size per query (3.55).")
@click.option("--target-per-query", type=float, default=None, help="Training set target size per query (9).")
@click.option("--max-per-query", type=int, default=None, help="Fixed M (instead of the target sizes).")
@click.option("--temperature", type=float, default=None, help="Fixed temperature (online-rft, rest-em, star).")
@click.option("--threshold", type=float, default=None, help="Fixed threshold (online-rft, rest-em, star).")
@click.option("--include-gold/--no-include-gold", default=None)
@click.option("--rationalize", is_flag=True, default=None, help="STaR rationalisation.")
@click.option("--prm-scale", type=click.Choice(["logit", "prob"]), default=None, help="PRM value (default logit).")
@click.option("--prompt-template", default=None)
@click.option("--max-tokens", type=int, default=None)
@click.option("--eval-k", type=int, default=None)
@click.option("--eval-sample-queries", type=int, default=None, help="Eval queries that get eval-k samples.")
@click.option("--mid-eval-queries", type=int, default=None, help="Eval queries between the first and last iteration.")
@click.option("--max-train-queries", type=int, default=None)
@click.option("--max-eval-queries", type=int, default=None)
@click.option("--train-steps", type=int, default=None, help="Optimizer steps per iteration (every mode).")
@click.option("--batch-size", type=int, default=None, help="Sequences per optimizer step.")
@click.option("--lr", type=float, default=None, help="Peak LR of the run's one warmup + cosine schedule.")
@click.option("--seed", type=int, default=None)
@click.option("--dtype", default=None)
@click.option("--device", default=None)
@click.option(
    "--gpu-memory-utilization",
    type=float,
    default=None,
    help="Share of the GPU the run may use (policy, PRM and trainer; the memory plan splits it). Default 0.9.",
)
@click.option(
    "--sleep-engines",
    type=click.Choice(SLEEP_ENGINES),
    default=None,
    help="Policy and PRM asleep while training (default auto: on CUDA).",
)
@click.option(
    "--offload-optimizer",
    is_flag=True,
    default=None,
    help="AdamW state and master weights in host memory (a 7B policy on one 80 GB GPU).",
)
@click.option(
    "--async-scheduling",
    is_flag=True,
    default=None,
    help="Generation steps launched before the previous step's tokens reach the host (same samples; see README).",
)
@click.option("--quiet", is_flag=True, help="No progress bars (ours or transformers').")
@click.option(
    "--embedded-preset",
    type=click.Choice(EMBEDDED_PRESETS),
    default=None,
    help="Built-in task size (without --model): 'tiny' builds in seconds, a smoke test whose models learn little.",
)
def run(model, prm, train_data, eval_data, out, resume, compare, seeds, jobs, quiet, temperatures, thresholds, **opts):
    """Iterative self-improvement with balanced exploration and exploitation."""
    if resume:
        if out and out != resume:
            raise BStarError("give either --out (a new run) or --resume DIR, not both")
    else:  # options are checked before anything heavy loads
        if model is None and (prm or train_data or eval_data):
            raise BStarError("--prm/--train-data/--eval-data need --model (without it the built-in task runs)")
        if model is not None and opts["embedded_preset"] is not None:
            raise BStarError("--embedded-preset sizes the built-in task; it does not go with --model")
        opts.update(
            model=model,
            prm=prm,
            train_data=train_data,
            eval_data=eval_data,
            temperatures=None if temperatures is None else parse_grid(temperatures),
            thresholds=None if thresholds is None else parse_grid(thresholds),
            progress=not quiet,
        )
        given = {k: v for k, v in opts.items() if v is not None}
        cfg = embedded_run_config(**given) if model is None else RunConfig(**given)
        if not out:  # a fresh folder, announced first
            out = os.path.join("runs", datetime.now().strftime("%Y%m%d-%H%M%S"))
            while os.path.exists(out):
                out += "x"
            click.echo(f"run directory: {out}")
        check_out_dir(out)
    if quiet:
        quiet_transformers()
    # torch, transformers, the engine and matplotlib: loaded when the command runs, not for --help
    from bstar.loop import controller, run_dir
    from bstar.results.report import redraw

    try:
        if resume:
            _summary(controller.run(None, resume, resume=True, on_record=redraw))
        elif not compare:
            _summary(controller.run(cfg, out, on_record=redraw))
        else:
            _compare(cfg, out, seeds, jobs or os.cpu_count() or 1, quiet)
    except run_dir.RunStopped as e:  # SIGINT / SIGTERM: one line, the shell's exit status for the signal
        click.echo(str(e), err=True)
        sys.exit(e.exit_code)


def _compare(cfg: RunConfig, out: str, seeds: int, jobs: int, quiet: bool) -> None:
    """Each (mode, seed) in its own one-thread process (`run --resume` of a prepared run directory), at most
    `jobs` at a time; a directory that already holds a finished run is kept as it is."""
    from bstar.embedded import EmbeddedConfig, build_assets
    from bstar.loop import controller, run_dir
    from bstar.results import compare

    controller.check_inputs(cfg)  # before any run directory is made
    if cfg.model is None:  # build once here, not in every process
        build_assets(EmbeddedConfig.preset(cfg.embedded_preset), progress=cfg.progress)
    runs, todo = {}, []
    for mode in COMPARE_MODES:
        for k in range(seeds):
            name = f"{mode}-seed{cfg.seed + k}"
            d = Path(out) / name
            runs[name] = str(d)
            if not (d / "config.json").exists():
                controller.prepare_out_dir(str(d), dataclasses.replace(cfg, mode=mode, seed=cfg.seed + k), False)
            if len(compare.records(d)) < cfg.iterations + 1:
                todo.append((name, d))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    running: list = []
    t0 = time.perf_counter()
    with run_dir.Forward() as fwd:  # SIGINT / SIGTERM: passed on to the runs, which stop resumably
        while (todo and fwd.signum is None) or running:
            while todo and fwd.signum is None and len(running) < jobs:
                name, d = todo.pop(0)
                cmd = [sys.executable, "-m", "bstar.cli", "run", "--resume", str(d)] + (["--quiet"] if quiet else [])
                log = open(d / "log.txt", "a")
                p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
                fwd.children.append(p)
                running.append((name, d, p, log))
                click.echo(f"{name}: started (log in {d / 'log.txt'})")
            time.sleep(0.5)
            for item in list(running):
                name, d, p, log = item
                if p.poll() is None:
                    continue
                running.remove(item)
                log.close()
                if fwd.signum is not None:  # stopped (or finished meanwhile): the line below names what is left
                    continue
                if p.returncode != 0:
                    for other in running:
                        other[2].terminate()
                    raise BStarError(f"{name} failed (exit {p.returncode}); see {d / 'log.txt'}")
                click.echo(f"{name}: done after {time.perf_counter() - t0:.0f}s")
    left = [d for d in runs.values() if len(compare.records(d)) < cfg.iterations + 1]
    if fwd.signum is not None and left:  # (a signal after the last run finished: the report is still made)
        raise fwd.stopped(left)
    summary = compare.report(out, runs)
    for line in summary:
        click.echo(line)
    click.echo(f"comparison plots and report in {out}")


def _summary(records):
    if records:
        first, last = records[0], records[-1]
        click.echo(
            f"greedy accuracy: iteration {first['iteration']} {first.get('greedy_acc', 0):.3f} -> "
            f"iteration {last['iteration']} {last.get('greedy_acc', 0):.3f}"
        )
