"""`bstar-engine score`: PRM step scores for question/candidate JSONL."""

import click

from bstar.cli.checks import check_model_dir, check_out_file
from bstar.errors import DataError
from bstar.utils.jsonl import emit, read_jsonl


@click.command("score")
@click.option("--prm", "prm_path", required=True, help="Local PRM directory (LM-style or classification head).")
@click.option("--data", required=True, help="JSONL: 'question' plus 'candidates' (list) or 'response'.")
@click.option("--out", default="-", show_default=True, help="Output JSONL ('-' for stdout).")
@click.option("--kind", type=click.Choice(["lm", "classifier"]), default=None, help="Default: from the checkpoint.")
@click.option("--step-tag", default=None, help="Step tag token (default 'ки', or '<extra_0>' for classifiers).")
@click.option("--good-token", default="+", show_default=True)
@click.option("--bad-token", default="-", show_default=True)
@click.option("--delimiter", default="\n", show_default=True, help="Step delimiter.")
@click.option("--aggregate", type=click.Choice(["min", "last", "prod", "mean"]), default="min", show_default=True)
@click.option(
    "--scale",
    type=click.Choice(["prob", "logit"]),
    default="prob",
    show_default=True,
    help="P(good), or its logit log p - log(1 - p) (B-STaR's step reward).",
)
@click.option("--dtype", default="auto", show_default=True)
@click.option("--device", default="auto", show_default=True)
def score(prm_path, data, out, kind, step_tag, good_token, bad_token, delimiter, aggregate, scale, dtype, device):
    """Score every candidate's steps with a process reward model."""
    from bstar.engine import PRM  # torch: loaded when the command runs, not for --help
    from bstar.engine.config import resolve_device

    # Every option, the PRM's config and the data, before anything loads or is written.
    resolve_device(device)
    check_out_file(out)
    records = read_jsonl(data, required=("question",))
    cands = []
    for i, r in enumerate(records):
        c = r.get("candidates", [r["response"]] if "response" in r else None)
        if not isinstance(r["question"], str):
            raise DataError(f"{data}:{i + 1}: 'question' must be a string")
        if not isinstance(c, list) or not all(isinstance(x, str) for x in c):
            raise DataError(f"{data}:{i + 1}: needs 'candidates' (a list of strings) or 'response' (a string)")
        cands.append(c)
    check_model_dir(prm_path, "--prm")
    prm = PRM(
        prm_path,
        kind=kind,
        step_tag=step_tag,
        good_token=good_token,
        bad_token=bad_token,
        step_delimiter=delimiter,
        aggregate=aggregate,
        scale=scale,
        dtype=dtype,
        device=device,
    )
    results = prm.score_batch([r["question"] for r in records], cands, progress=True)
    outs = [
        {**r, "scores": [{"step_scores": s.step_scores, "score": s.score} for s in res]}
        for r, res in zip(records, results)
    ]
    emit(outs, out)
