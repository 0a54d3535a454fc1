"""Where a run's communication time goes: every collective of every rank, with its step, phase, layer and time.

Rank side: a `CommProfiler` is the recorder of a rank's communicators (they wrap each collective in `_record`)
and hooks the rank's model (forward hooks on the modules that hold a communicator name the module, hence the
layer, that issued each collective). The model runner wraps each step in `step()` and `tag`s it with its shape
(chunks, logits rows), from which the phase follows (prefill / decode / mixed).

Timing: `time.perf_counter` on CPU, where gloo collectives are synchronous; CUDA events on GPU, resolved at the
end of each step (profiling synchronises once per step). A replayed CUDA graph runs no Python, so nothing could be
recorded or timed inside it: a profiling engine captures no decode graphs and runs every step eagerly. Its
figures are those of eager collectives; for decode they include launch gaps that graphs would remove.

The driver side (`plait.comm.trace`) drains every rank into one trace and writes it out.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from plait.comm.communicator import CommRecord, Communicator

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")


@dataclass
class StepRecord:
    """One executed plan on one rank. chunks: (start position, new tokens) per sequence, as scheduled."""

    step: int
    phase: str  # prefill | decode | mixed
    tokens: int
    seqs: int
    logit_rows: int
    chunks: list[tuple[int, int]]
    samples: int = 0  # sequences that sampled a token (the other logits rows are prompt logprobs)
    start_s: float = 0.0
    duration_s: float = 0.0
    collectives: int = 0
    bytes: int = 0
    comm_s: float = 0.0


@dataclass
class RankTrace:
    """What one rank recorded since the last drain. rank counts within its replica."""

    rank: int
    records: list[CommRecord]
    steps: list[StepRecord]
    dropped_records: int = 0
    replica: int = 0  # data-parallel replica


def step_phase(starts: list[int], prompt_lens: list[int]) -> str:
    """A sequence is decoding when its chunk starts at or past its prompt's end (it computes a sampled token)."""
    decode = [s >= p for s, p in zip(starts, prompt_lens, strict=True)]
    return "decode" if all(decode) else "prefill" if not any(decode) else "mixed"


class CommProfiler:
    """Records one rank's collectives. Keeps at most `max_records` detailed records between drains (a long
    `serve` run would otherwise grow without bound); steps keep their totals either way, and drops are counted."""

    def __init__(self, rank: int, device: torch.device, comms: list[Communicator | None], model: nn.Module,
                 max_records: int = 200_000):
        self.rank, self.cuda, self.max_records = rank, device.type == "cuda", max_records
        self.records: list[CommRecord] = []
        self.steps: list[StepRecord] = []
        self.dropped = 0
        self._modules: list[str] = []  # stack of the communicating modules now in their forward
        self._step: StepRecord | None = None
        self._step_records: list[CommRecord] = []  # every record of the step in progress, kept past the cap too
        self._step_count = 0
        self._pending: list[tuple[CommRecord, object, object | None]] = []  # GPU: (record, start event, end event)
        self._ranks: dict[int, tuple[int, ...]] = {}
        self._t0 = time.perf_counter()
        self._ref = self._event() if self.cuda else None
        for comm in comms:
            if comm is not None:
                comm.recorder = self
        self._hook(model)

    def _event(self):
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def _hook(self, model: nn.Module) -> None:
        """Name every module that holds a communicator, and its parent, so each record says which one issued it.
        The parent covers collectives called through a method rather than forward (the head exchange's all-to-alls,
        labelled with the attention that calls them)."""
        def enter(label: str) -> None:
            self._modules.append(label)

        def leave() -> None:  # a forward hook that returned a value would replace the module's output
            self._modules.pop()

        talking = {name for name, module in model.named_modules()
                   if any(isinstance(v, Communicator) for v in vars(module).values())}
        parents = {name.rpartition(".")[0] for name in talking if name}
        for name, module in model.named_modules():
            if name in talking or name in parents:
                label = name or type(module).__name__
                module.register_forward_pre_hook(lambda _m, _a, label=label: enter(label))
                module.register_forward_hook(lambda _m, _a, _o: leave())

    def _group_ranks(self, comm: Communicator) -> tuple[int, ...]:
        key = id(comm)
        if key not in self._ranks:
            self._ranks[key] = tuple(dist.get_process_group_ranks(comm.group)) if comm.group is not None else (self.rank,)
        return self._ranks[key]

    def begin(self, comm: Communicator, op: str, t: torch.Tensor, peer: int | None) -> CommRecord | None:
        """A collective of `comm` on buffer t (for all_gather: this rank's own shard) is about to run."""
        if self.cuda and torch.cuda.is_current_stream_capturing():  # inside a graph capture: nothing to time
            return None
        module = self._modules[-1] if self._modules else ""
        layer = _LAYER.search(module)
        rec = CommRecord(op, comm.size, t.numel() * t.element_size(), str(t.dtype).removeprefix("torch."),
                         group_ranks=self._group_ranks(comm), peer=peer, step=self._step.step if self._step else -1,
                         module=module, layer=int(layer.group(1)) if layer else None)
        if self.cuda:
            self._pending.append((rec, self._event(), None))
        else:
            rec.start_s = time.perf_counter() - self._t0
        self._keep(rec)
        return rec

    def end(self, rec: CommRecord) -> None:
        """The collective begun as `rec` has been issued (on GPU: enqueued; its end event is timed later)."""
        if self.cuda:
            for i in range(len(self._pending) - 1, -1, -1):
                if self._pending[i][0] is rec:
                    self._pending[i] = (rec, self._pending[i][1], self._event())
                    break
        else:
            rec.duration_s = time.perf_counter() - self._t0 - rec.start_s

    def _keep(self, rec: CommRecord) -> None:
        if self._step is not None:
            self._step.collectives += 1
            self._step.bytes += rec.bytes
            self._step_records.append(rec)
        if len(self.records) < self.max_records:
            self.records.append(rec)
        else:
            self.dropped += 1

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Around one plan's execution on this rank; `tag` says what the plan was before the block ends."""
        rec = StepRecord(self._step_count, "", 0, 0, 0, [])
        self._step_count += 1
        self._step = rec
        start = self._event() if self.cuda else time.perf_counter()
        try:
            yield
        finally:
            self._step = None
            if self.cuda:
                end = self._event()
                end.synchronize()
                self._resolve()
                rec.start_s, rec.duration_s = self._ref.elapsed_time(start) / 1e3, start.elapsed_time(end) / 1e3
            else:
                rec.start_s, rec.duration_s = start - self._t0, time.perf_counter() - start
            rec.comm_s = sum(r.duration_s for r in self._step_records)
            self._step_records = []
            if len(self.steps) < self.max_records:
                self.steps.append(rec)

    def tag(self, chunks: list[tuple[int, int]], prompt_lens: list[int], logit_rows: int, samples: int) -> None:
        """What the step in progress ran: (start, new tokens) and prompt length per sequence, logits rows, and how
        many sequences sampled."""
        rec = self._step
        assert rec is not None, "tag() outside step()"
        rec.phase = step_phase([s for s, _ in chunks], prompt_lens)
        rec.chunks, rec.tokens, rec.seqs, rec.logit_rows = chunks, sum(n for _, n in chunks), len(chunks), logit_rows
        rec.samples = samples
        for r in self._step_records:
            r.phase = rec.phase

    def _resolve(self) -> None:
        for rec, start, end in self._pending:  # end is None for a collective counted but never timed
            rec.start_s = self._ref.elapsed_time(start) / 1e3
            rec.duration_s = start.elapsed_time(end) / 1e3 if end is not None else 0.0
        self._pending.clear()

    def drain(self) -> RankTrace:
        """Everything recorded since the last drain; the profiler starts empty again."""
        if self.cuda:
            torch.cuda.synchronize()
            self._resolve()
        out = RankTrace(self.rank, self.records, self.steps, self.dropped)
        self.records, self.steps, self.dropped = [], [], 0
        return out
