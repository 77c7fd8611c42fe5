"""Host time per decode step of the sampler's penalties and the stop-string rule, at output lengths 1k and
8k tokens (issue 32, item 9): this engine's incremental way (runner.sampler.PenaltyState, core.
output_processor.StopTextState) against the old way (a [rows, vocab+1] count tensor rebuilt from every
output token, the whole output decoded again), which this file keeps as the peer, in the same run.

Each step appends one token to every row, penalises the rows' logits (repetition, frequency and presence
penalties on) and applies the stop rule (two stop strings, never found). Both ways must give the same
logits and decisions (checked every step). The figure is the median per-step time (perf_counter) over the
timed steps; on CPU it includes the tensor work, which is the same [rows, V] gather in both ways plus, in
the old way only, the rebuilt counts. Flat means new(8k) / new(1k) near 1.

    PYTHONPATH=src python bench/host_step.py            # rows 32, vocab 32768, 1k vs 8k tokens
    PYTHONPATH=src python bench/host_step.py --quick    # small, a check that the script runs
"""

import argparse
import statistics
import sys
import tempfile
import time

import torch

from bstar.engine.core.output_processor import OutputProcessor
from bstar.engine.core.sequence import Sequence
from bstar.engine.entrypoints.sampling_params import SamplingParams
from bstar.engine.model.tokenizer import Tokenizer
from bstar.engine.runner.sampler import PenaltyState, apply_penalties
from bstar.kernels.host import to_device
from bstar.testing.model_factory import build_tokenizer

STOPS = ["<never>", "§§"]


def old_apply_penalties(x: torch.Tensor, seqs: list[Sequence]) -> None:
    """The penalties as the engine applied them before issue 32: every output token, every step."""
    dev, V = x.device, x.shape[1]
    P = len(seqs)
    f32 = dict(dtype=torch.float32, device=dev)
    out_lens = [len(s.token_ids) - s.prompt_len for s in seqs]
    width = max(out_lens)
    counts = torch.zeros(P, V + 1, **f32)
    flat = []
    for s, n in zip(seqs, out_lens):
        flat += s.token_ids[s.prompt_len :]
        flat += [V] * (width - n)
    ids = to_device(flat, torch.int64, dev)
    counts.scatter_add_(1, ids.view(P, width), torch.ones(P, width, **f32))
    counts = counts[:, :V]
    prompts = torch.nn.utils.rnn.pad_sequence(
        [to_device(s.token_ids[: s.prompt_len], torch.int64, dev) for s in seqs], batch_first=True, padding_value=V
    )
    seen = torch.zeros(P, V + 1, dtype=torch.bool, device=dev).scatter_(1, prompts, True)[:, :V]
    seen |= counts > 0
    p = to_device([s.params.repetition_penalty for s in seqs], torch.float32, dev)[:, None].expand(P, V)
    p = torch.where(seen, p, torch.ones_like(p))
    xs = torch.where(x > 0, x / p, x * p)
    xs = xs - to_device([s.params.frequency_penalty for s in seqs], torch.float32, dev)[:, None] * counts
    xs = xs - to_device([s.params.presence_penalty for s in seqs], torch.float32, dev)[:, None] * (counts > 0).float()
    x.copy_(xs)


def old_stop_string(tok: Tokenizer, s: Sequence) -> bool:
    """The stop-string rule as before issue 32: the whole output decoded again, its tail searched."""
    p = s.params
    text = tok.decode(s.output_ids, p.skip_special_tokens)
    tail = max(len(x) for x in p.stop_strings) + 16
    return any(text.find(stop, max(0, len(text) - tail - len(stop))) >= 0 for stop in p.stop_strings)


def _rows(rows: int, length: int, vocab: int, seed: int) -> list[Sequence]:
    g = torch.Generator().manual_seed(seed)
    params = SamplingParams(
        repetition_penalty=1.2, frequency_penalty=0.3, presence_penalty=0.2, stop=STOPS, max_tokens=None
    )
    seqs = []
    for i in range(rows):
        s = Sequence(f"r{i}", torch.randint(3, vocab, (64,), generator=g).tolist(), params)
        s.token_ids += torch.randint(3, vocab, (length,), generator=g).tolist()
        seqs.append(s)
    return seqs


def measure(tok, rows: int, length: int, vocab: int, steps: int, seed: int = 0) -> dict[str, float]:
    """Median seconds per step of each way, at `length` output tokens; both ways checked equal."""
    new_seqs, old_seqs = _rows(rows, length, 256, seed), _rows(rows, length, 256, seed)
    proc = OutputProcessor(tok, eos_ids=set(), max_model_len=1 << 30)
    state = PenaltyState(vocab, "cpu")
    x0 = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))
    apply_penalties(x0.clone(), None, new_seqs, state)  # (the state as a running engine has it: counted)
    for s in new_seqs:
        proc.finish_reason(s)
    g = torch.Generator().manual_seed(seed + 1)
    times = {"new": [], "old": []}
    for _ in range(steps):
        new_tok = torch.randint(3, 256, (rows,), generator=g).tolist()
        for s, o, t in zip(new_seqs, old_seqs, new_tok):
            s.token_ids.append(t)
            o.token_ids.append(t)
        a, b = x0.clone(), x0.clone()
        t0 = time.perf_counter()
        apply_penalties(a, None, new_seqs, state)
        stop_new = [proc.finish_reason(s) for s in new_seqs]
        t1 = time.perf_counter()
        old_apply_penalties(b, old_seqs)
        stop_old = [old_stop_string(tok, s) for s in old_seqs]
        t2 = time.perf_counter()
        times["new"].append(t1 - t0)
        times["old"].append(t2 - t1)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)
        assert stop_new == [None] * rows and not any(stop_old)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--lengths", type=int, nargs=2, default=(1024, 8192))
    ap.add_argument("--quick", action="store_true", help="rows 4, vocab 512, lengths 64 and 512, 3 steps")
    args = ap.parse_args(argv)
    if args.quick:
        args.rows, args.vocab, args.lengths, args.steps = 4, 512, (64, 512), 3
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        build_tokenizer(d)
        tok = Tokenizer(d)
    short, long = (measure(tok, args.rows, n, args.vocab, args.steps) for n in args.lengths)
    print(f"rows {args.rows}, vocab {args.vocab}, penalties + 2 stop strings, median of {args.steps} steps")
    print(f"{'way':<6}{'len ' + str(args.lengths[0]):>14}{'len ' + str(args.lengths[1]):>14}{'long/short':>12}")
    for way in ("new", "old"):
        print(f"{way:<6}{short[way] * 1e3:>11.3f} ms{long[way] * 1e3:>11.3f} ms{long[way] / short[way]:>11.2f}x")
    print(f"old / new at {args.lengths[1]}: {long['old'] / long['new']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
