"""vllm.distributed.weight_transfer.packed_tensor (server mode only)"""

from bstar.vllm.distributed.weight_transfer import server_mode_only

_HERE = "vllm.distributed.weight_transfer.packed_tensor."
packed_nccl_broadcast_producer = server_mode_only(_HERE + "packed_nccl_broadcast_producer")
packed_nccl_broadcast_consumer = server_mode_only(_HERE + "packed_nccl_broadcast_consumer")
