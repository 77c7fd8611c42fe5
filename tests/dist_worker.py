"""torchrun worker for tests/integration/test_trainer_memory.py: bstar.utils.distributed' byte exchange on 2
ranks (gloo, CPU).

    torchrun --nproc_per_node 2 tests/dist_worker.py OUT_DIR

Each rank writes OUT_DIR/rank{R}.json: the timeout its group got, all_gather_json of records of different
sizes (token-id lists travel as binary arrays), broadcast_json from rank 0 and all_gather_bytes of raw bytes
(one rank empty).
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from bstar.utils import distributed as dist_utils


def main():
    out = Path(sys.argv[1])
    rank, size = dist_utils.init_from_env()
    assert size == 2 and dist.is_initialized()
    # the timeout the gloo backend really got (torch's default for gloo would be 30 minutes)
    gloo = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
    gathered = dist_utils.all_gather_json({"rank": rank, "ids": list(range(rank * 7, rank * 7 + 300 * (rank + 1)))})
    bcast = dist_utils.broadcast_json({"from": rank, "ids": list(range(50))} if rank == 0 else {"junk": 1})
    raw = dist_utils.all_gather_bytes(b"" if rank == 0 else b"x" * 1001)
    result = {
        "timeout_s": gloo.options._timeout.total_seconds(),
        "gathered": gathered,
        "broadcast": bcast,
        "raw": [b.decode() for b in raw],
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist_utils.barrier()
    dist_utils.destroy()


if __name__ == "__main__":
    main()
