"""Parallel Track against dense tensor parallelism: one engine per model, every figure of the comparison from it.

`run` measures one model on `--tp` ranks (a PT preset lays its tracks over them; a dense one runs TP): TPOT at
batch 1 and 64, TTFT of a 2k and an 8k prompt, and throughput at saturation for 4096-in/128-out and 1024-in/1024-out
(all requests at once). Beside them, where the time goes: the ranks' time inside a decode step, the measured
all-reduce latency of one token's hidden state, and the syncs per forward (dense TP: 2L + 2; PT: L/D + 2).
`report` turns a folder of such results into the ratios against the dense run and the issue's targets at D=4.

    python3 benchmarks/pt_speed.py run pt-llama3-8b-t4-d4 --tp 4 --output-json out/pt_speed_pt-d4.json
    python3 benchmarks/pt_speed.py report out --output-json benchmarks/results/pt_speed.json

On one GPU (`--tp 1`) a PT preset runs its 4 tracks side by side on the rank (batched GEMMs), so a dense run of the
same parameter count at `--tp 1` shows what running narrow tracks as grouped GEMMs costs against one wide model.
`--smoke` shrinks every figure (lengths / 64, at most 4 requests) to check the path on CPU with a tiny model folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import statistics
import time
from types import SimpleNamespace

import torch

from plait.bench.latency import run_once
from plait.bench.results import write_result
from plait.config import EngineConfig
from plait.engine.engine import LLMEngine
from plait.sampling_params import SamplingParams

# (name, batch, input, output, iterations): the latency figures, each after one warm-up batch of its shape.
LATENCY = [("tpot_bs1", 1, 128, 64, 3), ("tpot_bs64", 64, 128, 32, 2), ("ttft_2k", 1, 2048, 1, 3), ("ttft_8k", 1, 8192, 1, 2)]
THROUGHPUT = [("throughput_4096_128", 4096, 128), ("throughput_1024_1024", 1024, 1024)]
# The targets at D=4 against dense TP on the same GPUs: (figure, how much faster at least).
TARGETS = {"tpot_bs1": 1.25, "ttft_2k": 1.2, "ttft_8k": 1.2, "throughput_4096_128": 1.3}


def latency(engine: LLMEngine, batch: int, input_len: int, output_len: int, iters: int) -> dict:
    args = SimpleNamespace(batch_size=batch, input_len=input_len, output_len=output_len)
    device = engine.cfg.resolved_device()
    seeds = [input_len * 1000 + i for i in range(iters + 1)]  # prompts of their own: nothing hits the prefix cache
    run_once(engine, args, device, seeds[-1])
    ttfts, tpots = [], []
    for seed in seeds[:-1]:
        ttft, steps = run_once(engine, args, device, seed)
        ttfts.append(ttft)
        tpots += steps
    out = {"ttft_ms": statistics.median(ttfts) * 1e3}
    if tpots:
        out["tpot_ms"] = statistics.median(tpots) * 1e3
    return out


def throughput(engine: LLMEngine, num_prompts: int, input_len: int, output_len: int) -> dict:
    """Every request at once; the engine's scheduler keeps the batch full. Tokens per second of the whole run."""
    g = torch.Generator().manual_seed(1)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    for _ in range(num_prompts):
        engine.add_request(torch.randint(0, engine.model_config.vocab_size, (input_len,), generator=g).tolist(), params)
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()  # the last step returns once every token is on the host
    seconds = time.perf_counter() - start
    return {"num_prompts": num_prompts, "seconds": seconds, "output_tok_s": num_prompts * output_len / seconds,
            "total_tok_s": num_prompts * (input_len + output_len) / seconds}


def syncs_per_forward(engine: LLMEngine) -> int:
    """Collectives of one forward on tp ranks: the embedding's all-reduce and the LM head's gather, plus 2 per layer
    (TP) or one per block (PT, one track per rank); none on one rank."""
    m = engine.model_config
    if engine.cfg.tensor_parallel_size == 1:
        return 0
    return 2 + (m.num_layers // m.tracks.block_depth if m.tracks else 2 * m.num_layers)


def figures(smoke: bool) -> tuple[list, list]:
    """(LATENCY, THROUGHPUT), or both shrunk for a smoke run: lengths / 64 (outputs / 8), at most 4 requests."""
    if not smoke:
        return LATENCY, THROUGHPUT
    latency_ = [(n, min(b, 4), max(i // 64, 2), max(o // 8, 1), 1) for n, b, i, o, _ in LATENCY]
    return latency_, [(n, i // 64, o // 64) for n, i, o in THROUGHPUT]


def run(args: argparse.Namespace) -> dict:
    """Every figure of one model; the JSON is rewritten after each, so a run cut by its time limit keeps the rest."""
    lat, thr = figures(args.smoke)
    longest = max([i for _, _, i, _, _ in lat] + [i for _, i, _ in thr])  # the longest prompt, outputs fit in 64 more
    cfg = EngineConfig(model=args.model, tensor_parallel_size=args.tp, dtype=args.dtype, device=args.device,
                       load_format="dummy", max_model_len=longest + 64, max_num_seqs=64, max_num_batched_tokens=8192)
    started = time.perf_counter()
    engine = LLMEngine(cfg)
    m = engine.model_config
    result = {"benchmark": "pt_speed", "label": args.label, "model": args.model, "tensor_parallel_size": args.tp,
              "startup_s": time.perf_counter() - started, "syncs_per_forward": syncs_per_forward(engine),
              "model_shape": {k: getattr(m, k) for k in ("hidden_size", "num_layers", "num_heads")},
              "tracks": dataclasses.asdict(m.tracks) if m.tracks else None, "smoke": args.smoke}
    try:
        if args.tp > 1:
            result["all_reduce_us"] = engine.executor.call("all_reduce_latency")[0] * 1e6
            result["sync_ms_per_forward_floor"] = result["syncs_per_forward"] * result["all_reduce_us"] / 1e3
            engine.executor.call("step_times")
        for name, batch, input_len, output_len, iters in lat:
            result[name] = latency(engine, batch, input_len, output_len, iters)
            if name == "tpot_bs1" and args.tp > 1:  # time inside each rank's execute; the rest is the driver and IPC
                times = engine.executor.call("step_times")
                result["rank_execute_ms_bs1"] = [t.execute_s / max(t.steps, 1) * 1e3 for t in times]
            _save(result, name, args.output_json)
        for name, input_len, output_len in thr:
            result[name] = throughput(engine, min(args.num_prompts, 4) if args.smoke else args.num_prompts, input_len,
                                      output_len)
            _save(result, name, args.output_json)
    finally:
        engine.shutdown()
    return result


def _save(result: dict, name: str, path: str) -> None:
    print(f"{result['label']} {name}: {result[name]}", flush=True)
    write_result(result, path)


def figure(r: dict, name: str) -> float | None:
    """Seconds-like figure where lower is better (throughput inverted), or None if the run did not get there."""
    v = r.get(name)
    if v is None:
        return None
    if name.startswith("throughput"):
        return 1.0 / v["total_tok_s"]
    return v["tpot_ms"] if name.startswith("tpot") else v["ttft_ms"]


def report(args: argparse.Namespace) -> dict:
    runs = {}
    for path in sorted(glob.glob(os.path.join(args.folder, "pt_speed_*.json"))):
        with open(path) as f:
            r = json.load(f)
        runs[r["label"]] = r
    if "dense" not in runs:
        raise ValueError(f"no dense run (label 'dense') among {sorted(runs)} in {args.folder!r}")
    names = [n for n, *_ in LATENCY] + [n for n, *_ in THROUGHPUT]
    speedups = {label: {n: (figure(runs["dense"], n) / figure(r, n)) if figure(r, n) and figure(runs["dense"], n) else None
                        for n in names} for label, r in runs.items() if label != "dense"}
    targets = {n: {"need": need, "got": speedups.get("pt-d4", {}).get(n),
                   "met": (speedups.get("pt-d4", {}).get(n) or 0) >= need} for n, need in TARGETS.items()}
    lines = ["| run | syncs/fwd | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for label, r in runs.items():
        cells = []
        for n in names:
            cell = "-" if n not in r else f"{r[n]['total_tok_s']:.0f} tok/s" if n.startswith("throughput") else f"{figure(r, n):.2f} ms"
            gain = speedups.get(label, {}).get(n)
            cells.append(f"{cell} (x{gain:.2f})" if gain else cell)
        lines.append(f"| {label} | {r['syncs_per_forward']} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    for n, t in targets.items():
        print(f"target {n} at D=4: >= x{t['need']}: {'met' if t['met'] else 'missed'} (x{t['got'] or 0:.2f})")
    result = {"benchmark": "pt_speed_report", "table": table, "speedup_vs_dense": speedups, "targets_at_d4": targets,
              "runs": runs}
    write_result(result, args.output_json)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="measure one model")
    r.add_argument("model", help="a preset: llama3-8b (dense) or pt-llama3-8b-t4-dD")
    r.add_argument("--tp", type=int, default=4)
    r.add_argument("--label", required=True, help="dense, pt-d1, pt-d2, pt-d4, pt-d8")
    r.add_argument("--num-prompts", type=int, default=64, help="requests of each throughput run")
    r.add_argument("--device", default="cuda")
    r.add_argument("--dtype", default="bfloat16")
    r.add_argument("--smoke", action="store_true", help="every figure shrunk: a quick check of the path (CPU)")
    r.add_argument("--output-json", required=True)
    rep = sub.add_parser("report", help="ratios against the dense run and the targets at D=4")
    rep.add_argument("folder")
    rep.add_argument("--output-json", default=None)
    args = parser.parse_args()
    if args.cmd == "run":
        run(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
