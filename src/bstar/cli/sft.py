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
from bstar.errors import BStarError, DataError


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
@click.option("--epochs", default=1, show_default=True, type=click.IntRange(min=1))
@click.option("--max-steps", default=None, type=click.IntRange(min=1), help="Stop after this many optimizer steps.")
@click.option("--lr", default=1e-5, show_default=True, type=float)
@click.option(
    "--batch-tokens",
    default=16384,
    show_default=True,
    type=click.IntRange(min=1),
    help="Global batch per optimizer step, in tokens.",
)
@click.option(
    "--batch-examples",
    default=None,
    type=click.IntRange(min=1),
    help="Global batch in examples (overrides --batch-tokens).",
)
@click.option(
    "--micro-batch-tokens",
    default=4096,
    show_default=True,
    type=click.IntRange(min=1),
    help="Tokens per forward per device.",
)
@click.option("--max-seq-len", default=2048, show_default=True, type=click.IntRange(min=2))
@click.option("--no-pack", is_flag=True, help="Length-bucketed padded batches instead of packing.")
@click.option("--schedule", default="cosine", show_default=True, type=click.Choice(["cosine", "constant"]))
@click.option("--warmup-steps", default=0, show_default=True, type=click.IntRange(min=0))
@click.option("--warmup-ratio", default=0.0, show_default=True, type=click.FloatRange(0, 1))
@click.option("--min-lr-ratio", default=0.0, show_default=True, type=click.FloatRange(0, 1))
@click.option("--weight-decay", default=0.0, show_default=True, type=float)
@click.option("--max-grad-norm", default=1.0, show_default=True, type=float, help="0 disables clipping.")
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "bf16"]))
@click.option(
    "--grad-checkpointing/--no-grad-checkpointing",
    default=None,
    help="Recompute activations in backward (less memory). Default: on for CUDA, off on CPU.",
)
@click.option(
    "--offload-optimizer",
    is_flag=True,
    help="FSDP2 CPU offload: weights, gradients and AdamW state in host memory, the optimizer step on the CPU "
    "(fine-tunes a 7B model on one 80 GB GPU; needs ~16 bytes/param of host memory).",
)
@click.option(
    "--ce-chunk",
    default=1024,
    show_default=True,
    type=click.IntRange(min=0),
    help="Cross-entropy over this many rows at a time (no full float32 logits); 0: the plain loss.",
)
@click.option("--on-bad-data", default="skip", show_default=True, type=click.Choice(["skip", "refuse"]))
@click.option(
    "--save-every",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="Checkpoint every N steps (0: final only).",
)
@click.option(
    "--save-dtype",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    help="auto: the base checkpoint's dtype; float32 makes a resume exact.",
)
@click.option(
    "--resume", default=None, type=click.Path(exists=True, file_okay=False), help="Checkpoint dir to continue from."
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default=None, help="Default: cuda if available, else cpu.")
def sft(model, data, out, resume, save_every, max_grad_norm, no_pack, **kw):
    """Fine-tune MODEL on (prompt, completion) pairs; loss on completion tokens only."""
    from bstar.utils import distributed as dist_utils  # torch: loaded when the command runs, not for --help

    try:
        _run(model, data, Path(out), resume, save_every, max_grad_norm, no_pack, kw)
    except BStarError as e:  # one readable line, also when the command is invoked without the group
        raise click.ClickException(str(e)) from e
    finally:
        dist_utils.destroy()


def _run(model, data, out, resume, save_every, max_grad_norm, no_pack, kw):
    from bstar.train import SFTConfig, SFTTrainer  # torch, transformers: not for --help

    _check_inputs(model, data, out, max_grad_norm, kw)
    cfg = SFTConfig(
        **kw, pack=not no_pack, max_grad_norm=max_grad_norm or None, metrics_path=str(out / "metrics.jsonl")
    )
    make_out_dir(out)
    trainer = SFTTrainer(model, cfg)
    res = trainer.train(data, resume_from=resume, checkpoint_dir=out, save_every=save_every)
    final = trainer.save(out / "final")
    if trainer.rank == 0:
        last = f", last loss {res.losses[-1]:.4f}" if res.losses else ""
        click.echo(f"{res.steps} steps{last}; model saved to {final}")


def _check_inputs(model: str, data: str, out: Path, max_grad_norm: float, kw: dict) -> None:
    """Everything sft reads, checked before --out is created (a refused command leaves no trace): the
    numbers, the device, the checkpoint (config.json, safetensors weights: pickle is refused) and the data."""
    from bstar.engine.config import resolve_device
    from bstar.engine.model.loader import weight_files
    from bstar.train.data import _read_file, _report

    check_number("--lr", kw["lr"], low=0, low_open=True)
    check_number("--weight-decay", kw["weight_decay"], low=0)
    check_number("--max-grad-norm", max_grad_norm, low=0)
    if kw["device"] is not None:
        resolve_device(kw["device"])
    check_model_dir(model)
    weight_files(model)
    items, problems = _read_file(data, "prompt", "completion")
    if kw["on_bad_data"] == "refuse":
        _report(problems, data, "refuse")
    if not items:
        why = f"; line {problems[0].line}: {problems[0].reason}" if problems else ""
        raise DataError(f"{data}: no usable (prompt, completion) example{why}")
    check_out_dir(out)
