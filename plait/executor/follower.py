"""Node k > 0 of a multi-machine run: start this machine's ranks as followers of the driver on node 0, and watch them.

The launcher process holds no model: it joins node 0's store, takes the driver's config from the handshake, spawns
its ranks (global ranks k * per_node .., device index = local rank), whose commands and answers go through the store,
then beats a heartbeat and watches them. It exits 0 once the driver has shut every rank down, and raises
`RankFailure` when one of its ranks dies (after telling the driver which) or when node 0's store is gone (the driver
exited or failed), stopping its ranks either way.
"""

from __future__ import annotations

import multiprocessing as mp
import select
import socket
import sys

import torch.distributed as dist

from plait.config import EngineConfig
from plait.executor.executor import RankFailure, check_visible_gpus
from plait.executor.nodes import HEARTBEAT_S, join, node_key
from plait.executor.rendezvous import StoreChannel, connect_store
from plait.executor.worker import worker_main


def run_follower(cfg: EngineConfig) -> int:
    layout = cfg.nodes
    assert layout.node_rank > 0, "node 0 runs the driver, not a follower"
    addr, port = layout.master_addr, layout.master_port
    store = connect_store(addr, port, layout.timeout_s)
    try:
        driver_cfg, init_args = join(store, cfg)
    except dist.DistNetworkError:
        raise RankFailure(f"node 0's rendezvous at {addr}:{port} closed during the handshake: node 0 failed") from None
    try:
        check_visible_gpus(driver_cfg, layout.ranks_per_node)  # device index = local rank
    except ValueError as e:  # the driver learns it from the node's report, not from its silence
        store.set(node_key("failed", layout.node_rank), f"a refused start: {e}")
        raise
    ranks = layout.ranks_of(layout.node_rank)
    print(f"plait: node {layout.node_rank} of {layout.nnodes}: ranks {ranks.start}..{ranks.stop - 1} follow node 0 "
          f"at {addr}:{port}", file=sys.stderr, flush=True)
    ctx = mp.get_context("spawn")
    procs = {}
    for rank in ranks:
        args = (driver_cfg, rank, layout.world, (addr, port), rank - ranks.start, init_args, StoreChannel(addr, port, rank))
        procs[rank] = ctx.Process(target=worker_main, args=args, daemon=True)
        procs[rank].start()
    try:
        with socket.create_connection((addr, port)) as driver:
            return _watch(store, layout.node_rank, procs, driver, f"{addr}:{port}")
    finally:
        for proc in procs.values():
            if proc.is_alive():
                proc.kill()


def _watch(store: dist.Store, node: int, procs: dict[int, mp.Process], driver: socket.socket, where: str) -> int:
    """Beat, and watch the ranks: 0 when all ended cleanly and the driver still listens, else RankFailure.

    `driver` is a plain connection to node 0's store that never sends: it reads end-of-file the moment node 0's
    process is gone, so the loop waits on it instead of sleeping and stops before a store call fails (a store call
    that fails logs a C++ stack trace before raising)."""
    lost = RankFailure(f"node {node} lost node 0's rendezvous at {where}: the driver exited or failed")
    try:
        while True:
            store.add(node_key("beat", node), 1)
            failed = [(rank, p.exitcode) for rank, p in procs.items() if p.exitcode not in (None, 0)]
            if failed:
                rank, code = failed[0]
                store.set(node_key("failed", node), f"rank {rank} exited with code {code}")
                raise RankFailure(f"rank {rank} (node {node}) exited with code {code}")
            if all(p.exitcode == 0 for p in procs.values()):
                store.set(node_key("done", node), "1")  # the driver waits for this before closing the store
                return 0
            if select.select([driver], [], [], HEARTBEAT_S)[0]:  # readable: the store closed the connection
                raise lost
    except dist.DistError:  # the store went away between the check and the call
        raise lost from None
