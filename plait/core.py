"""The hand-off types between the scheduler (driver process) and the ranks (one process per GPU/CPU rank).

Ownership:
- `Sequence` lives in the driver only; the scheduler owns its status and `num_computed_tokens`, the engine
  owns its output tokens, text and finish reason.
- `StepPlan` is made by the scheduler each step and sent, read-only, to every rank. It says only "compute
  these tokens of these sequences": prefill, chunked prefill and decode are one case.
- `StepResult` is made by the rank that holds the LM head's output (the sampler rank) and read by the engine.
- Ranks keep a mirror of each live sequence's tokens (`SeqData`, sent once, then extended by the plan's
  tokens), so a step's plan carries only the new tokens.
- With asynchronous scheduling the driver plans step N+1 before it knows step N's tokens: a position whose
  token is the one sampled last step is sent as `PLACEHOLDER`, the ranks read it from their device-side copy of
  the last sampled tokens, and the real id follows in a later plan's `late_tokens` (docs/step_loop.md).
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from plait.sampling_params import SamplingParams

# A plan's token id for "the token this sequence sampled in the previous step", not yet known to the driver.
PLACEHOLDER = -1


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class SeqData:
    """What a rank must know about a sequence it has not seen (or must rebuild after preemption)."""

    seq_id: int
    token_ids: list[int]  # every token so far that the plan will compute (prompt, then outputs)
    prompt_len: int
    params: SamplingParams


@dataclass
class ScheduledSeq:
    """One sequence's share of a step: compute `token_ids` at positions start, start+1, ..."""

    seq_id: int
    start: int
    token_ids: list[int]
    block_table: list[int]
    sample: bool  # this chunk reaches the last known token, so a next token is sampled
    prompt_logprobs: bool  # return the logprob of each prompt token this chunk predicts


@dataclass
class StepPlan:
    seqs: list[ScheduledSeq]
    new_seqs: list[SeqData] = field(default_factory=list)
    finished_seq_ids: list[int] = field(default_factory=list)
    # (seq_id, position, token): ids an earlier plan sent as PLACEHOLDER, now known, for the ranks' mirrors
    late_tokens: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)


@dataclass
class TokenLogprobs:
    """The logprob of one chosen (or actual) token first, then the top-k alternatives with their ranks."""

    token_ids: list[int]
    logprobs: list[float]
    ranks: list[int]


@dataclass
class StepResult:
    sampled: dict[int, int] = field(default_factory=dict)  # seq_id -> next token
    logprobs: dict[int, TokenLogprobs] = field(default_factory=dict)  # seq_id -> the sampled token's logprobs
    prompt_logprobs: dict[int, list[TokenLogprobs]] = field(default_factory=dict)  # seq_id -> per predicted token

    @classmethod
    def merge(cls, parts: list[StepResult | None]) -> StepResult:
        """One result from the ranks' answers: the sampler rank's alone, or each rank's share when sampling is
        spread over the tensor-parallel ranks (their sequences are disjoint). Ranks that sample nothing send None."""
        merged = cls()
        for part in parts:
            if part is not None:
                merged.sampled.update(part.sampled)
                merged.logprobs.update(part.logprobs)
                merged.prompt_logprobs.update(part.prompt_logprobs)
        return merged


_seq_counter = itertools.count()


@dataclass
class Sequence:
    """One generated continuation of a request (a request with n=4 has four)."""

    request_id: str
    index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    seq_id: int = field(default_factory=lambda: next(_seq_counter))
    status: SeqStatus = SeqStatus.WAITING
    num_computed_tokens: int = 0  # scheduled so far: advanced when a plan is made, reset by preemption
    num_pending: int = 0  # tokens sampled by plans in flight, not yet known here (asynchronous scheduling)
    num_preemptions: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_len: int = field(init=False)

    def __post_init__(self) -> None:
        # One growing list of every token: a decode step appends and slices it without copying the history.
        self._tokens = list(self.prompt_token_ids)
        self.prompt_len = len(self.prompt_token_ids)

    def append_token(self, token: int) -> None:
        self._tokens.append(token)

    @property
    def token_ids(self) -> list[int]:
        """Every token so far (prompt, then outputs); the live list, read-only for callers."""
        return self._tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self._tokens[self.prompt_len :]

    @property
    def num_output_tokens(self) -> int:
        return len(self._tokens) - self.prompt_len

    @property
    def num_tokens(self) -> int:
        return len(self._tokens)

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED
