"""From logits rows to sampled tokens: per-row parameters, bans, penalties, seeds, logprobs.

Each draw's seed is a function of the request's seed, the candidate's index and the token
position only (`candidate_seed`, then `position_seed`), so a candidate's tokens do not depend on
batching, preemption or other requests.

The order is vLLM's: min_tokens bans, then penalties (repetition, frequency, presence; only rows
that use them, see `apply_penalties`), then temperature, min-p, top-k, top-p and the draw
(kernels.sample). Reported values follow the engine's logprobs_mode (config.LOGPROBS_MODES): "raw_*" are
taken from the model's logits before any of that, "processed_*" from the logits the draw used
(penalised, divided by the temperature, filtered tokens at -inf; a greedy row's are only
penalised). In the processed modes the filters run here once (kernels.sampling.apply_filters) and
the draw samples the processed logits as they are, so the reported values are exactly the
distribution drawn from.
"""

import weakref
from operator import attrgetter

import torch

from bstar import kernels
from bstar.engine.core.sequence import Sequence
from bstar.engine.entrypoints.outputs import Logprob, PositionLogprobs
from bstar.engine.entrypoints.sampling_params import SamplingParams
from bstar.engine.entrypoints.vllm_sampling import uses_masks
from bstar.kernels.host import HostCopy, index_pairs, to_device, to_device_segments
from bstar.kernels.sampling import apply_filters, filter_plan

# A row's filter values, in the kernel's order (the draw's key to reuse them between steps)
_filter_values = attrgetter("temperature", "top_k", "top_p", "min_p")


_MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def candidate_seed(request_seed: int, candidate: int) -> int:
    """The part of a draw's seed fixed for a candidate's lifetime."""
    return splitmix64(splitmix64(request_seed & _MASK64) ^ candidate)


def position_seed(candidate_base: int, position: int) -> int:
    """Seed (int64) of one draw from its candidate's base and the token position."""
    h = splitmix64(candidate_base ^ position)
    return h - (1 << 64) if h >= 1 << 63 else h


class Sampler:
    """Draws the next token of each candidate of a step."""

    def __init__(self, eos_ids: set[int], logprobs_mode: str = "raw_logprobs", triton: bool | None = None):
        self.eos_ids = eos_ids  # banned, with params.stop_token_ids, until params.min_tokens
        self.logprobs_mode = logprobs_mode
        self.triton = triton  # the kernel backend the engine chose (ModelRunner.triton); None: the logits' device
        self._filters: dict = {}  # the last shared-values step's filter tensors (draw_rows' `filters` cache)
        self.masks = None  # runner.logit_masks.LogitMasks: vLLM's per-request masks and bias (set by the engine)
        self.penalties: PenaltyState | None = None  # the penalised sequences' token counts, made at first use

    def __call__(self, logits: torch.Tensor, rows: list[int], seqs: list[Sequence]):
        """logits float32 [R, V]; seqs[i] draws from row rows[i]. Returns the Draw (on the device)."""
        if len(rows) != logits.shape[0] or rows != list(range(len(rows))):
            logits = logits[to_device(rows, torch.int64, logits.device)]
        seeds = []
        for s in seqs:
            if s.seed_base is None:
                s.seed_base = candidate_seed(s.seed, s.index)
            seeds.append(position_seed(s.seed_base, s.num_output))
        bans = [self._banned(s) if s.params.min_tokens else [] for s in seqs]
        params = [s.params for s in seqs]
        penalised = [s for s in seqs if s.params.has_penalties]
        masked = None
        if self.masks is not None and any(uses_masks(p) for p in params):
            masked = lambda x: self.masks.apply(x, seqs)
        state = self.penalties
        if penalised and (state is None or state.V != logits.shape[1] or state.device != logits.device):
            state = self.penalties = PenaltyState(logits.shape[1], logits.device)
        return draw_rows(
            logits,
            params,
            seeds,
            bans,
            penalised or None,
            self.logprobs_mode,
            filters=self._filters,
            masked=masked,
            penalties=state,
            triton=self.triton,
        )

    def _banned(self, s: Sequence) -> list[int]:
        if s.num_output >= s.params.min_tokens:
            return []
        ban = list(s.params.stop_token_ids)
        if not s.params.ignore_eos:
            ban += list(self.eos_ids)
        return ban


class PenaltyState:
    """The penalties' token counts, kept on the device and brought up to date with each step's new tokens
    only (as vLLM keeps them per request): host work per step is O(new tokens), not O(output length).

    Each penalised sequence holds a slot (a row) of `counts` float32 [slots, V] (its output tokens) and of
    `prompt` bool [slots, V] (its prompt's tokens, set once when the slot is taken). A slot is taken at the
    sequence's first penalised step (Sequence.penalty_slot, with Sequence.penalty_counted: the output
    positions counted so far) and is reclaimed once the sequence is garbage (a weak reference), or built
    again if its outputs were cut below what was counted. The rows grow by doubling, as slots are needed.

    Interface: `slots(seqs)` updates and returns the sequences' slot indices (device int64 [P]); then
    `counts[slots]` and `prompt[slots]` are their rows. apply_penalties is its one user."""

    def __init__(self, vocab: int, device):
        self.V, self.device = vocab, torch.device(device)
        self.counts = torch.zeros(0, vocab, dtype=torch.float32, device=self.device)
        self.prompt = torch.zeros(0, vocab, dtype=torch.bool, device=self.device)
        self._owner: list = []  # slot -> weakref of the sequence that holds it (None: never taken)
        self.free: list[int] = []  # slots whose sequence is gone (a weakref callback returns them)

    @property
    def num_slots(self) -> int:
        return len(self._owner)

    def _owns(self, s: Sequence, slot: int | None) -> bool:
        ref = self._owner[slot] if slot is not None and slot < len(self._owner) else None
        return ref is not None and ref() is s  # (not a slot of another state: a sequence sampled elsewhere)

    def _take(self, s: Sequence) -> int:
        if not self.free:
            n = len(self._owner)
            grow = max(16, n)
            self.counts = torch.cat([self.counts, self.counts.new_zeros(grow, self.V)])
            self.prompt = torch.cat([self.prompt, self.prompt.new_zeros(grow, self.V)])
            self._owner += [None] * grow
            self.free += range(n + grow - 1, n - 1, -1)
        slot = self.free.pop()
        self._owner[slot] = weakref.ref(s, lambda _, slot=slot: self.free.append(slot))
        s.penalty_slot, s.penalty_counted = slot, 0
        return slot

    def slots(self, seqs: list[Sequence]) -> torch.Tensor:
        """Count what each sequence drew since its last penalised step (its pending token, drawn by the step
        in flight, read on the device from the draw its Sequence.pending_source names); its slot indices."""
        slots, fresh, prompt_ids, rows, toks, pend_src, draw = [], [], [], [], [], [], None
        for s in seqs:
            slot = s.penalty_slot
            n = len(s.token_ids) - s.prompt_len
            if not self._owns(s, slot) or n < s.penalty_counted:  # (outputs cut below the counts: count again)
                slot = self._take(s)
                fresh.append(slot)
                prompt_ids += s.token_ids[: s.prompt_len]
                rows += [slot] * s.prompt_len  # (their prompt rows first, then the new output tokens)
            slots.append(slot)
        n_prompt = len(rows)
        pend_rows = []
        for s, slot in zip(seqs, slots):
            n = len(s.token_ids) - s.prompt_len
            if s.penalty_counted < n:
                known = s.token_ids[s.prompt_len + s.penalty_counted : len(s.token_ids) - s.num_pending]
                rows += [slot] * len(known)
                toks += known
                if s.num_pending:  # (one at most when a step samples: its last)
                    draw, r = s.pending_source
                    pend_rows.append(slot)
                    pend_src.append(r)
                s.penalty_counted = n
        if not (fresh or rows or pend_rows):  # nothing drawn since the last call: the counts are current
            return to_device(slots, torch.int64, self.device)
        layout = dict(
            slots=slots, fresh=fresh, rows=rows, pend_rows=pend_rows, prompt=prompt_ids, toks=toks, src=pend_src
        )
        seg = to_device_segments({k: (v, torch.int64) for k, v in layout.items()}, self.device)  # one copy
        slot_t, fresh_t, rows_t, pend_rows_t = seg["slots"], seg["fresh"], seg["rows"], seg["pend_rows"]
        prompt_t, toks_t, src_t = seg["prompt"], seg["toks"], seg["src"]
        if fresh:
            self.counts[fresh_t] = 0
            self.prompt[fresh_t] = False
            self.prompt[rows_t[:n_prompt], prompt_t] = True
        out_rows = torch.cat([rows_t[n_prompt:], pend_rows_t])
        if out_rows.numel():
            out_toks = torch.cat([toks_t, draw.index_select(0, src_t)]) if pend_src else toks_t
            ones = torch.ones(out_toks.shape, dtype=torch.float32, device=self.device)
            self.counts.index_put_((out_rows, out_toks), ones, accumulate=True)
        return slot_t


def apply_penalties(x: torch.Tensor, rows: torch.Tensor | None, seqs: list[Sequence], state=None) -> None:
    """Repetition, frequency and presence penalties, in place on float32 logits x [R, V], as vLLM
    applies them: rows `rows` (None: all rows) belong to `seqs`, in order.

    repetition_penalty p acts once on every token of prompt + output: a logit l becomes l / p if
    l > 0, else l * p. frequency_penalty f and presence_penalty r use the output tokens only:
    l - f * count - r * (count > 0). The counts are the PenaltyState's `state` (None: a fresh one, which
    counts every output token), brought up to date with the tokens drawn since the sequences' last step.

    Host values reach the device through pinned, non-blocking copies: nothing here makes the host wait."""
    dev, V = x.device, x.shape[1]
    if state is None:
        state = PenaltyState(V, dev)
    slots = state.slots(seqs)
    P = len(seqs)
    xs = x if rows is None else x[rows]
    counts = state.counts[slots]
    rep = [s.params.repetition_penalty for s in seqs]
    freq = [s.params.frequency_penalty for s in seqs]
    pres = [s.params.presence_penalty for s in seqs]
    seg = to_device_segments(
        {"rep": (rep, torch.float32), "freq": (freq, torch.float32), "pres": (pres, torch.float32)}, dev
    )
    p, f, r = seg["rep"], seg["freq"], seg["pres"]
    if any(v != 1 for v in rep):
        seen = state.prompt[slots] | (counts > 0)
        p = torch.where(seen, p[:, None].expand(P, V), 1.0)
        xs = torch.where(xs > 0, xs / p, xs * p)
    if any(freq):
        xs = xs - f[:, None] * counts
    if any(pres):
        xs = xs - r[:, None] * (counts > 0).float()
    if rows is None:
        x.copy_(xs)
    else:
        x[rows] = xs


class Draw:
    """One step's draw, on the device: tokens int64 [R] and their values float32 [R] (what
    cumulative_logprob sums), plus for the rows whose params ask for logprobs the tensors of their
    entries (position_logprob_tensors). `host()` turns them into lists (the step's one wait for the
    device); `start_copy()` begins that copy without waiting, so the host can work meanwhile."""

    def __init__(self, tokens, values, want=None, entry_values=None, entry_ids=None, ranks=None):
        self.want = want
        self._tensors = [t for t in (tokens, values, entry_values, entry_ids, ranks) if t is not None]
        self.tokens = tokens  # (the next step's inputs read it on the device)
        self._copy: HostCopy | None = None

    def start_copy(self):
        """Begin the copy to the host (CUDA: pinned, non-blocking; kernels.host.HostCopy)."""
        if self._copy is None:
            self._copy = HostCopy(self._tensors)

    def host(self):
        """(tokens list[int], values list[float], per row a {token id: Logprob} entry or None)."""
        self.start_copy()
        lists = self._copy.lists()
        tokens, values = lists[0], lists[1]
        if self.want is None:
            return tokens, values, [None] * len(tokens)
        _, entries = position_logprob_entries(*lists[2:], self.want)
        return tokens, values, entries  # (values: the draw's own, whatever other rows ask for)


def draw_rows(
    logits: torch.Tensor,
    params: list[SamplingParams],
    seeds: list[int],
    bans: list[list[int]],
    penalised: list[Sequence] | None = None,
    logprobs_mode: str = "raw_logprobs",
    filters: dict | None = None,
    masked=None,
    penalties: PenaltyState | None = None,
    triton: bool | None = None,
):
    """logits float32 [R, V]; one SamplingParams, seed and banned-id list per row; `penalised`:
    the sequences of the rows whose params have penalties (None when no row has them), in row order.
    `filters`: a dict that keeps the filter tensors of the last step whose rows share their filter values
    (temperature, top-k, top-p, min-p), for the next such step with the same values and rows (a decode
    step of one call's candidates then makes none: four device fills a step fewer). They are only read.
    Rows with different filter values send them with the seeds in one packed copy. `masked`: applies vLLM's
    per-request masks and bias in place (runner/logit_masks.py), after the bans, before the penalties.
    `penalties`: the PenaltyState that keeps the penalised sequences' counts between steps (None: counted afresh).
    `triton`: the sampling kernel's backend (kernels.dispatch; None: the logits' device).

    Returns the Draw (device tensors; Draw.host() gives the lists)."""
    dev = logits.device
    raw = logits
    banned = any(bans)
    if penalised is not None or banned or masked is not None:  # keep the raw logits for the raw modes' values
        logits = logits.clone()
    if banned:  # (index lists through to_device: a list index would copy without pinning, and wait)
        ban_rows = [r for r, ban in enumerate(bans) for _ in ban]
        cols = [t for ban in bans for t in ban]
        logits[index_pairs(ban_rows, cols, dev)] = float("-inf")
    if masked is not None:
        masked(logits)
    if penalised is not None:
        prows = None
        if len(penalised) != len(params):
            prows = to_device([r for r, p in enumerate(params) if p.has_penalties], torch.int64, dev)
        apply_penalties(logits, prows, penalised, penalties)
    R, p0 = len(params), params[0]
    uniform = all(p is p0 for p in params)
    f0 = _filter_values(p0)
    if uniform or all(_filter_values(p) == f0 for p in params):
        # the common case: one request's (or one call's) parameters, or requests that differ in their
        # seeds only (one SamplingParams per prompt, as RL loops make them)
        key = (*f0, R, dev)  # (values: params may be changed in place)
        kept = filters.get(key) if filters is not None else None
        if kept is None:
            kept = tuple(
                torch.full((R,), v, dtype=dt, device=dev)
                for v, dt in zip(f0, (torch.float32, torch.int32, torch.float32, torch.float32))
            )
            if filters is not None:
                filters.clear()
                filters[key] = kept
        temperature, top_k, top_p, min_p = kept
        seed_t = to_device(seeds, torch.int64, dev)
    else:
        # rows with their own filter values: the four columns and the seeds through one pinned,
        # non-blocking copy (no stream sync before the kernel; one copy, not five)
        temps, ks, tps, mps = zip(*map(_filter_values, params))
        seg = to_device_segments(
            {
                "seeds": (seeds, torch.int64),
                "temperature": (temps, torch.float32),
                "top_k": (ks, torch.int32),
                "top_p": (tps, torch.float32),
                "min_p": (mps, torch.float32),
            },
            dev,
        )
        seed_t, temperature, top_k, top_p = seg["seeds"], seg["temperature"], seg["top_k"], seg["top_p"]
        min_p = seg["min_p"]
    processed = logprobs_mode.startswith("processed")
    if processed:
        # The logits the draw uses, filtered once here; a greedy row keeps its penalised logits
        # (temperature 1, no filter), as in vLLM. The draw then samples them as they are.
        greedy = temperature <= 0
        one = torch.ones_like(temperature)
        eff = [(1.0, 0, 1.0, 0.0) if p.temperature <= 0 else (p.temperature, p.top_k, p.top_p, p.min_p) for p in params]
        proc = apply_filters(
            logits,
            torch.where(greedy, one, temperature),
            torch.where(greedy, torch.zeros_like(top_k), top_k),
            torch.where(greedy, one, top_p),
            torch.where(greedy, torch.zeros_like(min_p), min_p),
            plan=filter_plan(*zip(*eff), V=logits.shape[1]),  # from the host values: no wait for the device
        )
        tokens, logprobs = kernels.sample(
            proc, torch.where(greedy, torch.zeros_like(one), one), top_k * 0, one, min_p * 0, seed_t, triton=triton
        )
    else:
        tokens, logprobs = kernels.sample(logits, temperature, top_k, top_p, min_p, seed_t, triton=triton)
        if logits is not raw:  # the kernel's logprob is of the banned / penalised logits
            logprobs = raw.gather(1, tokens[:, None]).squeeze(1) - torch.logsumexp(raw, dim=-1)
    # Each row's value (what cumulative_logprob sums) is the mode's value of its token, whether or not
    # any row asks for logprobs entries: a row's value never depends on its batch.
    if logprobs_mode == "raw_logits":
        logprobs = raw.gather(1, tokens[:, None]).squeeze(1)
    elif logprobs_mode == "processed_logits":
        logprobs = proc.gather(1, tokens[:, None]).squeeze(1)
    if uniform:
        if p0.logprobs is None:  # the common case: no logprobs entries
            return Draw(tokens, logprobs)
        want = [p0.logprobs] * R
    else:
        want = [p.logprobs for p in params]
        if all(k is None for k in want):
            return Draw(tokens, logprobs)
    want = whole_vocabulary(want, logits.shape[1])
    values = {
        "raw_logprobs": lambda: torch.log_softmax(raw, dim=-1),
        "raw_logits": lambda: raw,
        "processed_logprobs": lambda: torch.log_softmax(proc, dim=-1),
        "processed_logits": lambda: proc,
    }[logprobs_mode]()
    return Draw(tokens, logprobs, want, *position_logprob_tensors(values, tokens, want))


def whole_vocabulary(want: list[int | None], V: int) -> list[int | None]:
    """vLLM's logprobs=-1 (and prompt_logprobs=-1): entries for the whole vocabulary."""
    return [V if w == -1 else w for w in want]


def sample_rows(*args, **kwargs):
    """draw_rows, then its host lists: (tokens list[int], the sampled tokens' values list[float]
    (what cumulative_logprob sums), per row the position's {token id: Logprob} when params.logprobs
    asks, else None)."""
    return draw_rows(*args, **kwargs).host()


def position_logprob_tensors(values: torch.Tensor, tokens: torch.Tensor, want: list[int | None]):
    """The device half of vLLM's per-position logprobs entries, from `values` [R, V] (logprobs or
    logits) and the chosen `tokens` [R]: per row the token's value then the top-k values [R, 1 + k],
    their ids [R, 1 + k] and the token's rank [R] (k: the most any row wants). Its lists (on the host,
    kernels.host.HostCopy) go to position_logprob_entries."""
    chosen = values.gather(1, tokens[:, None])
    rank = (values >= chosen).sum(-1)
    k = max((w or 0) for w in want)
    if k:
        top_v, top_i = values.topk(min(k, values.shape[-1]), dim=-1)
        return torch.cat([chosen, top_v], 1), torch.cat([tokens[:, None], top_i], 1), rank
    return chosen, tokens[:, None], rank


def position_logprob_entries(vals: list, ids: list, ranks: list, want: list[int | None]):
    """The host half, from position_logprob_tensors' lists: per row with want[r] not None,
    {tokens[r]: Logprob(value, rank), then the top-want[r] ids: Logprob(value, 1..k)}, where rank =
    1 + the number of strictly larger values. When the token is also in the top-k, its top-k entry
    wins (as a dict built in that order: vLLM's append_logprobs_for_next_position). Returns (the
    tokens' values list[float], the dicts)."""
    entries = [None] * len(want)
    for r, w in enumerate(want):
        if w is None:
            continue
        v, i = vals[r], ids[r]
        e = {i[0]: Logprob(v[0], ranks[r])}
        for j in range(1, min(w, len(i) - 1) + 1):  # (k beyond the vocabulary: all of it)
            e[i[j]] = Logprob(v[j], j)
        entries[r] = e
    return [v[0] for v in vals], entries


def prompt_logprob_tensors(logits: torch.Tensor, targets: torch.Tensor, want: list[int]):
    """position_logprob_tensors for raw logprobs, from float32 logits [R, V] (prompt_logprobs): the
    log-softmax [R, V] is never written (the logsumexp is subtracted from the 1 + k kept values only),
    and the values come flat: (values [R * (1 + k)], ids [R * (1 + k)], ranks [R], 1 + k), read on the host
    by flat_logprob_entries (a flat tolist is ~100x faster than a nested one)."""
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    chosen = logits.gather(1, targets[:, None])
    rank = (logits >= chosen).sum(-1)  # (the order of the logits is the order of the logprobs)
    k = min(max(want), logits.shape[-1])
    if k == 1:
        top_v, top_i = logits.max(dim=-1, keepdim=True)
    elif k:
        top_v, top_i = logits.topk(k, dim=-1)
    vals = torch.cat([chosen, top_v], 1) if k else chosen
    ids = torch.cat([targets[:, None], top_i], 1) if k else targets[:, None]
    return (vals - lse).flatten(), ids.flatten(), rank, 1 + k


def flat_logprob_entries(vals: list, ids: list, ranks: list, want: list[int], width: int) -> list[PositionLogprobs]:
    """position_logprob_entries from prompt_logprob_tensors' flat lists: per row {token: Logprob(value,
    rank), then the top-want[r] ids: Logprob(value, 1..k)} (a token also in the top-k keeps its top-k entry)."""
    entries = []
    for r, w in enumerate(want):
        at = r * width
        e = {ids[at]: Logprob(vals[at], ranks[r])}
        for j in range(1, min(w, width - 1) + 1):
            e[ids[at + j]] = Logprob(vals[at + j], j)
        entries.append(e)
    return entries
