"""vllm.distributed.weight_transfer.base (server mode only)"""

from bstar.vllm.distributed.weight_transfer import server_mode_class

SparseWeightPatch = server_mode_class("vllm.distributed.weight_transfer.base.SparseWeightPatch")
