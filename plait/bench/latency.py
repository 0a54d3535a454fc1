"""`plait bench latency`: one fixed batch, prefill then decode, timed step by step against the hardware floor.

TTFT is the time from adding the batch to every sequence having its first token (the prefill steps);
TPOT is the time of one decode step. Repeated `--num-iters` times; median and p90 reported, each beside
its floor (`plait.bench.floors`, measured in the same run) and the ratio to it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from plait.bench import floors, gpu_timeline
from plait.bench.results import write_result
from plait.config import EngineConfig
from plait.engine.data_parallel import make_engine
from plait.engine.engine import LLMEngine
from plait.sampling_params import SamplingParams


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--num-iters", type=int, default=5)
    parser.add_argument("--num-iters-warmup", type=int, default=1)
    parser.add_argument("--output-json", default=None, help="write the result here (default: print only)")
    parser.add_argument("--profile", action="store_true",
                        help="one more run under torch.profiler: its top GPU kernels and host operations (TP=1 only)")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_once(engine: LLMEngine, args, device: str, seed: int) -> tuple[float, list[float]]:
    """One batch end to end: returns (TTFT seconds, decode step seconds). Each run's prompts are its own (by
    `seed`), so no run finds another's blocks in the prefix cache."""
    g = torch.Generator().manual_seed(seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    for _ in range(args.batch_size):
        engine.add_request(torch.randint(0, vocab, (args.input_len,), generator=g).tolist(), params)
    _sync(device)
    start = time.perf_counter()
    ttft, steps, last = None, [], start
    while engine.has_unfinished_requests():
        outs = engine.step()  # returns once the host has the step's tokens: no sync needed (one would stall async)
        now = time.perf_counter()
        if ttft is None:
            if outs and all(o.outputs[0].token_ids for o in outs) and len(outs) == args.batch_size:
                ttft = now - start
        elif outs:
            steps.append(now - last)
        last = now
    return ttft, steps


def profile_decode(engine: LLMEngine, args, device: str) -> dict[str, list[dict]]:
    """One batch under torch.profiler: the top kernels by device time (where the GPU's time goes) and the top
    host operations by their own CPU time (where a host-bound step's time goes)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        run_once(engine, args, device, seed=2000)
    events = prof.key_averages()
    tables = {}
    for name, key in (("device", "self_device_time_total"), ("host", "self_cpu_time_total")):
        top = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:20]
        tables[name] = [{"name": e.key[:80], "calls": e.count, "device_ms": e.self_device_time_total / 1e3,
                         "self_cpu_ms": e.self_cpu_time_total / 1e3} for e in top]
        print(f"  top by {name} time:")
        for r in tables[name]:
            print(f"  {r['device_ms']:9.2f} ms device  {r['self_cpu_ms']:9.2f} ms host  {r['calls']:6d}x  {r['name']}")
    return tables


def parallel_label(cfg: EngineConfig) -> str:
    """'tp2', 'pp2', 'tp2xpp2', 'dp4', 'sp4', 'shift4' ...: the configuration in one word."""
    parts = [f"{name}{n}" for name, n in (("dp", cfg.data_parallel_size), ("tp", cfg.tensor_parallel_size),
                                          ("pp", cfg.pipeline_parallel_size)) if n > 1]
    if cfg.sequence_parallel_size > 1:
        parts.append(f"{'shift' if cfg.shift_parallel else 'sp'}{cfg.sequence_parallel_size}")
    return "x".join(parts) or "tp1"


def _multi_rank(engine) -> bool:
    """One replica over several ranks: its executor can time its ranks and their all-reduces."""
    return getattr(engine, "executor", None) is not None and engine.executor.world > 1


def _p(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def main(args: argparse.Namespace, cfg: EngineConfig) -> dict:
    if args.output_len < 2:
        raise ValueError(f"--output-len must be at least 2 (got {args.output_len}): TPOT is timed over decode steps")
    cfg = cfg.replace(max_num_seqs=max(cfg.max_num_seqs, args.batch_size),
                      max_num_batched_tokens=max(cfg.max_num_batched_tokens or 0, args.batch_size * args.input_len),
                      max_model_len=cfg.max_model_len or args.input_len + args.output_len + 16)
    engine = make_engine(cfg)
    device = cfg.resolved_device()
    try:
        for i in range(args.num_iters_warmup):
            run_once(engine, args, device, seed=1000 + i)
        ttfts, tpots = [], []
        if _multi_rank(engine):
            engine.executor.call("step_times")
        with gpu_timeline.recorded(engine, device) as timeline:  # GPU busy time and the idle gap between steps
            for i in range(args.num_iters):
                ttft, steps = run_once(engine, args, device, seed=i)
                ttfts.append(ttft)
                tpots += steps
        result = _report(engine, args, cfg, device, ttfts, tpots)
        if timeline:
            result["gpu_timeline"] = timeline
            gaps = [t["gap_ms"]["median"] for t in timeline if t["gap_ms"]]
            print(f"  GPU idle between steps (median), by rank: {[round(g, 3) for g in gaps]} ms")
        if _multi_rank(engine):  # time inside each rank's execute vs the driver's step: the rest is IPC
            times = engine.executor.call("step_times")
            result["rank_execute_ms"] = [t.execute_s / max(t.steps, 1) * 1e3 for t in times]
            print(f"  per-step time inside execute, by rank: {[round(v, 3) for v in result['rank_execute_ms']]} ms")
        if args.profile:
            result["profile"] = profile_decode(engine, args, device)
        if cfg.profile_comm:
            from plait.comm.trace import write_profile

            result["comm"] = write_profile(engine, args.profile_comm_dir).phase_table()
    finally:
        engine.shutdown()
    write_result(result, args.output_json)
    return result


def _report(engine, args, cfg, device, ttfts, tpots) -> dict:
    m = engine.model_config
    # Ranks that split each weight in a decode step: TP, or all SP ranks when Shift runs decode tensor-parallel.
    tp = cfg.tensor_parallel_size * (cfg.sequence_parallel_size if cfg.shift_parallel else 1)
    itemsize = torch.empty(0, dtype=cfg.torch_dtype()).element_size()
    result = {
        "benchmark": "latency",
        "model": engine.model_name,
        "model_shape": {k: getattr(m, k) for k in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size")},
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "parallel": parallel_label(cfg),
        "async_scheduling": cfg.resolved_async_scheduling(), "async_output_proc": cfg.async_output_proc,
        "dtype": str(cfg.torch_dtype()).removeprefix("torch."),
        "batch_size": args.batch_size, "input_len": args.input_len, "output_len": args.output_len,
        "ttft_ms": {"median": statistics.median(ttfts) * 1e3, "p90": _p(ttfts, 0.9) * 1e3},
        "tpot_ms": {"median": statistics.median(tpots) * 1e3, "p90": _p(tpots, 0.9) * 1e3},
        "output_throughput_tok_s": args.batch_size / statistics.median(tpots),
    }
    if device == "cuda":
        bw, rate = floors.hbm_bandwidth(), floors.matmul_rate()
        mean_ctx = args.input_len + args.output_len / 2
        decode_floor = floors.decode_floor_s(m, itemsize, int(args.batch_size * mean_ctx), tp, bw)
        if tp > 1 and _multi_rank(engine):  # TP adds two all-reduces per layer at the measured small-message latency
            all_reduce_s = engine.executor.call("all_reduce_latency")[0]
            decode_floor += 2 * m.num_layers * all_reduce_s
        prefill_floor = floors.prefill_floor_s(m, itemsize, [args.input_len] * args.batch_size, tp, rate, bw)
        result["floors"] = {
            "hbm_bandwidth_tb_s": bw / 1e12, "matmul_tflop_s": rate / 1e12,
            "all_reduce_us": all_reduce_s * 1e6 if tp > 1 and _multi_rank(engine) else 0.0,
            "decode_ms": decode_floor * 1e3, "prefill_ms": prefill_floor * 1e3,
            "tpot_over_floor": result["tpot_ms"]["median"] / (decode_floor * 1e3),
            "ttft_over_floor": result["ttft_ms"]["median"] / (prefill_floor * 1e3),
        }
    print(table(result))
    return result


def table(r: dict) -> str:
    lines = [f"{r['model']} {r['parallel']} bs={r['batch_size']} in={r['input_len']} out={r['output_len']} {r['dtype']}"]
    f = r.get("floors")
    for key, floor_key in (("ttft_ms", "prefill_ms"), ("tpot_ms", "decode_ms")):
        v = r[key]
        extra = f"  floor {f[floor_key]:8.3f}  ratio {v['median'] / f[floor_key]:5.2f}x" if f else ""
        lines.append(f"  {key:8s} median {v['median']:9.3f}  p90 {v['p90']:9.3f}{extra}")
    lines.append(f"  output throughput {r['output_throughput_tok_s']:.1f} tok/s")
    return "\n".join(lines)
