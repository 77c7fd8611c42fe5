"""`bstar-engine report`: redraw a run's plots and write report.md (all runs of a --compare directory)."""

import click


@click.command("report")
@click.argument("run_dir")
def report_cmd(run_dir):
    """Redraw a run's plots and write report.md."""
    from bstar.results import report  # matplotlib: loaded when the command runs, not for --help

    click.echo(report.redraw(run_dir))
