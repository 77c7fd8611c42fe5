"""The embedded default: a tiny policy and a tiny PRM for the built-in arithmetic task, built by the
project's own code and cached, so `bstar-engine run` needs no downloaded model.

    assets = build_assets()                 # first call builds (minutes), later calls load the cache
    assets.policy_path, assets.prm_path     # HF dirs for engine.LLM / engine.PRM / SFTTrainer
    assets.train, assets.test               # list[bstar.data.Example]

Build phases (each logs one line with its time; the slow ones show tqdm bars):
  1. data:      make_splits(n_train, n_test) plus a disjoint warm-start seed set from the same stream.
  2. tokenizer: byte-level BPE trained on the task text, digits split one per token (so arithmetic
                is learnable), "ки" (the PRM step tag) added; "+", "-", "*", "=", "#" are one token each.
  3. policy:    random tiny Llama, warm-started by SFT on the seed set so that it starts weak;
                greedy accuracy on the test split is measured with the engine.
  4. prm:       Math-Shepherd labels: candidates sampled from the warm policy, each step labelled "+"
                when some rollout from its prefix reaches the gold answer (hard estimation), else "-";
                the PRM (initialised from the warm policy) learns to predict the label at each step
                tag, on inputs tokenised exactly as engine.PRM tokenises them; accuracy is measured on
                held-out questions' steps with engine.PRM.

Cache: `$BSTAR_CACHE` or ~/.cache/bstar-engine, subfolder `embedded-<hash of config + VERSION>`.
A build happens in a temp dir beside it and is renamed into place at the end, so a killed or failed
build never leaves a partial cache under the final name.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from bstar.data import DEFAULT_PROMPT, Example, format_prompt
from bstar.rewards import grade
from bstar.synthetic import make_splits
from engine.errors import BStarError, CheckpointError

VERSION = "embedded-1"  # bump when the build procedure changes: old caches are then ignored
SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")  # ids 0, 1, 2
BOS, EOS, PAD = 0, 1, 2
STEP_TAG, GOOD, BAD = "ки", "+", "-"  # engine.PRM's LM-style (Math-Shepherd) defaults
PRM_QUESTION_TEMPLATE = "{question} "  # engine.PRM's default question_template
_MANIFEST = "manifest.json"


@dataclass
class EmbeddedConfig:
    seed: int = 0
    # data: the loop's train split, the held-out test split, and a disjoint warm-start seed set
    n_train: int = 512
    n_test: int = 200
    n_seed: int = 2000
    vocab_size: int = 400  # BPE target; the task's word set is small, so training may stop below it
    # tiny Llama (GQA)
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    max_position_embeddings: int = 256
    # warm start: ~1750 steps leave the policy weak but clearly non-zero on test (36.5% greedy).
    # Sensitive: 10 epochs gave 7.5% and 12 gave 13%, but then only ~20% of the PRM's step labels
    # are '+' and the PRM did not beat the majority class; a few hundred steps give ~1% (it has not
    # yet learned to copy the question's numbers)
    warm_epochs: int = 14
    warm_lr: float = 3e-3
    warm_batch: int = 16
    max_new_tokens: int = 80  # solutions are at most ~50 tokens
    # PRM labels (Math-Shepherd hard estimation) and training
    prm_questions: int = 256  # train questions whose warm-policy candidates get labelled
    prm_candidates: int = 4  # sampled candidates per question
    prm_rollouts: int = 8  # completions sampled from each step prefix
    prm_temperature: float = 0.8
    prm_holdout: float = 0.25  # fraction of those questions held out for PRM accuracy
    prm_epochs: int = 6
    prm_lr: float = 2e-3
    prm_batch: int = 32

    @classmethod
    def tiny(cls) -> EmbeddedConfig:
        """CI preset: builds in seconds; the models are too small to learn much."""
        return cls(
            n_train=24,
            n_test=16,
            n_seed=32,
            vocab_size=300,
            hidden_size=32,
            intermediate_size=64,
            num_layers=2,
            num_heads=2,
            num_kv_heads=1,
            warm_epochs=2,
            warm_batch=16,
            max_new_tokens=40,
            prm_questions=8,
            prm_candidates=2,
            prm_rollouts=2,
            prm_epochs=1,
            prm_batch=16,
        )

    def __post_init__(self):
        def bad(name, why):
            raise BStarError(f"EmbeddedConfig.{name}={getattr(self, name)!r}: {why}")

        for f in (
            "n_train",
            "n_test",
            "n_seed",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "warm_epochs",
            "warm_batch",
            "max_new_tokens",
            "prm_questions",
            "prm_candidates",
            "prm_rollouts",
            "prm_epochs",
            "prm_batch",
        ):
            if not isinstance(getattr(self, f), int) or getattr(self, f) < 1:
                bad(f, "must be an integer >= 1")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            bad("num_heads", "hidden_size must divide by num_heads and num_heads by num_kv_heads")
        if self.prm_questions > self.n_train:
            bad("prm_questions", f"must be <= n_train ({self.n_train})")
        if not 0 < self.prm_holdout < 1:
            bad("prm_holdout", "must be in (0, 1)")
        for f in ("warm_lr", "prm_lr", "prm_temperature"):
            if not getattr(self, f) > 0:
                bad(f, "must be > 0")
        if self.vocab_size < 300:
            bad("vocab_size", "must be >= 300 (256 byte symbols + specials + some merges)")

    def key(self) -> str:
        """Cache key: a hash of the config and the build procedure's version."""
        blob = json.dumps({"version": VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class EmbeddedAssets:
    policy_path: Path
    prm_path: Path
    train: list[Example]
    test: list[Example]
    manifest: dict = field(default_factory=dict)


def default_cache_dir() -> Path:
    return Path(os.environ.get("BSTAR_CACHE") or Path.home() / ".cache" / "bstar-engine")


# -- public entry point ------------------------------------------------------------------------------


def build_assets(
    cfg: EmbeddedConfig | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    threads: int | None = 1,
) -> EmbeddedAssets:
    """The cached assets for `cfg`, building them first when the cache has none.

    `threads`: torch intra-op threads during the build (restored after). 1 by default: these models
    are too small to gain from more, and on a busy 2-core machine 2 threads spin against other
    processes and run ~15x slower (measured: 4.8 s vs 0.3 s per SFT step). None: leave as is."""
    cfg = cfg or EmbeddedConfig()
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise BStarError(f"threads must be None or an integer >= 1, got {threads!r}")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    dest = root / f"embedded-{cfg.key()}"
    if (dest / _MANIFEST).is_file():
        return load_assets(dest)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BStarError(f"cannot create the embedded-model cache dir {root}: {e}") from None
    if not os.access(root, os.W_OK):
        raise BStarError(f"embedded-model cache dir {root} is not writable (set BSTAR_CACHE to another dir)")
    _sweep_stale(root, dest.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-{os.getpid()}-", dir=root))
    import torch

    before = torch.get_num_threads()
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        _build(cfg, tmp, progress)
        try:
            os.replace(tmp, dest)
        except OSError:
            if not (dest / _MANIFEST).is_file():  # not a concurrent builder's finished copy
                raise
    finally:
        torch.set_num_threads(before)
        shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
    return load_assets(dest)


def load_assets(path: str | os.PathLike) -> EmbeddedAssets:
    """Assets of a finished build directory."""
    path = Path(path)
    try:
        manifest = json.loads((path / _MANIFEST).read_text())
        splits = json.loads((path / "splits.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"embedded-model cache {path} is unreadable ({e}); delete it to rebuild") from None
    if manifest.get("version") != VERSION:
        raise CheckpointError(
            f"embedded-model cache {path} has version {manifest.get('version')!r}, "
            f"expected {VERSION!r}; delete it to rebuild"
        )
    train = [Example(**e) for e in splits["train"]]
    test = [Example(**e) for e in splits["test"]]
    return EmbeddedAssets(path / "policy", path / "prm", train, test, manifest)


def _sweep_stale(root: Path, name: str) -> None:
    """Removes temp dirs of builds whose process is gone (killed mid-build)."""
    for d in root.glob(f".{name}.tmp-*"):
        try:
            pid = int(d.name.split(".tmp-", 1)[1].split("-", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(d, ignore_errors=True)
        except (ValueError, IndexError, PermissionError):
            pass


# -- the build ---------------------------------------------------------------------------------------


def _log(progress: bool, msg: str) -> None:
    if progress:
        tqdm.write(f"[bstar embedded] {msg}", file=sys.stderr)


def _build(cfg: EmbeddedConfig, out: Path, progress: bool) -> None:
    import torch

    t_all = time.perf_counter()
    times, metrics = {}, {}
    torch.manual_seed(cfg.seed)

    t = time.perf_counter()
    train, test, seed_set = make_data(cfg)
    times["data"] = time.perf_counter() - t
    _log(
        progress,
        f"data: {len(train)} train, {len(test)} test, {len(seed_set)} warm-start examples ({times['data']:.1f}s)",
    )

    t = time.perf_counter()
    tok_dir = out / "tokenizer"
    tok_dir.mkdir()
    tok = build_tokenizer(tok_dir, train + seed_set, cfg.vocab_size)
    check_round_trip(tok, train + test + seed_set)
    times["tokenizer"] = time.perf_counter() - t
    metrics["vocab_size"] = tok.get_vocab_size()
    _log(progress, f"tokenizer: {tok.get_vocab_size()} tokens, round trip ok ({times['tokenizer']:.1f}s)")

    t = time.perf_counter()
    init_dir = out / "init"
    save_random_policy(cfg, tok_dir, init_dir, tok.get_vocab_size())
    policy_dir = out / "policy"
    warm = warm_start(cfg, init_dir, tok, seed_set, policy_dir, progress)
    shutil.rmtree(init_dir)
    acc = greedy_accuracy(policy_dir, test, cfg, progress)
    times["policy"] = time.perf_counter() - t
    metrics.update(warm_start_final_loss=warm, warm_test_accuracy=acc)
    _log(progress, f"policy: warm start done, greedy test accuracy {acc:.3f} ({times['policy']:.1f}s)")

    t = time.perf_counter()
    fit, held, label_stats = label_steps(cfg, policy_dir, train[: cfg.prm_questions], progress)
    _log(
        progress,
        f"prm labels: {label_stats['steps']} steps, {label_stats['good_rate']:.2f} '+', "
        f"candidate accuracy {label_stats['candidate_accuracy']:.2f} ({time.perf_counter() - t:.1f}s)",
    )
    with open(out / "prm_labels.jsonl", "w") as f:  # for inspection (and the tests)
        for part, rows in (("fit", fit), ("held_out", held)):
            for e, steps, labels in rows:
                f.write(
                    json.dumps(
                        {
                            "id": e.id,
                            "split": part,
                            "question": e.question,
                            "gold": e.gold_answer,
                            "steps": steps,
                            "labels": labels,
                        }
                    )
                    + "\n"
                )
    prm_dir = out / "prm"
    prm_loss = train_prm(cfg, policy_dir, tok, fit, prm_dir, progress)
    prm_eval = prm_accuracy(prm_dir, held)
    times["prm"] = time.perf_counter() - t
    metrics.update(prm_labels=label_stats, prm_final_loss=prm_loss, **prm_eval)
    _log(
        progress,
        f"prm: held-out step accuracy {prm_eval['prm_step_accuracy']:.3f} vs majority "
        f"{prm_eval['prm_majority_rate']:.3f} ({times['prm']:.1f}s)",
    )

    times["total"] = time.perf_counter() - t_all
    (out / "splits.json").write_text(
        json.dumps({"train": [asdict(e) for e in train], "test": [asdict(e) for e in test]})
    )
    import tokenizers
    import transformers

    manifest = {
        "version": VERSION,
        "key": cfg.key(),
        "config": asdict(cfg),
        "metrics": metrics,
        "seconds": {k: round(v, 2) for k, v in times.items()},
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "prompt_template": DEFAULT_PROMPT,
        "prm": {"step_tag": STEP_TAG, "good": GOOD, "bad": BAD, "question_template": PRM_QUESTION_TEMPLATE},
    }
    # written last: a cache dir with a manifest is complete
    (out / _MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    _log(progress, f"built in {times['total']:.1f}s")


# -- 1. data -----------------------------------------------------------------------------------------


def make_data(cfg: EmbeddedConfig) -> tuple[list[Example], list[Example], list[Example]]:
    """(train, test, warm-start seed set). The seed set continues the train stream, so it is
    disjoint from both splits and the train split is exactly make_splits(n_train, n_test)."""
    train, test = make_splits(cfg.n_train + cfg.n_seed, cfg.n_test, cfg.seed)
    return train[: cfg.n_train], test, train[cfg.n_train :]


# -- 2. tokenizer ------------------------------------------------------------------------------------


def _corpus(examples: list[Example]):
    for e in examples:
        yield format_prompt(e) + e.gold_solution


def build_tokenizer(path: Path, examples: list[Example], vocab_size: int):
    """Byte-level BPE (lossless decode) whose pre-tokenizer isolates every digit; saved with
    tokenizer_config.json (bos/eos/pad) so both engine.Tokenizer and transformers load it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(examples), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    tok.add_tokens([STEP_TAG])
    for s, i in zip(SPECIAL_TOKENS, (BOS, EOS, PAD)):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    for s in (STEP_TAG, "+", "-", "*", "=", "#", "\n"):
        if len(tok.encode(s, add_special_tokens=False).ids) != 1:
            raise BStarError(f"embedded tokenizer: {s!r} is not a single token")
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": "<s>",
                "eos_token": "</s>",
                "pad_token": "<pad>",
                "model_max_length": 4096,
            }
        )
    )
    return tok


def check_round_trip(tok, examples: list[Example]) -> None:
    """Decoded solutions must still grade as correct (and decode must be lossless)."""
    for e in examples:
        text = e.gold_solution
        back = tok.decode(tok.encode(text, add_special_tokens=False).ids)
        if back != text or not grade(back, e.gold_answer, e.task):
            raise BStarError(f"embedded tokenizer does not round-trip {text!r} (got {back!r})")


# -- 3. policy ---------------------------------------------------------------------------------------


def save_random_policy(cfg: EmbeddedConfig, tok_dir: Path, path: Path, n_vocab: int) -> None:
    """A randomly initialised tiny Llama with the tokenizer and generation config beside it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    mc = LlamaConfig(
        vocab_size=n_vocab,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(mc)
    model.save_pretrained(path)
    for f in tok_dir.iterdir():
        shutil.copy2(f, path / f.name)
    (path / "generation_config.json").write_text(
        json.dumps({"bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD})
    )


def _sft_config(cfg: EmbeddedConfig, lr: float, epochs: int, batch: int, progress: bool):
    from bstar.trainer import SFTConfig

    return SFTConfig(
        lr=lr,
        epochs=epochs,
        batch_examples=batch,
        max_seq_len=cfg.max_position_embeddings,
        micro_batch_tokens=max(4096, cfg.max_position_embeddings),
        warmup_ratio=0.05,
        min_lr_ratio=0.1,
        weight_decay=0.0,
        seed=cfg.seed,
        progress=progress,
        device="cpu",
    )


def warm_start(cfg: EmbeddedConfig, init_dir: Path, tok, seed_set: list[Example], out: Path, progress: bool) -> float:
    """SFT of the random policy on the seed set (loss on solution + eos); returns the last loss."""
    from bstar.sft_data import SFTExample
    from bstar.trainer import SFTTrainer

    data = []
    for i, e in enumerate(seed_set, 1):
        p = tok.encode(format_prompt(e)).ids
        c = tok.encode(e.gold_solution, add_special_tokens=False).ids + [EOS]
        data.append(SFTExample(tuple(p + c), len(p), i))
    trainer = SFTTrainer(init_dir, _sft_config(cfg, cfg.warm_lr, cfg.warm_epochs, cfg.warm_batch, progress))
    res = trainer.train(data)
    trainer.save(out, trainer_state=False)
    return res.losses[-1]


def _llm(path: Path, cfg: EmbeddedConfig):
    from engine import LLM

    return LLM(str(path), device="cpu", seed=cfg.seed, max_model_len=cfg.max_position_embeddings)


def greedy_accuracy(policy: Path, examples: list[Example], cfg: EmbeddedConfig, progress: bool) -> float:
    """Fraction of `examples` the policy answers correctly with greedy decoding (engine + grade)."""
    from engine import SamplingParams

    llm = _llm(policy, cfg)
    outs = llm.generate(
        [format_prompt(e) for e in examples],
        SamplingParams(temperature=0.0, max_tokens=cfg.max_new_tokens),
        use_tqdm=progress,
    )
    return sum(grade(o.outputs[0].text, e.gold_answer, e.task) for o, e in zip(outs, examples)) / len(examples)


# -- 4. PRM ------------------------------------------------------------------------------------------


def split_steps(text: str) -> list[str]:
    """Steps as engine.PRM splits them: non-empty stripped lines."""
    return [s.strip() for s in text.split("\n") if s.strip()]


def label_steps(cfg: EmbeddedConfig, policy: Path, questions: list[Example], progress: bool):
    """Math-Shepherd hard labels for warm-policy candidates of `questions`.

    Returns (fit, held_out, stats); fit / held_out: lists of (example, steps, labels) split by
    question. A step is good (True) when a rollout from the prefix ending with it reaches the gold
    answer; the candidate's own continuation counts as one rollout, and the last step's label is the
    candidate's own correctness (nothing follows it)."""
    from engine import SamplingParams

    llm = _llm(policy, cfg)
    sample = SamplingParams(
        n=cfg.prm_candidates, temperature=cfg.prm_temperature, max_tokens=cfg.max_new_tokens, seed=cfg.seed
    )
    outs = llm.generate([format_prompt(e) for e in questions], sample, use_tqdm=progress)
    cands = []  # (question index, steps, candidate correct)
    for qi, (o, e) in enumerate(zip(outs, questions)):
        for c in o.outputs:
            steps = split_steps(c.text)
            if steps:
                cands.append((qi, steps, grade(c.text, e.gold_answer, e.task)))
    # rollouts from every proper prefix of every wrong candidate (a right one's prefixes are good)
    jobs = [(k, i) for k, (qi, steps, ok) in enumerate(cands) if not ok for i in range(1, len(steps))]
    roll = SamplingParams(
        n=cfg.prm_rollouts, temperature=cfg.prm_temperature, max_tokens=cfg.max_new_tokens, seed=cfg.seed + 1
    )
    reached: dict[tuple[int, int], bool] = {}
    chunk = 256  # prompts per generate call: one bar over all of them
    bar = tqdm(total=len(jobs), desc="prm rollouts", disable=not progress)
    for s in range(0, len(jobs), chunk):
        part = jobs[s : s + chunk]
        prompts = [format_prompt(questions[cands[k][0]]) + "\n".join(cands[k][1][:i]) + "\n" for k, i in part]
        for (k, i), o in zip(part, llm.generate(prompts, roll, use_tqdm=False)):
            e = questions[cands[k][0]]
            reached[(k, i)] = any(grade(c.text, e.gold_answer, e.task) for c in o.outputs)
        bar.update(len(part))
    bar.close()
    del llm
    labelled = [
        (qi, steps, hard_labels(len(steps), ok, [reached.get((k, i), False) for i in range(1, len(steps))]))
        for k, (qi, steps, ok) in enumerate(cands)
    ]
    order = list(range(len(questions)))
    random.Random(cfg.seed).shuffle(order)
    held_q = set(order[: max(1, round(cfg.prm_holdout * len(questions)))])
    fit = [(questions[qi], st, lb) for qi, st, lb in labelled if qi not in held_q]
    held = [(questions[qi], st, lb) for qi, st, lb in labelled if qi in held_q]
    all_labels = [x for _, _, lb in labelled for x in lb]
    stats = {
        "candidates": len(cands),
        "steps": len(all_labels),
        "good_rate": sum(all_labels) / max(1, len(all_labels)),
        "candidate_accuracy": sum(ok for _, _, ok in cands) / max(1, len(cands)),
        "rollout_prompts": len(jobs),
        "fit_steps": sum(len(lb) for _, _, lb in fit),
        "held_out_steps": sum(len(lb) for _, _, lb in held),
    }
    return fit, held, stats


def hard_labels(n_steps: int, candidate_ok: bool, prefix_reached: list[bool]) -> list[bool]:
    """Math-Shepherd hard estimation: step i (of n) is good when a rollout from the prefix ending at
    it reached the gold answer (prefix_reached[i], for the n - 1 proper prefixes) or the candidate
    itself, which continues every prefix, is correct; the last step is good iff the candidate is."""
    if len(prefix_reached) != n_steps - 1:
        raise BStarError(f"{n_steps} steps need {n_steps - 1} prefix results, got {len(prefix_reached)}")
    return [candidate_ok or r for r in prefix_reached] + [candidate_ok]


def prm_inputs(tok, question: str, steps: list[str]) -> tuple[list[int], list[int]]:
    """(ids, tag positions) exactly as engine.PRM tokenises a question and its steps."""
    ids = tok.encode(PRM_QUESTION_TEMPLATE.format(question=question)).ids
    tag = tok.token_to_id(STEP_TAG)
    delim = tok.encode("\n", add_special_tokens=False).ids
    tags = []
    for i, step in enumerate(steps):
        if i:
            ids += delim
        ids += tok.encode(step + " ", add_special_tokens=False).ids
        tags.append(len(ids))
        ids.append(tag)
    return ids, tags


def prm_examples(tok, labelled) -> list:
    """One SFTExample per step: the PRM input up to and including the step's tag, then the label."""
    from bstar.sft_data import SFTExample

    good, bad = tok.token_to_id(GOOD), tok.token_to_id(BAD)
    out = []
    for e, steps, labels in labelled:
        ids, tags = prm_inputs(tok, e.question, steps)
        for t, lab in zip(tags, labels):
            out.append(SFTExample(tuple(ids[: t + 1] + [good if lab else bad]), t + 1, len(out) + 1))
    return out


def train_prm(cfg: EmbeddedConfig, policy: Path, tok, labelled, out: Path, progress: bool) -> float:
    from bstar.trainer import SFTTrainer

    data = prm_examples(tok, labelled)
    if not data:
        raise BStarError("embedded PRM: no labelled steps to train on (the warm policy produced no steps)")
    trainer = SFTTrainer(policy, _sft_config(cfg, cfg.prm_lr, cfg.prm_epochs, cfg.prm_batch, progress))
    res = trainer.train(data)
    trainer.save(out, trainer_state=False)
    return res.losses[-1]


def prm_accuracy(prm: Path, held) -> dict:
    """Step-label accuracy of engine.PRM (P(good) > 0.5) on held-out labelled candidates."""
    from engine import PRM

    model = PRM(str(prm), device="cpu")
    labels, preds = [], []
    for e, steps, lab in held:
        s = model.score(e.question, ["\n".join(steps)])[0]
        labels += lab
        preds += [p > 0.5 for p in s.step_scores]
    n = max(1, len(labels))
    good = sum(labels) / n
    return {
        "prm_step_accuracy": sum(p == y for p, y in zip(preds, labels)) / n,
        "prm_majority_rate": max(good, 1 - good),
        "prm_held_out_good_rate": good,
        "prm_held_out_steps": len(labels),
    }
