"""vLLM's import paths over this engine: `import bstar.vllm as vllm`, or `bstar.vllm.install()` once and then
an unchanged `import vllm` (TRL, OpenRLHF, verl, lm-evaluation-harness) gets this package.

    vllm                                      LLM, SamplingParams, RequestOutput, CompletionOutput,
                                              TokensPrompt, TextPrompt, AsyncLLMEngine, AsyncEngineArgs
    vllm.sampling_params                      SamplingParams, StructuredOutputsParams, GuidedDecodingParams,
                                              RequestOutputKind
    vllm.outputs / vllm.inputs                RequestOutput, CompletionOutput / TokensPrompt, TextPrompt
    vllm.lora.request                         LoRARequest (constructible; generate refuses a non-None one)
    vllm.transformers_utils.tokenizer         get_tokenizer
    vllm.entrypoints.chat_utils               resolve_hf_chat_template
    vllm.engine.arg_utils                     EngineArgs, AsyncEngineArgs
    vllm.utils / vllm.utils.network_utils     random_uuid / get_ip, get_open_port
    vllm.v1.engine.async_llm                  AsyncLLM
    vllm.distributed.weight_transfer.*        server-mode NCCL transfer: importable, NotImplementedError
                                              (one line) when called

VLLM_API_VERSION (version.py) is the vLLM release whose API this mirrors: `vllm.__version__`, and after
install() `importlib.metadata.version("vllm")` in this process.
"""

from typing import TYPE_CHECKING

from bstar.utils.lazy import lazy_names
from bstar.vllm.version import VLLM_API_VERSION

__version__ = VLLM_API_VERSION

if TYPE_CHECKING:
    from bstar.engine.entrypoints.async_llm import AsyncEngineArgs, AsyncLLM, AsyncLLMEngine
    from bstar.engine.entrypoints.inputs import TextPrompt, TokensPrompt
    from bstar.engine.entrypoints.llm import LLM
    from bstar.engine.entrypoints.outputs import CompletionOutput, RequestOutput
    from bstar.engine.entrypoints.sampling_params import SamplingParams
    from bstar.vllm._alias import install, uninstall
    from bstar.vllm.engine.arg_utils import EngineArgs

_MODULE_OF = {  # name -> the module that defines it (loaded on first use: `import vllm` stays light)
    "LLM": "bstar.engine.entrypoints.llm",
    "SamplingParams": "bstar.engine.entrypoints.sampling_params",
    "RequestOutput": "bstar.engine.entrypoints.outputs",
    "CompletionOutput": "bstar.engine.entrypoints.outputs",
    "TokensPrompt": "bstar.engine.entrypoints.inputs",
    "TextPrompt": "bstar.engine.entrypoints.inputs",
    "AsyncLLM": "bstar.engine.entrypoints.async_llm",
    "AsyncLLMEngine": "bstar.engine.entrypoints.async_llm",
    "AsyncEngineArgs": "bstar.engine.entrypoints.async_llm",
    "EngineArgs": "bstar.vllm.engine.arg_utils",
    "install": "bstar.vllm._alias",
    "uninstall": "bstar.vllm._alias",
}
__all__ = [
    "VLLM_API_VERSION",
    "LLM",
    "SamplingParams",
    "RequestOutput",
    "CompletionOutput",
    "TokensPrompt",
    "TextPrompt",
    "AsyncLLM",
    "AsyncLLMEngine",
    "AsyncEngineArgs",
    "EngineArgs",
    "install",
    "uninstall",
]


__getattr__, __dir__ = lazy_names(__name__, _MODULE_OF, shown="'vllm' (bstar.vllm)")
