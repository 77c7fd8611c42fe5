"""torchrun worker for tests/integration/test_trainer.py: trains under FSDP2 (gloo, CPU), saves, resumes.

    torchrun --nproc_per_node 2 tests/fsdp_worker.py MODEL_DIR DATA.jsonl OUT_DIR CONFIG_JSON

Writes OUT_DIR/result.json (rank 0): per-step losses and grad norms, the losses of a second run
resumed from the mid-run checkpoint, and the final weights in OUT_DIR/final (HF dir).
"""

import json
import sys
from pathlib import Path

import torch.distributed as dist

from bstar.train import SFTConfig, SFTTrainer, checkpoint
from bstar.utils import distributed as dist_utils

READS = {"n": 0}  # checkpoint files opened by this rank (the model is read once, on rank 0)
_enter = checkpoint.WeightReader.__enter__


def _counting_enter(self):
    READS["n"] += 1
    return _enter(self)


checkpoint.WeightReader.__enter__ = _counting_enter


def main():
    model_dir, data, out, cfg_json = sys.argv[1:5]
    out = Path(out)
    kw = json.loads(cfg_json)
    save_every = kw.pop("save_every")
    cfg = SFTConfig(**kw, progress=False)
    t = SFTTrainer(model_dir, cfg)
    assert dist.is_initialized() and dist.get_world_size() == 2
    res = t.train(data, checkpoint_dir=out / "ckpts", save_every=save_every)
    t.save(out / "final")
    # A fresh trainer resumed from the mid-run checkpoint must retrace the rest of the run.
    t2 = SFTTrainer(model_dir, cfg)
    res2 = t2.train(data, resume_from=out / "ckpts" / f"step-{save_every:06d}")
    resumed_final = dict(t2.named_weights())
    final = dict(t.named_weights())
    max_diff = max(float((resumed_final[n] - final[n]).abs().max()) for n in final)
    reads = dist_utils.all_gather_json(READS["n"])
    if dist.get_rank() == 0:
        (out / "result.json").write_text(
            json.dumps(
                {
                    "losses": res.losses,
                    "grad_norms": [m["grad_norm"] for m in res.metrics],
                    "resumed_losses": res2.losses,
                    "resumed_weight_max_diff": max_diff,
                    "sharded": type(t.model).__name__,
                    "checkpoint_reads": reads,
                }
            )
        )
    del t, t2, final, resumed_final  # the sharded models go before the group (dist_utils.destroy)
    dist_utils.destroy()


if __name__ == "__main__":
    main()
