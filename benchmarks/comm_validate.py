"""Issue 6's validation grid, measured in one device call: calibration, then every parallel configuration over a grid
of batch sizes and prompt lengths, timed as the engine runs (decode graphs) and profiled (every collective).

It only measures: predictions and error tables are made afterwards, on any machine, by benchmarks/comm_report.py
from the JSON written here (so the model can improve without spending GPU time again).

    python benchmarks/comm_validate.py --out-dir OUT          # GPU: Llama-3.1-8B shape, dummy weights, bf16, 4 GPUs
    python benchmarks/comm_validate.py --out-dir /tmp/v --device cpu --model tiny-folder --configs tp1,tp2,pp2 \
        --batches 1,2 --input-lens 16,32 --output-len 4 --budget-s 300     # the same machinery on CPU

Each configuration runs in its own subprocess under a deadline (a hung multi-rank run costs its own time only);
results are merged into OUT/comm_validation.json as they arrive, so a run cut short still leaves what it measured,
and `--resume` (same OUT) measures only what is missing. Pipeline stages run eager anyway and TP=1 has no
collectives, so by default only tp2, tp4 and tp2pp2 are profiled. With time left at the end, the engine's
overheads are fitted into the calibration (`plait calibrate --engine-model`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

CONFIGS = {"tp1": (1, 1), "tp2": (2, 1), "tp4": (4, 1), "pp2": (1, 2), "pp4": (1, 4), "tp2pp2": (2, 2)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", required=True)
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--configs", default="tp1,tp2,tp4,tp2pp2,pp2,pp4")
    p.add_argument("--profile-configs", default="tp2,tp4,tp2pp2", help="configurations also run profiled (eager)")
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--input-lens", default="128,2048,8192")
    p.add_argument("--profile-max-input", type=int, default=2048, help="profile (eager) only prompts up to this length")
    p.add_argument("--output-len", type=int, default=8)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--budget-s", type=float, default=540.0, help="stop starting new work after this many seconds")
    p.add_argument("--skip-calibration", action="store_true")
    p.add_argument("--resume", action="store_true", help="keep what OUT/comm_validation.json has; measure the rest")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one configuration, print its JSON
    return p.parse_args(argv)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def measure_config(name: str, args: argparse.Namespace) -> dict:
    """One configuration: the grid with decode graphs (as served), then the profiled sub-grid (eager)."""
    from plait.bench.comm_profile import run_batch
    from plait.comm.trace import collect
    from plait.config import EngineConfig
    from plait.engine.engine import LLMEngine
    from plait.plan.check import check_collectives, check_schedule
    from plait.plan.shapes import Layout
    from plait.plan.workload import fixed_batch_steps

    tp, pp = CONFIGS[name]
    batches, lens = _ints(args.batches), _ints(args.input_lens)
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    cfg = EngineConfig(model=args.model, load_format="dummy", device=args.device, dtype=dtype, tensor_parallel_size=tp,
                       pipeline_parallel_size=pp, max_model_len=max(lens) + args.output_len + 16,
                       max_num_seqs=max(batches), max_num_batched_tokens=args.max_num_batched_tokens)
    out = {"config": name, "tp": tp, "pp": pp, "engine": dataclasses.asdict(cfg), "points": [], "profiled": []}
    for profiled in (False, True) if name in args.profile_configs.split(",") else (False,):
        engine = LLMEngine(cfg.replace(profile_comm=profiled))
        try:
            run_batch(engine, 1, 16, 4)  # warm-up: allocator, kernel autotuning
            if profiled:
                collect(engine)  # drop the warm-up's records
            for b in batches:
                for n in lens:
                    if profiled and n > args.profile_max_input:
                        continue
                    start = time.perf_counter()
                    t = run_batch(engine, b, n, args.output_len)
                    point = {"batch": b, "input_len": n, "output_len": args.output_len, "ttft_ms": t.ttft_s * 1e3,
                             "tpot_ms": t.tpot_s * 1e3, "total_ms": t.total_s * 1e3, "wall_s": time.perf_counter() - start}
                    if profiled:
                        trace = collect(engine)
                        layout = Layout(tp, pp)
                        compared, bad = check_collectives(trace, engine.model_config, layout, 2 if dtype != "float32" else 4)
                        mb = fixed_batch_steps(b, n, args.output_len, engine.sched_config.max_num_batched_tokens,
                                               engine.sched_config.max_num_seqs, pp)
                        missing, extra = check_schedule(trace, mb)
                        ops: dict[str, dict[str, float]] = {}
                        for rt in trace.ranks:  # per op, per rank (mean over ranks), the whole run
                            for r in rt.records:
                                o = ops.setdefault(r.op, {"n": 0.0, "bytes": 0.0, "s": 0.0})
                                o["n"], o["bytes"], o["s"] = o["n"] + 1, o["bytes"] + r.bytes, o["s"] + r.duration_s
                        ops = {k: {f: v / len(trace.ranks) for f, v in o.items()} for k, o in ops.items()}
                        point |= {"ops": ops, "phases": trace.phase_table(), "exact_steps": compared - len(bad),
                                  "steps_compared": compared,
                                  "schedule_exact": not missing and not extra,
                                  "steps": [dataclasses.asdict(s) for s in trace.summary()]}
                    (out["profiled"] if profiled else out["points"]).append(point)
                    print(f"{name} {'profiled' if profiled else 'graphs  '} bs={b:3d} in={n:5d}: TTFT {point['ttft_ms']:9.2f} ms "
                          f"TPOT {point['tpot_ms']:8.3f} ms", file=sys.stderr, flush=True)
        finally:
            engine.shutdown()
    return out


def _run(cmd: list[str], timeout: float, log) -> subprocess.CompletedProcess | None:
    try:
        return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=log, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        print(f"timed out after {timeout:.0f} s: {' '.join(cmd)}", file=log, flush=True)
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one:
        print(json.dumps(measure_config(args.one, args)))
        return 0
    from plait.bench.results import provenance

    os.makedirs(args.out_dir, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    result_path = os.path.join(args.out_dir, "comm_validation.json")
    cal = os.path.join(args.out_dir, "calibration.json")
    result = {"benchmark": "comm_validation", "model": args.model, "args": vars(args), "configs": {}, "skipped": []}
    if args.resume and os.path.exists(result_path):
        with open(result_path) as f:
            result["configs"] = json.load(f)["configs"]
    result.update(provenance())
    plait = [sys.executable, "-m", "plait.cli"]
    with open(os.path.join(args.out_dir, "comm_validation.log"), "a") as log:
        if not args.skip_calibration and not (args.resume and os.path.exists(cal)):
            _run([*plait, "calibrate", "--device", args.device, "--iters", "20", "--output", cal],
                 min(150.0, deadline - time.monotonic()), log)
        result["calibration"] = "calibration.json" if os.path.exists(cal) else None
        passthrough = list(argv if argv is not None else sys.argv[1:])
        for name in args.configs.split(","):
            left = deadline - time.monotonic()
            if name in result["configs"]:
                continue
            if left < 45:
                result["skipped"].append({"config": name, "why": "out of time (run again with --resume)"})
                continue
            done = _run([sys.executable, __file__, *passthrough, "--one", name], left, log)
            if done is not None and done.returncode == 0 and done.stdout.strip():
                result["configs"][name] = json.loads(done.stdout.strip().splitlines()[-1])
            else:
                result["skipped"].append({"config": name, "why": "failed or timed out (see comm_validation.log)"})
            with open(result_path, "w") as f:
                json.dump(result, f, indent=1)
        left = deadline - time.monotonic()
        if result["calibration"] and args.device == "cuda" and left > 150:
            _run([*plait, "calibrate", "--from", cal, "--engine-model", args.model, "--output", cal], left, log)
    with open(result_path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {result_path}: {len(result['configs'])} configurations, {len(result['skipped'])} skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
