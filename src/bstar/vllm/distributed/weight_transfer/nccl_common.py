"""vllm.distributed.weight_transfer.nccl_common (server mode only)"""

from bstar.vllm.distributed.weight_transfer import server_mode_only

trainer_init = server_mode_only("vllm.distributed.weight_transfer.nccl_common.trainer_init")
