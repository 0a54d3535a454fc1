"""One rank's process: join the process group, build the model runner, then run plans until told to stop."""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from plait.comm.communicator import Communicator
from plait.parallel.context import RankContext
from plait.config import EngineConfig
from plait.engine.model_runner import ModelRunner

# A collective that waits longer than this means a peer is gone: fail instead of hanging forever.
COLLECTIVE_TIMEOUT = timedelta(seconds=int(os.environ.get("PLAIT_COLLECTIVE_TIMEOUT", "300")))


@dataclass
class StepTimes:
    """Seconds a rank spent in `execute` and how many steps: with the driver's step time, where the time goes."""

    execute_s: float = 0.0
    steps: int = 0

    def add(self, cmd: str, seconds: float) -> None:
        if cmd == "execute":
            self.execute_s += seconds
            self.steps += 1


def init_group(cfg: EngineConfig, rank: int, world: int, port: int, device_offset: int = 0) -> RankContext:
    """Join the replica's process group and build this rank's TP group (every rank creates every stage's group,
    in the same order, as torch.distributed requires)."""
    cuda = cfg.resolved_device() == "cuda"
    if cuda:
        torch.cuda.set_device((device_offset + rank) % torch.cuda.device_count())
    if world == 1:
        return RankContext.single()
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=COLLECTIVE_TIMEOUT,
    )
    par = cfg.parallel
    tp, pp = par.tensor_parallel_size, par.pipeline_parallel_size
    stage = rank // tp
    if pp == 1:
        return RankContext(rank, Communicator(dist.group.WORLD, rank, world), None)
    groups = [dist.new_group(list(range(s * tp, (s + 1) * tp))) if tp > 1 else None for s in range(pp)]
    tp_comm = Communicator(groups[stage], rank % tp, tp) if tp > 1 else Communicator.single()
    return RankContext(rank, tp_comm, Communicator(dist.group.WORLD, rank, world), stage, pp)


def handle(runner: ModelRunner, cmd: str, arg):
    if cmd == "num_kv_blocks":
        return runner.num_kv_blocks()
    if cmd == "allocate_kv_cache":
        return runner.allocate_kv_cache(arg)
    if cmd == "execute":
        return runner.execute(arg)
    if cmd == "all_reduce_latency":
        return runner.all_reduce_latency()
    if cmd == "comm_profile":  # this rank's recorded collectives and steps since the last ask (profile_comm only)
        return runner.profiler.drain()
    raise ValueError(f"unknown command {cmd!r}")


def worker_main(cfg: EngineConfig, rank: int, world: int, port: int, device_offset: int, init_args: dict, conn) -> None:
    """Entry point of a spawned rank. Replies ("ok", value) or ("error", traceback) to each command."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        ctx = init_group(cfg, rank, world, port, device_offset)
        runner = ModelRunner(cfg, ctx, **init_args)
        conn.send(("ok", None))
        busy = StepTimes()
        while True:
            cmd, arg = conn.recv()
            if cmd == "shutdown":
                break
            if cmd == "step_times":  # how long this rank spent inside its steps, since the last ask
                value, busy = busy, StepTimes()
            else:
                start = time.perf_counter()
                value = handle(runner, cmd, arg)
                busy.add(cmd, time.perf_counter() - start)
            conn.send(("ok", value))
    except (KeyboardInterrupt, EOFError):
        return
    except BaseException:  # noqa: BLE001 - reported to the driver, which raises it there
        conn.send(("error", traceback.format_exc()))
        os._exit(1)
    if dist.is_initialized() and cfg.resolved_device() == "cpu":
        dist.destroy_process_group()
    conn.send(("ok", None))
    if cfg.resolved_device() == "cuda":
        os._exit(0)  # NCCL captured in CUDA graphs can hang in teardown; the driver already has every answer
