"""Figures and the markdown report of a run directory (or several, for --compare)."""

import json
from pathlib import Path

from bstar.errors import BStarError
from bstar.results.plots import plot_runs, plot_search_table, write_report
from bstar.utils.jsonl import read_jsonl


def _records(run_dir: Path) -> list[dict]:
    f = run_dir / "iterations.jsonl"
    return read_jsonl(f) if f.exists() else []


def redraw(out: str) -> str:
    """Redraw plots and report.md of run directory `out` (one run, or a --compare directory whose
    sub-directories <mode>-seed<k> hold runs). Returns the report text."""
    out_p = Path(out)
    if not (out_p / "iterations.jsonl").exists():
        runs = {d.name: str(d) for d in sorted(out_p.glob("*-seed*")) if (d / "iterations.jsonl").exists()}
        if not runs:
            raise BStarError(f"{out} holds no run (no iterations.jsonl)")
        from bstar.results.compare import report

        report(out, runs)
        return (out_p / "report.md").read_text()
    data = _records(out_p)
    plots_dir = out_p / "plots"
    figures = plot_runs(data, plots_dir)
    searches = sorted(out_p.glob("iter_*/search.json"))  # the latest configuration-search surface
    table = json.loads(searches[-1].read_text()).get("table") if searches else None
    if table:
        name = searches[-1].parent.name
        figures.append(plot_search_table(table, plots_dir / f"search_{name}.png", title=f"balance score, {name}"))
    rel = [Path("plots") / Path(f).name for f in figures]
    return write_report(data, out_p / "report.md", figures=rel)
