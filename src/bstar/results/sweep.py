"""`bstar-engine run --compare --reward-sweep`: bstar against online-rft at several reward reliabilities.

A level is the reward that selection reads: the learned PRM ("prm"), or the built-in task's step verifier at
noise sigma ("s0", "s2", ...: bstar.loop.verifier). Its runs are named '<mode>-<level>-seed<k>'.

    level_name(noise)                  "prm" for None, "s2" for 2.0
    sweep_rows(runs, levels)           per level: the reward's within-question AUC and bstar's final gain
    report(out, runs, levels)          plots/reward_sweep.png, plots/reward_sweep_curves.png, a report section

The gain is bstar's final greedy accuracy minus online-rft's, mean over seeds, with a 95% bootstrap interval
paired over eval questions (bstar.results.compare). The x value is the reward's within-question AUC against
answer correctness on the eval samples, averaged over the iterations of every run of the level (the bar spans
the lowest and highest iteration mean among those runs): the reward as the policies of that level saw it.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from bstar.results.compare import paired_difference_ci, per_query, records

MODES = ("bstar", "online-rft")
CURVES = (  # (record key, panel title): exploration on the left, exploitation on the right
    ("pass_at_k", "exploration: Pass@K (eval)"),
    ("reward_at_k", "exploitation: Reward@K, the reward's pick (eval)"),
    ("distinct_styles", "exploration: distinct valid solutions / query (eval)"),
    ("prm_within_auc", "exploitation: reward AUC within a question (eval)"),
)


def level_name(noise: float | None) -> str:
    return "prm" if noise is None else f"s{noise:g}".replace(".", "p")


def _mean(xs):
    xs = [x for x in xs if isinstance(x, (int, float))]
    return sum(xs) / len(xs) if xs else None


def _by_group(runs: dict[str, str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for name in runs:
        groups.setdefault(name.rsplit("-seed", 1)[0], []).append(name)
    return groups


def sweep_rows(runs: dict[str, str], levels: list[str]) -> list[dict]:
    """Per level with both modes present: {level, auc, auc_lo, auc_hi, gain, gain_lo, gain_hi, bstar, online,
    seeds}; the finals come from the last iteration every seed of both modes reached."""
    groups = _by_group(runs)
    rows = []
    for level in levels:
        names = {m: groups.get(f"{m}-{level}", []) for m in MODES}
        if not all(names.values()):
            continue
        recs = {n: records(runs[n]) for m in MODES for n in names[m]}
        last = min(len(r) for r in recs.values()) - 1
        if last < 0:
            continue
        greedy = {m: [per_query(runs[n], recs[n][last]["iteration"])["greedy_acc"] for n in names[m]] for m in MODES}
        gain, lo, hi = paired_difference_ci(greedy["bstar"], greedy["online-rft"])
        aucs = [_mean([r.get("prm_within_auc") for r in rs]) for rs in recs.values()]
        aucs = [a for a in aucs if a is not None]
        acc = {m: _mean([sum(v) / len(v) for v in greedy[m]]) for m in MODES}
        rows.append(
            dict(
                level=level,
                auc=_mean(aucs),
                auc_lo=min(aucs) if aucs else None,
                auc_hi=max(aucs) if aucs else None,
                gain=gain,
                gain_lo=lo,
                gain_hi=hi,
                bstar=acc["bstar"],
                online=acc["online-rft"],
                seeds=len(names["bstar"]),
                iteration=recs[names["bstar"][0]][last]["iteration"],
            )
        )
    return rows


def plot_gain_vs_auc(rows: list[dict], path: Path) -> Path:
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    for i, r in enumerate(x for x in rows if x["auc"] is not None):
        xerr = [[r["auc"] - r["auc_lo"]], [r["auc_hi"] - r["auc"]]]
        yerr = [[r["gain"] - r["gain_lo"]], [r["gain_hi"] - r["gain"]]]
        ax.errorbar([r["auc"]], [r["gain"]], xerr=xerr, yerr=yerr, fmt="o", color=f"C{i}", capsize=4)
        label = "learned PRM" if r["level"] == "prm" else f"verifier sigma={r['level'][1:].replace('p', '.')}"
        ax.annotate(label, (r["auc"], r["gain"]), textcoords="offset points", xytext=(6, 6), fontsize="small")
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.axvline(0.5, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xlabel("reward's within-question AUC (eval, mean over iterations)")
    ax.set_ylabel("bstar - online-rft, final greedy accuracy")
    ax.set_title("B-STaR's gain against reward reliability (95% paired intervals)")
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def plot_curves(runs: dict[str, str], levels: list[str], path: Path) -> Path:
    """Exploration and exploitation against iterations, mean over seeds: colour = level, line = mode."""
    groups = _by_group(runs)
    fig = Figure(figsize=(11, 7.2), layout="constrained")
    fig.suptitle("Exploration and exploitation per iteration (mean over seeds; solid bstar, dashed online-rft)")
    for p, (key, title) in enumerate(CURVES):
        ax = fig.add_subplot(2, 2, p + 1)
        for c, level in enumerate(levels):
            for mode, style in zip(MODES, ("-", "--")):
                names = groups.get(f"{mode}-{level}", [])
                seeds = [records(runs[n]) for n in names]
                n_it = min((len(s) for s in seeds), default=0)
                xs, ys = [], []
                for i in range(n_it):
                    v = _mean([s[i].get(key) for s in seeds])
                    if v is not None:
                        xs.append(seeds[0][i]["iteration"])
                        ys.append(v)
                if ys:
                    ax.plot(xs, ys, style, marker="o", color=f"C{c}", label=f"{mode} {level}")
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if p == 0:
            ax.legend(fontsize="x-small", ncol=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def report(out: str, runs: dict[str, str], levels: list[str]) -> list[str]:
    """The sweep's figures and a section appended to report.md; returns summary lines."""
    out_p = Path(out)
    rows = sweep_rows(runs, levels)
    plot_gain_vs_auc(rows, out_p / "plots" / "reward_sweep.png")
    plot_curves(runs, levels, out_p / "plots" / "reward_sweep_curves.png")
    lines = [
        "",
        "## Reward sweep: B-STaR's final gain over online-rft against the reward's reliability",
        "",
        "![gain vs AUC](plots/reward_sweep.png)",
        "![curves](plots/reward_sweep_curves.png)",
        "",
        "| reward | within-question AUC (eval) | bstar greedy | online-rft greedy | bstar - online-rft [95%] | seeds |",
        "|---|---|---|---|---|---|",
    ]
    summary = []
    for r in rows:
        auc = "n/a" if r["auc"] is None else f"{r['auc']:.3f} [{r['auc_lo']:.3f}, {r['auc_hi']:.3f}]"
        gain = f"{r['gain']:+.3f} [{r['gain_lo']:+.3f}, {r['gain_hi']:+.3f}]"
        lines.append(f"| {r['level']} | {auc} | {r['bstar']:.3f} | {r['online']:.3f} | {gain} | {r['seeds']} |")
        summary.append(f"reward {r['level']}: AUC {auc}, bstar - online-rft greedy {gain}")
    report_md = out_p / "report.md"
    head = report_md.read_text() if report_md.exists() else "# Reward sweep\n"
    report_md.write_text(head.rstrip("\n") + "\n" + "\n".join(lines) + "\n")
    return summary
