"""`plait calibrate`: measure this machine, fit the model's figures, and write the file `plait plan` reads.

One process per rank (as ../shared/DEVICE.md advises: one `mp.Process` each, never `mp.spawn` plus a queue), every
rank in one world group; for each group size g = 2 .. world, ranks 0 .. g-1 form a group and run the
microbenchmarks (`microbench.GroupBench`) while the others wait at a barrier. Rank 0 also measures the matrix
rate and bandwidths and sends everything back. The driver waits with a deadline, so a hung rank fails the run
instead of hanging it. Optionally (`--engine-model`) the engine's own overheads are fitted too (`overheads.py`).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import wait

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from plait.comm.communicator import Communicator
from plait.plan.calibration import Calibration, Curve, h200_defaults
from plait.plan.microbench import BenchConfig, GroupBench, compute_rates

_KB, _MB = 1024, 1024 * 1024
GPU_SIZES = (16 * _KB, 64 * _KB, 256 * _KB, 1 * _MB, 4 * _MB, 16 * _MB, 64 * _MB)
CPU_SIZES = (4 * _KB, 64 * _KB, 1 * _MB)
SYMM_NUMEL = (4 << 20) // 2  # bf16 elements of the symmetric-memory buffer (the runner's 4 MB)


def _rank_main(cfg: BenchConfig, rank: int, conn) -> None:
    """One rank: join the world, benchmark each group it belongs to, and (rank 0) answer with every figure."""
    try:
        if cfg.device == "cuda":
            torch.cuda.set_device(rank)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg.world))
        dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{cfg.port}",
                                rank=rank, world_size=cfg.world, timeout=timedelta(seconds=120))
        out: dict[str, list[tuple[int, float]]] = {}
        notes: list[str] = []
        groups = range(2, cfg.world + 1)
        bar = tqdm(groups, desc="Collectives by group size", disable=rank != 0)
        for g in bar:
            group = dist.new_group(list(range(g)))  # every rank must ask for every group, in the same order
            if rank < g:
                comm = Communicator(group, rank, g)
                symm = None
                if cfg.device == "cuda":
                    symm = Communicator(group, rank, g)
                    if not symm.enable_symm_mem(SYMM_NUMEL, torch.bfloat16, torch.device("cuda", rank)):
                        symm = None
                bench = GroupBench(comm, cfg, out, notes)
                bench.run(symm)
                if g == 2:
                    bench.send_recv(cfg.sizes)
            dist.barrier()
        rates = compute_rates(cfg.device) if rank == 0 else None
        if rank == 0:
            conn.send(("ok", {"curves": out, "rates": rates, "notes": notes}))
        dist.barrier()
        if cfg.device == "cpu":
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - sent to the driver, which raises it
        conn.send(("error", f"rank {rank}:\n{traceback.format_exc()}"))


def measure(cfg: BenchConfig, timeout_s: float) -> dict:
    """Run the ranks; returns rank 0's {"curves", "rates"}. Raises RuntimeError with the failing rank's traceback."""
    ctx = mp.get_context("spawn")
    pipes = [ctx.Pipe(duplex=False) for _ in range(cfg.world)]
    procs = [ctx.Process(target=_rank_main, args=(cfg, r, pipes[r][1]), daemon=True) for r in range(cfg.world)]
    for p in procs:
        p.start()
    readers = [recv for recv, _ in pipes]
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            for recv in wait(readers, timeout=1.0):
                status, value = recv.recv()
                if status == "error":
                    raise RuntimeError(value)
                return value  # only rank 0 answers "ok"
            dead = [r for r, p in enumerate(procs) if not p.is_alive() and not readers[r].poll()]
            if dead:
                raise RuntimeError(f"calibration rank {dead[0]} exited with code {procs[dead[0]].exitcode} without answering")
        raise RuntimeError(f"calibration ranks gave no answer within {timeout_s:.0f} s")
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()


_OVERHEADS = ("host_step_s", "host_per_seq_s", "graph_layer_s", "eager_layer_s", "sync_per_collective_s")


def build(result: dict, device: str, path: str) -> Calibration:
    """Curves from the measured points (alpha-beta fitted by `Curve`), rates from rank 0. The engine's overheads are
    not measured here: on GPU they start as the built-in H200 figures, on CPU at zero, until --engine-model fits them."""
    curves = {key: Curve([b for b, _ in pts], [s for _, s in pts]) for key, pts in sorted(result["curves"].items())}
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    overheads = {k: getattr(h200_defaults(), k) for k in _OVERHEADS} if device == "cuda" else {}
    note = ("engine overheads: built-in H200 figures" if device == "cuda" else "engine overheads: zero") + \
        " (fit them with --engine-model)"
    return Calibration(source=f"measured: {path}", device=device, device_name=name, curves=curves,
                       symm_mem=any("/symm_" in k for k in curves), notes=[note, *result["notes"]], **result["rates"],
                       **overheads)


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--world", type=int, default=None, help="ranks (default: every GPU, or 2 on CPU)")
    parser.add_argument("--sizes", default=None, help="message sizes in bytes, comma-separated (default: 16 KB..64 MB "
                                                      "on GPU, 4 KB..1 MB on CPU)")
    parser.add_argument("--iters", type=int, default=None, help="timed calls per point (default 50 on GPU, 5 on CPU)")
    parser.add_argument("--engine-model", default=None, metavar="MODEL",
                        help="also fit the engine's overheads by running this model (dummy weights) at TP=1 and TP=world")
    parser.add_argument("--from", dest="from_file", default=None, metavar="FILE",
                        help="start from this calibration instead of measuring (with --engine-model: fit overheads only)")
    parser.add_argument("--timeout", type=float, default=540.0, help="seconds before a hung rank fails the run")
    parser.add_argument("--output", default="calibration.json")


def main(args: argparse.Namespace) -> Calibration:
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch sees no CUDA device")
    world = args.world or (torch.cuda.device_count() if device == "cuda" else 2)
    if world < 2 or (device == "cuda" and world > torch.cuda.device_count()):
        limit = torch.cuda.device_count() if device == "cuda" else "any"
        raise ValueError(f"--world must be between 2 and {limit}, got {world}")
    sizes = tuple(int(s) for s in args.sizes.split(",")) if args.sizes else (GPU_SIZES if device == "cuda" else CPU_SIZES)
    iters = args.iters or (50 if device == "cuda" else 5)
    from plait.executor.executor import free_port

    if args.from_file:
        calib = Calibration.load(args.from_file)
    else:
        calib = build(measure(BenchConfig(device, world, tuple(sorted(sizes)), iters, free_port()), args.timeout),
                      device, args.output)
    if args.engine_model:
        from plait.plan.overheads import fit_overheads

        calib = fit_overheads(calib, args.engine_model, world)
    calib.save(args.output)
    print(f"calibration of {calib.device_name} ({world} ranks) written to {args.output}")
    print(f"  matrix {calib.matmul_flops / 1e12:.2f} TFLOP/s, weight streaming {calib.gemv_bytes_s / 1e9:.1f} GB/s, "
          f"copy {calib.copy_bytes_s / 1e9:.1f} GB/s")
    for key, c in calib.curves.items():
        print(f"  {key:36s} {c.seconds[0] * 1e6:9.1f} us at {c.sizes[0]} B .. {c.seconds[-1] * 1e6:9.1f} us at {c.sizes[-1]} B"
              f"  (alpha {c.alpha * 1e6:.1f} us, beta {c.beta / 1e9:.2f} GB/s)")
    return calib
