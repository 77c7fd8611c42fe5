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
    "reward_at_k": "Reward@K: the PRM's pick of K (eval)",
    "prm_within_auc": "PRM AUC within a question (eval)",
    "prm_step_auc": "PRM step AUC vs true labels (eval)",
    "pool_prm_within_auc": "PRM AUC within a question (train pool)",
    "pool_prm_step_auc": "PRM step AUC vs true labels (train pool)",
    "pool_distinct_styles": "distinct valid solutions / query (train pool)",
    "train_frac_any_correct": "train queries with >= 1 correct (pool)",
    "diversity_distinct_correct": "distinct correct responses / query",
    "distinct_styles": "distinct valid solutions (styles) / query",
    "diversity_equations": "distinct / total equations (correct ones)",
    "frac_any_correct": "queries with >= 1 correct",
    "false_positive_rate": "right answers with a bad step (eval)",
    "temperature": "chosen temperature",
    "threshold": "chosen reward threshold",
    "cap": "per-query cap M",
    "balance_score": "balance score (training pool)",
    "selected_size": "selected-set size",
    "selected_acc": "selected-set accuracy (answers)",
    "selected_valid": "selected-set share of valid solutions",
    "gen_tokens_total": "generated tokens (search + pool), cumulative",
    "train_tokens_total": "trained tokens, cumulative",
    "iteration": "iteration",
}

FIGURES = {  # file stem -> (title, metric keys: one panel each)
    "exploration": (
        "Exploration",
        (
            "pass_at_k",
            "distinct_styles",
            "diversity_distinct_correct",
            "diversity_equations",
            "pool_distinct_styles",
            "train_frac_any_correct",
        ),
    ),
    "exploitation": (
        "Exploitation",
        (
            "greedy_acc",
            "pass_at_1",
            "reward_at_k",
            "prm_within_auc",
            "prm_step_auc",
            "pool_prm_within_auc",
            "selected_valid",
        ),
    ),
    "config": ("Chosen configuration", ("temperature", "threshold", "cap", "balance_score")),
    "selection": ("Selected training data", ("selected_size", "selected_acc", "selected_valid")),
    "cost": ("Cost", ("gen_tokens_total", "train_tokens_total")),
}
X_TOKENS = "gen_tokens_total"  # figures also drawn against generated tokens: exploration, exploitation

# Table columns of the report, in this order, when present.
REPORT_KEYS = (
    "greedy_acc",
    "pass_at_1",
    "pass_at_k",
    "reward_at_k",
    "prm_within_auc",
    "prm_step_auc",
    "distinct_styles",
    "diversity_distinct_correct",
    "diversity_equations",
    "pool_distinct_styles",
    "pool_prm_within_auc",
    "temperature",
    "threshold",
    "cap",
    "balance_score",
    "selected_size",
    "selected_acc",
    "selected_valid",
    "gen_tokens_total",
    "train_tokens_total",
)


def _as_groups(runs) -> dict[str, list[list[Mapping]]]:
    """name -> list of runs (seeds), each a list of records."""
    if not isinstance(runs, Mapping):
        runs = {"run": runs}
    out = {}
    for k, v in runs.items():
        v = list(v)
        out[str(k)] = v if v and isinstance(v[0], (list, tuple)) else [v]
    return out


def _as_runs(runs: Runs | Records) -> dict[str, list[Mapping]]:
    if isinstance(runs, Mapping):
        return {str(k): list(v) for k, v in runs.items()}
    return {"run": list(runs)}


def _number(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return None if math.isnan(v) else float(v)


def _series(records: Records, key: str, x_key: str = "iteration") -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, r in enumerate(records):
        y = _number(r.get(key))
        if y is None:
            continue
        x = _number(r.get(x_key))
        if x is None and x_key != "iteration":
            continue
        xs.append(i if x is None else x)
        ys.append(y)
    return xs, ys


def _mean_series(seeds: list[Records], key: str, x_key: str) -> tuple[list[float], list[float]]:
    """Mean over seeds at each iteration every seed has (x: the mean x)."""
    rows: dict[int, list[tuple[float, float]]] = {}
    for recs in seeds:
        for i, r in enumerate(recs):
            y, x = _number(r.get(key)), _number(r.get(x_key, i if x_key == "iteration" else None))
            if y is not None and x is not None:
                rows.setdefault(int(r.get("iteration", i)), []).append((float(x), y))
    xs, ys = [], []
    for it in sorted(rows):
        if len(rows[it]) == len(seeds):
            xs.append(sum(x for x, _ in rows[it]) / len(seeds))
            ys.append(sum(y for _, y in rows[it]) / len(seeds))
    return xs, ys


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100)
    return path


def plot_runs(runs, out_dir: str | Path, prefix: str = "") -> list[Path]:
    """Draw the per-iteration figures (exploration, exploitation, config, selection, cost) into out_dir, and
    exploration and exploitation again against cumulative generated tokens (…_vs_tokens.png).

    runs: one run's records, {name: records}, or {name: [records of each seed]} (then the mean over seeds
    is drawn with markers and each seed as a thin line of the same colour)."""
    groups = _as_groups(runs)
    out_dir = Path(out_dir)
    written = []
    jobs = [(stem, title, keys, "iteration", "") for stem, (title, keys) in FIGURES.items()]
    for stem in ("exploration", "exploitation"):  # the same against the cost
        jobs.append((stem, FIGURES[stem][0], FIGURES[stem][1], X_TOKENS, "_vs_tokens"))
    for stem, title, keys, xk, suffix in jobs:
        panels = [k for k in keys if any(_series(r, k, xk)[1] for seeds in groups.values() for r in seeds)]
        if not panels:
            continue
        cols = min(len(panels), 2)
        rows = math.ceil(len(panels) / cols)
        fig = Figure(figsize=(5.5 * cols, 3.6 * rows), layout="constrained")
        fig.suptitle(title + ("" if xk == "iteration" else " vs tokens spent"))
        for n, key in enumerate(panels):
            ax = fig.add_subplot(rows, cols, n + 1)
            for c, (name, seeds) in enumerate(groups.items()):
                color = f"C{c}"
                if len(seeds) > 1:
                    for recs in seeds:
                        xs, ys = _series(recs, key, xk)
                        if ys:
                            ax.plot(xs, ys, color=color, alpha=0.3, linewidth=0.8)
                    xs, ys = _mean_series(seeds, key, xk)
                    label = f"{name} (mean of {len(seeds)})"
                else:
                    xs, ys = _series(seeds[0], key, xk)
                    label = name
                if ys:
                    ax.plot(xs, ys, marker="o", color=color, label=label)
            ax.set_title(LABELS.get(key, key))
            ax.set_xlabel(LABELS.get(xk, xk))
            if xk == "iteration":
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            if len(groups) > 1 or any(len(s) > 1 for s in groups.values()):
                ax.legend(fontsize="small")
        written.append(_save(fig, out_dir / f"{prefix}{stem}{suffix}.png"))
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
    preamble: Sequence[str] = (),
) -> str:
    """A short markdown report: `preamble` lines, one table per run (a row per iteration) and what changed
    from the first to the last iteration; several runs also get a side-by-side of final values."""
    runs = _as_runs(runs)
    out = [f"# {title}", "", *preamble]
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
