"""Supervised fine-tuning (FSDP2), laid out as torchtitan lays out a trainer:

    config.py            SFTConfig (every option of a run) and the LR schedule
    data.py              (prompt, completion) records -> tokenised SFTExamples -> the batch plan
    varlen_attention.py  packed-row attention, registered with transformers as "bstar_varlen"
    loss.py              next-token cross-entropy with the LM head in chunks (no [tokens, vocab] logits)
    cpu_gemm.py          the Linear layers on oneDNN (CPU float32, one process) with their backward
    parallelize.py       the `fully_shard` calls (optionally CPU-offloaded), rank-0 broadcast load, gather
    checkpoint.py        HF safetensors dir + trainer_state/ for resume, written atomically
    trainer.py           SFTTrainer: the training loop, weights in and out

The B-STaR loop (bstar.loop.controller) and the built-in task's warm start and PRM (bstar.embedded) train
through SFTTrainer; `bstar-engine sft` (bstar.cli.sft) is its command line.

Importing the package (and bstar.train.config) is light, no torch: the command line derives `sft`'s options
from SFTConfig; the names below load their module on first use (PEP 562).
"""

from typing import TYPE_CHECKING

from bstar.utils.lazy import lazy_names

if TYPE_CHECKING:
    from bstar.train.config import SFTConfig
    from bstar.train.data import SFTExample
    from bstar.train.trainer import SFTTrainer, TrainResult

__all__ = ["SFTConfig", "SFTExample", "SFTTrainer", "TrainResult"]
_MODULE_OF = {  # name -> the module that defines it
    "SFTConfig": "bstar.train.config",
    "SFTExample": "bstar.train.data",
    "SFTTrainer": "bstar.train.trainer",
    "TrainResult": "bstar.train.trainer",
}

__getattr__, __dir__ = lazy_names(__name__, _MODULE_OF)
