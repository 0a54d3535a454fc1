"""The driver's handle on the ranks: the same commands whether they run in this process or in N processes.

With one rank the runner lives in the driver's process (no IPC, easy to debug). With N ranks each runs in a
spawned process. Commands are submitted to every rank and their replies collected later, in order, so several
steps can be in flight (pipeline micro-batches, data-parallel replicas stepping together). Replies are awaited
with a liveness check, so a rank that dies is reported by rank and cause within a second instead of leaving
the others hanging in a collective.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import socket
import time
from collections import deque
from multiprocessing.connection import wait

import torch

from plait.config import EngineConfig
from plait.executor.commands import RankCommands, resolve
from plait.executor.worker import init_group, worker_main


class RankFailure(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_port_free(port: int) -> None:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise ValueError(f"master_port {port} is already in use on this machine: pick another (or leave it unset)") from None


class LocalExecutor:
    """One rank, in the driver's own process: `submit` runs the command at once (a step is launched, its answer
    may still be on the device) and `collect` waits for the answer, so the next step can be launched first."""

    world = 1

    def __init__(self, cfg: EngineConfig, init_args: dict):
        from plait.engine.model_runner import ModelRunner

        self.runner = ModelRunner(cfg, init_group(cfg, 0, 1, 0), **init_args)
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
    """One spawned process per rank of a replica (TP x PP ranks), on GPUs device_offset, device_offset + 1, ..."""

    def __init__(self, cfg: EngineConfig, init_args: dict, device_offset: int = 0):
        par = cfg.parallel
        self.world = par.replica_world_size
        if cfg.master_port:
            check_port_free(cfg.master_port)
        port = cfg.master_port or free_port()
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for rank in range(self.world):
            parent, child = ctx.Pipe()
            args = (cfg, rank, self.world, port, device_offset, init_args, child)
            proc = ctx.Process(target=worker_main, args=args, daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        self.in_flight = 0
        self._replies()

    def submit(self, cmd: str, arg=None) -> None:
        for rank, conn in enumerate(self.conns):
            try:
                conn.send((cmd, arg))
            except OSError:  # its pipe is gone: the rank died
                code = self.procs[rank].exitcode
                self.shutdown()
                raise RankFailure(f"rank {rank} exited with code {code} without answering") from None
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
                    self.shutdown()
                    raise RankFailure(f"rank {rank} failed:\n{value}")
                out[rank] = value
                pending.discard(rank)
            dead = [r for r in pending if not self.procs[r].is_alive() and not self.conns[r].poll()]
            if dead:
                code = self.procs[dead[0]].exitcode
                self.shutdown()
                raise RankFailure(f"rank {dead[0]} exited with code {code} without answering")
        return out

    def _recv(self, rank: int):
        try:
            return self.conns[rank].recv()
        except (EOFError, OSError):  # the pipe closed under us: the rank died
            self.procs[rank].join(timeout=2)
            code = self.procs[rank].exitcode
            self.shutdown()
            raise RankFailure(f"rank {rank} exited with code {code} without answering") from None

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
        self.procs, self.conns = [], []


def make_executor(cfg: EngineConfig, init_args: dict, device_offset: int = 0, own_process: bool = False):
    """In-process for one rank (unless `own_process`: data-parallel replicas must run side by side)."""
    if cfg.parallel.replica_world_size == 1 and not own_process:
        return LocalExecutor(cfg, init_args)
    return MultiprocExecutor(cfg, init_args, device_offset)
