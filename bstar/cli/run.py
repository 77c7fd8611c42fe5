"""`bstar-engine run`: the B-STaR loop on a model and data, or on the built-in task; --compare runs bstar
and online-rft with the same budget and plots them together; --resume continues a run."""

import dataclasses
import os

import click

from bstar.config import EMBEDDED_PRESETS, MODES, RunConfig, embedded_run_config
from bstar.search import parse_grid
from engine.errors import BStarError


@click.command("run")
@click.option("--model", default=None, help="Policy checkpoint (HF dir). Default: the built-in task and models.")
@click.option("--prm", default=None, help="PRM checkpoint (HF dir).")
@click.option("--train-data", default=None, help="Training queries, JSONL (GSM8K or MATH format).")
@click.option("--eval-data", default=None, help="Evaluation queries, JSONL (GSM8K or MATH format).")
@click.option("--out", default=None, help="Run directory (config, iterations.jsonl, policy, candidates, plots).")
@click.option("--resume", default=None, help="Continue the run in this directory from its last completed step.")
@click.option("--compare", is_flag=True, help="Run bstar and online-rft with the same budget and plot both.")
@click.option("--mode", type=click.Choice(MODES), default=None)
@click.option("--iterations", type=int, default=None)
@click.option("--num-samples", type=int, default=None, help="N candidates per training query.")
@click.option("--search-k", type=int, default=None, help="K samples per query and temperature in the search.")
@click.option("--search-subset", type=int, default=None)
@click.option("--temperatures", default=None, help="Search grid, start:stop:step or a list.")
@click.option("--thresholds", default=None, help="Search grid, start:stop:step or a list.")
@click.option("--n-star", type=int, default=None)
@click.option("--target-size", type=int, default=None)
@click.option("--max-per-query", type=int, default=None, help="Fixed M (instead of --target-size).")
@click.option("--temperature", type=float, default=None, help="Fixed temperature (online-rft, rest-em, star).")
@click.option("--threshold", type=float, default=None, help="Fixed threshold (online-rft, rest-em, star).")
@click.option("--include-gold/--no-include-gold", default=None)
@click.option("--rationalize", is_flag=True, default=None, help="STaR rationalisation.")
@click.option("--prompt-template", default=None)
@click.option("--max-tokens", type=int, default=None)
@click.option("--eval-k", type=int, default=None)
@click.option("--max-train-queries", type=int, default=None)
@click.option("--max-eval-queries", type=int, default=None)
@click.option("--lr", type=float, default=None)
@click.option("--epochs", type=int, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--dtype", default=None)
@click.option("--device", default=None)
@click.option("--quiet", is_flag=True, help="No progress bars.")
@click.option(
    "--embedded-preset",
    type=click.Choice(EMBEDDED_PRESETS),
    default=None,
    help="Built-in task size (without --model): 'tiny' builds in seconds, a smoke test whose models learn little.",
)
def run(model, prm, train_data, eval_data, out, resume, compare, quiet, temperatures, thresholds, **opts):
    """Iterative self-improvement with balanced exploration and exploitation."""
    if resume:
        if out and out != resume:
            raise BStarError("give either --out (a new run) or --resume DIR, not both")
    else:  # options are checked before anything heavy loads
        if not out:
            raise BStarError("--out DIR is required (or --resume DIR)")
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
    # torch, transformers, the engine and matplotlib: loaded when the command runs, not for --help
    from bstar import controller, report

    if resume:
        _summary(controller.run(None, resume, resume=True))
        return
    if not compare:
        _summary(controller.run(cfg, out))
        return
    runs = {}  # bstar and online-rft on the same budget, each resumed when it already holds a run
    for mode in ("bstar", "online-rft"):
        d = os.path.join(out, mode)
        if os.path.exists(os.path.join(d, "iterations.jsonl")):
            records = controller.run(None, d, resume=True)
        else:
            records = controller.run(dataclasses.replace(cfg, mode=mode), d)
        runs[mode] = d
        click.echo(f"{mode}: final greedy accuracy {records[-1].get('greedy_acc', float('nan')):.3f}")
    report.redraw(out, runs=runs)
    click.echo(f"comparison plots and report in {out}")


def _summary(records):
    if records:
        first, last = records[0], records[-1]
        click.echo(
            f"greedy accuracy: iteration {first['iteration']} {first.get('greedy_acc', 0):.3f} -> "
            f"iteration {last['iteration']} {last.get('greedy_acc', 0):.3f}"
        )
