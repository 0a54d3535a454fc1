"""The one door for collectives: model and runner code never call torch.distributed directly.

A `Communicator` wraps one process group (or none, for a group of one rank, where every collective is the
identity and costs nothing). Backends: NCCL on GPU, gloo on CPU. When a `CommRecorder` is attached (the
profiler, plait/comm/profiler.py), each call is recorded (op, group, bytes, dtype, and its time) so the profiler
and the tests see exactly what ran.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist


@dataclass
class CommRecord:
    """One collective as one rank ran it. `bytes` is this rank's buffer: the tensor reduced (all_reduce), its own
    shard before padding (all_gather), the tensor sent or received (send / recv, with the other rank as `peer`)."""

    op: str
    group_size: int
    bytes: int
    dtype: str
    group_ranks: tuple[int, ...] = ()  # global ranks of the group
    peer: int | None = None
    step: int = -1  # the step, its phase, and the module (hence layer) that issued it, as the profiler saw them
    phase: str = ""
    module: str = ""
    layer: int | None = None
    start_s: float = 0.0  # since the profiler started
    duration_s: float = 0.0


class CommRecorder(Protocol):
    def begin(self, comm: "Communicator", op: str, t: torch.Tensor, peer: int | None) -> CommRecord | None: ...

    def end(self, record: CommRecord) -> None: ...


class _Recording:
    """`with comm._record(...)`: the collective inside the block is timed; it is counted as soon as it is made."""

    def __init__(self, recorder: CommRecorder | None, record: CommRecord | None):
        self.recorder, self.record = recorder, record

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        if self.record is not None:
            self.recorder.end(self.record)


class Communicator:
    """Collectives over one group of ranks; `rank` and `size` are positions within that group."""

    def __init__(self, group: dist.ProcessGroup | None, rank: int = 0, size: int = 1):
        assert (group is None) == (size == 1), "a group of one rank needs no process group, and only it"
        self.group, self.rank, self.size = group, rank, size
        self.recorder: CommRecorder | None = None
        self.symm_buffer: torch.Tensor | None = None  # symmetric-memory staging buffer for small all-reduces
        self.fused_norm = None  # SymmAllReduceNorm (plait.comm.fused_norm) once enabled
        self.skip_all_reduce = False  # the communication-removed ablation (--skip-all-reduce): wrong sums, no traffic
        self._pending_sends: list = []
        self.parent: Communicator | None = None  # set by `split`: a sub-group records into its parent's recorder

    @classmethod
    def single(cls) -> "Communicator":
        return cls(None)

    def _record(self, op: str, t: torch.Tensor, peer: int | None = None) -> _Recording:
        """Record one collective on buffer t; wrap the collective in `with` so that it is timed too."""
        recorder = self.recorder if self.recorder is not None or self.parent is None else self.parent.recorder
        return _Recording(recorder, recorder.begin(self, op, t, peer) if recorder is not None else None)

    def split(self, parts: list[list[int]]) -> "Communicator":
        """The communicator of this rank's part of a partition of this group (ranks as positions in it, each part
        sorted). Every rank calls it with the same partition in the same order, since torch.distributed creates a
        group only when every rank of the world asks for it; so only the world group can be split. A part of one
        rank is `single()`, a part of all ranks is this communicator."""
        assert sorted(r for p in parts for r in p) == list(range(self.size)) and all(p == sorted(p) for p in parts), (
            f"{parts} is not a partition of {self.size} ranks into sorted parts"
        )
        mine = next(p for p in parts if self.rank in p)
        if len(mine) == self.size:
            return self
        assert dist.get_world_size() == self.size, f"only the world can be split, not a group of {self.size} ranks"
        groups = [dist.new_group(p) if len(p) > 1 else None for p in parts]  # world ranks are group ranks here
        child = Communicator(groups[parts.index(mine)], mine.index(self.rank), len(mine))
        child.parent = self
        return child

    def enable_symm_mem(self, max_numel: int, dtype: torch.dtype, device: torch.device) -> bool:
        """Allocate and rendezvous (once, eagerly: it cannot be captured) a buffer for P2P all-reduces of up to
        `max_numel` elements. NVLink multicast is never used: only the one-shot / two-shot P2P kernels.
        Returns False, leaving NCCL in charge, where symmetric memory is unavailable or the group is not a power of
        two (a 3-rank group hung in calibration on the H200s; the engine runs 2, 4 and 8)."""
        if self.size & (self.size - 1):
            return False
        try:
            import torch.distributed._symmetric_memory as symm_mem

            buf = symm_mem.empty(max_numel, dtype=dtype, device=device)
            symm_mem.rendezvous(buf, self.group.group_name)
        except (ImportError, RuntimeError):
            return False
        self.symm_buffer = buf
        return True

    def enable_fused_norm(self, max_tokens: int, hidden: int, dtype: torch.dtype, device: torch.device,
                          forced: bool) -> bool:
        """Set up the fused all-reduce + add + RMSNorm (plait.comm.fused_norm) for steps of up to `max_tokens`.
        Returns False, leaving all_reduce + norm in charge, where symmetric memory is unavailable."""
        from plait.comm.fused_norm import FusedNormTuning, SymmAllReduceNorm

        if self.size == 1 or self.size & (self.size - 1):
            return False
        try:
            self.fused_norm = SymmAllReduceNorm(self.group.group_name, self.rank, self.size, max_tokens, hidden, dtype,
                                                device, FusedNormTuning.load(self.size, hidden), forced)
        except (ImportError, RuntimeError):
            return False
        return True

    def fuses_norm(self, num_tokens: int) -> bool:
        return self.fused_norm is not None and not self.skip_all_reduce and self.fused_norm.takes(num_tokens)

    def partial_sum_buffer(self, num_tokens: int) -> torch.Tensor | None:
        """Where a row-parallel layer whose sum the next norm reduces should write, or None (anywhere)."""
        return self.fused_norm.input(num_tokens) if self.fuses_norm(num_tokens) else None

    def all_reduce_rms_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
        """The fused op (only where `fuses_norm`): (rmsnorm(sum + residual), residual += sum on this rank's rows).
        Recorded as the all-reduce it replaces, so the profiler's counts match the unfused path."""
        with self._record("all_reduce", x):
            return self.fused_norm(x, residual, weight, eps)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks; returns the sum (in x for NCCL and gloo). Small messages on GPU go through symmetric
        memory P2P (one-shot up to 256 KB, two-shot above), which beats NCCL below a few MB (../shared/DEVICE.md)."""
        if self.size == 1 or self.skip_all_reduce:
            return x
        with self._record("all_reduce", x):
            buf = self.symm_buffer
            if buf is not None and x.numel() <= buf.numel() and x.dtype == buf.dtype:
                staged = buf[: x.numel()]
                staged.copy_(x.reshape(-1))
                if x.numel() * x.element_size() <= 256 * 1024:
                    return torch.ops.symm_mem.one_shot_all_reduce(staged, "sum", self.group.group_name).view(x.shape)
                torch.ops.symm_mem.two_shot_all_reduce_(staged, "sum", self.group.group_name)
                return x.copy_(staged.view(x.shape))
            dist.all_reduce(x, group=self.group)
            return x

    def time_all_reduce(self, numel: int, dtype: torch.dtype, device: torch.device, ops: int = 20) -> float:
        """Seconds per all-reduce of `numel` elements, as decode runs them: captured `ops` at a time in a CUDA graph.
        Zero under --skip-all-reduce: the ablation's all-reduces cost nothing."""
        if self.skip_all_reduce:
            return 0.0
        x = torch.ones(numel, dtype=dtype, device=device)
        if device.type != "cuda":
            import time

            start = time.perf_counter()
            for _ in range(ops):
                self.all_reduce(x.clone())
            return (time.perf_counter() - start) / ops
        for _ in range(3):
            self.all_reduce(x.clone())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(ops):
                self.all_reduce(x)
        graph.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / (10 * ops)

    def all_gather(self, x: torch.Tensor, sizes: list[int], dim: int = -1) -> torch.Tensor:
        """Concatenate every rank's x along `dim`. Shards may differ in size (uneven splits): `sizes[r]` is
        rank r's extent along `dim`, known to every rank from the parallel plan, so no extra exchange is needed."""
        if self.size == 1:
            return x
        assert len(sizes) == self.size and sizes[self.rank] == x.shape[dim], f"shard sizes {sizes} vs {tuple(x.shape)}"
        with self._record("all_gather", x):
            moved = x.movedim(dim, 0).contiguous()
            pad = max(sizes) - moved.shape[0]
            if pad:
                moved = torch.cat([moved, moved.new_zeros((pad, *moved.shape[1:]))])
            parts = [torch.empty_like(moved) for _ in range(self.size)]
            dist.all_gather(parts, moved, group=self.group)
            return torch.cat([p[:n] for p, n in zip(parts, sizes)]).movedim(0, dim)

    def all_to_all(self, x: torch.Tensor, send_sizes: list[int], recv_sizes: list[int]) -> torch.Tensor:
        """x: 1-D, rank j's part is the send_sizes[j] elements after the previous parts; returns the received
        parts (recv_sizes[i] from rank i) concatenated. Uneven parts are legal (uneven head splits)."""
        if self.size == 1:
            return x
        with self._record("all_to_all", x):
            out = x.new_empty(sum(recv_sizes))
            dist.all_to_all_single(out, x.contiguous(), recv_sizes, send_sizes, group=self.group)
            return out

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Group rank `src`'s x on every rank: x is the data on src and a buffer of its shape and dtype elsewhere,
        overwritten in place (the sampled tokens of a step, which every rank's next inputs read)."""
        if self.size == 1:
            return x
        with self._record("broadcast", x):
            dist.broadcast(x, group=self.group, group_src=src)
        return x

    def send(self, x: torch.Tensor, dst: int) -> None:
        """Point-to-point to global rank `dst` of this group (pipeline boundaries). Asynchronous, so a stage moves on
        to its next micro-batch; the handle keeps the tensor alive until sent, and at most a few sends stay
        outstanding. Within this group, as every other op: NCCL makes the pair's communicator under this group's."""
        with self._record("send", x, peer=dst):  # times the wait for an old send plus the enqueue, not the transfer
            while len(self._pending_sends) >= 4:
                self._pending_sends.pop(0)[0].wait()
            x = x.contiguous()
            self._pending_sends.append((dist.isend(x, dst, group=self.group), x))

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, src: int) -> torch.Tensor:
        x = torch.empty(shape, dtype=dtype, device=device)
        with self._record("recv", x, peer=src):  # includes waiting for the stage before to send
            dist.recv(x, src, group=self.group)
        return x

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier(group=self.group)
