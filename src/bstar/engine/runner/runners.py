"""Which runner an engine gets: chosen once, here, when the engine is built.

EngineConfig.kernels ("triton" / "torch") when set, else the BSTAR_KERNELS environment variable, else
the device (CUDA: the GPU runner, anything else the CPU runner): `bstar.kernels.dispatch.triton_on`, read
once. Changing BSTAR_KERNELS afterwards changes nothing for an engine already built.
"""

import torch

from bstar.engine.config import EngineConfig, ModelConfig
from bstar.engine.errors import RequestError
from bstar.engine.model.decoder import CausalLM
from bstar.engine.runner.cpu.runner import CpuRunner
from bstar.engine.runner.gpu.runner import GpuRunner
from bstar.engine.runner.model_runner import ModelRunner
from bstar.kernels.dispatch import triton_on


def runner_class(ecfg: EngineConfig, device: torch.device) -> type[ModelRunner]:
    """GpuRunner or CpuRunner for an engine on `device` with `ecfg` (reads BSTAR_KERNELS once)."""
    try:
        return GpuRunner if triton_on(device, ecfg.kernels) else CpuRunner
    except ValueError as e:
        raise RequestError(str(e)) from None


def build_runner(
    model: CausalLM, mcfg: ModelConfig, ecfg: EngineConfig, max_model_len: int, device: torch.device, dtype
) -> ModelRunner:
    return runner_class(ecfg, device)(model, mcfg, ecfg, max_model_len, device, dtype)
