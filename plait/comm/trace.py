"""The driver's side of profiling: every rank's records in one `CommTrace`, written three ways.

`collect(engine)` drains the ranks of a `profile_comm=True` engine (an LLMEngine or a data-parallel front end);
the trace writes comm_trace.json (every record and step), comm_chrome_trace.json (Chrome / Perfetto: open it in
ui.perfetto.dev or chrome://tracing) and comm_summary.txt (per phase: collectives, bytes, communication time and
its share of the step).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
from dataclasses import dataclass, field

from plait.comm.profiler import RankTrace, StepRecord


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
        lines.append(f"  {'phase':8s} {'steps':>6s} {'coll/step':>10s} {'MB/step':>10s} {'comm ms':>9s} {'step ms':>9s} "
                     f"{'comm %':>7s}")
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
