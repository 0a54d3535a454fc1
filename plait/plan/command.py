"""`plait plan MODEL --gpus N ...`: the arguments, and the run that prints (and optionally saves) the plan."""

from __future__ import annotations

import argparse
import json

from tqdm.auto import tqdm

from plait.models.loader import resolve_model
from plait.plan.calibration import Calibration, h200_defaults
from plait.plan.planner import GOALS, Slo, candidates, effective_tp, latency_tp, plan
from plait.plan.predict import EngineLimits, predict
from plait.plan.report import describe_collectives, plot, table, te_lines, to_json
from plait.plan.shapes import load_model_config
from plait.plan.shift import choose_threshold
from plait.plan.workload import Workload, workload_from_trace

_ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}


def add_args(parser: argparse.ArgumentParser) -> None:
    d = EngineLimits()
    parser.add_argument("model", nargs="?", metavar="MODEL", help="checkpoint folder, .gguf or preset (default: embedded SmolLM2)")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs to lay the model over")
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=None, help="concurrent sequences (default 1; or from --request-rate)")
    parser.add_argument("--request-rate", type=float, default=None, help="requests per second (concurrency by Little's law)")
    parser.add_argument("--workload", default=None,
                        help="a trace.jsonl (timestamp, input_len, output_len): lengths and rate from it")
    parser.add_argument("--slo-ttft", type=float, default=None, metavar="MS")
    parser.add_argument("--slo-tpot", type=float, default=None, metavar="MS")
    parser.add_argument("--goal", choices=GOALS, default=None, help="default: slo when an SLO is given, else latency")
    parser.add_argument("--calibration", default=None, help="a `plait calibrate` file (default: built-in H200 figures)")
    parser.add_argument("--dtype", choices=sorted(_ITEMSIZE), default="bfloat16")
    parser.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
    parser.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    parser.add_argument("--gpu-memory-utilization", type=float, default=d.gpu_memory_utilization)
    parser.add_argument("--max-prefill-graph-tokens", type=int, default=d.max_prefill_graph_tokens,
                        help="the engine's setting: a new prompt alone in its step up to this long prefills from a graph")
    parser.add_argument("--enforce-eager", action="store_true", help="predict without CUDA graphs")
    parser.add_argument("--plot", default=None, metavar="PNG", help="draw predicted TPOT vs throughput per configuration")
    parser.add_argument("--output-json", default=None)


def _workload(args: argparse.Namespace) -> Workload:
    if args.workload:
        w = workload_from_trace(args.workload)
        return Workload(w.input_len, w.output_len, args.batch_size, args.request_rate or w.request_rate)
    return Workload(args.input_len, args.output_len, args.batch_size, args.request_rate)


def main(args: argparse.Namespace) -> int:
    calib = Calibration.load(args.calibration) if args.calibration else h200_defaults()
    m = load_model_config(args.model)
    name = resolve_model(args.model).name
    w = _workload(args)
    slo = Slo(args.slo_ttft / 1e3 if args.slo_ttft else None, args.slo_tpot / 1e3 if args.slo_tpot else None)
    goal = args.goal or ("slo" if slo.ttft_s or slo.tpot_s else "latency")
    lim = EngineLimits(args.max_num_batched_tokens, args.max_num_seqs, _ITEMSIZE[args.dtype], args.enforce_eager,
                       args.gpu_memory_utilization, max_prefill_graph_tokens=args.max_prefill_graph_tokens)
    options = candidates(m, args.gpus, calib, lim, name)
    if not options:
        raise ValueError(f"no TP x PP x DP or SP x TP x DP layout of {args.gpus} GPUs fits this model's "
                         f"{m.num_heads} heads and {m.num_layers} layers")
    with tqdm(total=len(options), desc="Predicting configurations", leave=False) as bar:
        choices = plan(m, args.gpus, w, goal, slo, calib, lim, bar, name)
    te, sweep = effective_tp(m, args.gpus, w, calib, lim)
    lat_tp, lat_sweep = latency_tp(m, args.gpus, w, calib, lim)
    concurrency = f"rate {w.request_rate:g} req/s" if w.request_rate else f"batch {w.batch or 1}"
    print(f"plan for {args.model or 'SmolLM2-135M-Instruct'} on {args.gpus} GPUs: in {w.input_len}, out {w.output_len}, "
          f"{concurrency}, goal {goal}, {args.dtype}")
    print(f"figures: {calib.source}" + "".join(f"\n  note: {n}" for n in calib.notes))
    print(table(choices, goal))
    print(te_lines(te, sweep, lat_tp, lat_sweep))
    for layout in (c.prediction.layout for c in choices if c.prediction.layout.shift_threshold is not None):
        print(f"{layout.name}: " + choose_threshold(m, name, layout.sp, layout.tp, calib, lim).message(layout))
    best = choices[0].prediction
    print(f"best ({best.layout.name}), rank 0 collectives: first step {describe_collectives(best.first_step_collectives)}; "
          f"last step {describe_collectives(best.last_step_collectives)}")
    if args.plot:
        curves = {}
        for c in choices:
            if c.prediction.max_batch < 1:
                continue
            cap = c.prediction.max_batch * c.prediction.layout.dp
            sizes = [1 << i for i in range(cap.bit_length()) if 1 << i <= cap]
            curves[c.prediction.layout.name] = [predict(m, c.prediction.layout, b, w.input_len, w.output_len, calib, lim)
                                                for b in sizes]
        plot(curves, args.plot, args.slo_tpot)
        print(f"plot: {args.plot}")
    if args.output_json:
        meta = {"model": args.model, "gpus": args.gpus, "goal": goal, "calibration": calib.source,
                "workload": {"input_len": w.input_len, "output_len": w.output_len, "batch": w.batch,
                             "request_rate": w.request_rate}}
        with open(args.output_json, "w") as f:
            json.dump(to_json(choices, te, sweep, lat_tp, lat_sweep, meta), f, indent=1)
    return 0
