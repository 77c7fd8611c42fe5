"""A run's device memory plan, before it starts: from the device's total and free memory, the engines (policy,
PRM) and the trainer, `plan_memory` decides each engine's KV bytes and returns a `MemoryPlan` whose `table()`
prints weights, KV, activations and the trainer's estimate per phase (generate / score / train). A phase that
cannot fit is refused with one line (MemoryPlanError, which carries the plan so its table can still be printed).
Hand each engine its `plan.kv_cache_memory_bytes(name)` (LLM(..., kv_cache_memory_bytes=...)).

Phases. An iteration runs generate (policy engine), score (PRM engine) and train (trainer) one after another.
With sleep mode (LLM.sleep / wake_up) only the phase's own engines hold device memory; without it every engine
stays resident in every phase, the trainer's included (`default_phases`). Pure functions: tested on CPU.
"""

from dataclasses import dataclass, field

import torch

from bstar.engine.config import ModelConfig
from bstar.engine.errors import MemoryPlanError, RequestError
from bstar.engine.runner.memory_plan import (
    DEFAULT_RESERVE_BYTES,
    decode_graph_pool_bytes,
    engine_activation_bytes,
    engine_max_model_len,
    gib,
    kv_bytes_per_token,
    kv_cap_blocks,
    param_count,
    weight_bytes,
)
from bstar.train.memory_estimate import TrainerEstimate, TrainerSpec, trainer_estimate, trainer_refusal


def _cell(n: int) -> str:
    return gib(n) if n else "-"


@dataclass(frozen=True)
class DeviceMemory:
    total: int  # the device's memory
    free: int  # free before this run loads anything (others' use already subtracted)
    name: str = "cuda:0"

    @classmethod
    def of(cls, device: torch.device) -> "DeviceMemory":
        """Read a CUDA device now (torch.cuda.mem_get_info)."""
        free, total = torch.cuda.mem_get_info(device)
        return cls(total=total, free=free, name=str(device))


@dataclass(frozen=True)
class EngineSpec:
    """One engine as it will be built: LLM/PRM(..., dtype, max_num_seqs, max_model_len, ...)."""

    name: str  # "policy", "prm"
    mcfg: ModelConfig
    dtype: torch.dtype = torch.bfloat16
    max_num_seqs: int = 256
    max_model_len: int | None = None  # None: the model's (engine_max_model_len)
    max_num_batched_tokens: int = 4096
    block_size: int = 16
    enable_prefix_caching: bool = True
    kv_cache_memory_bytes: int | None = None  # explicit (still capped); None: the plan splits what is left
    sleep_level: int = 1  # while asleep: 1 keeps the weights in host memory, 2 discards them
    cuda_graphs: bool = True  # decode CUDA graphs (an LM head, not enforce_eager): their pool is budgeted

    @property
    def context(self) -> int:
        return engine_max_model_len(self.mcfg, self.max_model_len)

    @property
    def block_bytes(self) -> int:
        return kv_bytes_per_token(self.mcfg, self.dtype) * self.block_size

    @property
    def cap_blocks(self) -> int:
        return kv_cap_blocks(self.max_num_seqs, self.context, self.block_size, self.enable_prefix_caching)

    @property
    def min_blocks(self) -> int:
        """One sequence of the full context."""
        return -(-self.context // self.block_size)


@dataclass(frozen=True)
class Phase:
    name: str  # "generate", "score", "train"
    engines: tuple[str, ...]  # engines awake (holding weights and KV on the device)
    train: bool = False  # the trainer runs


def default_phases(engines: list[str], sleep: bool = True, train: bool = True) -> list[Phase]:
    """The loop's phases for engines ["policy"] or ["policy", "prm"]: with sleep, each phase wakes its own
    engine only; without, every engine is resident in every phase."""
    names = tuple(engines)
    gen = ("policy",) if sleep else names
    out = [Phase("generate", gen)]
    if "prm" in names:
        out.append(Phase("score", ("prm",) if sleep else names))
    if train:
        out.append(Phase("train", () if sleep else names, train=True))
    return out


@dataclass
class EnginePlan:
    spec: EngineSpec
    weights: int
    activations: int
    kv_cap: int  # bytes of cap_blocks
    graph_pool: int = 0  # the decode CUDA graphs' memory pool
    num_blocks: int = 0

    @property
    def working(self) -> int:
        """What the engine holds beside its weights and KV cache: the biggest step's activations and the pool."""
        return self.activations + self.graph_pool

    @property
    def kv(self) -> int:
        return self.num_blocks * self.spec.block_bytes

    @property
    def kv_tokens(self) -> int:
        return self.num_blocks * self.spec.block_size


@dataclass
class PhasePlan:
    phase: Phase
    weights: int = 0
    kv: int = 0
    activations: int = 0  # the awake engines' activations and decode graph pools
    trainer: int = 0
    host: int = 0  # sleeping engines' level-1 weights + the offloaded trainer state

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.activations + self.trainer


@dataclass
class MemoryPlan:
    device: DeviceMemory
    budget: int  # min(free, total x gpu_memory_utilization) - reserve
    gpu_memory_utilization: float
    reserve: int
    engines: dict[str, EnginePlan]
    trainer_spec: TrainerSpec | None
    trainer: TrainerEstimate | None
    phases: list[PhasePlan] = field(default_factory=list)
    host_memory: int | None = None

    def kv_cache_memory_bytes(self, name: str) -> int:
        """The KV bytes to build engine `name` with: LLM/PRM(..., kv_cache_memory_bytes=...)."""
        return self.engines[name].kv

    def table(self) -> str:
        d = self.device
        lines = [
            f"memory plan on {d.name}: {gib(d.total)} total, {gib(d.free)} free; budget {gib(self.budget)} "
            f"(gpu_memory_utilization {self.gpu_memory_utilization}, {gib(self.reserve)} reserved)",
            f"{'bstar.engine':<8} {'model':<34} {'dtype':<9} {'weights':>10} {'activ.':>10} {'graphs':>10} {'KV':>10} "
            f"{'KV tokens':>10} {'(cap)':>10}",
        ]
        for name, e in self.engines.items():
            m, s = e.spec.mcfg, e.spec
            model = f"{m.architecture.replace('ForCausalLM', '')}/{m.head} {param_count(m) / 1e9:.2f}B"
            lines.append(
                f"{name:<8} {model:<34} {str(s.dtype).replace('torch.', ''):<9} {_cell(e.weights):>10} "
                f"{_cell(e.activations):>10} {_cell(e.graph_pool):>10} {_cell(e.kv):>10} {e.kv_tokens:>10} "
                f"{gib(e.kv_cap):>10}"
            )
        if self.trainer is not None:
            t, s = self.trainer, self.trainer_spec
            lines.append(
                f"trainer  {t.params / 1e9:.2f}B params, {s.world_size} rank(s), offload {'on' if s.offload else 'off'}"
                f", activation checkpointing {'on' if s.activation_checkpointing else 'off'}, CE chunk "
                f"{s.ce_chunk or 'off'}, {s.micro_batch_tokens} tokens/micro-batch: GPU state {gib(t.gpu_state)}, "
                f"unsharded {gib(t.unsharded)}, grads {gib(t.grad_transient)}, activations {gib(t.activations)}, "
                f"logits {gib(t.logits)} = {gib(t.gpu_total)}; host state {gib(t.host_state)}"
            )
        lines.append(
            f"{'phase':<9} {'awake':<14} {'weights':>10} {'KV':>10} {'activ.':>10} {'trainer':>10} {'total':>10} "
            f"{'left':>10} {'host':>10}"
        )
        for p in self.phases:
            awake = ", ".join(p.phase.engines + (("trainer",) if p.phase.train else ())) or "-"
            lines.append(
                f"{p.phase.name:<9} {awake:<14} {_cell(p.weights):>10} {_cell(p.kv):>10} {_cell(p.activations):>10} "
                f"{_cell(p.trainer):>10} {gib(p.total):>10} {gib(self.budget - p.total):>10} {_cell(p.host):>10}"
            )
        return "\n".join(lines)


def _water_fill(amount: int, caps: dict[str, int]) -> dict[str, int]:
    """Split `amount` equally among the keys, none above its cap; what a capped one leaves goes to the rest."""
    out, left, todo = {}, max(0, amount), dict(caps)
    while todo:
        share = left // len(todo)
        capped = {k: c for k, c in todo.items() if c <= share}
        if not capped:
            out.update({k: share for k in todo})
            break
        for k, c in capped.items():
            out[k] = c
            left -= c
            del todo[k]
    return out


def plan_memory(
    device: DeviceMemory,
    engines: list[EngineSpec],
    trainer: TrainerSpec | None = None,
    phases: list[Phase] | None = None,
    *,
    sleep: bool = True,
    gpu_memory_utilization: float = 0.9,
    reserve_bytes: int = DEFAULT_RESERVE_BYTES,
    host_memory_bytes: int | None = None,
    check: bool = True,
) -> MemoryPlan:
    """Each engine's KV bytes, and each phase's device (and host) memory. Budget: min(free, total x
    gpu_memory_utilization) - reserve_bytes. In every phase the awake engines' weights and activation
    estimates and the trainer's estimate come first; engines with an explicit kv_cache_memory_bytes take it
    (capped); the others split what is left equally, each capped at what it can use (kv_cap_blocks). An engine
    awake in several phases keeps the smallest of its shares.

    Refuses (MemoryPlanError, one line; `.plan` holds the plan for printing) when the trainer does not fit
    its phase, when an engine's KV cache would not hold one sequence of its full context, or when a phase
    needs more host memory than host_memory_bytes. check=False returns the plan without refusing."""
    names = [e.name for e in engines]
    if len(set(names)) != len(names):
        raise RequestError(f"engine names must be distinct, got {names}")
    phases = phases if phases is not None else default_phases(names, sleep, train=trainer is not None)
    for ph in phases:
        unknown = [n for n in ph.engines if n not in names]
        if unknown:
            raise RequestError(f"phase {ph.name!r} names unknown engine(s) {unknown}; engines are {names}")
        if ph.train and trainer is None:
            raise RequestError(f"phase {ph.name!r} trains but no TrainerSpec was given")
    budget = min(device.free, int(device.total * gpu_memory_utilization)) - reserve_bytes
    specs = {e.name: e for e in engines}
    plans = {
        e.name: EnginePlan(
            spec=e,
            weights=weight_bytes(e.mcfg, e.dtype),
            activations=engine_activation_bytes(e.mcfg, e.dtype, e.max_num_batched_tokens, e.max_num_seqs, e.context),
            kv_cap=e.cap_blocks * e.block_bytes,
            graph_pool=decode_graph_pool_bytes(e.mcfg, e.dtype, e.max_num_seqs, e.context) if e.cuda_graphs else 0,
        )
        for e in engines
    }
    est = trainer_estimate(trainer) if trainer is not None else None
    # Each engine's share of each phase it is awake in; it keeps the smallest.
    share: dict[str, int] = {}
    for ph in phases:
        fixed = sum(plans[n].weights + plans[n].working for n in ph.engines)
        fixed += est.gpu_total if ph.train else 0
        explicit = {
            n: min(specs[n].kv_cache_memory_bytes, plans[n].kv_cap)
            for n in ph.engines
            if specs[n].kv_cache_memory_bytes is not None
        }
        auto = {n: plans[n].kv_cap for n in ph.engines if n not in explicit}
        fill = _water_fill(budget - fixed - sum(explicit.values()), auto)
        for n, b in {**explicit, **fill}.items():
            share[n] = min(share.get(n, b), b)
    for n, p in plans.items():
        p.num_blocks = share.get(n, 0) // p.spec.block_bytes
    plan = MemoryPlan(
        device=device,
        budget=budget,
        gpu_memory_utilization=gpu_memory_utilization,
        reserve=reserve_bytes,
        engines=plans,
        trainer_spec=trainer,
        trainer=est,
        host_memory=host_memory_bytes,
    )
    level1_sleepers = [n for n in names if specs[n].sleep_level == 1 and any(n not in ph.engines for ph in phases)]
    for ph in phases:
        pp = PhasePlan(ph)
        for n in ph.engines:
            pp.weights += plans[n].weights
            pp.kv += plans[n].kv
            pp.activations += plans[n].working
        # (a level-1 sleeper's flat host buffer, exactly its weights, is kept while it is awake: every phase)
        pp.host = sum(plans[n].weights for n in level1_sleepers)
        if ph.train:
            pp.trainer = est.gpu_total
            pp.host += est.host_state
        plan.phases.append(pp)
    if check:
        problem = _first_problem(plan)
        if problem:
            err = MemoryPlanError(problem)
            err.plan = plan
            raise err
    return plan


def _first_problem(plan: MemoryPlan) -> str | None:
    for pp in plan.phases:
        ph = pp.phase
        if ph.train:
            others = (
                pp.weights
                + pp.activations
                + sum(plan.engines[n].spec.min_blocks * plan.engines[n].spec.block_bytes for n in ph.engines)
            )
            available = plan.budget - others
            if plan.trainer.gpu_total > available:
                where = f" beside {', '.join(ph.engines)}" if ph.engines else ""
                return f"phase {ph.name}{where}: " + trainer_refusal(plan.trainer_spec, plan.trainer, available)
        for n in ph.engines:
            e = plan.engines[n]
            s = e.spec
            if e.num_blocks < s.min_blocks:
                return (
                    f"phase {ph.name}: the {n} engine's KV cache would get {gib(e.kv)} but one {s.context}-token "
                    f"sequence needs {gib(s.min_blocks * s.block_bytes)} (its weights take {gib(e.weights)}, "
                    f"activations and graphs {gib(e.working)}, the budget is {gib(plan.budget)}); lower max_model_len "
                    f"or max_num_batched_tokens, sleep the other engines in this phase, or use a bigger GPU"
                )
        if plan.host_memory is not None and pp.host > plan.host_memory:
            return (
                f"phase {ph.name} needs ~{gib(pp.host)} of host memory (sleeping engines' weights and offloaded "
                f"trainer state) but the host has {gib(plan.host_memory)}; sleep engines at level 2 "
                f"(reload their weights) or train on more GPUs"
            )
    return None
