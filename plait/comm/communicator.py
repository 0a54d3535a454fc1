"""The one door for collectives: model and runner code never call torch.distributed directly.

A `Communicator` wraps one process group (or none, for a group of one rank, where every collective is the
identity and costs nothing). Backends: NCCL on GPU, gloo on CPU. When a `CommRecorder` is attached, each
call is recorded (op, group size, bytes, dtype) so the profiler and the tests see exactly what ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class CommRecord:
    op: str
    group_size: int
    bytes: int
    dtype: str


@dataclass
class CommRecorder:
    records: list[CommRecord] = field(default_factory=list)

    def add(self, op: str, group_size: int, t: torch.Tensor) -> None:
        self.records.append(CommRecord(op, group_size, t.numel() * t.element_size(), str(t.dtype)))


class Communicator:
    """Collectives over one group of ranks; `rank` and `size` are positions within that group."""

    def __init__(self, group: dist.ProcessGroup | None, rank: int = 0, size: int = 1):
        assert (group is None) == (size == 1), "a group of one rank needs no process group, and only it"
        self.group, self.rank, self.size = group, rank, size
        self.recorder: CommRecorder | None = None

    @classmethod
    def single(cls) -> "Communicator":
        return cls(None)

    def _record(self, op: str, t: torch.Tensor) -> None:
        if self.recorder is not None:
            self.recorder.add(op, self.size, t)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place; returns x so call sites read as expressions."""
        if self.size == 1:
            return x
        self._record("all_reduce", x)
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, sizes: list[int], dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's x along `dim`. Shards may differ in size (uneven splits): `sizes[r]` is
        rank r's extent along `dim`, known to every rank from the parallel plan, so no extra exchange is needed."""
        if self.size == 1:
            return x
        assert len(sizes) == self.size and sizes[self.rank] == x.shape[dim], f"shard sizes {sizes} vs {tuple(x.shape)}"
        self._record("all_gather", x)
        moved = x.movedim(dim, 0).contiguous()
        pad = max(sizes) - moved.shape[0]
        if pad:
            moved = torch.cat([moved, moved.new_zeros((pad, *moved.shape[1:]))])
        parts = [torch.empty_like(moved) for _ in range(self.size)]
        dist.all_gather(parts, moved, group=self.group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)]).movedim(0, dim)

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier(group=self.group)
