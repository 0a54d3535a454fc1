"""The rendezvous: one torch.distributed TCPStore, hosted by the driver's process on node 0, where every rank meets.

The process group sets itself up through it (under the prefix "pg"), as torchrun's would. When ranks run on other
machines it also carries what a pipe carries on one machine: the driver's commands to each remote rank and their
answers, as store queues (`plait/cmd/<rank>`, `plait/reply/<rank>`), so there is no transport of plait's own. The
store lives in the driver's process, so when the driver exits or dies every follower loses it and stops.

Under torchrun (one plait per machine) the node placement comes from torchrun's variables, and the store is the
one torchrun's agent already serves on MASTER_PORT.

Waits that may last (a server idle for hours) block inside the store; waits with a deadline (a node joining) poll
it, because a store wait that times out logs a C++ warning each time.
"""

from __future__ import annotations

import os
import pickle
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch.distributed as dist

from plait.config import NodeLayout

# Blocking reads re-arm after this long, so an idle follower waits for its next command as long as it takes.
_IDLE = timedelta(hours=1)
POLL_S = 0.1


def torchrun_placement(environ: dict[str, str] = os.environ) -> dict[str, int | str]:
    """nnodes, node_rank, master_addr and master_port from torchrun's variables, or {} outside a launcher. plait
    starts each machine's ranks itself, so the launcher starts one plait per machine and RANK / WORLD_SIZE count
    machines; one process per GPU would have every process try to be a driver."""
    if not all(k in environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        return {}
    per_node, local_rank = int(environ.get("LOCAL_WORLD_SIZE", "1")), int(environ.get("LOCAL_RANK", "0"))
    if per_node != 1 or local_rank != 0:
        raise ValueError(
            f"plait starts each machine's ranks itself, so torchrun must start one plait per machine: use "
            f"--nproc-per-node 1 (got LOCAL_WORLD_SIZE {per_node}, LOCAL_RANK {local_rank}) and size the ranks with --tp/--pp"
        )
    return {"nnodes": int(environ["WORLD_SIZE"]), "node_rank": int(environ["RANK"]),
            "master_addr": environ["MASTER_ADDR"], "master_port": int(environ["MASTER_PORT"])}


def driver_store(layout: NodeLayout) -> dist.TCPStore:
    """The store the driver runs the job through: torchrun's agent's when it serves master_port, else its own."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return connect_store(layout.master_addr, layout.master_port, layout.timeout_s)
    return host_store(layout.master_port)


def host_store(port: int | None) -> dist.TCPStore:
    """The driver's store on `port` (None: a free one); it listens on every interface of node 0."""
    try:
        return dist.TCPStore("127.0.0.1", port or 0, is_master=True, wait_for_workers=False, timeout=_IDLE)
    except dist.DistNetworkError:
        raise ValueError(f"master_port {port} is already in use on this machine: pick another (or leave it unset)") from None


def connect_store(addr: str, port: int, timeout_s: float, store_timeout: timedelta = _IDLE) -> dist.TCPStore:
    """A client of node 0's store. Reachability is probed first with a plain socket, retried until `timeout_s`, so
    a wrong address or a node 0 not started yet is a ValueError naming both, not a C++ trace."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((addr, port), timeout=max(0.1, min(5.0, deadline - time.monotonic()))).close()
            break
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ValueError(
                    f"cannot reach node 0's rendezvous at {addr}:{port} within dist_timeout {timeout_s:g} s ({e}): "
                    f"check --master-addr and --master-port, that node 0 is running, and the firewall"
                ) from None
            time.sleep(0.5)
    return dist.TCPStore(addr, port, is_master=False, timeout=store_timeout)


def wait_for_key(store: dist.Store, key: str, deadline: float) -> bool:
    """Whether `key` appeared before `deadline` (time.monotonic())."""
    while not store.check([key]):
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S)
    return True


def pop(store: dist.Store, key: str) -> bytes:
    """The next item of queue `key`, however long it takes; EOFError once the store is gone (the driver exited)."""
    while True:
        try:
            return store.queue_pop(key)
        except dist.DistNetworkError:
            raise EOFError(f"lost the rendezvous store while waiting for {key}") from None
        except dist.DistStoreError:  # timed out: wait again
            continue


def command_queue(rank: int) -> str:
    return f"plait/cmd/{rank}"


def reply_queue(rank: int) -> str:
    return f"plait/reply/{rank}"


@dataclass
class StoreChannel:
    """A rank's end of its command channel when the driver is on another machine: `recv` and `send` as on a Pipe
    end, over node 0's store. It is handed to the spawned rank unopened; its two connections (one per thread: the
    main thread reads commands while the reply thread sends answers) open in the rank's own process."""

    addr: str
    port: int
    rank: int
    _in: dist.Store | None = field(default=None, init=False, repr=False)
    _out: dist.Store | None = field(default=None, init=False, repr=False)

    def recv(self):
        if self._in is None:
            self._in = dist.TCPStore(self.addr, self.port, is_master=False, timeout=_IDLE)
        return pickle.loads(pop(self._in, command_queue(self.rank)))

    def send(self, obj) -> None:
        if self._out is None:
            self._out = dist.TCPStore(self.addr, self.port, is_master=False, timeout=_IDLE)
        try:
            self._out.queue_push(reply_queue(self.rank), pickle.dumps(obj))
        except dist.DistNetworkError:
            raise BrokenPipeError("lost the rendezvous store: the driver is gone") from None
