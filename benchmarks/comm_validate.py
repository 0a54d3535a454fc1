"""Issue 6's validation grid, measured in one device call: calibration, then every parallel configuration over a grid
of batch sizes and prompt lengths, timed as the engine runs (decode graphs) and profiled (every collective).

It only measures: predictions and error tables are made afterwards, on any machine, by benchmarks/comm_report.py
from the JSON written here (so the model can improve without spending GPU time again).

    python benchmarks/comm_validate.py --out-dir OUT          # GPU: Llama-3.1-8B shape, dummy weights, bf16, 4 GPUs
    python benchmarks/comm_validate.py --out-dir /tmp/v --device cpu --model tiny-folder --configs tp1,tp2,pp2 \
        --batches 1,2 --input-lens 16,32 --output-len 4 --budget-s 300     # the same machinery on CPU

Time. Starting an engine (spawn, NCCL, model, decode graphs) costs about 30 s on the H200s (tp1 took 62 s for 32 s of
points), more than most of its points, so every configuration gets one engine (one more when profiled) and the points
are made to fit around them: a point's prompt tokens are capped (--max-prompt-tokens; the first H200 run spent 22 of
its 32 s of tp1 points on batch 64 x 8192), each job (a configuration, timed or profiled) gets a fair share of the
time left, and runs its points cheapest first, so a job cut short loses its largest points, not whole configurations.
Jobs run as subprocesses in their own process group, killed whole at their deadline (the first run's calibration,
killed at its timeout, left its four ranks hung on the GPUs for two more minutes, while tp1 and tp2 were timed).
Points arrive one JSON line at a time and are merged into OUT/comm_validation.json at once, so `--resume` (same OUT)
measures exactly the points still missing.

What is timed. Each point runs twice on the same engine and only the second run counts: the first pays whatever is
done once per shape (Triton compiling the paged-prefill kernel at the first step that mixes decodes with a prompt
chunk, which the old 16-token warm-up never reached; kernels loaded for new GEMM shapes). On the first H200 run tp1
batch 8 x 2048 measured TTFT 1170 ms and TPOT 76 ms against 300 ms and 19 ms at TP=2, run later with Triton's cache
warm: replaying its schedule, the second step (4 decodes + 8188 prompt tokens, about 0.2 s) took about 1 s, and that
one step is in both figures. tp1's first point (TTFT 773 ms at 128 tokens) was likewise cold. The untimed run's
figures are kept as `cold_*` to show the size of that effect. TTFT and TPOT are vLLM's (`comm_profile.BatchTimes`):
TPOT is per request, (last token - first token) / (output_len - 1), so the prefill chunks of later requests that
share a step with a request's decodes count in its TPOT, as they do for vLLM's users; the model replays the same
schedule and counts them too.

Pipeline stages run eager anyway and TP=1 has no collectives, so by default only tp2, tp4 and tp2pp2 are profiled.
With time left at the end, the engine's overheads are fitted into the calibration (`plait calibrate --engine-model`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

CONFIGS = {"tp1": (1, 1), "tp2": (2, 1), "tp4": (4, 1), "pp2": (1, 2), "pp4": (1, 4), "tp2pp2": (2, 2),
           "tp8": (8, 1), "pp8": (1, 8), "tp4pp2": (4, 2)}  # the last three on 8 GPUs (benchmarks/gpu_x8.sh)
MIN_JOB_S = 45.0  # an engine start and a few points: a job given less is not started
SHUTDOWN_S = 10.0  # a job stops starting points this long before its deadline, to shut its engine down


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", required=True)
    p.add_argument("--model", default="llama3-8b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--configs", default="tp1,tp2,tp4,pp2,pp4,tp2pp2")
    p.add_argument("--profile-configs", default="tp2,tp4,tp2pp2", help="configurations also run profiled (eager)")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--input-lens", default="128,2048,8192")
    p.add_argument("--max-prompt-tokens", type=int, default=65536, help="leave out points of more prompt tokens")
    p.add_argument("--profile-max-input", type=int, default=2048, help="profile (eager) only prompts up to this length")
    p.add_argument("--output-len", type=int, default=8)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--async-scheduling", choices=("auto", "on", "off"), default="auto",
                   help="the engine's scheduling (auto: its default, asynchronous on GPU); a grid of each mode lets "
                        "`plait calibrate --fit-from` tell host time from GPU time")
    p.add_argument("--budget-s", type=float, default=540.0, help="stop starting new work after this many seconds")
    p.add_argument("--calibration-s", type=float, default=90.0, help="time for `plait calibrate` (it keeps what it "
                                                                      "measured by then)")
    p.add_argument("--skip-calibration", action="store_true")
    p.add_argument("--resume", action="store_true", help="keep what OUT/comm_validation.json has; measure the rest")
    # internal: run one job (a configuration, timed or --profiled) on these points for at most --job-s seconds
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    p.add_argument("--profiled", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--points", default="", help=argparse.SUPPRESS)
    p.add_argument("--job-s", type=float, default=0.0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


@dataclass(frozen=True)
class Job:
    """One engine's worth of work: a configuration timed with decode graphs, or profiled (eager)."""

    config: str
    profiled: bool

    @property
    def key(self) -> str:  # where its points go in the configuration's results
        return "profiled" if self.profiled else "points"

    @property
    def label(self) -> str:
        return f"{self.config} profiled" if self.profiled else self.config


def grid(args: argparse.Namespace, profiled: bool) -> list[tuple[int, int]]:
    """A job's (batch, input_len) points, cheapest (fewest prompt tokens) first."""
    pts = [(b, n) for b in _ints(args.batches) for n in _ints(args.input_lens)
           if b * n <= args.max_prompt_tokens and (not profiled or n <= args.profile_max_input)]
    return sorted(pts, key=lambda p: (p[0] * p[1], p[1]))


def jobs(args: argparse.Namespace) -> list[Job]:
    """Every configuration timed first (what the accuracy and planner tables need), then the profiled runs."""
    names = args.configs.split(",")
    return [Job(n, False) for n in names] + [Job(n, True) for n in names if n in args.profile_configs.split(",")]


def engine_config(name: str, args: argparse.Namespace):
    """The same engine for every job and every resumed run of a configuration: sized by the whole grid."""
    from plait.config import EngineConfig

    tp, pp = CONFIGS[name]
    full = grid(args, False)
    dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    return EngineConfig(model=args.model, load_format="dummy", device=args.device, dtype=dtype, tensor_parallel_size=tp,
                        pipeline_parallel_size=pp, max_model_len=max(n for _, n in full) + args.output_len + 16,
                        max_num_seqs=max(b for b, _ in full), max_num_batched_tokens=args.max_num_batched_tokens,
                        async_scheduling={"auto": None, "on": True, "off": False}[args.async_scheduling],
                        # the model prices all-reduce then norm (not the fused op), and every prompt computed (points
                        # of one seed share their leading tokens, which the prefix cache would skip)
                        fused_allreduce_norm="off", enable_prefix_caching=False)


def profile_point(engine, tp: int, pp: int, batch: int, input_len: int, output_len: int) -> dict:
    """The profiled run's collectives: per op per rank, per phase, and whether each step matched the model."""
    from plait.comm.trace import collect
    from plait.plan.check import check_collectives, check_schedule
    from plait.plan.collectives import Sampling
    from plait.plan.shapes import Layout
    from plait.plan.workload import fixed_batch_steps

    trace = collect(engine)
    itemsize = engine.cfg.torch_dtype().itemsize
    compared, bad = check_collectives(trace, engine.model_config, Layout(tp, pp), itemsize, Sampling.of(engine.cfg))
    mb = fixed_batch_steps(batch, input_len, output_len, engine.sched_config.max_num_batched_tokens,
                           engine.sched_config.max_num_seqs, pp)
    missing, extra = check_schedule(trace, mb)
    ops: dict[str, dict[str, float]] = {}
    for rt in trace.ranks:  # per op, per rank (mean over ranks), the whole run
        for r in rt.records:
            o = ops.setdefault(r.op, {"n": 0.0, "bytes": 0.0, "s": 0.0})
            o["n"], o["bytes"], o["s"] = o["n"] + 1, o["bytes"] + r.bytes, o["s"] + r.duration_s
    ops = {k: {f: v / len(trace.ranks) for f, v in o.items()} for k, o in ops.items()}
    return {"ops": ops, "phases": trace.phase_table(), "exact_steps": compared - len(bad), "steps_compared": compared,
            "schedule_exact": not missing and not extra, "steps": [dataclasses.asdict(s) for s in trace.summary()]}


def measure_job(job: Job, points: list[tuple[int, int]], args: argparse.Namespace) -> Iterator[dict]:
    """Yields {"engine": ...} once the engine is up, then {"point": ...} per point, until the points are done or the
    next one (estimated from the last, by prompt tokens) would not end before the job's time is up."""
    from plait.bench.comm_profile import run_batch
    from plait.comm.trace import collect
    from plait.engine.engine import LLMEngine
    from plait.plan.predict import EngineLimits

    stop_at = time.monotonic() + args.job_s - SHUTDOWN_S
    tp, pp = CONFIGS[job.config]
    started = time.monotonic()
    engine = LLMEngine(engine_config(job.config, args).replace(profile_comm=job.profiled))
    try:
        print(f"{job.label}: engine up in {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
        # the features of this code's engine that no EngineConfig field names: the report prices it with them
        yield {"engine": dataclasses.asdict(engine.cfg), "features": EngineLimits().features()}
        last: tuple[int, float] | None = None  # (prompt tokens, seconds) of the last point, both runs
        for b, n in points:
            if last and time.monotonic() + last[1] * max(1.0, b * n / last[0]) > stop_at:
                print(f"{job.label}: out of time before bs={b} in={n}", file=sys.stderr, flush=True)
                return
            start = time.perf_counter()
            cold = run_batch(engine, b, n, args.output_len, seed=1)  # untimed: compiles and tunes for these shapes
            if job.profiled:
                collect(engine)  # drop its records
            t = run_batch(engine, b, n, args.output_len)
            last = (b * n, time.perf_counter() - start)
            point = {"batch": b, "input_len": n, "output_len": args.output_len, "ttft_ms": t.ttft_s * 1e3,
                     "tpot_ms": t.tpot_s * 1e3, "total_ms": t.total_s * 1e3, "cold_ttft_ms": cold.ttft_s * 1e3,
                     "cold_tpot_ms": cold.tpot_s * 1e3, "wall_s": last[1]}
            if job.profiled:
                point |= profile_point(engine, tp, pp, b, n, args.output_len)
            print(f"{job.label:15s} bs={b:3d} in={n:5d}: TTFT {point['ttft_ms']:9.2f} ms "
                  f"TPOT {point['tpot_ms']:8.3f} ms (untimed run {point['cold_ttft_ms']:9.2f} / "
                  f"{point['cold_tpot_ms']:8.3f}), {last[1]:.1f} s",
                  file=sys.stderr, flush=True)
            yield {"point": point}
    finally:
        engine.shutdown()


def stream(cmd: list[str], seconds: float, log) -> Iterator[str]:
    """`cmd`'s stdout lines as they come (stderr to `log`). At `seconds`, or when the caller stops reading, its whole
    process group is killed: engine workers and calibration ranks go with it instead of holding the GPUs."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + seconds
    try:
        while (line := lines.get(timeout=max(deadline - time.monotonic(), 0.01))) is not None:
            yield line
    except queue.Empty:
        print(f"timed out after {seconds:.0f} s: {' '.join(cmd)}", file=log, flush=True)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:  # the group is gone already
            pass
        proc.wait()


def _save(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def run_jobs(args: argparse.Namespace, argv: list[str], result: dict, deadline: float, result_path: str, log) -> None:
    """Each job with points still missing, in turn, with a fair share of the time left (what one leaves passes
    on); points are merged and saved as they arrive. `argv`: this run's arguments, passed on to each job."""
    todo = []
    for job in jobs(args):
        have = result["configs"].get(job.config, {}).get(job.key, [])
        done = {(p["batch"], p["input_len"]) for p in have}
        missing = [p for p in grid(args, job.profiled) if p not in done]
        if missing:
            todo.append((job, missing))
    for i, (job, points) in enumerate(todo):
        left = deadline - time.monotonic()
        if left < MIN_JOB_S:
            break
        seconds = max(left / (len(todo) - i), MIN_JOB_S)
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--one", job.config, "--job-s", f"{seconds:.0f}",
               "--points", ",".join(f"{b}:{n}" for b, n in points), *(["--profiled"] if job.profiled else [])]
        for line in stream(cmd, seconds + 5, log):
            if not line.startswith("{"):  # something else printed to stdout: keep it in the log
                print(line, end="", file=log, flush=True)
                continue
            msg = json.loads(line)
            if "engine" in msg:
                tp, pp = CONFIGS[job.config]
                cfg = result["configs"].setdefault(job.config, {"config": job.config, "tp": tp, "pp": pp, "points": [],
                                                                "profiled": []})
                cfg["engine"], cfg["features"] = msg["engine"], msg["features"]
            else:
                cfg[job.key].append(msg["point"])
                _save(result, result_path)


def not_measured(args: argparse.Namespace, result: dict) -> list[dict]:
    """The grid points each job still lacks, for the report."""
    out = []
    for job in jobs(args):
        done = {(p["batch"], p["input_len"]) for p in result["configs"].get(job.config, {}).get(job.key, [])}
        missing = [f"bs{b}x{n}" for b, n in grid(args, job.profiled) if (b, n) not in done]
        if missing:
            out.append({"config": job.label, "why": f"{' '.join(missing)} not measured (run again with --resume; see "
                                                    f"comm_validation.log)"})
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.one:
        job = Job(args.one, args.profiled)
        points = [tuple(int(x) for x in p.split(":")) for p in args.points.split(",") if p]
        for msg in measure_job(job, points, args):
            print(json.dumps(msg), flush=True)
        return 0
    from plait.bench.results import provenance

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # `timeout` stops us: unwind, so each job's group is killed
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
            seconds = min(args.calibration_s, deadline - time.monotonic())
            for line in stream([*plait, "calibrate", "--device", args.device, "--iters", "20", "--timeout",
                                f"{seconds:.0f}", "--output", cal], seconds + 20, log):
                print(line, end="", file=log, flush=True)
        result["calibration"] = "calibration.json" if os.path.exists(cal) else None
        run_jobs(args, list(argv if argv is not None else sys.argv[1:]), result, deadline, result_path, log)
        left = deadline - time.monotonic()
        if result["calibration"] and args.device == "cuda" and left > 150:
            for line in stream([*plait, "calibrate", "--from", cal, "--engine-model", args.model, "--output", cal],
                               left, log):
                print(line, end="", file=log, flush=True)
    result["skipped"] = not_measured(args, result)
    _save(result, result_path)
    counts = [sum(len(c[k]) for c in result["configs"].values()) for k in ("points", "profiled")]
    print(f"wrote {result_path}: {counts[0]} timed points, {counts[1]} profiled, {len(result['skipped'])} jobs short")
    return 0


if __name__ == "__main__":
    sys.exit(main())
