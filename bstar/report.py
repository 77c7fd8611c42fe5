"""Figures and the markdown report of a run directory (or several, for --compare)."""

import json
from pathlib import Path

from bstar.jsonl import read_jsonl
from bstar.plots import plot_runs, plot_search_table, write_report
from engine.errors import BStarError


def _records(run_dir: Path) -> list[dict]:
    f = run_dir / "iterations.jsonl"
    return read_jsonl(f) if f.exists() else []


def redraw(out: str, runs: dict[str, str] | None = None) -> str:
    """Redraw plots and report.md of run directory `out`; `runs` (name -> run dir) compares several.
    Returns the report text."""
    out_p = Path(out)
    if runs is None:
        if not (out_p / "iterations.jsonl").exists():
            raise BStarError(f"{out} holds no run (no iterations.jsonl)")
        data = {"run": _records(out_p)}
    else:
        data = {name: _records(Path(d)) for name, d in runs.items()}
    plots_dir = out_p / "plots"
    figures = plot_runs(data if runs else data["run"], plots_dir)
    for name, d in (runs or {"run": out}).items():  # the latest configuration-search surface
        searches = sorted(Path(d).glob("iter_*/search.json"))
        if searches:
            table = json.loads(searches[-1].read_text()).get("table")
            if table:
                rows = table
                prefix = "" if runs is None else f"{name}-"
                figures.append(
                    plot_search_table(
                        rows,
                        plots_dir / f"{prefix}search_{searches[-1].parent.name}.png",
                        title=f"balance score, {searches[-1].parent.name}",
                    )
                )
    rel = [Path("plots") / Path(f).name for f in figures]
    return write_report(data if runs else data["run"], out_p / "report.md", figures=rel)
