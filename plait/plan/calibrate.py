"""`plait calibrate`: measure this machine, fit the model's figures, and write the file `plait plan` reads.

One process per rank (as ../shared/DEVICE.md advises: one `mp.Process` each, never `mp.spawn` plus a queue), every
rank in one world group. Rank 0 first measures the matrix rate and bandwidths; then, for each group size g, ranks
0 .. g-1 form a group and run the microbenchmarks (`microbench.GroupBench`, send/recv on the 2-rank group) while
the others wait at a barrier. On GPU only the sizes the engine runs are measured, powers of two (a 3-rank group
hung the H200 run, and the engine never makes one); other sizes are scaled by `Calibration.curve`.

Every rank makes the same collectives on the world group in the same order: each asks for every group, and the
only world-group collectives are the barriers between group sizes (send/recv go through the pair's own group,
not a lazily made communicator of the world group). Even so a rank can hang, so the whole run has a deadline:
rank 0 sends each group size's figures as soon as they are measured, and when the deadline passes the driver
kills the ranks and writes what arrived, with a note of what is missing (the model scales the nearest group
size). Only when nothing was measured is no file written: `plait plan` then says it runs on built-in figures.
Optionally (`--engine-model`) the engine's own overheads are fitted too (`overheads.py`); or, with no measuring,
the engine's terms are fitted to a measured validation grid (`--fit-from`, `fit.py`).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.connection import Connection, wait

import torch
import torch.distributed as dist

from plait.comm.communicator import Communicator
from plait.plan.calibration import Calibration, Curve, h200_defaults
from plait.plan.fit import DEFAULT_CONFIGS, TERMS, fit_validation
from plait.plan.microbench import BenchConfig, GroupBench, compute_rates

_KB, _MB = 1024, 1024 * 1024
GPU_SIZES = (16 * _KB, 64 * _KB, 256 * _KB, 1 * _MB, 4 * _MB, 16 * _MB, 64 * _MB)
CPU_SIZES = (4 * _KB, 64 * _KB, 1 * _MB)
SYMM_NUMEL = (4 << 20) // 2  # bf16 elements of the symmetric-memory buffer (the runner's 4 MB)


def group_sizes(world: int, device: str) -> list[int]:
    """The group sizes to measure: on GPU the engine's (powers of two up to the world), on CPU every size."""
    return [g for g in range(2, world + 1) if device != "cuda" or not g & (g - 1)]


def _rank_main(cfg: BenchConfig, rank: int, conn: Connection) -> None:
    """One rank: join the world, benchmark each group it belongs to; rank 0 sends ("rates", ...), then
    ("group", {"curves", "notes"}) per group size as it finishes, then ("done", None)."""
    try:
        if cfg.device == "cuda":
            torch.cuda.set_device(rank)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // cfg.world))
        dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{cfg.port}",
                                rank=rank, world_size=cfg.world, timeout=timedelta(seconds=cfg.timeout_s))
        if rank == 0:
            conn.send(("rates", compute_rates(cfg.device)))
        for g in group_sizes(cfg.world, cfg.device):
            group = dist.new_group(list(range(g)))  # every rank must ask for every group, in the same order
            if rank < g:
                out: dict[str, list[tuple[int, float]]] = {}
                notes: list[str] = []
                comm = Communicator(group, rank, g)
                symm = None
                if cfg.device == "cuda":
                    symm = Communicator(group, rank, g)
                    if not symm.enable_symm_mem(SYMM_NUMEL, torch.bfloat16, torch.device("cuda", rank)):
                        symm = None
                bench = GroupBench(comm, cfg, out, notes)
                bench.run(symm)
                if g == 2:
                    bench.send_recv(cfg.sizes)  # over this group of ranks 0 and 1, which every rank created
                if rank == 0:
                    conn.send(("group", {"curves": out, "notes": notes}))
            dist.barrier()
        if rank == 0:
            conn.send(("done", None))
        dist.barrier()
        if cfg.device == "cpu":
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - sent to the driver, which reports it
        conn.send(("error", f"rank {rank}:\n{traceback.format_exc()}"))


@dataclass
class Measured:
    """What rank 0 sent before the run ended; `problem` says why it ended early (None: complete)."""

    rates: dict[str, float] | None = None
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    groups: int = 0  # group sizes measured
    problem: str | None = None


def measure(cfg: BenchConfig, timeout_s: float) -> Measured:
    """Run the ranks until rank 0 is done, a rank fails, or `timeout_s` passes; returns what arrived by then."""
    ctx = mp.get_context("spawn")
    pipes = [ctx.Pipe(duplex=False) for _ in range(cfg.world)]
    procs = [ctx.Process(target=_rank_main, args=(cfg, r, pipes[r][1]), daemon=True) for r in range(cfg.world)]
    for p in procs:
        p.start()
    readers = [recv for recv, _ in pipes]
    deadline = time.monotonic() + timeout_s
    got = Measured()
    try:
        while got.problem is None:
            if time.monotonic() > deadline:
                got.problem = f"no answer within {timeout_s:.0f} s"
                break
            for recv in wait(readers, timeout=1.0):
                kind, value = recv.recv()
                if kind == "rates":
                    got.rates = value
                elif kind == "group":
                    got.groups += 1
                    got.notes += value["notes"]
                    for key, pts in value["curves"].items():
                        got.curves.setdefault(key, []).extend(pts)
                elif kind == "done":
                    return got
                else:
                    got.problem = value
            dead = [r for r, p in enumerate(procs) if not p.is_alive() and not readers[r].poll()]
            if dead and got.problem is None:
                got.problem = f"rank {dead[0]} exited with code {procs[dead[0]].exitcode} without answering"
        for p in procs:  # a rank that failed or hung will not finish: the others would wait for it
            p.kill()
        return got
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()


_RATES = ("matmul_flops", "gemv_bytes_s", "copy_bytes_s", "memory_bytes")
_OVERHEADS = tuple(TERMS)


def build(got: Measured, device: str, world: int, path: str) -> Calibration:
    """Curves from the measured points (alpha-beta fitted by `Curve`), rates from rank 0. The engine's overheads are
    not measured here: on GPU they start as the built-in H200 figures, on CPU at zero, until --engine-model fits them.
    A run cut short keeps what it measured and says what it lacks; with nothing measured it raises."""
    if got.rates is None and (device != "cuda" or not got.curves):
        raise RuntimeError(f"calibration measured nothing: {got.problem}")
    defaults = h200_defaults()
    notes = [("engine overheads: built-in H200 figures" if device == "cuda" else "engine overheads: zero")
             + " (fit them with --engine-model)"]
    rates = got.rates
    if rates is None:  # rank 0 measures them first, so only a GPU run that failed at once lacks them
        rates = {k: getattr(defaults, k) for k in _RATES}
        notes.append("matrix rate and bandwidths: built-in H200 figures (not measured)")
    if got.problem is not None:
        missing = ", ".join(str(g) for g in group_sizes(world, device)[got.groups:]) or "none"
        notes.append(f"calibration cut short ({got.problem.strip().splitlines()[-1][:160]}); group sizes not "
                     f"measured: {missing} (scaled from the nearest measured size)")
    curves = {key: Curve([b for b, _ in pts], [s for _, s in pts]) for key, pts in sorted(got.curves.items())}
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    sms = {"sm_count": torch.cuda.get_device_properties(0).multi_processor_count} if device == "cuda" else {}
    overheads = {k: getattr(defaults, k) for k in _OVERHEADS} if device == "cuda" else {}
    return Calibration(source=f"measured: {path}", device=device, device_name=name, curves=curves,
                       symm_mem=any("/symm_" in k for k in curves), notes=[*notes, *got.notes], **rates, **overheads, **sms)


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
    parser.add_argument("--fit-from", default=None, nargs="+", metavar="RESULTS",
                        help="fit the engine's terms to benchmarks/comm_validate.py comm_validation.json files of one "
                             "model (one grid per scheduling mode tells host time from GPU time), starting from "
                             "--from, default the calibration beside the first; no measuring")
    parser.add_argument("--fit-configs", default=",".join(DEFAULT_CONFIGS),
                        help="with --fit-from: the configurations fitted (the rest are held out)")
    parser.add_argument("--timeout", type=float, default=180.0,
                        help="seconds for the whole measurement; a run cut short writes what it measured")
    parser.add_argument("--output", default="calibration.json")


def main(args: argparse.Namespace) -> Calibration | None:
    """Measure (or load), optionally fit the overheads, write the file. None when nothing could be measured."""
    if args.fit_from:
        return _fit_from(args)
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
        got = measure(BenchConfig(device, world, tuple(sorted(sizes)), iters, free_port(), args.timeout), args.timeout)
        try:
            calib = build(got, device, world, args.output)
        except RuntimeError as e:
            print(f"{e}\nno calibration written: `plait plan` uses its built-in figures without one")
            return None
        if got.problem is not None:
            print(f"calibration cut short, writing what was measured: {got.problem}")
    if args.engine_model:
        from plait.plan.overheads import fit_overheads

        calib = fit_overheads(calib, args.engine_model, world)
    calib.save(args.output)
    print(f"calibration of {calib.device_name} ({world} ranks) written to {args.output}")
    _print(calib)
    return calib


def _fit_from(args: argparse.Namespace) -> Calibration:
    """--fit-from: the engine's terms fitted to validation grids' timed points (`fit.fit_validation`)."""
    grids = []
    for path in args.fit_from:
        with open(path) as f:
            grids.append(json.load(f))
    first = os.path.dirname(os.path.abspath(args.fit_from[0]))
    start = args.from_file or os.path.join(first, grids[0].get("calibration") or "")
    if not os.path.isfile(start):
        raise ValueError(f"--fit-from needs a calibration to start from: give --from (no {start!r})")
    calib = fit_validation(Calibration.load(start), grids, tuple(c for c in args.fit_configs.split(",") if c))
    calib.save(args.output)
    print(f"calibration fitted to {', '.join(args.fit_from)} ({', '.join(calib.fit_configs)}) written to "
          f"{args.output}\n  {calib.notes[-1]}")
    return calib


def _print(calib: Calibration) -> None:
    print(f"  matrix {calib.matmul_flops / 1e12:.2f} TFLOP/s, weight streaming {calib.gemv_bytes_s / 1e9:.1f} GB/s, "
          f"copy {calib.copy_bytes_s / 1e9:.1f} GB/s")
    for key, c in calib.curves.items():
        print(f"  {key:36s} {c.seconds[0] * 1e6:9.1f} us at {c.sizes[0]} B .. {c.seconds[-1] * 1e6:9.1f} us at {c.sizes[-1]} B"
              f"  (alpha {c.alpha * 1e6:.1f} us, beta {c.beta / 1e9:.2f} GB/s)")
