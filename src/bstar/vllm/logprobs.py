"""vllm.logprobs"""

from bstar.engine.entrypoints.outputs import Logprob, PositionLogprobs

__all__ = ["Logprob", "PositionLogprobs"]
