"""The engine's errors a user can act on. The CLI prints their message as one line and exits non-zero."""

from bstar.errors import BStarError


class CheckpointError(BStarError):
    """A model directory that cannot be loaded (missing or corrupt files, unknown architecture...)."""


class RequestError(BStarError, ValueError):
    """A request that cannot be served (invalid sampling value, prompt longer than the context...)."""


class MemoryPlanError(BStarError):
    """A run, phase or engine that cannot fit in the device's memory: refused before allocating, with
    the figures and what to change (more GPUs, offload, a smaller budget...)."""


class UnsupportedError(BStarError, ValueError):
    """An option or call that has no counterpart here (a vLLM keyword such as tensor_parallel_size=2,
    trust_remote_code=True, a checkpoint without a chat template): the message names it and says why."""
