"""vllm.distributed.weight_transfer.nccl_engine (server mode only)"""

from bstar.vllm.distributed.weight_transfer import server_mode_class

_HERE = "vllm.distributed.weight_transfer.nccl_engine."
NCCLWeightTransferEngine = server_mode_class(_HERE + "NCCLWeightTransferEngine")
NCCLTrainerSendWeightsArgs = server_mode_class(_HERE + "NCCLTrainerSendWeightsArgs")
