"""The driver's handle on the ranks: the same commands whether they run in this process or in N processes.

With one rank the runner lives in the driver's process (no IPC, easy to debug). With N ranks each runs in a
spawned process; the driver sends every command to all of them and reads every reply, polling so that a rank
that dies is reported by rank and cause within seconds instead of leaving the others hanging in a collective.
"""

from __future__ import annotations

import multiprocessing as mp
import gc
import socket
import time
from multiprocessing.connection import wait

import torch

from plait.config import EngineConfig
from plait.executor.worker import handle, init_group, worker_main


class RankFailure(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalExecutor:
    world = 1

    def __init__(self, cfg: EngineConfig, init_args: dict):
        from plait.engine.model_runner import ModelRunner

        self.runner = ModelRunner(cfg, init_group(cfg, 0, 1, 0), **init_args)

    def call(self, cmd: str, arg=None) -> list:
        return [handle(self.runner, cmd, arg)]

    def shutdown(self) -> None:
        """Drop the model and cache now, so a next engine in this process gets the GPU memory back."""
        if self.runner is not None and self.runner.device.type == "cuda":
            self.runner = None
            gc.collect()
            torch.cuda.empty_cache()
        self.runner = None


class MultiprocExecutor:
    def __init__(self, cfg: EngineConfig, init_args: dict):
        self.world = cfg.tensor_parallel_size
        port = cfg.master_port or free_port()
        ctx = mp.get_context("spawn")
        self.conns, self.procs = [], []
        for rank in range(self.world):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(cfg, rank, self.world, port, init_args, child), daemon=True)
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        self._replies()

    def call(self, cmd: str, arg=None) -> list:
        for conn in self.conns:
            conn.send((cmd, arg))
        return self._replies()

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
        except EOFError:
            return "error", f"rank {rank} closed its pipe (exit code {self.procs[rank].exitcode})"

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


def make_executor(cfg: EngineConfig, init_args: dict):
    return (LocalExecutor if cfg.tensor_parallel_size == 1 else MultiprocExecutor)(cfg, init_args)
