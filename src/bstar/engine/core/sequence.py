"""A sequence: one candidate's tokens, its place in the KV cache, and its sampling state; a request:
the candidates of one prompt."""

import enum
import itertools
from dataclasses import dataclass, field

from bstar.engine.entrypoints.outputs import PositionLogprobs
from bstar.engine.entrypoints.sampling_params import SamplingParams

_ids = itertools.count()

# An output token drawn on the device whose value the host does not know yet (async scheduling,
# bstar/engine/core/async_step.py): it counts in every length, and the next step reads it on the device.
PENDING_TOKEN = -1


class SequenceStatus(enum.Enum):
    """Where a sequence is in the scheduler (core.scheduler): which of its queues holds it, if any."""

    WAITING = "waiting"  # queued, never run
    RUNNING = "running"  # in the running set: its blocks are held
    PREEMPTED = "preempted"  # back in the queue, its blocks freed: it is recomputed from its tokens
    FINISHED = "finished"  # in no queue: stopped, aborted, failed, or (prompt-only) its prefill is done


class Sequence:
    """Prompt + output tokens of one candidate.

    A request with n > 1 starts as a single sequence (candidate 0) that prefills the prompt once;
    when its first token is sampled it forks n - 1 siblings that share its KV blocks.
    """

    def __init__(
        self,
        request_id: str,
        token_ids: list[int],
        params: SamplingParams,
        index: int = 0,
        fork_count: int = 0,
        seed: int = 0,
    ):
        self.seq_id = next(_ids)
        self.status = SequenceStatus.WAITING
        self.request_id = request_id
        self.index = index  # candidate index within the request
        self.seed = seed  # the request's seed, shared by its candidates
        self.token_ids = list(token_ids)
        self.prompt_len = len(token_ids)
        self.params = params
        self.fork_count = fork_count  # siblings still to fork at the first sampled token
        self.num_computed = 0  # tokens whose KV is in the cache
        self.block_table: list[int] = []
        self.num_hashed_blocks = 0  # leading full blocks registered in the prefix cache
        self.hash_root: int | None = None  # the first block's "previous hash": the prompt's cache_salt, if any
        self.last_hash: int | None = None
        self.logprobs: list[PositionLogprobs] = []
        self.cumulative_logprob = 0.0
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None  # the stop string or stop token id that ended it
        self.stop_text: str | None = None  # output text cut at a stop string
        self.stop_text_state = None  # its stop strings' incremental text (core.output_processor.StopTextState)
        self.num_preemptions = 0
        self.seed_base: int | None = None  # bstar.engine.runner.sampler.candidate_seed of this candidate, once known
        self.prompt_logprobs_pending = False  # this sequence computes its request's prompt_logprobs
        # Prompt-only (core.prompt_forward: PRM scoring, compute_logits): it prefills and finishes, drawing nothing.
        self.prompt_only = False
        self.prefix_limit: int | None = None  # at most this many tokens from the prefix cache (None: any)
        self.penalty_slot: int | None = None  # its row of the sampler's PenaltyState (runner.sampler)
        self.penalty_counted = 0  # output positions that PenaltyState counted so far
        # Async scheduling: the trailing PENDING_TOKENs in token_ids, and whether the first of them ends
        # the candidate for sure (max_tokens or the context): it is then not scheduled again.
        self.num_pending = 0
        self.ends_at_pending = False
        self.pending_source = None  # (the draw's tokens tensor, this sequence's row) of the last pending one

    def __len__(self):
        return len(self.token_ids)

    @property
    def output_ids(self) -> list[int]:
        """The output tokens known on the host (not the pending ones)."""
        return self.token_ids[self.prompt_len : len(self.token_ids) - self.num_pending]

    @property
    def num_output(self) -> int:
        """Output tokens drawn, pending ones included (they count toward max_tokens and seeds)."""
        return len(self.token_ids) - self.prompt_len

    def append_token(self, token: int, logprob: float, entry: PositionLogprobs | None):
        """Record a sampled token, its logprob and (when params.logprobs asks) its position's
        logprobs entry (the sampled token first, then the top-k)."""
        self.token_ids.append(token)
        self.cumulative_logprob += logprob
        if entry is not None:
            self.logprobs.append(entry)

    def add_pending(self):
        self.token_ids.append(PENDING_TOKEN)
        self.num_pending += 1

    def drop_pending(self) -> int:
        """Remove the pending tokens; returns how many there were."""
        n = self.num_pending
        if n:
            del self.token_ids[-n:]
            self.num_pending = 0
        return n

    def fork(self, index: int) -> "Sequence":
        """A sibling sharing everything computed so far (the caller shares the blocks)."""
        child = Sequence(self.request_id, self.token_ids, self.params, index=index, seed=self.seed)
        child.prompt_len = self.prompt_len
        child.num_computed = self.num_computed
        child.block_table = list(self.block_table)
        child.num_hashed_blocks = self.num_hashed_blocks
        child.hash_root = self.hash_root
        child.last_hash = self.last_hash
        return child


@dataclass
class Request:
    """What the engine keeps of a request until all of its n candidates have finished."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    finished: list[Sequence] = field(default_factory=list)  # candidates done so far, in finishing order
    prompt_logprobs: list[PositionLogprobs | None] | None = None  # filled during prefill (params.prompt_logprobs)

    @property
    def is_finished(self) -> bool:
        return len(self.finished) == self.params.n
