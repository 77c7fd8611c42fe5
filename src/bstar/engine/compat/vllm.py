"""vLLM's names for what RL loops reach into (TRL, OpenRLHF, verl): the LLM keywords they pass, and the
handles below `llm.llm_engine` down to the model's `load_weights`. Thin adapters over LLMEngine, no second
engine: every call lands on LLMEngine's own methods.

    llm.llm_engine                                      LLMEngine (model_config, model_executor set here)
      .model_config                                     VllmModelConfig: max_model_len, dtype, model, ...
      .model_executor.driver_worker                     Worker (also reached as driver_worker.worker)
        .model_runner.model.load_weights(weights=[...]) LLMEngine.load_weights: prefix cache reset,
                                                        decode buffers and graphs invalidated
      .model_executor.collective_rpc(method, ...)       [method(worker, ...)]: one in-process worker
"""

import importlib
import json
import os
from collections.abc import Callable

from bstar.engine.errors import CheckpointError, UnsupportedError


def _one_device(v) -> bool:
    return v in (None, 1)


_ONE_DEVICE = "one device per engine: run one engine per rank instead (torchrun, as vLLM's 'external_launcher')"

# vLLM LLM / EngineArgs keywords with no parameter of their own here: keyword -> (accepts(value), why the
# other values are refused). The accepted values are true no-ops: outputs do not depend on them.
VLLM_KWARGS: dict[str, tuple[Callable[[object], bool], str]] = {
    "tensor_parallel_size": (_one_device, _ONE_DEVICE),
    "pipeline_parallel_size": (_one_device, _ONE_DEVICE),
    "data_parallel_size": (_one_device, _ONE_DEVICE),
    "distributed_executor_backend": (
        lambda v: v in (None, "uni", "mp", "external_launcher"),
        "the engine runs in this process (one per rank); it spawns no Ray workers",
    ),
    "enable_sleep_mode": (
        lambda v: isinstance(v, bool),
        "must be a bool (sleep/wake_up work either way: no special allocator is needed)",
    ),
    "quantization": (lambda v: v is None, "weights are served unquantized, in dtype"),
    "model_impl": (lambda v: v in ("auto", "vllm"), "only the engine's own model implementation exists"),
    "revision": (lambda v: v is None, "model is a local directory; check out the revision there"),
    "tokenizer_revision": (lambda v: v is None, "tokenizer is a local directory"),
    "code_revision": (lambda v: v is None, "no checkpoint code is run"),
    "tokenizer_mode": (lambda v: v in ("auto", "hf"), "tokenizers are read from tokenizer.json only"),
    "kv_cache_dtype": (lambda v: v in (None, "auto"), "the KV cache is kept in the model's dtype"),
    "load_format": (lambda v: v in ("auto", "safetensors"), "checkpoints are read from safetensors only"),
    "cpu_offload_gb": (lambda v: not v, "weights stay on the engine's device"),
    "enable_lora": (lambda v: not v, "LoRA adapters are not supported; merge them into the weights"),
    "speculative_config": (lambda v: v is None, "no speculative decoding"),
    "hf_overrides": (lambda v: not v, "the checkpoint's config.json is used as it is"),
    "override_generation_config": (lambda v: not v, "pass the sampling values in SamplingParams"),
    "limit_mm_per_prompt": (lambda v: not v, "text-only models"),
    "scheduling_policy": (lambda v: v == "fcfs", "requests are scheduled first come, first served"),
    # True no-ops: what they set does not exist or cannot change an output here.
    "enable_chunked_prefill": (lambda v: v in (None, True, False), "prefill is always chunked"),
    "disable_log_stats": (lambda v: True, ""),  # no stats logger
    "disable_log_requests": (lambda v: True, ""),
    "enable_log_requests": (lambda v: True, ""),
    "disable_custom_all_reduce": (lambda v: True, ""),  # one device: no all-reduce
    "swap_space": (lambda v: True, ""),  # preempted sequences are recomputed, never swapped
    "compilation_config": (lambda v: True, ""),  # no torch.compile; decode graphs follow enforce_eager
    "served_model_name": (lambda v: True, ""),
    # LoRA sizing: meaningless without LoRA, which enable_lora=True (refused above) would turn on
    "max_lora_rank": (lambda v: True, ""),
    "max_loras": (lambda v: True, ""),
    "max_cpu_loras": (lambda v: True, ""),
}

# Engine options where vLLM reads None as "the default" (lm-eval passes max_num_seqs=None)
NONE_MEANS_DEFAULT = ("max_num_seqs", "max_num_batched_tokens", "gpu_memory_utilization", "seed")


def has_remote_code(model_dir: str) -> bool:
    """Whether the checkpoint's config.json names code of its own (auto_map): only then would vLLM's
    trust_remote_code=True run anything."""
    try:
        with open(os.path.join(model_dir, "config.json")) as f:
            return bool(json.load(f).get("auto_map"))
    except (OSError, ValueError):
        return False  # (a missing or bad config.json is the loader's one-line error)


def check_trust_remote_code(value, model_dir: str):
    """trust_remote_code=True is a no-op for a built-in architecture (OpenRLHF always passes it); refused
    only when the checkpoint ships code (config.json's auto_map), which this engine never runs."""
    if value in (None, False):
        return
    if value is not True:
        raise UnsupportedError(f"LLM(trust_remote_code={value!r}) is not supported: must be a bool")
    if has_remote_code(model_dir):
        raise UnsupportedError(
            f"LLM(trust_remote_code=True): {model_dir}/config.json has an auto_map (code of its own), and this "
            "engine never runs code shipped with a checkpoint; its architectures are built in"
        )


def check_vllm_kwargs(kwargs: dict, model_dir: str | None = None):
    """Accept the vLLM keywords in VLLM_KWARGS at a value with the same meaning here (trust_remote_code:
    check_trust_remote_code); refuse any other keyword or value with one line naming it and why."""
    for k, v in kwargs.items():
        if k == "trust_remote_code":
            check_trust_remote_code(v, model_dir or "")
            continue
        if k not in VLLM_KWARGS:
            raise UnsupportedError(
                f"LLM got unknown keyword {k!r}: neither an engine option nor a vLLM option it knows "
                "(see README, 'Using it from an RL loop')"
            )
        ok, why = VLLM_KWARGS[k]
        if not ok(v):
            raise UnsupportedError(f"LLM({k}={v!r}) is not supported: {why}")


def no_lora(lora_request):
    if lora_request is not None and lora_request != []:
        raise UnsupportedError("lora_request is not supported: no LoRA adapters (merge them into the weights)")


# AsyncLLM.generate's vLLM keywords with no effect here at their defaults (lora_request: None only)
GENERATE_KWARGS = {
    "lora_request",
    "priority",
    "trace_headers",
    "prompt_text",
    "tokenization_kwargs",
    "data_parallel_rank",
}


class VllmModelConfig:
    """vLLM's `llm_engine.model_config`: the fields RL loops read."""

    def __init__(self, engine):
        self._engine = engine
        self.model = engine.model_path
        self.tokenizer = engine.tokenizer_path
        self.max_model_len = engine.max_model_len
        self.dtype = engine.dtype
        self.seed = engine.seed
        self.max_logprobs = engine.ecfg.max_logprobs
        self.logprobs_mode = engine.ecfg.logprobs_mode
        self.enforce_eager = engine.ecfg.enforce_eager
        self.trust_remote_code = False
        self.runner_type = "generate" if engine.mcfg.head == "lm" else "pooling"
        self._hf_config = None

    def get_vocab_size(self) -> int:
        return self._engine.mcfg.vocab_size

    @property
    def hf_config(self):
        """The checkpoint's transformers config (loaded on first use, local files only)."""
        if self._hf_config is None:
            from transformers import AutoConfig

            self._hf_config = AutoConfig.from_pretrained(self.model, local_files_only=True)
        return self._hf_config


class ModelHandle:
    """`model_runner.model`: the engine's decoder, whose `load_weights` is the engine's (so a loop's
    per-tensor sync resets the prefix cache and invalidates decode buffers and graphs, and level-2
    reload bookkeeping is kept). Other attributes are the module's (named_parameters, ...)."""

    def __init__(self, engine):
        self._engine = engine

    def load_weights(self, weights) -> set[str]:
        return self._engine.load_weights(weights)

    def __getattr__(self, name):
        return getattr(self._engine.model, name)


class ModelRunnerHandle:
    """`driver_worker.model_runner`: its `.model` and `.device`."""

    def __init__(self, engine):
        self.model = ModelHandle(engine)
        self.device = engine.device


class Worker:
    """vLLM's in-process worker: what collective_rpc calls run on. Methods of a worker_extension_cls are
    mixed in (make_worker), with these attributes at hand (OpenRLHF's and verl's extensions use
    self.model_runner.model.load_weights, self.device and self.model_config.dtype).

    reload_weights re-reads the checkpoint from disk, as vLLM's (undoing any in-process sync). OpenRLHF's
    and verl's update_weight comes with their worker_extension_cls (vLLM's worker has none either)."""

    rank = local_rank = 0

    def __init__(self, engine):
        self.engine = engine
        self.model_runner = ModelRunnerHandle(engine)
        self.device = engine.device
        self.model_config = engine.model_config

    @property
    def worker(self):  # verl's driver_worker.worker.model_runner: vLLM's wrapper forwards to its worker
        return self

    def get_model(self):
        return self.model_runner.model

    def sleep(self, level: int = 1):
        self.engine.sleep(level)

    def wake_up(self, tags: list[str] | None = None):
        self.engine.wake_up(tags)

    def reload_weights(self):
        """vLLM's: load the weights again from the model directory (safetensors)."""
        from bstar.engine.model.loader import iter_weights

        self.engine.load_weights(iter_weights(self.engine.model_path))


def _extension_class(ext):
    if not ext:
        return None
    if isinstance(ext, type):
        return ext
    module, _, name = str(ext).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as e:
        raise UnsupportedError(f"worker_extension_cls={ext!r} cannot be imported: {e}") from None


def make_worker(engine, worker_extension_cls=None) -> Worker:
    """The engine's worker, with worker_extension_cls (a class or a "module.Class" path) mixed in as vLLM
    does, so its methods are reachable by name through collective_rpc."""
    ext = _extension_class(worker_extension_cls)
    cls = Worker if ext is None else type(f"Worker_{ext.__name__}", (Worker, ext), {})
    return cls(engine)


class Executor:
    """`llm_engine.model_executor`: one in-process worker."""

    def __init__(self, engine, worker_extension_cls=None):
        self.driver_worker = make_worker(engine, worker_extension_cls)

    def collective_rpc(self, method, timeout: float | None = None, args: tuple = (), kwargs: dict | None = None):
        """As vLLM's: a str names a method of the worker, a callable is called with the worker first.
        Returns one result per worker, here a list of one. timeout has no use in process."""
        w, kwargs = self.driver_worker, kwargs or {}
        if isinstance(method, str):
            fn = getattr(w, method, None)
            if fn is None or not callable(fn):
                raise NotImplementedError(f"collective_rpc: the worker has no method {method!r}")
            return [fn(*args, **kwargs)]
        return [method(w, *args, **kwargs)]


# -- tokenizer and chat ---------------------------------------------------------------------------
def hf_tokenizer(path: str):
    """transformers' fast tokenizer of a model directory, read from the same tokenizer.json the engine
    encodes with (so the ids are the engine's) and tokenizer_config.json (special tokens, chat template)."""
    from transformers import PreTrainedTokenizerFast

    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise CheckpointError(f"{path} has no tokenizer.json")
    return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)


def is_conversation(messages) -> bool:
    return isinstance(messages, (list, tuple)) and all(isinstance(m, dict) for m in messages)


def render_chats(
    tok,
    messages,
    chat_template: str | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    tools=None,
    chat_template_kwargs: dict | None = None,
) -> list[dict]:
    """TokensPrompts (ids and rendered text) of one conversation (a list of {"role", "content"} dicts) or a
    list of them, rendered by the checkpoint's (or the given) Jinja chat template in transformers' sandbox.
    As vLLM, the rendered text is tokenized without adding special tokens (the template writes them)."""
    if tok is None:
        raise UnsupportedError("chat needs a tokenizer, but the engine has none (skip_tokenizer_init=True?)")
    if chat_template is None and not getattr(tok, "chat_template", None):
        raise UnsupportedError(
            "chat: the checkpoint has no chat template (tokenizer_config.json / chat_template.jinja); "
            "pass chat_template=..."
        )
    if add_generation_prompt and continue_final_message:
        raise UnsupportedError("chat: continue_final_message=True needs add_generation_prompt=False")
    convs = [messages] if is_conversation(messages) else list(messages)
    if not convs or not all(is_conversation(c) and c for c in convs):
        raise UnsupportedError("chat: messages must be a conversation (a list of dicts) or a list of them")
    prompts = []
    for conv in convs:
        text = tok.apply_chat_template(
            conv,
            chat_template=chat_template,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            tools=tools,
            tokenize=False,
            **(chat_template_kwargs or {}),
        )
        prompts.append({"prompt_token_ids": tok.encode(text, add_special_tokens=False), "prompt": text})
    return prompts
