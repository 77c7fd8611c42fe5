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
from bstar.cli.options import config_options, config_values, given_options
from bstar.errors import BStarError
from bstar.loop.config import RunConfig, embedded_run_config

COMPARE_MODES = ("bstar", "online-rft")
SWEEP_NOISES = (0.0, 16.0)  # --reward-sweep: an oracle and a near-chance verifier (with the learned PRM: three rewards)
COVERED = {"progress": "quiet"}  # RunConfig fields set from an option of run's own: field -> that option


def quiet_transformers() -> None:
    """No weight-loading / shard-writing progress bars or info logs from transformers and the HF hub."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


@click.command("run")
@click.option("--out", default=None, help="Run directory. Default: a new runs/<date-time>/ folder.")
@click.option("--resume", default=None, help="Continue the run in this directory from its last completed step.")
@click.option(
    "--compare", is_flag=True, help="Run bstar and online-rft (each for --seeds seeds) at the same budget; report both."
)
@click.option("--seeds", type=click.IntRange(min=1), default=2, show_default=True, help="Seeds per mode (--compare).")
@click.option(
    "--reward-sweep",
    is_flag=True,
    help="--compare at several reward reliabilities (built-in task): the learned PRM and the step verifier at each "
    "--sweep-noises level; draws bstar's gain over online-rft against the reward's within-question AUC.",
)
@click.option(
    "--sweep-noises",
    default=",".join(f"{x:g}" for x in SWEEP_NOISES),
    show_default=True,
    help="Verifier noise levels of --reward-sweep (comma list).",
)
@click.option(
    "--jobs",
    type=click.IntRange(min=1),
    default=None,
    help="Runs at a time under --compare, one thread each.  [default: the CPU count]",
)
@click.option("--quiet", is_flag=True, help="No progress bars (ours or transformers').")
@config_options(RunConfig, covered=COVERED, alternative=("built-in task", embedded_run_config()))
def run(out, resume, compare, seeds, jobs, quiet, reward_sweep, sweep_noises, **opts):
    """Iterative self-improvement with balanced exploration and exploitation.

    Without --model, the built-in task and models run with the built-in task's settings (shown beside the
    defaults); options given override them."""
    noises = _noise_levels(sweep_noises) if reward_sweep else None
    if reward_sweep and opts.get("model") is not None:
        raise BStarError("--reward-sweep varies the built-in task's verifier; it does not go with --model")
    if resume:
        if out and out != resume:
            raise BStarError("give either --out (a new run) or --resume DIR, not both")
    else:  # options are checked before anything heavy loads
        cfg = run_config(given_options(opts), quiet)
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
        elif not (compare or reward_sweep):
            _summary(controller.run(cfg, out, on_record=redraw))
        else:
            _compare(cfg, out, seeds, jobs or os.cpu_count() or 1, quiet, noises)
    except run_dir.RunStopped as e:  # SIGINT / SIGTERM: one line, the shell's exit status for the signal
        click.echo(str(e), err=True)
        sys.exit(e.exit_code)


def run_config(given: dict, quiet: bool = False) -> RunConfig:
    """The run's config from the options given on the command line: over the built-in task's settings
    without --model, over RunConfig's defaults with it."""
    given = dict(config_values(RunConfig, given), progress=not quiet)
    if given.get("model") is not None and "embedded_preset" in given:
        raise BStarError("--embedded-preset sizes the built-in task; it does not go with --model")
    return embedded_run_config(**given) if given.get("model") is None else RunConfig(**given)


def _noise_levels(text: str) -> list[float]:
    try:
        levels = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BStarError(f"--sweep-noises must be a comma list of numbers >= 0, got {text!r}") from None
    if not levels or any(not (x >= 0 and x < float("inf")) for x in levels):
        raise BStarError(f"--sweep-noises must be a comma list of numbers >= 0, got {text!r}")
    return levels


def _variants(cfg: RunConfig, noises: list[float] | None) -> list[tuple[str, RunConfig]]:
    """(run-name prefix, config) of every run of a comparison: each mode of COMPARE_MODES, and under a reward
    sweep each mode at each reward (the learned PRM, then the verifier at each noise level)."""
    from bstar.results.sweep import level_name

    if noises is None:
        return [(mode, dataclasses.replace(cfg, mode=mode)) for mode in COMPARE_MODES]
    return [
        (f"{mode}-{level_name(n)}", dataclasses.replace(cfg, mode=mode, verifier_noise=n))
        for n in [None, *noises]
        for mode in COMPARE_MODES
    ]


def _compare(cfg: RunConfig, out: str, seeds: int, jobs: int, quiet: bool, noises: list[float] | None = None) -> None:
    """Each (mode, seed) in its own one-thread process (`run --resume` of a prepared run directory), at most
    `jobs` at a time; a directory that already holds a finished run is kept as it is."""
    from bstar.embedded import EmbeddedConfig, build_assets
    from bstar.loop import controller, run_dir
    from bstar.results import compare

    controller.check_inputs(cfg)  # before any run directory is made
    if cfg.model is None:  # build once here, not in every process
        build_assets(EmbeddedConfig.preset(cfg.embedded_preset), progress=cfg.progress)
    runs, todo = {}, []
    for k in range(seeds):  # seed by seed: every variant's first seed finishes first
        for prefix, vcfg in _variants(cfg, noises):
            name = f"{prefix}-seed{cfg.seed + k}"
            d = Path(out) / name
            runs[name] = str(d)
            if not (d / "config.json").exists():
                controller.prepare_out_dir(str(d), dataclasses.replace(vcfg, seed=cfg.seed + k), False)
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
    if noises is not None:
        from bstar.results import sweep

        summary += sweep.report(out, runs, [sweep.level_name(n) for n in [None, *noises]])
    for line in summary:
        click.echo(line)
    click.echo(f"comparison plots and report in {out}")


def _summary(records):
    from bstar.utils.distributed import world

    if records and world()[0] == 0:  # (under torchrun: one line, from rank 0)
        first, last = records[0], records[-1]
        click.echo(
            f"greedy accuracy: iteration {first['iteration']} {first.get('greedy_acc', 0):.3f} -> "
            f"iteration {last['iteration']} {last.get('greedy_acc', 0):.3f}"
        )
