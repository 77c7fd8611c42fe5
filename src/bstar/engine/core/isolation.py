"""One bad request never takes the engine down (LLMEngine.step): after a step raised, the engine undoes it and
its requests are bisected. Each group runs apart from the rest until every member has drawn twice (the step
that failed, then one more: async scheduling takes a draw in one step later); a group that fails again is split
again, and the request that fails alone finishes with an error. Draws depend only on the seed and the tokens, so
the others' outputs are those they would have had."""

from bstar.engine.entrypoints.outputs import RequestOutput


class Isolation:
    def __init__(self):
        self.suspects: list[list[str]] = []  # groups of a failed step's requests still to run apart, in order
        self.focus: dict[str, int] | None = None  # the group running now: request id -> successful drawing steps
        self.salvaged: list[RequestOutput] = []  # outputs a failed step had already finished

    def next_focus(self, requests: dict) -> set[str] | None:
        """The request ids the next step may schedule (None: all)."""
        if self.focus is not None and not any(rid in requests for rid in self.focus):
            self.focus = None  # its members finished or were aborted
        while self.focus is None and self.suspects:
            group = {rid: 0 for rid in self.suspects.pop(0) if rid in requests}
            self.focus = group or None
        return None if self.focus is None else set(self.focus)

    def after_step(self, batch, requests: dict):
        """Count the focused group's successful drawing steps; two for each live member clear the group."""
        if self.focus is None:
            return
        for rid in {batch.seqs[i].request_id for i in batch.sampled} if batch else ():
            if rid in self.focus:
                self.focus[rid] += 1
        if all(n >= 2 for rid, n in self.focus.items() if rid in requests):
            self.focus = None

    def take_salvaged(self) -> list[RequestOutput]:
        """After a failed step: the outputs it had already finished; the focused group is dropped."""
        done, self.salvaged, self.focus = self.salvaged, [], None
        return done

    def bisect(self, involved: list[str]):
        """A failed step's requests (more than one): each half runs apart, first half first."""
        if involved:
            half = len(involved) // 2
            self.suspects[:0] = [involved[:half], involved[half:]]
