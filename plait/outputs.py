"""User-facing results, shaped as vLLM's RequestOutput / CompletionOutput so client code ports unchanged.

With `RequestOutputKind.DELTA` each output holds only what its step added: the completions that got tokens, each
with its new token ids, logprobs and text, and the finish reason once it ends; the prompt (its token ids and
logprobs) comes with the request's first output only. `RequestOutput.add` sums deltas back into the whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# One position's logprobs: token id -> Logprob (the chosen token plus the top-k).
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[PositionLogprobs] | None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | None while running
    stop_reason: int | str | None = None  # the stop string or token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, delta: CompletionOutput) -> None:
        """Append a later delta of the same completion."""
        self.text += delta.text
        self.token_ids += delta.token_ids
        if delta.logprobs is not None:
            self.logprobs += delta.logprobs
        self.cumulative_logprob = delta.cumulative_logprob
        self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[PositionLogprobs | None] | None
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False

    def add(self, delta: RequestOutput) -> None:
        """Append a later delta of the same request (this one becomes the sum of both; `delta` is consumed)."""
        assert delta.request_id == self.request_id, f"{delta.request_id} added to {self.request_id}"
        mine = {c.index: c for c in self.outputs}
        for c in delta.outputs:
            if c.index in mine:
                mine[c.index].add(c)
            else:
                self.outputs.append(c)
        self.outputs.sort(key=lambda c: c.index)
        self.finished = delta.finished
