"""The model against the profiler: every recorded step's collectives, and the schedule, as predicted.

Exactness is the model's first promise: for each step a rank ran, `collectives.rank_collectives` (from the
step's token count and logits rows) must list the very collectives the rank recorded, in order, with the same
op, bytes, layer and peer. And for a fixed batch, `workload.fixed_batch_steps` must predict the steps the
scheduler made. `plait profile` prints both checks; the tests assert them.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from plait.comm.trace import CommTrace
from plait.config import ModelConfig
from plait.plan.collectives import Sampling, rank_collectives
from plait.plan.shapes import Layout
from plait.plan.workload import StepShape


@dataclass(frozen=True)
class Mismatch:
    replica: int
    rank: int
    step: int
    predicted: list[tuple]
    recorded: list[tuple]

    def __str__(self) -> str:
        first = next((i for i, (p, r) in enumerate(zip(self.predicted, self.recorded)) if p != r),
                     min(len(self.predicted), len(self.recorded)))
        return (f"replica {self.replica} rank {self.rank} step {self.step}: {len(self.predicted)} predicted, "
                f"{len(self.recorded)} recorded; first difference at #{first}: "
                f"{self.predicted[first:first + 1]} vs {self.recorded[first:first + 1]}")


def check_collectives(trace: CommTrace, m: ModelConfig, layout: Layout, itemsize: int,
                      sampling: Sampling = Sampling()) -> tuple[int, list[Mismatch]]:
    """(steps compared, mismatches). A trace that dropped records past its cap cannot be checked."""
    if any(rt.dropped_records for rt in trace.ranks):
        raise ValueError("the trace dropped records past the profiler's cap: profile a shorter run to check it")
    compared, bad = 0, []
    for rt in trace.ranks:
        by_step: dict[int, list[tuple]] = {}
        for r in rt.records:
            by_step.setdefault(r.step, []).append((r.op, r.bytes, r.layer, r.peer))
        for s in rt.steps:
            predicted = [c.key() for c in rank_collectives(m, layout, rt.rank, s.tokens, s.logit_rows, itemsize,
                                                           s.samples, sampling)]
            recorded = by_step.get(s.step, [])
            compared += 1
            if predicted != recorded:
                bad.append(Mismatch(rt.replica, rt.rank, s.step, predicted, recorded))
    return compared, bad


def check_schedule(trace: CommTrace, predicted: list[list[StepShape]]) -> tuple[Counter, Counter]:
    """(predicted - recorded, recorded - predicted) over step shapes (chunks, logits rows) of replica 0, rank 0;
    both empty when the schedule was predicted exactly. Micro-batches interleave, so shapes are compared as
    multisets."""
    rank0 = next(rt for rt in trace.ranks if rt.replica == 0 and rt.rank == 0)
    recorded = Counter((tuple(map(tuple, s.chunks)), s.logit_rows) for s in rank0.steps)
    expected = Counter((s.chunks, s.logit_rows) for steps in predicted for s in steps)
    return expected - recorded, recorded - expected
