"""Supervised fine-tuning on (prompt, completion) pairs with PyTorch FSDP2, in-process with the engine.

One process (no torchrun, no process group) trains the plain module on one device; under torchrun
every decoder layer and the root are wrapped with `torch.distributed.fsdp.fully_shard` (NCCL on GPU,
gloo on CPU). The model is transformers' own `AutoModelForCausalLM` built from the HF directory the
engine loads, so parameter names are the HF checkpoint names.

    trainer = SFTTrainer("path/to/model", SFTConfig(lr=1e-5, epochs=1, batch_tokens=16384))
    result = trainer.train("data.jsonl")          # or a list of {prompt, completion} / SFTExample
    llm.load_weights(trainer.named_weights())     # hand-off to a live engine, nothing on disk
    trainer.save("out/final")                     # HF safetensors dir + trainer_state/ for resume

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

Checkpoints (rank 0 writes; resume reads them on every rank, hence the shared filesystem) hold the
weights in save_dtype (float32 by default, which keeps resume exact), AdamW state, step and rank 0's
RNG state; the data and schedule are re-derived from the data and config, checked by fingerprint.
"""

import json
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from bstar import dist_utils
from bstar.train import checkpoint
from bstar.train.config import VARLEN, SFTConfig, lr_at
from bstar.train.data import (
    IGNORE,
    SFTExample,
    collate_packed,
    collate_padded,
    dummy_micro,
    epoch_batches,
    fingerprint,
    load_sft_examples,
    step_plan,
)
from bstar.train.parallelize import apply_fsdp, full_tensor
from bstar.train.varlen_attention import register_varlen_attention
from engine.config import DTYPES
from engine.errors import BStarError, CheckpointError


@dataclass
class TrainResult:
    steps: int  # optimizer steps taken in total (including those before a resume)
    losses: list[float] = field(default_factory=list)  # per step run in this call
    metrics: list[dict] = field(default_factory=list)


def sft_loss_sum(model, mb) -> torch.Tensor:
    """Sum of next-token cross entropies over the micro-batch's target positions (fp32).
    Only target positions go through lm_head (transformers' boolean logits_to_keep)."""
    keep = mb.targets != IGNORE  # [B, T]
    if not bool(keep.any()):  # dummy batch: keep the graph connected, add nothing
        keep = torch.zeros_like(keep)
        keep[0, 0] = True
    kw = {}
    if mb.cu_seq_lens is not None:  # packed row: segment bounds for varlen attention (ours or flash)
        kw = dict(
            cu_seq_lens_q=mb.cu_seq_lens, cu_seq_lens_k=mb.cu_seq_lens, max_length_q=mb.max_len, max_length_k=mb.max_len
        )
    out = model(
        input_ids=mb.input_ids,
        attention_mask=mb.attention_mask,
        position_ids=mb.position_ids,
        use_cache=False,
        logits_to_keep=keep,
        **kw,
    )
    logits = out.logits.float()  # [n_keep, vocab]
    return F.cross_entropy(logits, mb.targets[keep], ignore_index=IGNORE, reduction="sum")


class SFTTrainer:
    """Holds the model (sharded under torchrun), the tokenizer and, once training ran, the optimizer.

    `model`: HF model directory (config, tokenizer, weights). `weights`: optional named tensors (a
    state dict or an iterable of (hf_name, tensor)) to start from instead of the directory's weights,
    e.g. the current policy of a B-STaR round; the directory still supplies config and tokenizer."""

    def __init__(
        self,
        model: str | os.PathLike,
        config: SFTConfig | None = None,
        *,
        weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]] | None = None,
        tokenizer=None,
    ):
        self.cfg = config or SFTConfig()
        self.model_dir = Path(model)
        if not (self.model_dir / "config.json").is_file():
            raise CheckpointError(f"{self.model_dir}: not a model directory (no config.json)")
        self.rank, self.world = dist_utils.init_from_env()
        self.distributed = dist.is_initialized()
        if self.cfg.device:
            self.device = torch.device(self.cfg.device)
        elif torch.cuda.is_available():
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        else:
            self.device = torch.device("cpu")
        prec = self.cfg.precision
        self.bf16 = prec == "bf16" or (prec == "auto" and self.device.type == "cuda")

        try:
            self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(self.model_dir)
            attn = self.cfg.attn_implementation
            if attn == VARLEN:
                register_varlen_attention()
            window = getattr(AutoConfig.from_pretrained(self.model_dir), "sliding_window", None)
            if attn == VARLEN and window is not None and window < self.cfg.max_seq_len:
                attn = "sdpa"  # ours has no sliding window; transformers' masks do
            # fp32 master weights; bf16 compute comes from FSDP's policy or autocast
            m = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32, attn_implementation=attn)
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{self.model_dir}: cannot load model: {e}") from e
        m.config.use_cache = False
        self.pad_id = next(t for t in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, 0) if t is not None)
        self.model = m
        if weights is not None:
            self.load_weights(weights)
        if self.cfg.grad_checkpointing:
            # non-reentrant checkpointing runs inside each layer's FSDP hooks (re-gathers in backward)
            if hasattr(m, "activation_checkpointing_enable"):  # transformers >= 5.x name
                m.activation_checkpointing_enable({"use_reentrant": False})
            else:
                m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.distributed:
            apply_fsdp(m, self.device.type, self.world, self.bf16)
        else:
            m.to(self.device)
        m.train()
        self.optimizer = None
        self.step = 0  # optimizer steps taken by the last train() (continues across a resume)
        self.step_offset = 0  # the schedule's step when the last train() began (continue_from)

    # -- setup -----------------------------------------------------------------------------------

    def _autocast(self):
        # FSDP's MixedPrecisionPolicy casts params itself; a plain module needs autocast for bf16
        if self.bf16 and not self.distributed:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _make_optimizer(self):
        c = self.cfg
        return torch.optim.AdamW(
            self.model.parameters(), lr=c.lr, betas=c.betas, eps=c.eps, weight_decay=c.weight_decay
        )

    # -- weights in and out ----------------------------------------------------------------------

    def _param_names(self) -> list[str]:
        # named_parameters drops the duplicate of tied weights (lm_head tied to embed_tokens), as
        # save_pretrained's checkpoint does; persistent buffers are part of the checkpoint too.
        names = [n for n, _ in self.model.named_parameters()]
        sd_keys = set(self.model.state_dict().keys())
        return names + [n for n, _ in self.model.named_buffers() if n in sd_keys and n not in names]

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full weights with HF names, one tensor at a time (each gathered once under FSDP; every
        rank must consume the iterator). Feed to `engine.LLM.load_weights`. Without FSDP the tensors
        may be the live parameters themselves: copy them to keep them."""
        sd = self.model.state_dict()
        for name in self._param_names():
            yield name, full_tensor(sd[name].detach())

    def load_weights(self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replaces the model weights (HF names; a tied lm_head may be absent)."""
        sd = dict(weights.items() if isinstance(weights, Mapping) else weights)
        names = self._param_names()  # a list: the order must be the same on every rank
        missing, unexpected = set(names) - sd.keys(), sd.keys() - set(self.model.state_dict().keys())
        if missing or unexpected:
            raise CheckpointError(
                f"weights do not match the model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
            )
        sd = {n: sd[n] for n in names}
        for n, p in self.model.state_dict().items():
            if n in sd and tuple(sd[n].shape) != tuple(p.shape):
                raise CheckpointError(f"weight {n}: shape {tuple(sd[n].shape)} != model {tuple(p.shape)}")
        if self.distributed:
            set_model_state_dict(self.model, sd, options=StateDictOptions(full_state_dict=True, strict=False))
        else:
            with torch.no_grad():
                own = self.model.state_dict()
                for n, t in sd.items():
                    own[n].copy_(t)

    # -- checkpoints -----------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, *, trainer_state: bool = True) -> Path:
        """HF safetensors dir (config.json, model.safetensors, tokenizer and generation config copied
        from the source dir) plus, after training, trainer_state/ for resume. Written to a temp dir
        beside `path` and renamed into place, so `path` is never half-written."""
        path = Path(path)
        sdt = DTYPES[self.cfg.save_dtype]
        weights = {n: t.to("cpu", sdt).contiguous() for n, t in self.named_weights()}  # all ranks gather
        with_state = trainer_state and self.optimizer is not None
        state = checkpoint.gather_optimizer_state(self.model, self.optimizer) if with_state else None
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
            checkpoint.write_checkpoint(
                path, weights, self.model.config.to_dict(), self.cfg.save_dtype, self.model_dir, state, info
            )
        if self.distributed:
            dist.barrier()
        return path

    def _resume(self, ckpt: Path) -> tuple[int, int]:
        """Loads weights, optimizer state and RNG of checkpoint `ckpt`; returns its (step, step offset)."""
        info, weights, osd, rng = checkpoint.read_resume_state(ckpt, self._run_info)
        self.load_weights(weights)
        checkpoint.restore_optimizer_and_rng(self.model, self.optimizer, osd, rng)
        return int(info["step"]), int(info.get("step_offset", 0))

    def _continue(self, ckpt: Path) -> int:
        """Loads the optimizer state and RNG an earlier call of this schedule ended with; returns its global
        step (this call's offset into the schedule)."""
        global_step, osd, rng = checkpoint.read_continue_state(ckpt, self.cfg.schedule_steps)
        checkpoint.restore_optimizer_and_rng(self.model, self.optimizer, osd, rng)
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
                lsum = sft_loss_sum(self.model, mb)
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
