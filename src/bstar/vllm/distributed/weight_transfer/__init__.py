"""vllm.distributed.weight_transfer: server mode's NCCL weight transfer. The names import (TRL imports them
at load whatever its mode); calling one raises a one-line NotImplementedError naming the feature. In
process, weights are synced with model_runner.model.load_weights (TRL's colocate mode)."""

_WHY = (
    "NCCL weight transfer to a vLLM server (TRL/OpenRLHF server mode) is not supported by bstar.vllm; "
    "run the engine in process (colocate) and sync with load_weights"
)


def server_mode_only(name: str):
    """A stand-in for a server-mode function or class: importable, NotImplementedError when called."""

    def refuse(*args, **kwargs):
        raise NotImplementedError(f"{name}: {_WHY}")

    refuse.__name__ = refuse.__qualname__ = name.rpartition(".")[2]
    return refuse


def server_mode_class(name: str):
    """A class whose construction and class methods raise the one-line NotImplementedError."""

    class _Refused:
        def __init__(self, *args, **kwargs):
            raise NotImplementedError(f"{name}: {_WHY}")

    for meth in ("trainer_init", "trainer_send_weights", "init_transfer_engine", "receive_weights"):
        setattr(_Refused, meth, staticmethod(server_mode_only(f"{name}.{meth}")))
    _Refused.__name__ = _Refused.__qualname__ = name.rpartition(".")[2]
    return _Refused
