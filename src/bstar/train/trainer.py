"""Supervised fine-tuning on (prompt, completion) pairs with PyTorch FSDP2, in-process with the engine.

One process (no torchrun, no process group) trains the plain module on one device; under torchrun
every decoder layer and the root are wrapped with `torch.distributed.fsdp.fully_shard` (NCCL on GPU,
gloo on CPU); with `offload_optimizer` FSDP2's CPUOffloadPolicy keeps parameters, gradients and AdamW
state in host memory (on one device too: a one-rank process group). The model is transformers' own
`AutoModelForCausalLM` built from the HF directory the engine loads, so parameter names are the HF
checkpoint names.

    trainer = SFTTrainer("path/to/model", SFTConfig(lr=1e-5, epochs=1, batch_tokens=16384))
    result = trainer.train("data.jsonl")          # or a list of {prompt, completion} / SFTExample
    llm.load_weights(trainer.named_weights())     # hand-off to a live engine, nothing on disk
    trainer.save("out/final")                     # HF safetensors dir + trainer_state/ for resume

Memory (bstar.engine.runner.memory_plan.trainer_estimate is the arithmetic): activation checkpointing (on by default
on CUDA), cross-entropy in chunks of `ce_chunk` rows (bstar.train.loss: no [tokens, vocab] float32
logits), fused AdamW (no foreach copies), and under FSDP the model is built on the meta device and its
weights loaded once: rank 0 reads the checkpoint one tensor at a time and broadcasts it, each rank keeps
its shard (bstar.train.parallelize). Saving streams each gathered tensor to rank 0's safetensors file.

Batches: each optimizer step takes a global batch (batch_tokens or batch_examples, across all ranks)
from a seeded per-epoch shuffle; it is split over ranks by length, and each rank packs its share into
rows of <= micro_batch_tokens (positions restart per example; attention "bstar_varlen" runs causal SDPA
per example, no dense mask) or, with pack=False, length-sorted padded batches. Ranks with fewer
micro-batches run empty ones so FSDP's collectives stay in step.

Loss: sum of completion-token cross entropies over the global batch / number of completion tokens in
the global batch. Every rank knows that count from the (deterministic) plan, and FSDP averages
gradients over ranks, so each rank scales its loss by world_size / global_targets: 1 process and N
ranks take the same optimizer steps up to float rounding.

Several devices (one process per GPU; all ranks read the same data file):

    torchrun --nproc_per_node 8 -m bstar.cli sft --model PATH --data FILE.jsonl --out DIR
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        -m bstar.cli sft --model PATH --data FILE.jsonl --out DIR   # DIR on a shared filesystem

Checkpoints (rank 0 writes; resume reads them on rank 0 and broadcasts, so the path must be the same
on every node) hold the weights in save_dtype ("auto": the loaded checkpoint's dtype; float32 makes a
resume exact), AdamW state, step and rank 0's RNG state; the data and schedule are re-derived from the
data and config, checked by fingerprint.
"""

import json
import os
import time
import types
from collections.abc import Iterable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import register_fsdp_forward_method
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from bstar.engine.config import DTYPES
from bstar.engine.errors import CheckpointError
from bstar.errors import BStarError
from bstar.train import checkpoint
from bstar.train.config import VARLEN, SFTConfig, adamw_options, lr_at, resolve_grad_checkpointing
from bstar.train.cpu_gemm import apply_cpu_gemm
from bstar.train.data import (
    SFTExample,
    collate_packed,
    collate_padded,
    dummy_micro,
    epoch_batches,
    fingerprint,
    load_sft_examples,
    step_plan,
)
from bstar.train.loss import sft_loss_sum
from bstar.train.parallelize import TensorSource, apply_fsdp, broadcast_load, check_source, full_tensor, gather_full
from bstar.train.varlen_attention import register_varlen_attention
from bstar.utils import distributed as dist_utils

__all__ = ["SFTTrainer", "TrainResult", "sft_loss_sum"]


@dataclass
class TrainResult:
    steps: int  # optimizer steps taken in total (including those before a resume)
    losses: list[float] = field(default_factory=list)  # per step run in this call
    metrics: list[dict] = field(default_factory=list)


def _reset_buffers(model, device: torch.device) -> None:
    """After `to_empty` the non-persistent buffers (rotary inv_freq) hold garbage and are in no checkpoint:
    recompute them as the module's own constructor does, on the compute device (also under CPU offload,
    where the parameters live on the host)."""
    for mod in model.modules():
        if "RotaryEmbedding" in type(mod).__name__ and hasattr(mod, "original_inv_freq"):
            with torch.device("cpu"):
                fresh = type(mod)(mod.config)
            for name, buf in fresh.named_buffers(recurse=False):
                mod._buffers[name] = buf.to(device)
    for mod in model.modules():
        for name, buf in list(mod._buffers.items()):
            if buf is not None and buf.device != device:
                mod._buffers[name] = buf.to(device)


def _loss_method(model, mb, ce_chunk):
    return sft_loss_sum(model, mb, ce_chunk)


class SFTTrainer:
    """Holds the model (sharded under torchrun or with offload_optimizer), the tokenizer and, once training
    ran, the optimizer.

    `model`: HF model directory (config, tokenizer, weights). `weights`: optional named tensors (a
    state dict or an iterable of (hf_name, tensor)) to start from instead of the directory's weights,
    e.g. the current policy of a B-STaR round; the directory still supplies config and tokenizer
    (under torchrun rank 0's tensors are the ones used)."""

    def __init__(
        self,
        model: str | os.PathLike,
        config: SFTConfig | None = None,
        *,
        weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | None = None,
        tokenizer=None,
    ):
        self.cfg = c = config or SFTConfig()
        self.model_dir = Path(model)
        if not (self.model_dir / "config.json").is_file():
            raise CheckpointError(f"{self.model_dir}: not a model directory (no config.json)")
        self.rank, self.world = dist_utils.init_from_env()
        if c.device:
            self.device = torch.device(c.device)
        elif torch.cuda.is_available():
            self.device = torch.device("cuda", dist_utils.local_rank())
        else:
            self.device = torch.device("cpu")
        self.offload = c.offload_optimizer
        if self.offload and self.world == 1:
            dist_utils.init_single_process()
        self.fsdp = self.world > 1 or self.offload  # the model is sharded (a DTensor per parameter)
        self.distributed = self.world > 1  # several ranks: collectives across them
        self.bf16 = c.precision == "bf16" or (c.precision == "auto" and self.device.type == "cuda")
        self.grad_checkpointing = resolve_grad_checkpointing(c.grad_checkpointing, self.device.type)
        if c.save_dtype == "auto":
            self.save_dtype = checkpoint.checkpoint_dtype(self.model_dir)
        else:
            self.save_dtype = DTYPES[c.save_dtype]

        try:
            self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(self.model_dir)
            attn = c.attn_implementation
            if attn == VARLEN:
                register_varlen_attention()
            hf_cfg = AutoConfig.from_pretrained(self.model_dir)
            window = getattr(hf_cfg, "sliding_window", None)
            if attn == VARLEN and window is not None and window < c.max_seq_len:
                attn = "sdpa"  # ours has no sliding window; transformers' masks do
            # fp32 master weights; bf16 compute comes from FSDP's policy or autocast
            if self.fsdp:  # built without memory; each rank gets its shard below
                with torch.device("meta"):
                    m = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32, attn_implementation=attn)
            else:
                m = AutoModelForCausalLM.from_pretrained(  # safetensors only: never unpickle a .bin
                    self.model_dir, dtype=torch.float32, attn_implementation=attn, use_safetensors=True
                )
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{self.model_dir}: cannot load model: {e}") from e
        m.config.use_cache = False
        self.pad_id = next(t for t in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, 0) if t is not None)
        self.model = m
        if self.grad_checkpointing:
            # non-reentrant checkpointing runs inside each layer's FSDP hooks (re-gathers in backward)
            if hasattr(m, "activation_checkpointing_enable"):  # transformers >= 5.x name
                m.activation_checkpointing_enable({"use_reentrant": False})
            else:
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.fsdp:
            apply_fsdp(m, self.device.type, self.world, self.bf16, self.offload)
            m.to_empty(device="cpu" if self.offload else self.device)
            _reset_buffers(m, self.device)
            if weights is None:
                with checkpoint.WeightReader(self.model_dir) if self.rank == 0 else nullcontext() as src:
                    self._load(src, strict=False)
            else:
                self.load_weights(weights)
        else:
            if weights is not None:
                self.load_weights(weights)
            m.to(self.device)
        # one process on CPU in float32: the Linear layers on the engine's CPU GEMM (bstar/train/cpu_gemm.py)
        self.cpu_gemm = "aten"
        if self.device.type == "cpu" and not self.bf16 and not self.fsdp:
            self.cpu_gemm = apply_cpu_gemm(m, c.cpu_gemm)
        m.train()
        # The loss runs as a forward of the root module, where FSDP has unsharded the LM head
        m.bstar_sft_loss = types.MethodType(_loss_method, m)
        register_fsdp_forward_method(m, "bstar_sft_loss")
        self.optimizer = None
        self.step = 0  # optimizer steps taken by the last train() (continues across a resume)
        self.step_offset = 0  # the schedule's step when the last train() began (continue_from)

    # -- setup -----------------------------------------------------------------------------------

    def _autocast(self):
        # FSDP's MixedPrecisionPolicy casts params itself; a plain module needs autocast for bf16
        if self.bf16 and not self.fsdp:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _make_optimizer(self):
        """AdamW: fused where every parameter's device has the fused kernel, else the for-loop implementation
        (foreach is never used: it copies the parameters into temporaries)."""
        c = self.cfg
        params = list(self.model.parameters())
        devices = {(p.to_local() if hasattr(p, "to_local") else p).device.type for p in params}
        kw = adamw_options(c.fused_optimizer, devices, _get_fused_kernels_supported_devices())
        return torch.optim.AdamW(params, lr=c.lr, betas=c.betas, eps=c.eps, weight_decay=c.weight_decay, **kw)

    # -- weights in and out ----------------------------------------------------------------------

    def _param_names(self) -> list[str]:
        # named_parameters drops the duplicate of tied weights (lm_head tied to embed_tokens), as
        # save_pretrained's checkpoint does; persistent buffers are part of the checkpoint too.
        names = [n for n, _ in self.model.named_parameters()]
        sd_keys = set(self.model.state_dict().keys())
        return names + [n for n, _ in self.model.named_buffers() if n in sd_keys and n not in names]

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full weights with HF names, one tensor at a time (each gathered once under FSDP; every
        rank must consume the iterator). Feed to `bstar.LLM.load_weights`. Without FSDP the tensors
        may be the live parameters themselves: copy them to keep them."""
        return gather_full(self.model, self._param_names())

    def _load(self, source, strict: bool) -> None:
        """The model's weights from `source` (TensorSource or checkpoint.WeightReader; under FSDP only rank
        0's is read, and broadcast)."""
        names = self._param_names()
        if self.fsdp:
            broadcast_load(self.model, names, source if self.rank == 0 else None, strict)
            return
        problem, _ = check_source(self.model, names, source, strict)
        if problem:
            raise CheckpointError(problem)
        with torch.no_grad():
            own = self.model.state_dict()
            for n in names:
                own[n].copy_(source.get(n))

    def load_weights(self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replaces the model weights (HF names; a tied lm_head may be absent)."""
        self._load(TensorSource(weights.items() if isinstance(weights, Mapping) else weights), strict=True)

    # -- checkpoints -----------------------------------------------------------------------------

    def save(
        self, path: str | os.PathLike, *, trainer_state: bool = True, extra_files: dict[str, str] | None = None
    ) -> Path:
        """HF safetensors dir (config.json, model.safetensors, tokenizer and generation config copied
        from the source dir) plus, after training, trainer_state/ for resume. Written to a temp dir
        beside `path` and renamed into place, so `path` is never half-written. Every rank must call it:
        each tensor is gathered in turn and streamed to rank 0's file (no rank holds the whole model).
        `extra_files` (name: text) are committed with it (checkpoint.write_checkpoint)."""
        path = Path(path)
        with_state = trainer_state and self.optimizer is not None
        state = checkpoint.gather_optimizer_state(self.model, self.optimizer) if with_state else None
        names = self._param_names()
        sd = self.model.state_dict()  # (sharded) tensors: for names, shapes and dtypes only
        dtype = {n: self.save_dtype if sd[n].is_floating_point() else sd[n].dtype for n in names}
        specs = [(n, tuple(sd[n].shape), dtype[n]) for n in names]
        del sd
        gathered = gather_full(self.model, names)
        if self.rank == 0:
            info = None
            if state:
                info = dict(
                    self._run_info,
                    step=self.step,
                    step_offset=self.step_offset,
                    global_step=self.step_offset + self.step,
                    config=asdict(self.cfg),
                    world_size=self.world,
                )
            weights = ((n, t.to("cpu", dtype[n])) for n, t in gathered)
            checkpoint.write_checkpoint(
                path, specs, weights, self.model.config.to_dict(), self.model_dir, state, info, extra_files
            )
        else:
            for _ in gathered:  # the all-gathers rank 0's writer runs
                pass
        if self.distributed:
            dist.barrier()
        return path

    def _restore_optimizer(self, ckpt: Path, info: dict) -> None:
        """AdamW state (rank 0 reads it, FSDP broadcasts it) and rank 0's RNG state from `ckpt`."""
        osd = checkpoint.read_optimizer_state(ckpt, info) if self.rank == 0 else {}
        checkpoint.restore_optimizer(self.model, self.optimizer, osd, broadcast=self.fsdp)
        checkpoint.restore_rng(checkpoint.read_rng(ckpt))

    def _resume(self, ckpt: Path) -> tuple[int, int]:
        """Loads weights, optimizer state and RNG of checkpoint `ckpt`; returns its (step, step offset)."""
        info = checkpoint.read_info(ckpt)
        checkpoint.check_resume(ckpt, info, self._run_info)
        with checkpoint.WeightReader(ckpt) if self.rank == 0 or not self.fsdp else nullcontext() as src:
            self._load(src, strict=True)
        self._restore_optimizer(ckpt, info)
        return int(info["step"]), int(info.get("step_offset", 0))

    def _continue(self, ckpt: Path) -> int:
        """Loads the optimizer state and RNG an earlier call of this schedule ended with; returns its global
        step (this call's offset into the schedule)."""
        info = checkpoint.read_info(ckpt)
        global_step = checkpoint.check_continue(ckpt, info, self.cfg.schedule_steps)
        self._restore_optimizer(ckpt, info)
        return global_step

    # -- training --------------------------------------------------------------------------------

    def load_data(self, data) -> list[SFTExample]:
        c = self.cfg
        return load_sft_examples(
            data,
            self.tokenizer,
            c.max_seq_len,
            prompt_field=c.prompt_field,
            completion_field=c.completion_field,
            add_eos=c.add_eos,
            on_bad=c.on_bad_data,
        )

    def _plan(self, lengths: list[int]) -> list[list[int]]:
        """Global batches of the whole call: `steps` of them (the data cycled, re-shuffled per pass), or
        `epochs` passes cut at max_steps."""
        c = self.cfg
        batches = lambda e: epoch_batches(lengths, e, c.seed, c.batch_tokens, c.batch_examples)
        if c.steps is not None:
            plan, e = [], 0
            while lengths and len(plan) < c.steps:
                plan += batches(e)
                e += 1
            return plan[: c.steps]
        plan = [b for e in range(c.epochs) for b in batches(e)]
        return plan if c.max_steps is None else plan[: c.max_steps]

    def train(
        self,
        data,
        *,
        resume_from: str | os.PathLike | None = None,
        continue_from: str | os.PathLike | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        save_every: int = 0,
    ) -> TrainResult:
        """Runs the call's steps on `data` (JSONL path, list of {prompt, completion} dicts, or list of
        SFTExample) with a fresh optimizer; or resumes this same call from `resume_from` (weights,
        optimizer, step, RNG; same data); or, with `continue_from` (the checkpoint an earlier call ended
        with), continues that call's optimizer state and LR schedule on new data: the model is this
        trainer's (its directory or `weights`), the step count goes on from the earlier call's, so calls
        with `schedule_steps` set share one warmup and one cosine. Every `save_every` steps a checkpoint
        goes to `checkpoint_dir/step-NNNNNN`."""
        c = self.cfg
        if resume_from is not None and continue_from is not None:
            raise BStarError("give resume_from (the same call, interrupted) or continue_from (a later call), not both")
        examples = self.load_data(data)
        plan = self._plan([len(x) for x in examples])
        total = len(plan)
        self._run_info = {
            "data": fingerprint(examples),
            "total_steps": total,
            "examples": len(examples),
            "schedule_steps": c.schedule_steps,
        }
        torch.manual_seed(c.seed)
        self.optimizer = self._make_optimizer()
        self.step, self.step_offset = 0, 0
        if resume_from is not None:
            self.step, self.step_offset = self._resume(Path(resume_from))
        elif continue_from is not None:
            self.step_offset = self._continue(Path(continue_from))
        schedule = c.schedule_steps or self.step_offset + total
        if self.step_offset + total > schedule:
            raise BStarError(
                f"the LR schedule has {schedule} steps; this call would end at step {self.step_offset + total}"
            )
        metrics_file = open(c.metrics_path, "a") if c.metrics_path and self.rank == 0 else None
        result = TrainResult(self.step)
        bar = tqdm(total=total, initial=self.step, desc="sft", disable=not (c.progress and self.rank == 0))
        try:
            while self.step < total:
                row = self._train_step(examples, plan[self.step], lr_at(self.step_offset + self.step, schedule, c))
                self.step += 1
                row = {"step": self.step, "global_step": self.step_offset + self.step, **row}
                result.losses.append(row["loss"])
                result.metrics.append(row)
                if metrics_file:
                    metrics_file.write(json.dumps(row) + "\n")
                    metrics_file.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
                if checkpoint_dir and save_every and self.step % save_every == 0 and self.step < total:
                    self.save(Path(checkpoint_dir) / f"step-{self.step:06d}")
        finally:
            bar.close()
            if metrics_file:
                metrics_file.close()
        result.steps = self.step
        return result

    def _train_step(self, examples, batch, lr) -> dict:
        c = self.cfg
        t0 = time.perf_counter()
        sp = step_plan(batch, examples, self.rank, self.world, c.micro_batch_tokens, c.pack)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        # FSDP averages gradients over ranks: scale by world so the result is sum / global targets
        scale = self.world / max(1, sp.global_targets)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for idx in sp.micro:
            if not idx:
                mb = dummy_micro(self.pad_id)
            elif c.pack:
                mb = collate_packed([examples[i] for i in idx])
            else:
                mb = collate_padded([examples[i] for i in idx], self.pad_id)
            mb = mb.to(self.device)
            with self._autocast():
                lsum = self.model.bstar_sft_loss(mb, c.ce_chunk)
            (lsum * scale).backward()
            loss_sum += lsum.detach().double()
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.max_grad_norm or float("inf"))
        grad_norm = float(full_tensor(norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.distributed:
            # gloo/nccl all-reduce of float64 is exact enough; loss for logging only
            dist.all_reduce(loss_sum)
        loss = float(loss_sum) / max(1, sp.global_targets)
        dt = time.perf_counter() - t0
        return {
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": sp.global_tokens,
            "target_tokens": sp.global_targets,
            "tokens_per_s": sp.global_tokens / dt,
            "step_s": dt,
        }
