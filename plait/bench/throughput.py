"""`plait bench throughput` and `plait bench tp-sweep`: output tokens per second at saturation.

throughput (vLLM's benchmark_throughput): every request is added at once and run to completion; the figure is
output tokens over wall time, after one short warm-up run that compiles and tunes the kernels.

tp-sweep: throughput at each TP degree over a fixed number of GPUs, the rest of them as data-parallel replicas
(replicas = GPUs / TP). Tensor parallelism pays less per GPU as it grows (communication, and host work that does
not shrink), while a replica of fewer GPUs has less room for KV cache: the degree with the most throughput is t_e
(Albireo), the point past which one bigger replica loses to more replicas. Run it with and without the step
loop's overlap features (--async-scheduling, --async-output-proc, --sampling-parallel) to see whether t_e moves.
Beside each measured figure it records what `plait plan` predicts for the same degrees, lengths and engine limits
(on the --calibration file, else the built-in H200 figures), so that predicted and measured t_e compare directly.
"""

from __future__ import annotations

import argparse
import cProfile
import contextlib
import pathlib
import pstats
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from plait.bench import gpu_timeline
from plait.bench.results import write_result
from plait.config import EngineConfig
from plait.engine.data_parallel import DataParallelEngine, make_engine
from plait.engine.engine import LLMEngine
from plait.plan.calibration import Calibration, h200_defaults
from plait.plan.planner import effective_tp
from plait.plan.predict import EngineLimits, Prediction
from plait.plan.workload import Workload
from plait.sampling_params import RequestOutputKind, SamplingParams

_ROOT = str(pathlib.Path(__file__).resolve().parents[2]) + "/"


def add_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--output-json", default=None, help="write the result here (default: print only)")
    parser.add_argument("--profile-host", action="store_true",
                        help="run the measured part under cProfile: the step loop's Python functions by own time per "
                             "step go in the result (the measured throughput is then lower: profiling slows Python)")


def add_sweep_args(parser: argparse.ArgumentParser) -> None:
    add_args(parser)
    parser.add_argument("--gpus", type=int, default=4, help="the GPU budget: every point uses all of them")
    parser.add_argument("--tp-sizes", default="1,2,4", help="TP degrees, comma-separated; each must divide --gpus")


def run(engine, num_prompts: int, input_len: int, output_len: int, seed: int = 0) -> dict:
    """Add every request, step until all are done; random prompt ids, greedy, no early stop."""
    g = torch.Generator().manual_seed(seed)
    vocab = engine.model_config.vocab_size
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True,
                            output_kind=RequestOutputKind.FINAL_ONLY)
    start = time.perf_counter()
    for _ in range(num_prompts):
        engine.add_request(torch.randint(0, vocab, (input_len,), generator=g).tolist(), params)
    produced = steps = 0
    while engine.has_unfinished_requests():
        produced += sum(len(out.outputs[0].token_ids) for out in engine.step() if out.finished)
        steps += 1
    elapsed = time.perf_counter() - start
    return {"elapsed_s": elapsed, "steps": steps, "requests": num_prompts, "output_tokens": produced,
            "output_tok_s": produced / elapsed, "total_tok_s": (produced + num_prompts * input_len) / elapsed}


@contextlib.contextmanager
def warm_engine(cfg: EngineConfig, args) -> Iterator[LLMEngine | DataParallelEngine]:
    """The engine of one configuration after a short run on every replica (compiles and tunes the kernels); shut down
    on the way out."""
    engine = make_engine(cfg.replace(max_model_len=cfg.max_model_len or args.input_len + args.output_len + 16))
    try:
        run(engine, 2 * cfg.data_parallel_size, args.input_len, 4, seed=1)
        yield engine
    finally:
        engine.shutdown()


def measure(engine: LLMEngine | DataParallelEngine, args) -> dict:
    """One configuration's run on its warm engine, with the GPU's busy share and the host profile where asked."""
    cfg = engine.cfg
    profile = cProfile.Profile() if args.profile_host else None
    with gpu_timeline.recorded(engine, cfg.resolved_device()) as timeline, profile or contextlib.nullcontext():
        figures = run(engine, args.num_prompts, args.input_len, args.output_len)
    if timeline:  # how much of the run the GPU was busy: the rest it waited for the host
        figures["gpu_timeline"] = timeline
        figures["gpu_busy_fraction"] = [gpu_timeline.busy_fraction(t, figures["elapsed_s"]) for t in timeline]
    if profile is not None:
        figures["host_profile"] = host_profile(profile, figures["steps"])
    return {"tensor_parallel_size": cfg.tensor_parallel_size, "data_parallel_size": cfg.data_parallel_size, **figures}


def host_profile(profile: cProfile.Profile, steps: int, top: int = 30) -> list[dict]:
    """The functions with the most own time, in microseconds per engine step (own and with callees)."""
    stats = pstats.Stats(profile).stats
    rows = sorted(stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    return [{"function": f"{path.removeprefix(_ROOT)}:{line}({name})", "calls": calls,
             "own_us_per_step": round(1e6 * own / steps, 1), "cum_us_per_step": round(1e6 * cum / steps, 1)}
            for (path, line, name), (_, calls, own, cum, _) in rows]


def _setup(cfg: EngineConfig, args) -> dict:
    return {"model": cfg.model, "dtype": cfg.dtype, "num_prompts": args.num_prompts, "input_len": args.input_len,
            "output_len": args.output_len, "async_scheduling": cfg.resolved_async_scheduling(),
            "async_output_proc": cfg.async_output_proc, "sampling_parallel": cfg.sampling_parallel}


def main(args: argparse.Namespace, cfg: EngineConfig) -> dict:
    with warm_engine(cfg, args) as engine:
        result = {"benchmark": "throughput", **_setup(cfg, args), **measure(engine, args)}
    busy = result.get("gpu_busy_fraction")
    print(f"{cfg.model} tp={cfg.tensor_parallel_size} dp={cfg.data_parallel_size}: {result['output_tok_s']:.1f} "
          f"output tok/s ({result['output_tokens']} tokens in {result['elapsed_s']:.2f} s)"
          + (f"; GPU busy {100 * busy[0]:.0f}% of it (rank 0)" if busy else ""))
    for row in result.get("host_profile", [])[:12]:
        print(f"  {row['own_us_per_step']:8.1f} us own {row['cum_us_per_step']:8.1f} us cum per step  {row['function']}")
    write_result(result, args.output_json)
    return result


@dataclass(frozen=True)
class Predicted:
    """What `plait plan` predicts the sweep finds (`planner.effective_tp` over the same degrees)."""

    figures: str  # where the figures come from: the calibration the engine config names, or the built-in H200 ones
    t_e: int | None
    by_tp: dict[int, Prediction]  # each degree at saturation; a degree that does not fit is missing

    @classmethod
    def of(cls, engine: LLMEngine | DataParallelEngine, args, sizes: list[int]) -> "Predicted":
        """From the engine's config and the limits it resolved at start-up (step budget, element size)."""
        cfg = engine.cfg
        calib = Calibration.load(cfg.calibration) if cfg.calibration else h200_defaults()
        lim = EngineLimits.of(cfg, engine.sched_config.max_num_batched_tokens, engine.itemsize)
        te, preds = effective_tp(engine.model_config, args.gpus, Workload(args.input_len, args.output_len), calib,
                                 lim, sizes)
        return cls(calib.source, te, {p.layout.tp: p for p in preds})


def sweep(args: argparse.Namespace, cfg: EngineConfig) -> dict:
    sizes = [int(t) for t in args.tp_sizes.split(",")]
    bad = [t for t in sizes if t < 1 or args.gpus % t]
    if bad:
        raise ValueError(f"TP degrees {bad} do not divide --gpus {args.gpus}: give divisors of it in --tp-sizes")
    points, prediction = [], None
    for tp in sizes:
        with warm_engine(cfg.replace(tensor_parallel_size=tp, data_parallel_size=args.gpus // tp), args) as engine:
            prediction = prediction or Predicted.of(engine, args, sizes)
            point = measure(engine, args)
        guess = prediction.by_tp.get(tp)
        point["output_tok_s_per_gpu"] = point["output_tok_s"] / args.gpus
        point["predicted_output_tok_s"] = guess.throughput if guess else None
        point["predicted_batch"] = guess.batch if guess else None
        points.append(point)
        print(f"  tp={tp} x dp={args.gpus // tp}: {point['output_tok_s']:10.1f} output tok/s, predicted "
              + (f"{guess.throughput:10.1f} at batch {guess.batch}" if guess else "none (does not fit)"))
    best = max(points, key=lambda p: p["output_tok_s"])
    result = {"benchmark": "tp_sweep", **_setup(cfg, args), "gpus": args.gpus, "points": points,
              "t_e": best["tensor_parallel_size"], "predicted_t_e": prediction.t_e,
              "prediction_figures": prediction.figures}
    print(f"t_e = {result['t_e']} measured, {prediction.t_e} predicted (the TP degree of the most throughput over "
          f"{args.gpus} GPUs; predicted from {prediction.figures})")
    write_result(result, args.output_json)
    return result
