"""Figures and a markdown report of a run's per-iteration metrics (headless, PNG).

Input: per-iteration metric dicts (one per line of iterations.jsonl), for one run or several
runs to compare on the same axes: {"bstar": [...], "online-rft": [...]}. Missing keys, None and
NaN values are skipped; a panel no run has data for is left out, a figure with no panels too.

    plot_runs(runs, out_dir)            -> written PNG paths
    plot_search_table(rows, path)       -> balance score over the (temperature, threshold) grid
    write_report(runs, path)            -> the markdown text (also written to path)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

# Figure + the Agg canvas directly: no pyplot, so no global backend state and no display needed.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

Records = Sequence[Mapping]
Runs = Mapping[str, Records]

LABELS = {
    "greedy_acc": "greedy accuracy (eval)",
    "pass_at_1": "Pass@1 (eval)",
    "pass_at_k": "Pass@K (eval)",
    "reward_at_k": "Reward@K (eval)",
    "diversity_distinct_correct": "distinct correct responses / query",
    "diversity_equations": "distinct / total equations",
    "frac_any_correct": "queries with >= 1 correct",
    "temperature": "chosen temperature",
    "threshold": "chosen reward threshold",
    "balance_score": "balance score",
    "selected_size": "selected-set size",
    "selected_acc": "selected-set accuracy",
}

FIGURES = {  # file stem -> (title, metric keys: one panel each)
    "accuracy": ("Exploitation and accuracy", ("greedy_acc", "pass_at_1", "pass_at_k", "reward_at_k")),
    "diversity": (
        "Exploration",
        ("pass_at_k", "diversity_distinct_correct", "diversity_equations", "frac_any_correct"),
    ),
    "config": ("Chosen configuration", ("temperature", "threshold", "balance_score")),
    "selection": ("Selected training data", ("selected_size", "selected_acc")),
}

# Table columns of the report, in this order, when present.
REPORT_KEYS = (
    "greedy_acc",
    "pass_at_1",
    "pass_at_k",
    "reward_at_k",
    "diversity_distinct_correct",
    "diversity_equations",
    "temperature",
    "threshold",
    "balance_score",
    "selected_size",
    "selected_acc",
)


def _as_runs(runs: Runs | Records) -> dict[str, list[Mapping]]:
    if isinstance(runs, Mapping):
        return {str(k): list(v) for k, v in runs.items()}
    return {"run": list(runs)}


def _number(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return None if math.isnan(v) else float(v)


def _series(records: Records, key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, r in enumerate(records):
        y = _number(r.get(key))
        if y is None:
            continue
        x = _number(r.get("iteration"))
        xs.append(i if x is None else x)
        ys.append(y)
    return xs, ys


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)
    return path


def plot_runs(runs: Runs | Records, out_dir: str | Path, prefix: str = "") -> list[Path]:
    """Draw the per-iteration figures (accuracy, diversity, config, selection) into out_dir."""
    runs = _as_runs(runs)
    out_dir = Path(out_dir)
    written = []
    for stem, (title, keys) in FIGURES.items():
        panels = [k for k in keys if any(_series(recs, k)[1] for recs in runs.values())]
        if not panels:
            continue
        cols = min(len(panels), 2)
        rows = math.ceil(len(panels) / cols)
        fig = Figure(figsize=(5.5 * cols, 3.6 * rows), layout="constrained")
        fig.suptitle(title)
        for n, key in enumerate(panels):
            ax = fig.add_subplot(rows, cols, n + 1)
            for name, recs in runs.items():
                xs, ys = _series(recs, key)
                if ys:
                    ax.plot(xs, ys, marker="o", label=name)
            ax.set_title(LABELS.get(key, key))
            ax.set_xlabel("iteration")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            if len(runs) > 1:
                ax.legend(fontsize="small")
        written.append(_save(fig, out_dir / f"{prefix}{stem}.png"))
    return written


def _edges(vals: list[float]) -> list[float]:
    if len(vals) == 1:
        return [vals[0] - 0.5, vals[0] + 0.5]
    mids = [(a + b) / 2 for a, b in zip(vals, vals[1:])]
    return [2 * vals[0] - mids[0]] + mids + [2 * vals[-1] - mids[-1]]


def plot_search_table(rows: Sequence, path: str | Path, title: str = "") -> Path:
    """Heat map of the balance score over (temperature, threshold) from a configuration search
    table (SearchRow objects or dicts with temperature, threshold, balance_score)."""
    get = (lambda r, k: r[k]) if rows and isinstance(rows[0], Mapping) else getattr
    temps = sorted({get(r, "temperature") for r in rows})
    thrs = sorted({get(r, "threshold") for r in rows})
    grid = [[math.nan] * len(thrs) for _ in temps]
    ti, hi = {t: i for i, t in enumerate(temps)}, {h: j for j, h in enumerate(thrs)}
    for r in rows:
        grid[ti[get(r, "temperature")]][hi[get(r, "threshold")]] = get(r, "balance_score")
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    if temps:
        # cell edges halfway between grid values, so uneven grids are drawn where they are
        im = ax.pcolormesh(_edges(thrs), _edges(temps), grid, shading="flat")
        fig.colorbar(im, ax=ax, label="mean balance score")
    ax.set_xlabel("reward threshold")
    ax.set_ylabel("temperature")
    ax.set_title(title or "configuration search")
    return _save(fig, Path(path))


def _fmt(v) -> str:
    n = _number(v)
    if n is None:
        return "–" if v is None or isinstance(v, float) else str(v)  # None, NaN
    if isinstance(v, int) or n.is_integer() and abs(n) >= 10:
        return str(int(n))
    return f"{n:.3f}"


def _changes(records: Records, keys: Sequence[str]) -> list[str]:
    lines = []
    for k in keys:
        _, ys = _series(records, k)
        if not ys:
            continue
        if k in ("temperature", "threshold"):  # chosen values: list them, a delta means little
            if len(set(ys)) > 1:
                lines.append(f"- {LABELS[k]} over iterations: {', '.join(_fmt(y) for y in ys)}")
            else:
                lines.append(f"- {LABELS[k]}: {_fmt(ys[0])} throughout")
        elif len(ys) >= 2:
            ints = all(isinstance(r.get(k), int) for r in records if _number(r.get(k)) is not None)
            d = ys[-1] - ys[0]
            delta = f"{int(d):+d}" if ints else f"{d:+.3f}"
            lines.append(f"- {LABELS.get(k, k)}: {_fmt(ys[0])} → {_fmt(ys[-1])} ({delta})")
    return lines


def write_report(
    runs: Runs | Records,
    path: str | Path | None = None,
    title: str = "B-STaR run report",
    figures: Sequence[str | Path] = (),
) -> str:
    """A short markdown report: one table per run (a row per iteration) and what changed from
    the first to the last iteration; several runs also get a side-by-side of final values."""
    runs = _as_runs(runs)
    out = [f"# {title}", ""]
    for name, recs in runs.items():
        keys = [k for k in REPORT_KEYS if any(_number(r.get(k)) is not None for r in recs)]
        out += [f"## {name}", ""]
        if not recs:
            out += ["(no iterations recorded)", ""]
            continue
        out.append("| iteration | " + " | ".join(keys) + " |")
        out.append("|" + "---|" * (len(keys) + 1))
        for i, r in enumerate(recs):
            it = r.get("iteration", i)
            out.append(f"| {it} | " + " | ".join(_fmt(r.get(k)) for k in keys) + " |")
        out.append("")
        changes = _changes(recs, keys)
        if changes:
            out += ["What changed (first → last iteration):", ""] + changes + [""]
    if len(runs) > 1:
        keys = [
            k for k in REPORT_KEYS if any(_number(r.get(k)) is not None for recs in runs.values() for r in recs[-1:])
        ]
        out += [
            "## Final iteration, side by side",
            "",
            "| run | " + " | ".join(keys) + " |",
            "|" + "---|" * (len(keys) + 1),
        ]
        for name, recs in runs.items():
            last = recs[-1] if recs else {}
            out.append(f"| {name} | " + " | ".join(_fmt(last.get(k)) for k in keys) + " |")
        out.append("")
    if figures:
        out += ["## Figures", ""] + [f"![{Path(f).stem}]({Path(f).name})" for f in figures] + [""]
    text = "\n".join(out)
    if path is not None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return text
