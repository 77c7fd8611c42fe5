"""`bstar-engine run` (the B-STaR loop) and `bstar-engine report` (redraw a run's plots and report)."""

import dataclasses

import click

from bstar.controller import MODES, RunConfig


def embedded_run_config(**overrides) -> RunConfig:
    """The built-in task's run: the reference's settings scaled down to a tiny model on a 2-core CPU."""
    base = dict(
        iterations=3,
        num_samples=16,
        max_tokens=64,
        search_k=8,
        search_subset=64,
        temperatures=[round(0.5 + 0.1 * i, 2) for i in range(8)],
        thresholds=[round(-1 + 0.05 * i, 2) for i in range(41)],
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


def _grid(spec: str | None) -> list[float] | None:
    """'0.5:1.2:0.05' or '0.5,0.7,0.9' -> a list of floats."""
    if spec is None:
        return None
    from engine.errors import BStarError

    try:
        if ":" in spec:
            a, b, step = (float(x) for x in spec.split(":"))
            n = int(round((b - a) / step))
            return [round(a + i * step, 4) for i in range(n + 1)]
        return [float(x) for x in spec.split(",")]
    except ValueError:
        raise BStarError(f"bad grid {spec!r}: use start:stop:step or a comma-separated list") from None


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
def run(model, prm, train_data, eval_data, out, resume, compare, quiet, temperatures, thresholds, **opts):
    """Iterative self-improvement with balanced exploration and exploitation."""
    from bstar import controller, report
    from engine.errors import BStarError

    if resume:
        if out and out != resume:
            raise BStarError("give either --out (a new run) or --resume DIR, not both")
        records = controller.run(None, resume, resume=True)
        _summary(records)
        return
    if not out:
        raise BStarError("--out DIR is required (or --resume DIR)")
    if model is None and (prm or train_data or eval_data):
        raise BStarError("--prm/--train-data/--eval-data need --model (without it the built-in task runs)")
    opts.update(
        model=model,
        prm=prm,
        train_data=train_data,
        eval_data=eval_data,
        temperatures=_grid(temperatures),
        thresholds=_grid(thresholds),
        progress=not quiet,
    )
    given = {k: v for k, v in opts.items() if v is not None}
    if model is None:
        cfg = embedded_run_config(**given)
    else:
        cfg = RunConfig(**given)
    if not compare:
        _summary(controller.run(cfg, out))
        return
    import os

    runs = {}
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


@click.command("report")
@click.argument("run_dir")
def report_cmd(run_dir):
    """Redraw a run's plots and write report.md."""
    import os

    from bstar import report

    subs = {
        m: os.path.join(run_dir, m)
        for m in ("bstar", "online-rft")
        if os.path.exists(os.path.join(run_dir, m, "iterations.jsonl"))
    }
    text = report.redraw(run_dir, runs=subs or None)
    click.echo(text)
