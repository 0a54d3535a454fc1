"""Where a run's communication time goes: every collective of every rank, with its step, phase, layer and time.

Rank side: a `CommProfiler` is the recorder of a rank's communicators (they wrap each collective in `_record`)
and hooks the rank's model (forward hooks on the modules that hold a communicator name the module, hence the
layer, that issued each collective). The model runner wraps each step in `step()` and `tag`s it with its shape
(chunks, logits rows), from which the phase follows (prefill / decode / mixed).

Timing: `time.perf_counter` on CPU, where gloo collectives are synchronous; CUDA events on GPU, resolved at the
end of each step (profiling synchronises once per step). A replayed CUDA graph runs no Python, so nothing could be
recorded or timed inside it: a profiling engine captures no decode graphs and runs every step eagerly. Its
figures are those of eager collectives; for decode they include launch gaps that graphs would remove.

Driver side: `collect(engine)` drains every rank into a `CommTrace`, which writes the JSON trace, a Chrome /
Perfetto trace (chrome://tracing, ui.perfetto.dev) and the per-step summary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from plait.comm.communicator import CommRecord, Communicator

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass
class StepRecord:
    """One executed plan on one rank. chunks: (start position, new tokens) per sequence, as scheduled."""

    step: int
    phase: str  # prefill | decode | mixed
    tokens: int
    seqs: int
    logit_rows: int
    chunks: list[tuple[int, int]]
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
        """Name every module that holds a communicator, so each record says which one issued it."""
        def enter(label: str) -> None:
            self._modules.append(label)

        def leave() -> None:  # a forward hook that returned a value would replace the module's output
            self._modules.pop()

        for name, module in model.named_modules():
            if any(isinstance(v, Communicator) for v in vars(module).values()):
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

    def tag(self, chunks: list[tuple[int, int]], prompt_lens: list[int], logit_rows: int) -> None:
        """What the step in progress ran: (start, new tokens) and prompt length per sequence, and logits rows."""
        rec = self._step
        assert rec is not None, "tag() outside step()"
        rec.phase = step_phase([s for s, _ in chunks], prompt_lens)
        rec.chunks, rec.tokens, rec.seqs, rec.logit_rows = chunks, sum(n for _, n in chunks), len(chunks), logit_rows
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


# ---- driver side ------------------------------------------------------------------------------------------------


@dataclass
class StepSummary:
    """One step over all ranks: collectives, bytes and comm time are per rank (mean over ranks; with a pipeline the
    stages differ), the step time is the slowest rank's."""

    replica: int
    step: int
    phase: str
    tokens: int
    seqs: int
    collectives: float
    bytes: float
    comm_s: float
    step_s: float

    @property
    def comm_share(self) -> float:
        return self.comm_s / self.step_s if self.step_s > 0 else 0.0


@dataclass
class CommTrace:
    """Every rank's records of one run, with the run's description (model, parallel sizes, dtype)."""

    meta: dict
    ranks: list[RankTrace] = field(default_factory=list)

    def summary(self) -> list[StepSummary]:
        by_step: dict[tuple[int, int], list[StepRecord]] = {}
        for rt in self.ranks:
            for s in rt.steps:
                by_step.setdefault((rt.replica, s.step), []).append(s)
        out = []
        for (replica, step), recs in sorted(by_step.items()):
            n = len(recs)
            first = recs[0]
            out.append(StepSummary(replica, step, first.phase, first.tokens, first.seqs, sum(r.collectives for r in recs) / n,
                                   sum(r.bytes for r in recs) / n, sum(r.comm_s for r in recs) / n,
                                   max(r.duration_s for r in recs)))
        return out

    def phase_table(self) -> list[dict]:
        """Per phase: steps, and per step and rank the collectives, bytes and comm time; the step time; comm share."""
        rows = []
        steps = self.summary()
        for phase in ("prefill", "mixed", "decode"):
            mine = [s for s in steps if s.phase == phase]
            if not mine:
                continue
            comm, total = sum(s.comm_s for s in mine), sum(s.step_s for s in mine)
            rows.append({
                "phase": phase, "steps": len(mine),
                "collectives_per_step": statistics.mean(s.collectives for s in mine),
                "bytes_per_step": statistics.mean(s.bytes for s in mine),
                "comm_ms_per_step": comm / len(mine) * 1e3, "step_ms": total / len(mine) * 1e3,
                "comm_share": comm / total if total else 0.0,
            })
        return rows

    def to_json(self) -> dict:
        return {
            "meta": self.meta,
            "summary": [dataclasses.asdict(s) | {"comm_share": s.comm_share} for s in self.summary()],
            "phases": self.phase_table(),
            "ranks": [dataclasses.asdict(rt) for rt in self.ranks],
        }

    def to_chrome(self) -> dict:
        """Chrome trace events: one process per rank, steps on thread 0, collectives on thread 1 (times in us).
        Each rank's clock starts at its profiler's start, so ranks line up to within their start-up skew."""
        events = []
        for rt in self.ranks:
            pid = rt.replica * 1000 + rt.rank
            name = f"replica {rt.replica} rank {rt.rank}" if self.meta.get("data_parallel_size", 1) > 1 else f"rank {rt.rank}"
            events.append({"name": "process_name", "ph": "M", "pid": pid, "args": {"name": name}})
            for s in rt.steps:
                events.append({"name": f"step {s.step} {s.phase}", "cat": "step", "ph": "X", "pid": pid, "tid": 0,
                               "ts": s.start_s * 1e6, "dur": s.duration_s * 1e6,
                               "args": {"tokens": s.tokens, "seqs": s.seqs, "collectives": s.collectives, "bytes": s.bytes}})
            for r in rt.records:
                events.append({"name": r.op, "cat": "comm", "ph": "X", "pid": pid, "tid": 1,
                               "ts": r.start_s * 1e6, "dur": r.duration_s * 1e6,
                               "args": {"bytes": r.bytes, "module": r.module, "group": list(r.group_ranks), "step": r.step}})
        return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": self.meta}

    def write(self, folder: str) -> dict[str, str]:
        """Write trace.json (everything), chrome_trace.json and summary.txt into `folder`; returns their paths."""
        os.makedirs(folder, exist_ok=True)
        paths = {k: os.path.join(folder, f) for k, f in
                 (("trace", "comm_trace.json"), ("chrome", "comm_chrome_trace.json"), ("summary", "comm_summary.txt"))}
        with open(paths["trace"], "w") as f:
            json.dump(self.to_json(), f)
        with open(paths["chrome"], "w") as f:
            json.dump(self.to_chrome(), f)
        with open(paths["summary"], "w") as f:
            f.write(self.table() + "\n")
        return paths

    def table(self) -> str:
        m = self.meta
        dropped = sum(rt.dropped_records for rt in self.ranks)
        lines = [f"communication of {m.get('model')} {m.get('parallel')} {m.get('dtype')} on {m.get('device')}"
                 + (f" ({dropped} records past the cap were dropped; totals still count them)" if dropped else "")]
        lines.append(f"  {'phase':8s} {'steps':>6s} {'coll/step':>10s} {'MB/step':>10s} {'comm ms':>9s} {'step ms':>9s} {'comm %':>7s}")
        for r in self.phase_table():
            lines.append(f"  {r['phase']:8s} {r['steps']:6d} {r['collectives_per_step']:10.1f} {r['bytes_per_step'] / 1e6:10.4f} "
                         f"{r['comm_ms_per_step']:9.3f} {r['step_ms']:9.3f} {100 * r['comm_share']:6.1f}%")
        return "\n".join(lines)


def collect(engine) -> CommTrace:
    """Drain every rank of a profiling engine (`profile_comm=True`; an LLMEngine or a data-parallel front end)
    into one trace, once the requests of interest have finished (plans still in flight are completed first)."""
    cfg = engine.cfg
    if not cfg.profile_comm:
        raise ValueError("this engine was started without profile_comm=True (--profile-comm): nothing was recorded")
    par = cfg.parallel
    meta = {
        "model": engine.model_name, "dtype": str(cfg.torch_dtype()).removeprefix("torch."), "device": cfg.resolved_device(),
        "tensor_parallel_size": par.tensor_parallel_size, "pipeline_parallel_size": par.pipeline_parallel_size,
        "data_parallel_size": par.data_parallel_size,
        "parallel": f"tp={par.tensor_parallel_size} pp={par.pipeline_parallel_size} dp={par.data_parallel_size}",
        "timing": "CUDA events, eager" if cfg.resolved_device() == "cuda" else "perf_counter, gloo",
    }
    ranks = []
    for d, replica in enumerate(getattr(engine, "replicas", [engine])):
        while replica.in_flight:  # a pipeline may still run a plan that only retires finished sequences
            replica.collect_step()
        for rt in replica.executor.call("comm_profile"):
            rt.replica = d
            ranks.append(rt)
    return CommTrace(meta, ranks)


def write_profile(engine, folder: str) -> CommTrace:
    """After a `--profile-comm` run: collect, write the three files into `folder`, print the summary (stderr)."""
    import sys

    trace = collect(engine)
    paths = trace.write(folder)
    print(trace.table() + "\ncommunication profile: " + ", ".join(paths.values()), file=sys.stderr)
    return trace
