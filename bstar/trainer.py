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

    torchrun --nproc_per_node 8 -m bstar.sft_cli --model PATH --data FILE.jsonl --out DIR
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        -m bstar.sft_cli --model PATH --data FILE.jsonl --out DIR   # DIR on a shared filesystem

Checkpoints (rank 0 writes; resume reads them on every rank, hence the shared filesystem) hold the
weights in save_dtype (float32 by default, which keeps resume exact), AdamW state, step and rank 0's
RNG state; the data and schedule are re-derived from the data and config, checked by fingerprint.
"""

import json
import math
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from bstar.sft_data import (
    IGNORE,
    SFTExample,
    collate_packed,
    collate_padded,
    dummy_micro,
    epoch_batches,
    fingerprint,
    load_examples,
    step_plan,
)
from engine.errors import BStarError, CheckpointError

STATE_DIR = "trainer_state"
VARLEN = "bstar_varlen"  # our packed attention, registered with transformers below
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class SFTConfig:
    lr: float = 1e-5
    epochs: int = 1
    max_steps: int | None = None  # cap on optimizer steps (after epochs)
    # Global batch per optimizer step, across all ranks: at most batch_tokens input tokens, or
    # exactly batch_examples examples (set one; batch_examples wins when both are set).
    batch_tokens: int | None = 16384
    batch_examples: int | None = None
    micro_batch_tokens: int = 4096  # per rank per forward: a packed row length or padded-batch budget
    max_seq_len: int = 2048  # longer examples are bad data (skipped or refused)
    pack: bool = True  # False: length-bucketed padded batches
    schedule: str = "cosine"  # or "constant"; both after a linear warmup
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps == 0
    min_lr_ratio: float = 0.0  # cosine floor, as a fraction of lr
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0  # None or 0: no clipping (the norm is still logged)
    seed: int = 0
    precision: str = "auto"  # auto: bf16 compute with fp32 master weights on GPU, fp32 on CPU
    grad_checkpointing: bool = False
    # bstar_varlen: per-example causal SDPA on packed rows (no dense mask); or sdpa / eager /
    # flash_attention_2 (transformers' own; all handle packed rows correctly)
    attn_implementation: str = VARLEN
    on_bad_data: str = "skip"  # or "refuse" (raises DataError)
    add_eos: bool = True
    prompt_field: str = "prompt"
    completion_field: str = "completion"
    save_dtype: str = "float32"  # checkpoint weights; float32 keeps resume exact
    metrics_path: str | None = None  # per-step JSONL (rank 0)
    progress: bool = True
    device: str | None = None  # default: cuda (LOCAL_RANK) if available, else cpu

    def __post_init__(self):
        if self.batch_tokens is None and self.batch_examples is None:
            raise BStarError("set batch_tokens or batch_examples")
        if self.batch_examples is not None:
            self.batch_tokens = None
        if self.schedule not in ("cosine", "constant"):
            raise BStarError(f"schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise BStarError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if self.save_dtype not in _DTYPES:
            raise BStarError(f"save_dtype must be one of {list(_DTYPES)}, got {self.save_dtype!r}")
        if self.micro_batch_tokens < self.max_seq_len:
            raise BStarError(f"micro_batch_tokens {self.micro_batch_tokens} < max_seq_len {self.max_seq_len}")
        if self.lr <= 0 or self.epochs < 1:
            raise BStarError("lr must be > 0 and epochs >= 1")
        self.betas = tuple(self.betas)


@dataclass
class TrainResult:
    steps: int  # optimizer steps taken in total (including those before a resume)
    losses: list[float] = field(default_factory=list)  # per step run in this call
    metrics: list[dict] = field(default_factory=list)


def lr_at(step: int, total: int, cfg: SFTConfig) -> float:
    """LR for 0-based optimizer step `step` of `total`: linear warmup, then cosine or constant."""
    warm = cfg.warmup_steps or int(cfg.warmup_ratio * total)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - warm) / max(1, total - warm)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def init_distributed() -> tuple[int, int]:
    """Joins the torchrun process group when launched by torchrun (WORLD_SIZE set); (rank, world)."""
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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


# -- packed attention ----------------------------------------------------------------------------
# With restarting position_ids and no mask, transformers' sdpa/eager build a dense [T, T] block-diagonal
# mask over the whole packed row: T^2 work and memory. "bstar_varlen" instead runs causal SDPA on each
# example's block (sum of L_i^2), the CPU/any-device analogue of flash-attention's varlen kernels; it
# takes the same cu_seq_lens_q kwarg (so flash_attention_2 can be swapped in) and falls back to plain
# SDPA for padded batches.


def _segments(n: int, cu_seq_lens, position_ids, b: int) -> list[int]:
    if cu_seq_lens is not None:
        return [int(x) for x in cu_seq_lens.tolist()]
    if position_ids is None:
        return [0, n]
    pos = position_ids[min(b, position_ids.shape[0] - 1)]
    starts = (torch.diff(pos, prepend=pos[:1] - 1) != 1).nonzero().flatten().tolist()
    return sorted(set([0] + starts)) + [n]


def varlen_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """query [B, H, T, D], key/value [B, KVH, T, D] -> ([B, T, H, D], None)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None or query.shape[2] != key.shape[2]:  # padded batch: the mask says it all
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    cu, pos = kwargs.get("cu_seq_lens_q"), kwargs.get("position_ids")
    gqa = query.shape[1] != key.shape[1]
    p = dropout if module.training else 0.0
    rows = []
    for b in range(query.shape[0]):
        bounds = _segments(query.shape[2], cu if query.shape[0] == 1 else None, pos, b)
        sw = kwargs.get("sliding_window")
        if sw is not None and max(e - s for s, e in zip(bounds[:-1], bounds[1:])) > sw:
            raise BStarError(
                f"{VARLEN} has no sliding window: example longer than {sw}; use attn_implementation='sdpa'"
            )
        outs = [
            F.scaled_dot_product_attention(
                query[b : b + 1, :, s:e],
                key[b : b + 1, :, s:e],
                value[b : b + 1, :, s:e],
                dropout_p=p,
                is_causal=True,
                scale=scaling,
                enable_gqa=gqa,
            )
            for s, e in zip(bounds[:-1], bounds[1:])
            if e > s
        ]
        rows.append(torch.cat(outs, dim=2) if len(outs) > 1 else outs[0])
    out = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
    return out.transpose(1, 2).contiguous(), None


def _varlen_mask(*args, attention_mask=None, **kwargs):
    # no dense mask for packed rows (the attention splits them); padded batches get sdpa's mask
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def _register_varlen():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionMaskInterface.register(VARLEN, _varlen_mask)


_register_varlen()


def _decoder_layers(model):
    base = getattr(model, model.base_model_prefix, None)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise CheckpointError(f"{type(model).__name__}: no decoder layers found to shard")
    return layers


def _to_full(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


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
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        self.cfg = config or SFTConfig()
        self.model_dir = Path(model)
        if not (self.model_dir / "config.json").is_file():
            raise CheckpointError(f"{self.model_dir}: not a model directory (no config.json)")
        self.rank, self.world = init_distributed()
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
            self._shard()
        else:
            m.to(self.device)
        m.train()
        self.optimizer = None
        self.step = 0  # optimizer steps taken by the last train() (continues across a resume)

    # -- setup -----------------------------------------------------------------------------------

    def _shard(self):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.device.type, (self.world,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.bf16 else None
        kw = dict(mesh=mesh, mp_policy=mp) if mp else dict(mesh=mesh)
        for layer in _decoder_layers(self.model):
            fully_shard(layer, **kw)
        fully_shard(self.model, **kw)

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

    def named_weights(self, dtype: torch.dtype | None = None, device=None) -> Iterator[tuple[str, torch.Tensor]]:
        """Full weights with HF names, one tensor at a time (each gathered once under FSDP; every
        rank must consume the iterator). Feed to `engine.LLM.load_weights`. Without FSDP the tensors
        may be the live parameters themselves: copy them (or use state_dict()) to keep them."""
        sd = self.model.state_dict()
        for name in self._param_names():
            t = _to_full(sd[name].detach())
            if dtype is not None or device is not None:
                t = t.to(device=device or t.device, dtype=dtype or t.dtype)
            yield name, t

    def state_dict(self, dtype=None, device="cpu") -> dict[str, torch.Tensor]:
        """A detached copy of the full weights (HF names), e.g. to restart a later round from them."""
        return {n: t.to(device=device or t.device, dtype=dtype or t.dtype, copy=True) for n, t in self.named_weights()}

    def push_to(self, llm) -> None:
        """Hands the current weights to a live engine in the same process (no disk)."""
        llm.load_weights(self.named_weights())

    def load_weights(self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> None:
        """Replaces the model weights (HF names; a tied lm_head may be absent)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

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
        sdt = _DTYPES[self.cfg.save_dtype]
        weights = {n: t.to("cpu", sdt).contiguous() for n, t in self.named_weights()}  # all ranks gather
        state = self._gather_state() if trainer_state and self.optimizer is not None else None
        if self.rank == 0:
            tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            cfg = self.model.config.to_dict()
            cfg["use_cache"] = True
            cfg["dtype"] = self.cfg.save_dtype
            cfg.pop("torch_dtype", None)
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
            for f in sorted(self.model_dir.iterdir()):  # tokenizer files, generation_config.json, ...
                if (
                    f.is_file()
                    and not f.name.endswith(_WEIGHT_SUFFIXES)
                    and f.name
                    not in (
                        "config.json",
                        "model.safetensors.index.json",
                        "pytorch_model.bin.index.json",
                    )
                ):
                    shutil.copy2(f, tmp / f.name)
            if state is not None:
                self._write_state(tmp / STATE_DIR, state)
            _atomic_replace(tmp, path)
        if self.distributed:
            dist.barrier()
        return path

    def _gather_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        osd = get_optimizer_state_dict(
            self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        return {"optim": osd, "rng": torch.get_rng_state()}

    def _write_state(self, d: Path, state: dict):
        d.mkdir()
        osd = state["optim"]
        flat = {
            f"{name}/{k}": v.detach().cpu().contiguous() for name, st in osd["state"].items() for k, v in st.items()
        }
        save_file(flat, str(d / "optimizer.safetensors"))
        rng = {"cpu": state["rng"]}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(d / "rng.safetensors"))
        groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in osd["param_groups"]]
        info = dict(
            self._run_info,
            step=self.step,
            param_groups=groups,
            config=asdict(self.cfg),
            world_size=self.world,
        )
        (d / "state.json").write_text(json.dumps(info, indent=2) + "\n")

    def _load_state(self, ckpt: Path) -> int:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        d = ckpt / STATE_DIR
        if not (d / "state.json").is_file():
            raise CheckpointError(f"{ckpt}: no {STATE_DIR}/state.json to resume from")
        info = json.loads((d / "state.json").read_text())
        for k in ("data", "total_steps"):
            if info.get(k) != self._run_info[k]:
                raise CheckpointError(
                    f"{ckpt}: resume with different {k} ({info.get(k)} in checkpoint, {self._run_info[k]} now)"
                )
        self.load_weights(load_file(str(ckpt / "model.safetensors")))
        flat = load_file(str(d / "optimizer.safetensors"))
        state: dict = {}
        for key, v in flat.items():
            name, k = key.rsplit("/", 1)
            state.setdefault(name, {})[k] = v
        groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in info["param_groups"]]
        set_optimizer_state_dict(
            self.model,
            self.optimizer,
            {"state": state, "param_groups": groups},
            options=StateDictOptions(full_state_dict=True),
        )
        rng = load_file(str(d / "rng.safetensors"))
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
        return int(info["step"])

    # -- training --------------------------------------------------------------------------------

    def load_data(self, data) -> list[SFTExample]:
        c = self.cfg
        return load_examples(
            data,
            self.tokenizer,
            c.max_seq_len,
            prompt_field=c.prompt_field,
            completion_field=c.completion_field,
            add_eos=c.add_eos,
            on_bad=c.on_bad_data,
        )

    def train(
        self,
        data,
        *,
        resume_from: str | os.PathLike | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
        save_every: int = 0,
    ) -> TrainResult:
        """Runs the whole schedule on `data` (JSONL path, list of {prompt, completion} dicts, or list
        of SFTExample) with a fresh optimizer, or continues the run saved in `resume_from` (weights,
        optimizer, schedule position, RNG). Every `save_every` steps a checkpoint goes to
        `checkpoint_dir/step-NNNNNN`."""
        c = self.cfg
        examples = self.load_data(data)
        lengths = [len(x) for x in examples]
        plan = [b for e in range(c.epochs) for b in epoch_batches(lengths, e, c.seed, c.batch_tokens, c.batch_examples)]
        if c.max_steps is not None:
            plan = plan[: c.max_steps]
        total = len(plan)
        self._run_info = {"data": fingerprint(examples), "total_steps": total, "examples": len(examples)}
        torch.manual_seed(c.seed)
        self.optimizer = self._make_optimizer()
        self.step = 0
        if resume_from is not None:
            self.step = self._load_state(Path(resume_from))
        metrics_file = open(c.metrics_path, "a") if c.metrics_path and self.rank == 0 else None
        result = TrainResult(self.step)
        bar = tqdm(total=total, initial=self.step, desc="sft", disable=not (c.progress and self.rank == 0))
        try:
            while self.step < total:
                row = self._train_step(examples, plan[self.step], lr_at(self.step, total, c))
                self.step += 1
                row = {"step": self.step, **row}
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
        grad_norm = float(_to_full(norm))
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


def _atomic_replace(tmp: Path, dest: Path) -> None:
    """rename() cannot replace a non-empty directory, so an existing `dest` is first moved aside;
    at every instant either the old or the new complete checkpoint exists under a known name."""
    if dest.exists():
        old = dest.parent / f".{dest.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)
