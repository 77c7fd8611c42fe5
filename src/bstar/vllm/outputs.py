"""vllm.outputs"""

from bstar.engine.entrypoints.outputs import CompletionOutput, Logprob, RequestOutput

__all__ = ["CompletionOutput", "Logprob", "RequestOutput"]
