"""The fused all-reduce + residual add + RMSNorm (plait.comm.fused_norm) on W GPUs: checked, timed and tuned.

One process per GPU. For each group size W and hidden size H:
  check: against NCCL all-reduce then the add+norm kernel, within bf16 tolerance; the output bit-identical on every
         rank; the op captured in a CUDA graph gives what it gives eagerly. Any miss exits non-zero (the GPU test
         tests/gpu/test_fused_norm_gpu.py runs `--check`).
  time:  per token count, every method captured 10 times in one CUDA graph (as decode runs it), microseconds per op:
         NCCL all-reduce + norm, two-shot symmetric-memory all-reduce + norm (the core's path up to 4 MB), and the
         fused op with each thread-block count. The best block count per token count, and whether it beat the best
         unfused method by MIN_KERNEL_GAIN, go to the tuning table that plait.comm.fused_norm reads (`--table`).

    python3 benchmarks/fused_norm.py --gpus 2,4 --check
    python3 benchmarks/fused_norm.py --gpus 2,4 --hidden 4096,8192 --output-json r.json --table plait/comm/fused_norm_table.json
    python3 benchmarks/fused_norm.py --from-json r.json --table plait/comm/fused_norm_table.json   # no GPU
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from plait.bench.results import write_result  # noqa: E402
from plait.comm.communicator import Communicator  # noqa: E402
from plait.comm.fused_norm import FusedNormTuning  # noqa: E402
from plait.executor.executor import free_port  # noqa: E402
from plait.kernels.allreduce_norm import owned_rows  # noqa: E402
from plait.kernels.fused import rms_norm  # noqa: E402

EPS = 1e-5
DTYPE = torch.bfloat16
CHECK_TOKENS = (1, 3, 64, 1000, 4096)


def _randn(seed: int, *shape: int, device: torch.device) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator(device=device).manual_seed(seed), device=device).to(DTYPE)


def check(fused: Communicator, nccl: Communicator, hidden: int, device: torch.device) -> list[dict]:
    """One record per token count; `ok` false on any miss."""
    rank, world = nccl.rank, nccl.size
    weight = (torch.rand(hidden, generator=torch.Generator(device=device).manual_seed(7), device=device) + 0.5).to(DTYPE)
    out = []
    for T in CHECK_TOKENS:
        x, residual = _randn(1000 * rank + T, T, hidden, device=device), _randn(T, T, hidden, device=device)
        ref = nccl.all_reduce(x.clone())
        ref_res = residual.clone()
        ref_out = rms_norm(ref, weight, EPS, ref_res)
        buf = fused.partial_sum_buffer(T)
        buf.copy_(x)  # where the row-parallel layer writes
        res = residual.clone()
        got, res = fused.all_reduce_rms_norm(buf, res, weight, EPS)
        got = got.clone()
        a, b = owned_rows(T, world, rank)
        close = bool(((got.float() - ref_out.float()).abs() <= 0.05 + 0.02 * ref_out.float().abs()).all())
        res_close = bool(((res[a:b].float() - ref_res[a:b].float()).abs() <= 0.05 + 0.02 * ref_res[a:b].float().abs()).all())
        everyone = [torch.empty_like(got) for _ in range(world)]
        dist.all_gather(everyone, got)
        identical = all(torch.equal(e, everyone[0]) for e in everyone)
        graph = torch.cuda.CUDAGraph()
        g_res = residual.clone()
        with torch.cuda.graph(graph):
            fused.partial_sum_buffer(T).copy_(x)
            g_out, _ = fused.all_reduce_rms_norm(fused.partial_sum_buffer(T), g_res, weight, EPS)
        g_res.copy_(residual)
        graph.replay()
        torch.cuda.synchronize()
        graph_same = torch.equal(g_out, got)
        del graph
        max_err = (got.float() - ref_out.float()).abs().max().item()
        out.append(dict(world=world, hidden=hidden, tokens=T, max_abs_err=max_err, close=close, residual_close=res_close,
                        identical_across_ranks=identical, graph_equals_eager=graph_same,
                        ok=close and res_close and identical and graph_same))
    return out


def time_graph(fn, ops: int = 10, reps: int = 5) -> float:
    """Microseconds per op: `ops` calls captured in one graph, replayed `reps` times; every rank does the same."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(ops):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    del graph
    return start.elapsed_time(end) * 1e3 / (ops * reps)


def sweep(fused: Communicator, nccl: Communicator, two_shot: Communicator, hidden: int, tokens: list[int],
          blocks: list[int], device: torch.device) -> list[dict]:
    weight = torch.ones(hidden, dtype=DTYPE, device=device)
    rows = []
    for T in tokens:
        x, residual = _randn(T, T, hidden, device=device), _randn(T + 1, T, hidden, device=device)
        row = dict(world=nccl.size, hidden=hidden, tokens=T, bytes=T * hidden * 2)
        for name, comm in (("nccl_norm_us", nccl), ("two_shot_norm_us", two_shot)):
            row[name] = time_graph(lambda comm=comm: rms_norm(comm.all_reduce(x), weight, EPS, residual))
        fused.partial_sum_buffer(T).copy_(x)
        for b in blocks:
            fused.fused_norm.tuning = FusedNormTuning((1 << 30,), (b,), (True,))
            row[f"fused_b{b}_us"] = time_graph(
                lambda: fused.all_reduce_rms_norm(fused.partial_sum_buffer(T), residual, weight, EPS))
        best_b = min(blocks, key=lambda b: row[f"fused_b{b}_us"])
        row.update(best_blocks=best_b, fused_us=row[f"fused_b{best_b}_us"])
        row["unfused_us"] = min(row["nccl_norm_us"], row["two_shot_norm_us"])
        row["speedup_vs_nccl"] = row["nccl_norm_us"] / row["fused_us"]
        row["speedup_vs_best_unfused"] = row["unfused_us"] / row["fused_us"]
        rows.append(row)
    return rows


def rank_main(rank: int, world: int, port: int, args: argparse.Namespace, out_path: str) -> None:
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            device_id=device)
    nccl, two_shot, fused = (Communicator(dist.group.WORLD, rank, world) for _ in range(3))
    two_shot.enable_symm_mem((4 << 20) // 2, DTYPE, device)
    result: dict = {"check": [], "timings": []}
    for hidden in args.hidden:
        if not fused.enable_fused_norm(max(max(args.tokens), max(CHECK_TOKENS)), hidden, DTYPE, device, forced=True):
            raise RuntimeError(f"symmetric memory unavailable for a group of {world}")
        result["check"] += check(fused, nccl, hidden, device)
        if not args.check:
            result["timings"] += sweep(fused, nccl, two_shot, hidden, args.tokens, args.blocks, device)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)
    dist.barrier()
    os._exit(0)  # leave without NCCL teardown (../shared/DEVICE.md)


def run_world(world: int, args: argparse.Namespace, timeout_s: float) -> dict:
    """W processes; rank 0's result, or RuntimeError naming the rank that failed or the timeout."""
    ctx = mp.get_context("spawn")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rank0.json")
        procs = [ctx.Process(target=rank_main, args=(r, world, port, args, path)) for r in range(world)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        try:
            while any(p.is_alive() for p in procs):
                failed = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if failed:
                    raise RuntimeError(f"rank {failed[0]} of {world} exited with code {procs[failed[0]].exitcode}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{world} ranks gave no answer within {timeout_s:.0f} s")
                time.sleep(0.2)
            failed = [r for r, p in enumerate(procs) if p.exitcode != 0]
            if failed or not os.path.exists(path):
                raise RuntimeError(f"rank {failed[0] if failed else 0} of {world} exited without a result")
            with open(path) as f:
                return json.load(f)
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()


# The fused op counts as a win for a token bucket only where the kernel alone beats the best unfused method by this
# much. Kernel timings do not carry over one to one (benchmarks/results/, Llama-3.1-8B shape, TP=4, hidden 4096):
# at 2048 tokens the kernel measured 1.01x (fused_norm_kernel.json) yet forced-on prefill of 2048 tokens was 0.95x
# end to end (fused_norm_e2e.json: 34.2 vs 32.5 ms), while at 64 tokens the kernel's 1.11x gave batch-64 decode
# 1.09x (TPOT 6.50 vs 7.09 ms). 1.10 is just under the smallest kernel gain that held end to end.
MIN_KERNEL_GAIN = 1.10


def build_table(timings: list[dict]) -> dict:
    """tp{W}_h{H} -> per measured token count: best block count, and whether fused beat the best unfused method by
    at least MIN_KERNEL_GAIN."""
    table: dict = {}
    for row in sorted(timings, key=lambda r: (r["world"], r["hidden"], r["tokens"])):
        entry = table.setdefault(f"tp{row['world']}_h{row['hidden']}", {"tokens": [], "blocks": [], "wins": []})
        entry["tokens"].append(row["tokens"])
        entry["blocks"].append(row["best_blocks"])
        entry["wins"].append(row["unfused_us"] / row["fused_us"] >= MIN_KERNEL_GAIN)
    return table


def update_table(path: str, timings: list[dict]) -> None:
    """The group sizes measured in `timings` replace theirs; others keep what an earlier run measured."""
    table = json.loads(pathlib.Path(path).read_text()) if os.path.exists(path) else {}
    table.update(build_table(timings))
    lines = [f" {json.dumps(key)}: {json.dumps(table[key])}" for key in sorted(table)]  # one line per group and size
    pathlib.Path(path).write_text("{\n" + ",\n".join(lines) + "\n}\n")


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", type=_ints, default=[2, 4], help="group sizes to run, comma-separated")
    parser.add_argument("--hidden", type=_ints, default=[4096, 8192])
    parser.add_argument("--tokens", type=_ints, default=[1, 4, 16, 64, 256, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--blocks", type=_ints, default=[4, 8, 16, 32, 64, 128],
                        help="thread-block counts to time (32, the most the first sweep tried, won every big step)")
    parser.add_argument("--check", action="store_true", help="correctness only; exit 1 on any miss")
    parser.add_argument("--timeout-s", type=float, default=240.0, help="per group size")
    parser.add_argument("--output-json", default=None)
    parser.add_argument("--table", default=None,
                        help="update the tuning table here (plait/comm/fused_norm_table.json) with the group sizes run")
    parser.add_argument("--from-json", default=None,
                        help="no GPU: rebuild --table from the timings of an earlier --output-json")
    args = parser.parse_args()
    if args.from_json:
        if not args.table:
            parser.error("--from-json needs --table")
        update_table(args.table, json.loads(pathlib.Path(args.from_json).read_text())["timings"])
        return
    available = torch.cuda.device_count()
    checks, timings = [], []
    for world in args.gpus:
        if world > available:
            print(f"skipping {world} GPUs: {available} here")
            continue
        result = run_world(world, args, args.timeout_s)
        checks += result["check"]
        timings += result["timings"]
    for c in checks:
        print(f"check tp{c['world']} h{c['hidden']} T={c['tokens']:5d}: max err {c['max_abs_err']:.4f} "
              f"identical={c['identical_across_ranks']} graph={c['graph_equals_eager']} -> {'ok' if c['ok'] else 'MISS'}")
    for r in timings:
        print(f"tp{r['world']} h{r['hidden']} T={r['tokens']:6d}: NCCL+norm {r['nccl_norm_us']:8.1f} us  two-shot+norm "
              f"{r['two_shot_norm_us']:8.1f}  fused {r['fused_us']:8.1f} ({r['best_blocks']:2d} blocks)  "
              f"x{r['speedup_vs_nccl']:.2f} vs NCCL, x{r['speedup_vs_best_unfused']:.2f} vs best unfused")
    if timings:
        write_result({"benchmark": "fused_allreduce_norm", "dtype": "bfloat16", "checks": checks, "timings": timings},
                     args.output_json)
        if args.table:
            update_table(args.table, timings)
    if not checks or not all(c["ok"] for c in checks):
        sys.exit(1)


if __name__ == "__main__":
    main()
