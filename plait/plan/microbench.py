"""The microbenchmarks behind `plait calibrate`, as one rank runs them.

Collectives the engine runs go through the `Communicator` (the one door), so the figures are those of the code
the engine calls: all-reduce (gloo, NCCL, and on GPU the symmetric-memory one-shot / two-shot path the
communicator takes up to 4 MB), all-gather and send/recv. Reduce-scatter and all-to-all are not in the
communicator yet (sequence parallelism will need all-to-all); they are timed through torch.distributed so a plan
can price them before they land. On GPU each collective is timed eagerly (back to back, CUDA events) and as
decode runs it, captured `GRAPH_OPS` at a time in a CUDA graph. Matrix rate, weight-streaming and copy bandwidth
are measured on rank 0.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from plait.comm.communicator import Communicator
from plait.plan.calibration import ONE_SHOT_MAX_BYTES, SYMM_MEM_MAX_BYTES, curve_key

GRAPH_OPS = 20  # collectives captured per graph, as Communicator.time_all_reduce does


@dataclass(frozen=True)
class BenchConfig:
    device: str  # cuda | cpu
    world: int
    sizes: tuple[int, ...]  # message sizes in bytes
    iters: int
    port: int
    timeout_s: float = 120.0  # the process group's: a collective waiting longer fails its rank

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.device == "cuda" else torch.float32


def time_fn(fn: Callable[[], object], device: str, iters: int, warmup: int = 3) -> float:
    """Seconds per call, back to back (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    if device != "cuda":
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - start) / iters
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def time_graph(fn: Callable[[], object], replays: int) -> float:
    """Seconds per call of `fn` captured GRAPH_OPS times in one CUDA graph."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_OPS):
            fn()
    return time_fn(graph.replay, "cuda", replays, warmup=1) / GRAPH_OPS


class GroupBench:
    """Every collective over one group, at every size; results land in `out` as {curve key: [(bytes, s)]}."""

    def __init__(self, comm: Communicator, cfg: BenchConfig, out: dict[str, list[tuple[int, float]]], notes: list[str]):
        self.comm, self.cfg, self.out, self.notes = comm, cfg, out, notes
        self.device = torch.device(cfg.device, torch.cuda.current_device() if cfg.device == "cuda" else None)
        self.itemsize = torch.empty(0, dtype=cfg.dtype).element_size()
        self.impl = "nccl" if cfg.device == "cuda" else "gloo"

    def _add(self, op: str, impl: str, nbytes: int, fn: Callable[[], object]) -> None:
        g = self.comm.size
        self.out.setdefault(curve_key(op, impl, "eager", g), []).append((nbytes, time_fn(fn, self.cfg.device, self.cfg.iters)))
        if self.cfg.device == "cuda":
            try:
                seconds = time_graph(fn, self.cfg.iters)
            except RuntimeError as e:  # a collective that cannot be captured has no graph curve, and the file says so
                torch.cuda.synchronize()
                self.notes.append(f"{curve_key(op, impl, 'graph', g)} at {nbytes} B: capture failed: {str(e)[:120]}")
                return
            self.out.setdefault(curve_key(op, impl, "graph", g), []).append((nbytes, seconds))

    def _tensor(self, nbytes: int) -> torch.Tensor:
        g = self.comm.size
        numel = max(g, nbytes // self.itemsize // g * g)  # divisible by the group, for the sharded ops
        return torch.ones(numel, dtype=self.cfg.dtype, device=self.device)

    def run(self, symm: Communicator | None) -> None:
        g = self.comm.size
        for size in self.cfg.sizes:
            x = self._tensor(size)
            nbytes = x.numel() * self.itemsize
            self._add("all_reduce", self.impl, nbytes, lambda: self.comm.all_reduce(x))
            if symm is not None and nbytes <= SYMM_MEM_MAX_BYTES:
                impl = "symm_one_shot" if nbytes <= ONE_SHOT_MAX_BYTES else "symm_two_shot"
                self._add("all_reduce", impl, nbytes, lambda: symm.all_reduce(x))
            shard = x[: x.numel() // g]
            self._add("all_gather", self.impl, nbytes, lambda: self.comm.all_gather(shard, [shard.numel()] * g, dim=0))
            out = torch.empty_like(shard)
            with warnings.catch_warnings():  # torch 2.13 renames it; the device's torch has only this name
                warnings.simplefilter("ignore", FutureWarning)
                self._add("reduce_scatter", self.impl, nbytes,
                          lambda: dist.reduce_scatter_tensor(out, x, group=self.comm.group))
            y = torch.empty_like(x)
            self._add("all_to_all", self.impl, nbytes, lambda: dist.all_to_all_single(y, x, group=self.comm.group))

    def send_recv(self, sizes: tuple[int, ...]) -> None:
        """One-way time between ranks 0 and 1 of this (2-rank) group: half a ping-pong (eager: sends are not captured).
        The Communicator sends within its own group, so no communicator of the world group is made for the pair."""
        peer = 1 - self.comm.rank
        for size in sizes:
            x = self._tensor(size)
            nbytes = x.numel() * self.itemsize

            def ping_pong() -> None:
                if self.comm.rank == 0:
                    self.comm.send(x, peer)
                    self.comm.recv(x.shape, x.dtype, self.device, peer)
                else:
                    self.comm.recv(x.shape, x.dtype, self.device, peer)
                    self.comm.send(x, peer)

            seconds = time_fn(ping_pong, self.cfg.device, self.cfg.iters) / 2
            self.out.setdefault(curve_key("send_recv", self.impl, "eager", 2), []).append((nbytes, seconds))


def compute_rates(device: str) -> dict[str, float]:
    """Matrix rate on a model-shaped GEMM, weight streaming (batch-1 GEMV), copy bandwidth, memory per device."""
    if device == "cuda":
        dtype, (t, k, n), copy_bytes = torch.bfloat16, (8192, 4096, 14336), 2 << 30
        memory = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    else:
        dtype, (t, k, n), copy_bytes = torch.float32, (256, 1024, 2048), 64 << 20
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    itemsize = torch.empty(0, dtype=dtype).element_size()
    a = torch.randn(t, k, dtype=dtype, device=device)
    w = torch.randn(k, n, dtype=dtype, device=device)
    v = a[:1].clone()
    iters = 20 if device == "cuda" else 5
    gemm = time_fn(lambda: a @ w, device, iters)
    gemv = time_fn(lambda: v @ w, device, iters * 5)
    src = torch.empty(copy_bytes // itemsize, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    copy = time_fn(lambda: dst.copy_(src), device, iters)
    return {"matmul_flops": 2 * t * k * n / gemm, "gemv_bytes_s": k * n * itemsize / gemv,
            "copy_bytes_s": 2 * copy_bytes / copy, "memory_bytes": int(memory)}
