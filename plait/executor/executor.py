"""The driver's handle on the ranks: the same commands whether they run in this process or in N processes.

With one rank the runner lives in the driver's process (no IPC, easy to debug). With N ranks each runs in a
spawned process. Commands are submitted to every rank and their replies collected later, in order, so several
steps can be in flight (pipeline micro-batches, data-parallel replicas stepping together). Replies are awaited
with a liveness check, so a rank that dies is reported by rank and cause within a second instead of leaving
the others hanging in a collective. With several machines (--nnodes) the driver starts node 0's share of the
ranks and reaches the others through node 0's store (nodes.py): the same commands, answers and liveness check.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import socket
import time
from collections import deque
from multiprocessing.connection import wait

import torch

from plait.config import EngineConfig
from plait.executor.commands import RankCommands, resolve
from plait.executor.nodes import RemoteNodes, RemoteRank, admit
from plait.executor.rendezvous import driver_store
from plait.executor.worker import init_group, worker_main


class EngineFailure(RuntimeError):
    """A process the engine needs died or raised: the CLI prints this one line and exits 1."""


class RankFailure(EngineFailure):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalExecutor:
    """One rank, in the driver's own process: `submit` runs the command at once (a step is launched, its answer
    may still be on the device) and `collect` waits for the answer, so the next step can be launched first."""

    world = 1

    def __init__(self, cfg: EngineConfig, init_args: dict):
        from plait.engine.model_runner import ModelRunner

        self.runner = ModelRunner(cfg, init_group(cfg, 0, 1, None, 0), **init_args)
        self.commands = RankCommands(self.runner)
        self._done: deque = deque()

    def submit(self, cmd: str, arg=None) -> None:
        self._done.append(self.commands(cmd, arg))

    def collect(self) -> list:
        return [resolve(self._done.popleft())]

    def call(self, cmd: str, arg=None) -> list:
        self.submit(cmd, arg)
        return self.collect()

    def shutdown(self) -> None:
        """Drop the model and cache now, so a next engine in this process gets the GPU memory back."""
        cuda = self.runner is not None and self.runner.device.type == "cuda"
        self.runner = self.commands = None
        self._done.clear()
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()


class MultiprocExecutor:
    """One spawned process per rank of a replica (TP x PP ranks), on GPUs device_offset, device_offset + 1, ...
    With nnodes > 1, node 0's share of the ranks; the others run on their own machines (nodes.py)."""

    def __init__(self, cfg: EngineConfig, init_args: dict, device_offset: int = 0):
        layout = cfg.nodes
        check_visible_gpus(cfg, device_offset + layout.ranks_per_node)  # before any rank starts: the indices handed out
        self.world = layout.world
        self.store = driver_store(layout)  # the rendezvous; a store of its own closes with it, ending remote ranks
        rendezvous = (layout.master_addr, self.store.port)
        if layout.nnodes > 1:
            admit(self.store, cfg, init_args)
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for rank in layout.ranks_of(0):
            parent, child = ctx.Pipe()
            args = (cfg, rank, self.world, rendezvous, device_offset + rank, init_args, child)
            proc = ctx.Process(target=worker_main, args=args, daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        self.remote = RemoteNodes(self.store, layout) if layout.nnodes > 1 else None
        if self.remote is not None:
            self.conns += self.remote.conns()
            self.procs += self.remote.processes()
        self.in_flight = 0
        self._replies()

    def submit(self, cmd: str, arg=None) -> None:
        for rank, conn in enumerate(self.conns):
            try:
                conn.send((cmd, arg))
            except OSError:  # its pipe is gone: the rank died
                raise self._lost(rank) from None
        self.in_flight += 1

    def collect(self) -> list:
        """Every rank's reply to the oldest submitted command."""
        assert self.in_flight > 0, "collect() without a submitted command"
        self.in_flight -= 1
        return self._replies()

    def call(self, cmd: str, arg=None) -> list:
        self.submit(cmd, arg)
        return self.collect()

    def _replies(self) -> list:
        out: list = [None] * self.world
        pending = set(range(self.world))
        while pending:
            ready = wait([self.conns[r] for r in pending], timeout=1.0)
            for rank in [r for r in pending if self.conns[r] in ready]:
                status, value = self._recv(rank)
                if status == "error":
                    raise self._failed(rank, value)
                out[rank] = value
                pending.discard(rank)
            dead = [r for r in pending if not self.procs[r].is_alive() and not self.conns[r].poll()]
            if dead:
                raise self._lost(dead[0])
        return out

    def _recv(self, rank: int):
        try:
            return self.conns[rank].recv()
        except (EOFError, OSError):  # the pipe closed under us: the rank died
            self.procs[rank].join(timeout=2)
            raise self._lost(rank) from None

    def _failed(self, rank: int, error: str) -> RankFailure:
        """Stop every rank and report `rank`'s error, unless a peer is lost: a collective then fails on every rank
        that takes part, and the lost peer is the cause worth naming."""
        lost = [r for r, p in enumerate(self.procs) if r != rank and isinstance(p, mp.process.BaseProcess) and not p.is_alive()]
        if not lost and self.remote is not None:
            lost = self.remote.lost_ranks()
        if lost:
            return self._lost(lost[0], f"; then rank {rank} failed: {error.strip().splitlines()[-1]}")
        self.shutdown()
        return RankFailure(f"rank {rank} failed:\n{error}")

    def _lost(self, rank: int, after: str = "") -> RankFailure:
        """Stop every rank, and say how `rank` went: its exit code here, or what its node reported."""
        proc = self.procs[rank]
        how = proc.problem() if isinstance(proc, RemoteRank) else f"exited with code {proc.exitcode} without answering"
        self.shutdown()
        return RankFailure(f"rank {rank} {how}{after}")

    def shutdown(self) -> None:
        for conn, proc in zip(self.conns, self.procs):
            if proc.is_alive():
                try:
                    conn.send(("shutdown", None))
                except (BrokenPipeError, OSError):
                    pass
        deadline = time.monotonic() + 10
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
        for conn in self.conns:
            conn.close()
        self.procs, self.conns, self.store, self.remote = [], [], None, None


def check_gpus(cfg: EngineConfig, ranks: int, visible: int, cuda_visible_devices: str | None) -> None:
    """Refuse `ranks` ranks on this machine (device indices 0 .. ranks - 1) with only `visible` GPUs
    (CUDA_VISIBLE_DEVICES as set, None if unset): each rank takes the GPU of its index, so two ranks would share
    one and fail only once the model is loaded, as an out-of-memory error or an empty KV cache. The caller asks
    torch for the count."""
    if ranks <= visible:
        return
    par = cfg.parallel
    share = par.world_size // cfg.nnodes  # this machine's ranks of this layout
    layout = (f"dp {par.data_parallel_size} x pp {par.pipeline_parallel_size} x tp {par.tensor_parallel_size} x "
              f"sp {par.sequence_parallel_size} = {par.world_size} ranks")
    where = f" over nnodes {cfg.nnodes} = {share} per node" if cfg.nnodes > 1 else " on this machine"
    if ranks > share:  # placed after another replica's GPUs (a device offset)
        where += f" after its first {ranks - share} GPU(s)"
    env = "unset" if cuda_visible_devices is None else repr(cuda_visible_devices)
    raise ValueError(
        f"{layout}{where}, but {visible} GPU(s) visible here (CUDA_VISIBLE_DEVICES {env}): each rank needs a GPU of "
        f"its own; lower the degrees, make more GPUs visible, or spread the ranks over more machines (--nnodes)"
    )


def check_visible_gpus(cfg: EngineConfig, ranks: int) -> None:
    """On GPU, refuse `ranks` ranks on this machine (device indices 0 .. ranks - 1) when torch sees fewer GPUs: the
    callers check before they start a rank, so the error is one line instead of a failure inside every rank."""
    if cfg.resolved_device() == "cuda":
        check_gpus(cfg, ranks, torch.cuda.device_count(), os.environ.get("CUDA_VISIBLE_DEVICES"))


def make_executor(cfg: EngineConfig, init_args: dict, device_offset: int = 0, own_process: bool = False):
    """In-process for one rank (unless `own_process`: data-parallel replicas must run side by side)."""
    if cfg.node_rank != 0:
        raise ValueError(f"node_rank {cfg.node_rank} runs no engine, only its ranks: start it with the same `plait` "
                         f"command as node 0 (or plait.executor.follower.run_follower(cfg))")
    if cfg.parallel.replica_world_size == 1 and not own_process:
        return LocalExecutor(cfg, init_args)
    return MultiprocExecutor(cfg, init_args, device_offset)
