"""The commands a rank answers, the same in the driver's process (one rank) and in a spawned one.

Besides the runner's own commands a rank keeps its step accounting: host seconds inside `execute`
(`step_times`) and, on GPU, CUDA events around each step (`gpu_timeline`), from which the GPU's busy time per
step and its idle gap between steps follow: the part of a step the host's work did not hide.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from plait.engine.heap import freeze_startup_heap
from plait.engine.model_runner import ModelRunner
from plait.engine.step_sampling import PendingResult


@dataclass
class StepTimes:
    """Seconds a rank spent in `execute` and how many steps: with the driver's step time, where the time goes.
    The wait for the GPU's answer is not inside: it happens when the answer is resolved."""

    execute_s: float = 0.0
    steps: int = 0

    def add(self, cmd: str, seconds: float) -> None:
        if cmd == "execute":
            self.execute_s += seconds
            self.steps += 1


class GpuTimeline:
    """A pair of CUDA events around each step's GPU work. Step N+1's start event fires when the GPU reaches it:
    right after step N's end if the host launched it in time, later by the host's delay otherwise."""

    def __init__(self):
        self.events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def around(self, run):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        value = run()
        end.record()
        self.events.append((start, end))
        return value

    def summary(self) -> dict:
        """Mean and median busy and idle milliseconds per step (the gap after the first step)."""
        torch.cuda.synchronize()
        busy = [s.elapsed_time(e) for s, e in self.events]
        gaps = [e.elapsed_time(s) for (_, e), (s, _) in zip(self.events, self.events[1:])]
        stats = {"steps": len(busy)}
        for name, values in (("busy_ms", busy), ("gap_ms", gaps)):
            stats[name] = {"mean": statistics.fmean(values), "median": statistics.median(values)} if values else None
        return stats


class RankCommands:
    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.times = StepTimes()
        self.timeline: GpuTimeline | None = None

    def __call__(self, cmd: str, arg):
        if cmd == "step_times":  # how long this rank spent inside its steps, since the last ask
            value, self.times = self.times, StepTimes()
            return value
        if cmd == "gpu_timeline":  # arg True: start recording; False: stop and return the summary (GPU only)
            cuda = self.runner.device.type == "cuda"
            previous, self.timeline = self.timeline, GpuTimeline() if arg and cuda else None
            return previous.summary() if previous is not None else None
        start = time.perf_counter()
        if cmd == "execute" and self.timeline is not None:
            value = self.timeline.around(lambda: self.runner.execute(arg))
        else:
            value = self._run(cmd, arg)
        self.times.add(cmd, time.perf_counter() - start)
        return value

    def _run(self, cmd: str, arg):
        runner = self.runner
        if cmd == "num_kv_blocks":
            return runner.num_kv_blocks()
        if cmd == "allocate_kv_cache":  # the end of a rank's start-up (CUDA graphs captured)
            runner.allocate_kv_cache(arg)
            freeze_startup_heap()
            return None
        if cmd == "execute":
            return runner.execute(arg)
        if cmd == "all_reduce_latency":
            return runner.all_reduce_latency()
        if cmd == "comm_profile":  # this rank's recorded collectives and steps since the last ask (profile_comm only)
            return runner.profiler.drain()
        raise ValueError(f"unknown command {cmd!r}")


def resolve(value):
    """A step's answer may still be on the device (`PendingResult`): wait for it and list it."""
    return value.resolve() if isinstance(value, PendingResult) else value
