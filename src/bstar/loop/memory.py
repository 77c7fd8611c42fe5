"""The loop's device memory, for the controller: the run's memory plan before anything loads, and the train
phase (engines asleep while the trainer runs, the trainer freed before they wake).

    plan = run_memory_plan(policy_dir, prm_dir, device=DeviceMemory.of(dev), sft=SFTConfig(...))
    print(plan.table())                                   # MemoryPlanError (one line) if a phase cannot fit
    llm = LLM(policy_dir, kv_cache_memory_bytes=plan.kv_cache_memory_bytes("policy"))
    ...
    with train_phase({"policy": llm, "prm": prm}) as phase:   # both asleep (level 1)
        trainer = SFTTrainer(...); trainer.train(data)
        phase.hand_off("policy", trainer.named_weights())     # the policy's weights back, the new ones in
        del trainer                                           # nothing else may keep it alive
    # here: gc.collect() + empty_cache(), then every engine fully awake

The arithmetic is bstar.engine.runner.memory_plan's; this module only turns a run's options into its inputs.
"""

import gc
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from bstar.engine.config import ModelConfig, resolve_dtype
from bstar.engine.errors import RequestError
from bstar.kernels.dispatch import triton_on
from bstar.loop.memory_plan import DeviceMemory, EngineSpec, MemoryPlan, plan_memory
from bstar.train.config import SFTConfig, resolve_grad_checkpointing
from bstar.train.memory_estimate import TrainerSpec

__all__ = ["TrainPhase", "free_device_memory", "run_memory_plan", "train_phase", "trainer_spec"]


def _mcfg(model: "str | ModelConfig") -> ModelConfig:
    return model if isinstance(model, ModelConfig) else ModelConfig.from_dir(str(model))


def trainer_spec(mcfg: ModelConfig, sft: SFTConfig, device_type: str = "cuda", world_size: int = 1) -> TrainerSpec:
    """The trainer's memory inputs as SFTTrainer will run with `sft` on `device_type`: the same defaults
    (activation checkpointing on for CUDA, bf16 compute on CUDA under precision "auto"), offload and
    chunked cross-entropy as configured, micro_batch_tokens rows through the loss at most."""
    bf16 = sft.precision == "bf16" or (sft.precision == "auto" and device_type == "cuda")
    return TrainerSpec(
        mcfg=mcfg,
        world_size=world_size,
        offload=sft.offload_optimizer,
        micro_batch_tokens=sft.micro_batch_tokens,
        activation_checkpointing=resolve_grad_checkpointing(sft.grad_checkpointing, device_type),
        ce_chunk=sft.ce_chunk or None,
        compute_dtype=torch.bfloat16 if bf16 else torch.float32,
    )


def run_memory_plan(
    policy: "str | ModelConfig",
    prm: "str | ModelConfig | None" = None,
    *,
    device: DeviceMemory,
    sft: SFTConfig | None = None,
    train: bool = True,
    dtype: str = "auto",
    prm_dtype: str | None = None,
    max_num_seqs: int = 256,
    max_model_len: int | None = None,
    prm_max_model_len: int | None = None,
    max_num_batched_tokens: int = 4096,
    kv_cache_memory_bytes: int | None = None,
    prm_kv_cache_memory_bytes: int | None = None,
    sleep: bool = True,
    sleep_level: int = 1,
    world_size: int = 1,
    gpu_memory_utilization: float = 0.9,
    host_memory_bytes: int | None = None,
    check: bool = True,
) -> MemoryPlan:
    """The plan of a run (`policy` and optional `prm`: HF model dirs or ModelConfigs) on `device`: each engine
    in the dtype it will serve ("auto" resolved as the engine does on that device), the trainer as
    `trainer_spec(sft)`, one phase per step of an iteration (generate, score, train; with `sleep` only the
    phase's own engines awake). Pure (no device is touched): test it with DeviceMemory(total=..., free=...).
    Refuses with MemoryPlanError (one line, `.plan` attached) what cannot fit, unless check=False."""
    dev = torch.device(device.name)
    sft = sft or SFTConfig()
    engines = []
    for name, model, dt, mml, kv in (
        ("policy", policy, dtype, max_model_len, kv_cache_memory_bytes),
        ("prm", prm, prm_dtype or dtype, prm_max_model_len or max_model_len, prm_kv_cache_memory_bytes),
    ):
        if model is None:
            continue
        m = _mcfg(model)
        engines.append(
            EngineSpec(
                name=name,
                mcfg=m,
                dtype=resolve_dtype(dt, m, dev),
                max_num_seqs=max_num_seqs,
                max_model_len=mml,
                max_num_batched_tokens=max_num_batched_tokens,
                kv_cache_memory_bytes=kv,
                sleep_level=sleep_level,
                # (bstar.PRM never decodes: it captures no graphs; nor does the torch path)
                cuda_graphs=name == "policy" and triton_on(dev),
            )
        )
    spec = trainer_spec(engines[0].mcfg, sft, dev.type, world_size) if train else None
    return plan_memory(
        device,
        engines,
        spec,
        sleep=sleep,
        gpu_memory_utilization=gpu_memory_utilization,
        host_memory_bytes=host_memory_bytes,
        check=check,
    )


def free_device_memory() -> None:
    """Collect garbage (reference cycles keep modules alive: transformers models have them) and return the
    allocator's cached blocks to the driver, so that engines waking next find the memory free."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class TrainPhase:
    """What `train_phase` yields: the sleeping engines, and `hand_off` to give one of them new weights."""

    engines: dict
    levels: dict[str, int]
    handed_off: set[str] = field(default_factory=set)

    def hand_off(self, name: str, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Engine `name`'s weights back on its device (level 1: the old ones from host memory; level 2: empty),
        then overwritten with `weights` (e.g. trainer.named_weights(), one tensor at a time); its KV cache
        stays asleep until the phase ends (after the trainer is freed)."""
        if name not in self.engines:
            raise RequestError(f"hand_off: no engine {name!r} in this train phase ({', '.join(self.engines)})")
        e = self.engines[name]
        e.wake_up(["weights"])
        e.load_weights(weights)
        self.handed_off.add(name)


@contextmanager
def train_phase(
    engines: Mapping[str, object],
    level: "int | Mapping[str, int]" = 1,
    reload: Mapping[str, Callable[[], Iterable[tuple[str, torch.Tensor]]]] | None = None,
) -> Iterator[TrainPhase]:
    """Sleeps `engines` (name -> LLM or PRM; `level` for all, or per name), yields a TrainPhase, then frees
    what the body dropped (free_device_memory: the trainer, its optimizer and activations) and wakes every
    engine. An engine slept at level 2 needs its weights back: `phase.hand_off(name, ...)` in the body, or
    `reload[name]()` (weights from disk, e.g. bstar.engine.model.loader.iter_weights(dir)) called here after the free.
    Engines are woken also when the body raises (then a level-2 engine without weights stays asleep)."""
    engines = dict(engines)
    levels = {n: (level if isinstance(level, int) else level.get(n, 1)) for n in engines}
    reload = dict(reload or {})
    for n, lv in levels.items():
        if lv not in (1, 2):
            raise RequestError(f"sleep level must be 1 or 2, got {lv!r} for {n}")
    phase = TrainPhase(engines, levels)
    asleep = []
    try:
        for n, e in engines.items():
            e.sleep(levels[n])
            asleep.append(n)
        yield phase
    except BaseException:
        free_device_memory()
        for n in asleep:
            if levels[n] == 1 or n in phase.handed_off:
                engines[n].wake_up()
        raise
    free_device_memory()
    for n in asleep:
        e = engines[n]
        if levels[n] == 2 and n not in phase.handed_off:
            if n not in reload:
                raise RequestError(
                    f"engine {n} slept at level 2 (weights discarded) and got no new weights: call "
                    f"phase.hand_off({n!r}, ...) or pass reload={{{n!r}: ...}}"
                )
            e.wake_up(["weights"])
            e.load_weights(reload[n]())
            e.wake_up(["kv_cache"])
        elif n in phase.handed_off:
            e.wake_up(["kv_cache"])
        else:
            e.wake_up()
