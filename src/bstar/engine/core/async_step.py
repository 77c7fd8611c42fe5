"""Async scheduling (EngineConfig.async_scheduling): the overlapped step of LLMEngine.

Each step is scheduled and launched while the previous step's draw is still on its way to the host;
that draw is then taken in (stop rules, outputs). Each sequence that drew a token holds a PENDING_TOKEN
in its place until then: lengths, blocks and seeds count it, the next forward reads its value on the
device (Batch.feed_*), and its prefix-cache block waits for it. A candidate that the previous token
stops was scheduled again: that row's draw is discarded; one that max_tokens or the context stops is
not scheduled again (Sequence.ends_at_pending).

The functions take the engine (core.llm_engine.LLMEngine, not imported: it imports this module), whose
`_in_flight` holds the launched step.
"""

from bstar.engine.core.sequence import Sequence
from bstar.engine.entrypoints.outputs import RequestOutput
from bstar.engine.runner.sampler import Draw


class InFlight:
    """A launched step whose draw has not reached the host: the sequences that drew (sequence i
    from row i of the draw, its Sequence.pending_source) and the draw."""

    def __init__(self, seqs: list[Sequence], draw: Draw):
        self.seqs, self.draw = seqs, draw


def step_async(eng) -> list[RequestOutput]:
    """A step with async scheduling: schedule and launch this step, then take the previous step's draw
    in. Returns the requests that finished."""
    prev, eng._in_flight, done = eng._in_flight, None, []
    launched = len(eng.prompt_logprobs.copies)  # the steps before this one launched these
    batch = eng._batch = eng.scheduler.schedule()
    if batch:
        if prev is not None:
            for i, s in enumerate(batch.seqs[: batch.num_decode]):
                if s.num_pending:
                    batch.feed_rows.append(i)
                    batch.feed_src.append(s.pending_source[1])
            batch.feed_tokens = prev.draw.tokens
        try:
            seqs, draw = eng._run(batch)
        except BaseException:
            eng.prompt_logprobs.take(eng.requests, launched)
            if prev is not None:  # its pending tokens must not outlive it; its outputs are kept
                eng.isolation.salvaged += take_draw(eng, prev)
            raise
        if seqs:
            draw.start_copy()
            eng._in_flight = InFlight(seqs, draw)
            for r, s in enumerate(seqs):
                s.add_pending()
                s.pending_source = (draw.tokens, r)  # (penalties count it on the device)
                s.ends_at_pending = eng.output_processor.length_reached(s)
    elif prev is None and eng.scheduler.has_work():
        done.append(eng._fail_stuck())
    eng.prompt_logprobs.take(eng.requests, launched)  # (before the draw that may finish their requests)
    if prev is not None:
        done += take_draw(eng, prev)
        cur = eng._in_flight
        if cur is not None and all(s.finish_reason is not None for s in cur.seqs):
            eng._in_flight = None  # every row of it is discarded
    return done


def take_draw(eng, inflight: InFlight) -> list[RequestOutput]:
    """Put a launched step's tokens in place of their PENDING_TOKENs, apply the stop rules, and
    return the requests that finished. Candidates finished (or aborted) since the draw skip it."""
    tokens, logprobs, tops = inflight.draw.host()
    done = []
    for s, tok, lp, top in zip(inflight.seqs, tokens, logprobs, tops):
        if s.finish_reason is not None:
            eng.num_discarded_tokens += 1
            continue
        # The first pending token is this draw's; one after it is the step just launched's.
        later = s.drop_pending() - 1
        out = eng._accept_isolated(s, tok, lp, top, register=True)
        if s.finish_reason is not None:
            if out is not None:
                done.append(out)
        else:
            for _ in range(later):
                s.add_pending()
    return done
