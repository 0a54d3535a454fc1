"""The GPU's busy time and idle gaps while a benchmark runs: CUDA events around every step on every rank
(`plait.executor.commands.GpuTimeline`). What the GPU did not spend busy, it spent waiting for the host."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def recorded(engine, device: str) -> Iterator[list[dict]]:
    """Record while the block runs; the list then holds each rank's summary (steps, busy_ms, gap_ms). Empty off the
    GPU, and for a data-parallel front end (its replicas have executors of their own)."""
    summaries: list[dict] = []
    executor = getattr(engine, "executor", None) if device == "cuda" else None
    if executor is not None:
        executor.call("gpu_timeline", True)
    yield summaries  # a block that raises ends here: no call to ranks that may have failed
    if executor is not None:
        summaries += executor.call("gpu_timeline", False)


def busy_fraction(summary: dict, elapsed_s: float) -> float:
    """The share of `elapsed_s` the rank's GPU spent inside steps."""
    busy = summary["busy_ms"]
    return busy["mean"] * summary["steps"] / 1e3 / elapsed_s if busy else 0.0
