"""`bstar-engine sft`: supervised fine-tuning on a JSONL file of {"prompt", "completion"} lines.

One device:

    bstar-engine sft --model PATH --data FILE.jsonl --out DIR [--epochs 1 --lr 1e-5 --batch-tokens 16384]

Several devices (FSDP2; one process per GPU, NCCL; on CPU gloo):

    torchrun --nproc_per_node N -m bstar.cli sft --model PATH --data FILE.jsonl --out DIR
    torchrun --nnodes M --nproc_per_node N --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        -m bstar.cli sft --model PATH --data FILE.jsonl --out DIR

One 80 GB GPU and a 7B model: --offload-optimizer (FSDP2 CPUOffloadPolicy on a one-rank group).

DIR receives: final/ (HF safetensors checkpoint that transformers and the engine load, with
trainer_state/ for resume), step-NNNNNN/ every --save-every steps, metrics.jsonl (one line per step).
Continue an interrupted run with --resume DIR/step-NNNNNN (same data and options).
"""

from pathlib import Path

import click

from bstar.cli.checks import check_model_dir, check_number, check_out_dir, make_out_dir
from bstar.cli.options import config_options, config_values
from bstar.errors import BStarError, DataError
from bstar.train.config import SFTConfig

COVERED = {"metrics_path": "out"}  # SFTConfig fields set from an option of sft's own: field -> that option


@click.command("sft")
@click.option(
    "--model",
    "model",
    required=True,
    type=click.Path(exists=True, file_okay=False),
    help="HF model directory to start from.",
)
@click.option(
    "--data",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="JSONL with prompt and completion fields.",
)
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Run directory (final/, step-N/, metrics.jsonl)."
)
@click.option(
    "--save-every",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Checkpoint every N steps (0: final only).",
)
@click.option(
    "--resume",
    default=None,
    type=click.Path(exists=True, file_okay=False),
    help="Checkpoint dir to continue from.  [default: none]",
)
@config_options(SFTConfig, covered=COVERED)
def sft(model, data, out, resume, save_every, **kw):
    """Fine-tune MODEL on (prompt, completion) pairs; loss on completion tokens only."""
    from bstar.utils import distributed as dist_utils  # torch: loaded when the command runs, not for --help

    try:
        _run(model, data, Path(out), resume, save_every, kw)
    except BStarError as e:  # one readable line, also when the command is invoked without the group
        raise click.ClickException(str(e)) from e
    finally:
        dist_utils.destroy()


def _run(model, data, out, resume, save_every, kw):
    from bstar.train import SFTTrainer  # torch, transformers: not for --help

    _check_inputs(model, data, out, kw)
    cfg = sft_config(kw, out)
    make_out_dir(out)
    trainer = SFTTrainer(model, cfg)
    res = trainer.train(data, resume_from=resume, checkpoint_dir=out, save_every=save_every)
    final = trainer.save(out / "final")
    if trainer.rank == 0:
        last = f", last loss {res.losses[-1]:.4f}" if res.losses else ""
        click.echo(f"{res.steps} steps{last}; model saved to {final}")


def sft_config(kw: dict, out: Path) -> SFTConfig:
    """The run's config from sft's parsed options; the metrics go to OUT/metrics.jsonl."""
    return SFTConfig(**config_values(SFTConfig, kw), metrics_path=str(Path(out) / "metrics.jsonl"))


def _check_inputs(model: str, data: str, out: Path, kw: dict) -> None:
    """Everything sft reads, checked before --out is created (a refused command leaves no trace): the
    numbers, the device, the checkpoint (config.json, safetensors weights: pickle is refused) and the data."""
    from bstar.engine.config import resolve_device
    from bstar.engine.model.loader import weight_files
    from bstar.train.data import _read_file, _report

    check_number("--lr", kw["lr"], low=0, low_open=True)
    check_number("--weight-decay", kw["weight_decay"], low=0)
    check_number("--max-grad-norm", kw["max_grad_norm"], low=0)
    if kw["device"] is not None:
        resolve_device(kw["device"])
    check_model_dir(model)
    weight_files(model)
    items, problems = _read_file(data, kw["prompt_field"], kw["completion_field"])
    if kw["on_bad_data"] == "refuse":
        _report(problems, data, "refuse")
    if not items:
        why = f"; line {problems[0].line}: {problems[0].reason}" if problems else ""
        raise DataError(f"{data}: no usable ({kw['prompt_field']}, {kw['completion_field']}) example{why}")
    check_out_dir(out)
