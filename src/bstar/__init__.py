"""bstar-engine: a paged-KV inference engine, its Triton kernels, and the B-STaR self-improvement loop.

One import namespace, three rooms one level down, each layer importing only those below it:

    kernels/    Triton kernels, each beside its torch reference (the hot paths of a step)
    engine/     the inference engine: LLM, AsyncLLM, PRM, scheduler, block manager, runner, sampler
    train/      the FSDP2 SFT trainer the loop fine-tunes with
    loop/       B-STaR: configuration search, balance, rewards, selection, metrics, the controller
    embedded/   the built-in task, its tokenizer, policy and PRM (no download needed)
    results/    a run's plots and report, and --compare (modes x seeds, bootstrap intervals)
    cli/        the `bstar-engine` command line (`python -m bstar` runs it too)
    utils/      JSONL files, process groups;  testing/: tiny local checkpoints for tests and benchmarks
    errors.py   BStarError, the base of every error a user can act on

The engine's public names are here too, vLLM-shaped (`from bstar import LLM, SamplingParams`); they load
on first use, so `import bstar` costs no torch.
"""

from typing import TYPE_CHECKING

import bstar.engine as _engine

if TYPE_CHECKING:
    from bstar.engine import *  # noqa: F403

__all__ = list(_engine.__all__)


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module 'bstar' has no attribute {name!r}")
    value = getattr(_engine, name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
