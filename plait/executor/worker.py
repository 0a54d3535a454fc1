"""One rank's process: join the process group, build the model runner, then run plans until told to stop.

Answers leave from a thread of their own, in command order: a step's answer waits there for its GPU work while
the main thread already runs the next command, which the driver sends before it reads this answer when it
schedules asynchronously.
"""

from __future__ import annotations

import os
import queue
import threading
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from plait.comm.communicator import Communicator
from plait.config import EngineConfig
from plait.engine.model_runner import ModelRunner
from plait.executor.commands import RankCommands, resolve
from plait.parallel.context import RankContext

# A collective that waits longer than this means a peer is gone: fail instead of hanging forever.
COLLECTIVE_TIMEOUT = timedelta(seconds=int(os.environ.get("PLAIT_COLLECTIVE_TIMEOUT", "300")))


def init_group(cfg: EngineConfig, rank: int, world: int, rendezvous: tuple[str, int] | None, device_index: int) -> RankContext:
    """Join the replica's process group through node 0's store at `rendezvous` (address, port) and build this rank's
    TP group, and its SP group under sequence parallelism (every rank creates every group, in the same order, as
    torch.distributed requires). NCCL on GPU, within and across machines; gloo on CPU."""
    cuda = cfg.resolved_device() == "cuda"
    if cuda:
        torch.cuda.set_device(device_index)  # < the visible GPUs: its starter checked them (check_visible_gpus)
    if world == 1:
        return RankContext.single()
    addr, port = rendezvous
    store = dist.TCPStore(addr, port, is_master=False, timeout=COLLECTIVE_TIMEOUT)
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        store=dist.PrefixStore("pg", store),
        rank=rank,
        world_size=world,
        timeout=COLLECTIVE_TIMEOUT,
    )
    par = cfg.parallel
    tp, pp = par.tensor_parallel_size, par.pipeline_parallel_size
    stage = rank // tp
    if par.sequence_parallel_size > 1:  # one stage (ParallelConfig refuses sp with pp)
        return RankContext.sequence_parallel(Communicator(dist.group.WORLD, rank, world), par.sequence_parallel_size, tp)
    if pp == 1:
        return RankContext(rank, Communicator(dist.group.WORLD, rank, world), None)
    groups = [dist.new_group(list(range(s * tp, (s + 1) * tp))) if tp > 1 else None for s in range(pp)]
    tp_comm = Communicator(groups[stage], rank % tp, tp) if tp > 1 else Communicator.single()
    return RankContext(rank, tp_comm, Communicator(dist.group.WORLD, rank, world), stage, pp)


class Replies:
    """("ok", value) or ("error", traceback) per command, sent in order; a failure ends the process."""

    def __init__(self, conn):
        self.conn = conn
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="plait-replies", daemon=True)
        self._thread.start()

    def ok(self, value) -> None:
        self._queue.put(("ok", value))

    def error(self, text: str) -> None:
        self._queue.put(("error", text))

    def close(self) -> None:
        """Return once every answer so far has been sent."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            status, value = item
            if status == "ok":
                try:
                    value = resolve(value)
                except BaseException:  # noqa: BLE001 - reported to the driver, which raises it there
                    status, value = "error", traceback.format_exc()
            self.conn.send((status, value))
            if status == "error":
                os._exit(1)


def worker_main(cfg: EngineConfig, rank: int, world: int, rendezvous: tuple[str, int], device_index: int,
                init_args: dict, conn) -> None:
    """Entry point of a spawned rank. Replies ("ok", value) or ("error", traceback) to each command. `conn` is a
    Pipe end from the driver on this machine, or a `StoreChannel` to a driver on another one."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg.nodes.ranks_per_node))
    replies = Replies(conn)
    try:
        ctx = init_group(cfg, rank, world, rendezvous, device_index)
        commands = RankCommands(ModelRunner(cfg, ctx, **init_args))
        replies.ok(None)
        while True:
            cmd, arg = conn.recv()
            if cmd == "shutdown":
                break
            replies.ok(commands(cmd, arg))
    except (KeyboardInterrupt, EOFError):
        return
    except BaseException:  # noqa: BLE001 - reported to the driver, which raises it there
        replies.error(traceback.format_exc())
        replies.close()  # the reply thread ends the process once the error is sent
        os._exit(1)
    replies.close()
    if dist.is_initialized() and cfg.resolved_device() == "cpu":
        dist.destroy_process_group()
    conn.send(("ok", None))
    if cfg.resolved_device() == "cuda":
        os._exit(0)  # NCCL captured in CUDA graphs can hang in teardown; the driver already has every answer
