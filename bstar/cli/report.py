"""`bstar-engine report`: redraw a run's plots and write report.md (both modes of a --compare run)."""

import os

import click


@click.command("report")
@click.argument("run_dir")
def report_cmd(run_dir):
    """Redraw a run's plots and write report.md."""
    from bstar import report  # matplotlib: loaded when the command runs, not for --help

    subs = {
        m: os.path.join(run_dir, m)
        for m in ("bstar", "online-rft")
        if os.path.exists(os.path.join(run_dir, m, "iterations.jsonl"))
    }
    text = report.redraw(run_dir, runs=subs or None)
    click.echo(text)
