"""`bstar-engine run --compare`: several modes x seeds of one configuration, reported together.

    records(run_dir)                  the run's iterations.jsonl records
    per_query(run_dir, iteration)     per-query outcomes of one evaluation (greedy and sampled)
    bootstrap_ci(rows, ...)           mean over seeds and its 95% interval, resampling queries
    exploration_change(dirs, 1, last) Pass@K and distinct valid solutions, last minus first, paired
    report(out, runs)                 report.md and plots/ for all runs; returns summary lines

Intervals: the same eval questions are resampled (with replacement, 2,000 times) for every seed of every
mode, so an interval is the question-sampling uncertainty of the mean over seeds; the difference between
two modes is resampled paired (same questions). The seeds' own spread is listed beside it.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from bstar.results.plots import LABELS, plot_runs, plot_search_table, write_report
from bstar.utils.jsonl import read_jsonl

N_BOOT = 2000
CI_KEYS = ("greedy_acc", "pass_at_1", "pass_at_k", "reward_at_k", "distinct_styles")


def records(run_dir) -> list[dict]:
    f = Path(run_dir) / "iterations.jsonl"
    return read_jsonl(f) if f.exists() else []


def per_query(run_dir, iteration: int, labels=None, questions=None) -> dict[str, list[float]]:
    """Per-query values of one evaluation: greedy_acc (every eval query), and for the sampled ones pass_at_1
    (share correct), pass_at_k (any correct), reward_at_k (the PRM's pick correct; ties: earlier) and, with
    task labels, distinct_styles (distinct valid solutions)."""
    f = Path(run_dir) / f"iter_{iteration:03d}" / "eval_samples.jsonl"
    rows = read_jsonl(f)
    greedy = [r for r in rows if r.get("kind") == "greedy"]
    sampled = [r for r in rows if r.get("kind") == "sampled"]
    out = {"greedy_acc": [float(r["correct"][0]) for r in greedy]}
    if sampled:
        out["sampled_query"] = [r["query"] for r in sampled]
        out["pass_at_1"] = [sum(r["correct"]) / len(r["correct"]) for r in sampled]
        out["pass_at_k"] = [float(any(r["correct"])) for r in sampled]
        out["reward_at_k"] = [
            float(r["correct"][max(range(len(r["prm"])), key=lambda j: (r["prm"][j], -j))]) for r in sampled
        ]
        if labels is not None and questions is not None:
            out["distinct_styles"] = [float(labels.distinct_valid(questions[r["query"]], r["texts"])) for r in sampled]
    return out


def bootstrap_ci(seeds_values: list[list[float]], n_boot: int = N_BOOT, seed: int = 0) -> tuple[float, float, float]:
    """(mean over seeds of the per-seed mean, 2.5% and 97.5% bootstrap quantiles); every seed's list holds
    the same queries in the same order, resampled together."""
    n = len(seeds_values[0])
    if any(len(v) != n for v in seeds_values):
        raise ValueError("every seed needs a value for the same queries")
    per_q = [sum(v[i] for v in seeds_values) / len(seeds_values) for i in range(n)]
    mean = sum(per_q) / n
    rng = random.Random(seed)
    stats = sorted(sum(per_q[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    return mean, stats[int(0.025 * n_boot)], stats[min(n_boot - 1, int(0.975 * n_boot))]


def paired_difference_ci(a: list[list[float]], b: list[list[float]], n_boot: int = N_BOOT, seed: int = 1):
    """bootstrap_ci of (mean over a's seeds) - (mean over b's seeds), per query, paired."""
    n = len(a[0])
    diff = [sum(v[i] for v in a) / len(a) - sum(v[i] for v in b) / len(b) for i in range(n)]
    return bootstrap_ci([diff], n_boot, seed)


EXPLORATION_KEYS = ("pass_at_k", "distinct_styles")


def exploration_change(run_dirs: list[str], first: int, last: int, labels=None, questions=None) -> dict:
    """{key: (mean, lo, hi)}: each exploration measure at iteration `last` minus at `first`, over the sampled eval
    questions both iterations evaluated (the curves' inner points sample fewer), mean over seeds, paired
    bootstrap interval over questions; and "questions": how many."""
    at = {i: [per_query(d, i, labels, questions) for d in run_dirs] for i in (first, last)}
    runs = list(zip(at[first], at[last]))
    common = sorted(set.intersection(*(set(v["sampled_query"]) & set(w["sampled_query"]) for v, w in runs)))
    out: dict = {"questions": len(common)} if common else {}
    for k in EXPLORATION_KEYS:
        if not common or not all(k in v and k in w for v, w in runs):
            continue
        by_q = [(dict(zip(v["sampled_query"], v[k])), dict(zip(w["sampled_query"], w[k]))) for v, w in runs]
        last_v = [[b[q] for q in common] for _, b in by_q]
        out[k] = paired_difference_ci(last_v, [[a[q] for q in common] for a, _ in by_q])
    return out


def exploration_lines(modes: dict[str, list[str]], data: dict, runs: dict, labels=None, questions=None) -> list[str]:
    """The report's table of exploration from the first trained iteration (1) to the last, per mode."""
    rows = []
    for m, names in modes.items():
        last = data[names[0]][min(len(data[n]) for n in names) - 1]["iteration"]
        if last <= 1:
            continue
        ch = exploration_change([runs[n] for n in names], 1, last, labels, questions)
        if ch:
            cells = [_fmt_ci(*ch[k]) if k in ch else "–" for k in EXPLORATION_KEYS]
            rows.append(f"| {m} | 1 → {last} | {ch['questions']} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    head = " | ".join(LABELS.get(k, k) for k in EXPLORATION_KEYS)
    return [
        "## Exploration from iteration 1 to the last: change, mean over seeds, 95% interval paired over questions",
        "",
        f"| mode | iterations | eval questions | {head} |",
        "|" + "---|" * (3 + len(EXPLORATION_KEYS)),
        *rows,
    ]


def _fmt_ci(m, lo, hi) -> str:
    return f"{m:.3f} [{lo:.3f}, {hi:.3f}]"


def _mean(xs):
    xs = [x for x in xs if isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else None


def cost_lines(mean_runs: dict[str, list[dict]]) -> list[str]:
    """Generated tokens per mode (search + pool, cumulative; evaluation is not a cost of the method), and each
    mode's greedy accuracy at equal tokens: at its last iteration whose cumulative tokens stay within the
    cheapest mode's final total (means over seeds; the inner iterations may be evaluated on fewer questions)."""
    finals = {m: rows[-1] for m, rows in mean_runs.items() if rows and "gen_tokens_total" in rows[-1]}
    if len(finals) < 2:
        return []
    budget = min(r["gen_tokens_total"] for r in finals.values())
    out = ["## Cost: generated tokens (search + pool), means over seeds", ""]
    out.append(f"| mode | tokens, final | greedy, final | greedy at <= {budget:,.0f} tokens (iteration) |")
    out.append("|---|---|---|---|")
    for m, rows in mean_runs.items():
        if m not in finals:
            continue
        within = [r for r in rows if r.get("gen_tokens_total", 0) <= budget * (1 + 1e-9) and "greedy_acc" in r]
        at = within[-1] if within else None
        cell = f"{at['greedy_acc']:.3f} ({at['iteration']:.0f})" if at else "n/a"
        out.append(f"| {m} | {finals[m]['gen_tokens_total']:,.0f} | {finals[m].get('greedy_acc', float('nan')):.3f} "
                   f"| {cell} |")  # fmt: skip
    return out + [""]


def report(out: str, runs: dict[str, str], labels=None, questions=None) -> list[str]:
    """report.md and plots/ in `out` for runs {name: run dir} named '<mode>-seed<k>'; returns summary lines."""
    out_p = Path(out)
    data = {name: records(d) for name, d in runs.items()}
    modes: dict[str, list[str]] = {}
    for name in runs:
        modes.setdefault(name.rsplit("-seed", 1)[0], []).append(name)
    if labels is None:
        cfg = json.loads((Path(next(iter(runs.values()))) / "config.json").read_text())
        if cfg.get("model") is None:
            from bstar.embedded import EmbeddedConfig, build_assets
            from bstar.loop.controller import builtin_labels

            labels = builtin_labels()
            questions = [
                e.question for e in build_assets(EmbeddedConfig.preset(cfg["embedded_preset"]), progress=False).test
            ]
    groups = {m: [data[n] for n in names] for m, names in modes.items()}
    figures = plot_runs(groups, out_p / "plots")
    for m, names in modes.items():  # the last search surface of each mode's first seed
        d = Path(runs[names[0]])
        for kind in ("search", "selection"):
            files = sorted(d.glob(f"iter_*/{kind}.json"))
            table = json.loads(files[-1].read_text()).get("table") if files else None
            if table and kind == "search":
                figures.append(
                    plot_search_table(table, out_p / "plots" / f"{m}-search_{files[-1].parent.name}.png",
                                      title=f"{m}: balance score on the subset, {files[-1].parent.name}")
                )  # fmt: skip
    # final-iteration intervals
    lines, summary = ["## Final iteration: mean over seeds, 95% bootstrap interval over eval questions", ""], []
    finals = {}
    for m, names in modes.items():
        last = min(len(data[n]) for n in names) - 1
        vals = [per_query(runs[n], data[n][last]["iteration"], labels, questions) for n in names]
        finals[m] = (last, vals)
    keys = [k for k in CI_KEYS if all(k in v for _, vals in finals.values() for v in vals)]
    lines.append("| mode | iteration | " + " | ".join(LABELS.get(k, k) for k in keys) + " | greedy per seed |")
    lines.append("|" + "---|" * (len(keys) + 3))
    for m, (last, vals) in finals.items():
        cells = [_fmt_ci(*bootstrap_ci([v[k] for v in vals])) for k in keys]
        per_seed = ", ".join(f"{sum(v['greedy_acc']) / len(v['greedy_acc']):.3f}" for v in vals)
        it = data[modes[m][0]][last]["iteration"]
        lines.append(f"| {m} | {it} | " + " | ".join(cells) + f" | {per_seed} |")
        g = bootstrap_ci([v["greedy_acc"] for v in vals])
        summary.append(f"{m}: final greedy accuracy {_fmt_ci(*g)} (mean of {len(vals)} seeds: {per_seed})")
    if "bstar" in finals and "online-rft" in finals:
        lines += ["", "Difference bstar - online-rft (paired over questions):", ""]
        for k in keys:
            a = [v[k] for v in finals["bstar"][1]]
            b = [v[k] for v in finals["online-rft"][1]]
            lines.append(f"- {LABELS.get(k, k)}: {_fmt_ci(*paired_difference_ci(a, b))}")
        d = paired_difference_ci([v["greedy_acc"] for v in finals["bstar"][1]],
                                 [v["greedy_acc"] for v in finals["online-rft"][1]])  # fmt: skip
        summary.append(f"bstar - online-rft greedy accuracy: {_fmt_ci(*d)}")
    lines += [""] + exploration_lines(modes, data, runs, labels, questions)
    sizes = sorted({(r.get("eval_greedy_queries"), r.get("eval_sampled_queries")) for rs in data.values() for r in rs})
    if len(sizes) > 1:  # mid_eval_queries: the curves' inner points come from fewer questions
        lines += ["", "Eval questions (greedy, sampled) per iteration differ: "
                  + ", ".join(f"{g}, {s}" for g, s in sizes) + " (iterations.jsonl: eval_greedy_queries)."]  # fmt: skip
    lines.append("")
    # per-iteration means over seeds (the curves)
    mean_runs = {}
    for m, names in modes.items():
        n_it = min(len(data[n]) for n in names)
        rows = []
        for i in range(n_it):
            recs = [data[n][i] for n in names]
            row = {"iteration": recs[0]["iteration"]}
            for k in set().union(*recs) - {"iteration"}:
                v = _mean([r.get(k) for r in recs])
                if v is not None:
                    row[k] = v
            rows.append(row)
        mean_runs[m] = rows
    lines += cost_lines(mean_runs)
    rel = [Path("plots") / Path(f).name for f in figures]
    text = write_report(
        mean_runs, None, title="B-STaR comparison report (tables: means over seeds)", figures=rel, preamble=lines
    )
    (out_p / "report.md").write_text(text)
    return summary
