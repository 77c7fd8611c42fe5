"""bstar.results.plots: figures only for metrics with data, the search surface, the markdown report."""

from reference_selection import hand_samples

from bstar.loop.search import SearchConfig, search_config
from bstar.results.plots import plot_runs, plot_search_table, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def test_plots_and_report(tmp_path):
    bstar = [
        {
            "iteration": i,
            "greedy_acc": 0.2 + 0.1 * i,
            "pass_at_1": 0.2 + 0.05 * i,
            "pass_at_k": 0.6 + 0.02 * i,
            "reward_at_k": 0.4,
            "diversity_distinct_correct": 3.0 - i,
            "diversity_equations": None if i == 1 else 0.5,
            "temperature": 0.7 + 0.1 * i,
            "threshold": 0.5,
            "balance_score": 0.3 + 0.1 * i,
            "selected_size": 100 + 10 * i,
            "selected_acc": 0.9,
            "gen_tokens_total": 1000 * i,
        }
        for i in range(1, 4)
    ]
    rft = [{"iteration": i, "greedy_acc": 0.25, "pass_at_k": float("nan"), "temperature": 1.0} for i in range(1, 4)]
    paths = plot_runs({"bstar": bstar, "online-rft": rft}, tmp_path / "figs")
    assert {p.name for p in paths} == {
        "exploration.png",
        "exploitation.png",
        "config.png",
        "selection.png",
        "cost.png",
        "exploration_vs_tokens.png",
        "exploitation_vs_tokens.png",
    }
    for p in paths:
        data = p.read_bytes()
        assert data.startswith(PNG) and len(data) > 5000
    # only what has data is drawn
    only = plot_runs([{"iteration": 1, "greedy_acc": 0.1}, {"greedy_acc": 0.3}], tmp_path / "one")
    assert [p.name for p in only] == ["exploitation.png"]
    assert plot_runs([{"iteration": 1}], tmp_path / "none") == []
    # several seeds per mode: drawn as their mean and one thin line each
    seeds = plot_runs({"bstar": [bstar, bstar[:2]], "online-rft": [rft]}, tmp_path / "seeds")
    assert {p.name for p in seeds} >= {"exploration.png", "exploitation_vs_tokens.png"}

    res = search_config(hand_samples(), SearchConfig(thresholds=(0.0, 0.1, 1.12), n_star=2, target_per_query=None))
    hp = plot_search_table(res.table, tmp_path / "search.png")
    assert hp.read_bytes().startswith(PNG)

    text = write_report({"bstar": bstar, "online-rft": rft}, tmp_path / "report.md", figures=paths)
    assert (tmp_path / "report.md").read_text() == text
    assert "## bstar" in text and "## online-rft" in text and "side by side" in text
    assert "| iteration | greedy_acc |" in text
    assert "greedy accuracy (eval): 0.300 → 0.500 (+0.200)" in text
    assert "selected-set size: 110 → 130 (+20)" in text
    assert "chosen temperature over iterations: 0.800, 0.900, 1.000" in text
    assert "chosen reward threshold: 0.500 throughout" in text
    assert "chosen temperature: 1.000 throughout" in text  # online-rft
    assert "![exploitation](exploitation.png)" in text
    assert "nan" not in text.lower()
