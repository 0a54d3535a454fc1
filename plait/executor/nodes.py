"""Ranks on other machines, seen from the driver on node 0: the nodes' handshake, their ranks' channels, their health.

Every node is started with the same flags but its own --node-rank. Node k > 0 (`follower.py`) joins node 0's store,
announces its parallel layout and waits for node 0's verdict: the driver's config and init arguments, or the reason
it was refused (a different world, say). Its ranks then take commands from store queues instead of pipes; the
driver's ends of those queues (`RemoteConn`) and a stand-in for each remote rank's process (`RemoteRank`) let the
executor treat local and remote ranks alike. A follower node beats a counter in the store every second and reports
a rank that exits; the driver reads both when it checks liveness, so a lost node fails the job within
`SILENCE_S` seconds, naming its rank.
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import socket
import threading
import time
from dataclasses import dataclass

import torch.distributed as dist

from plait.config import EngineConfig, NodeLayout
from plait.executor.rendezvous import POLL_S, command_queue, pop, reply_queue, wait_for_key

HEARTBEAT_S = 1.0  # a follower node beats this often
SILENCE_S = 10.0  # a node silent this long is taken for dead


def node_key(kind: str, node: int) -> str:
    """Keys of the handshake and health reports: claim, info, verdict, beat, failed, done."""
    return f"plait/node/{node}/{kind}"


@dataclass(frozen=True)
class NodeInfo:
    """What a node was started with that must agree across nodes, and its host name for messages."""

    nnodes: int
    tp: int
    pp: int
    sp: int
    host: str

    @classmethod
    def of(cls, cfg: EngineConfig) -> "NodeInfo":
        return cls(cfg.nnodes, cfg.tensor_parallel_size, cfg.pipeline_parallel_size, cfg.sequence_parallel_size,
                   socket.gethostname())

    def layout(self) -> str:
        return f"nnodes {self.nnodes}, tp {self.tp} x pp {self.pp} x sp {self.sp} = {self.tp * self.pp * self.sp} ranks"


def admit(store: dist.Store, cfg: EngineConfig, init_args: dict) -> None:
    """Node 0's side of the handshake: wait for every other node, check they agree with this one, and answer each
    with the driver's config and init arguments, or with the reason they were refused (raised here too)."""
    layout = cfg.nodes
    deadline = time.monotonic() + layout.timeout_s
    others = range(1, layout.nnodes)
    missing = [k for k in others if not wait_for_key(store, node_key("info", k), deadline)]
    if missing:
        raise ValueError(
            f"node(s) {missing} did not join the rendezvous at {layout.master_addr}:{store.port} within dist_timeout "
            f"{layout.timeout_s:g} s: start each with the same flags as node 0 and its own --node-rank"
        )
    mine = NodeInfo.of(cfg)
    infos = {k: pickle.loads(store.get(node_key("info", k))) for k in others}
    wrong = [f"node {k} ({info.host}) was started with {info.layout()}" for k, info in infos.items()
             if info.layout() != mine.layout()]
    error = f"{'; '.join(wrong)}; node 0 with {mine.layout()}: start every node with the same parallel flags" if wrong else None
    verdict = ("error", error) if error else ("ok", cfg, init_args)
    for k in others:
        store.set(node_key("verdict", k), pickle.dumps(verdict))
    if error:  # the store closes with this error: first let the nodes read theirs (each deletes its verdict)
        deadline = time.monotonic() + 5.0
        while any(store.check([node_key("verdict", k)]) for k in others) and time.monotonic() < deadline:
            time.sleep(POLL_S)
        raise ValueError(error)


def join(store: dist.Store, cfg: EngineConfig) -> tuple[EngineConfig, dict]:
    """Node k's side of the handshake: (the driver's config, the ranks' init arguments), or a ValueError."""
    layout, k = cfg.nodes, cfg.node_rank
    if store.add(node_key("claim", k), 1) > 1:
        raise ValueError(f"another node already joined {layout.master_addr}:{layout.master_port} as node_rank {k}: "
                         f"give each node its own --node-rank")
    store.set(node_key("info", k), pickle.dumps(NodeInfo.of(cfg)))
    if not wait_for_key(store, node_key("verdict", k), time.monotonic() + layout.timeout_s):
        raise ValueError(f"node 0 at {layout.master_addr}:{layout.master_port} did not admit node {k} within "
                         f"dist_timeout {layout.timeout_s:g} s (is every other node started?)")
    verdict = pickle.loads(store.get(node_key("verdict", k)))
    store.delete_key(node_key("verdict", k))
    if verdict[0] == "error":
        raise ValueError(verdict[1])
    return verdict[1].replace(node_rank=k), verdict[2]


class RemoteNodes:
    """The driver's view of nodes 1 .. nnodes - 1 once admitted: a channel and a process stand-in per remote rank,
    and each node's health as the store tells it."""

    def __init__(self, store: dist.TCPStore, layout: NodeLayout):
        self.store, self.layout = store, layout
        self._beats = {k: (-1, time.monotonic()) for k in range(1, layout.nnodes)}  # node -> (last count, seen at)

    def ranks(self) -> list[int]:
        return [r for k in range(1, self.layout.nnodes) for r in self.layout.ranks_of(k)]

    def conns(self) -> list[RemoteConn]:
        return [RemoteConn(self.store, r) for r in self.ranks()]

    def processes(self) -> list[RemoteRank]:
        return [RemoteRank(self, r) for r in self.ranks()]

    def done(self, node: int) -> bool:
        return self.store.check([node_key("done", node)])

    def problem(self, node: int) -> str | None:
        """Why `node` is lost (its report of a failed rank, or its silence), or None while it is healthy."""
        if self.store.check([node_key("failed", node)]):
            return f"node {node} reports {self.store.get(node_key('failed', node)).decode()}"
        count, seen = self._beats[node]
        now, beat = time.monotonic(), self.store.add(node_key("beat", node), 0)
        if beat != count:
            self._beats[node] = (beat, now)
        elif now - seen > SILENCE_S:
            return (f"node {node} sent no heartbeat for {SILENCE_S:g} s: its machine, its plait launcher or the "
                    f"network is down")
        return None

    def lost_ranks(self) -> list[int]:
        """The ranks of nodes found lost, waiting until each node has either beaten once more (alive) or gone
        silent: what tells a peer's death from a rank's own error, within one heartbeat when every node is alive."""
        start = {k: self.store.add(node_key("beat", k), 0) for k in self._beats}
        pending, deadline = set(start), time.monotonic() + SILENCE_S + HEARTBEAT_S
        while pending and time.monotonic() < deadline:
            lost = [k for k in sorted(pending) if self.problem(k) is not None]
            if lost:
                return [r for k in lost for r in self.layout.ranks_of(k)]
            pending = {k for k in pending if self.store.add(node_key("beat", k), 0) == start[k]}
            time.sleep(POLL_S)
        return []


class RemoteConn:
    """The driver's end of a remote rank's channel, used as a Pipe end: commands go into the rank's store queue; a
    relay thread moves its answers from the store into a local pipe, so that `multiprocessing.connection.wait`
    watches local and remote ranks alike."""

    def __init__(self, store: dist.TCPStore, rank: int):
        self.store, self.rank = store, rank
        self._answers, writer = mp.Pipe(duplex=False)
        # Its own connection: a store client must not be shared with a thread that blocks in it.
        client = dist.TCPStore(store.host, store.port, is_master=False, timeout=store.timeout)
        self._relay = threading.Thread(target=_relay, args=(client, rank, writer), name=f"plait-relay-{rank}", daemon=True)
        self._relay.start()

    def send(self, obj) -> None:
        self.store.queue_push(command_queue(self.rank), pickle.dumps(obj))

    def recv(self):
        return self._answers.recv()

    def poll(self) -> bool:
        return self._answers.poll()

    def fileno(self) -> int:
        return self._answers.fileno()

    def close(self) -> None:
        """End the relay while the store is still up (a store that closes under a blocked read logs a C++ trace)."""
        self.store.queue_push(reply_queue(self.rank), _END)
        self._relay.join(timeout=1.0)
        self._answers.close()


_END = b"plait-end-of-answers"


def _relay(client: dist.Store, rank: int, writer) -> None:
    """Answers of `rank`, store -> pipe, until `RemoteConn.close` (or the store closes under it)."""
    with writer:
        try:
            while (answer := pop(client, reply_queue(rank))) != _END:
                writer.send_bytes(answer)
        except (EOFError, OSError):
            return


class RemoteRank:
    """Stands in for the `multiprocessing.Process` of a rank on another node, answering what the executor asks of
    a process (alive? wait for it to end; kill) from its node's reports."""

    def __init__(self, nodes: RemoteNodes, rank: int):
        self.nodes, self.rank, self.node = nodes, rank, nodes.layout.node_of(rank)

    def is_alive(self) -> bool:
        return not self.nodes.done(self.node) and self.nodes.problem(self.node) is None

    def problem(self) -> str:
        return f"on node {self.node} is lost: {self.nodes.problem(self.node) or 'its node finished'}"

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.is_alive() and time.monotonic() < deadline:
            time.sleep(POLL_S)

    def kill(self) -> None:
        """Nothing to do from here: its node's launcher stops it once the driver's store is gone."""
