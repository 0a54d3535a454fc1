"""The analytical model's figures for the eight-GPU runs (issue 12) while no nvidia-h200-x8 is lent.

Every figure is a prediction of `plait plan`'s model on the built-in H200 calibration (`h200_defaults`), which holds
all-reduce curves measured at 2 and 4 GPUs only: 8-GPU collectives are scaled from the 4-GPU ones by the ring model
(latency x (p - 1), bandwidth term x (p - 1) / p). So these are what the model expects, to be checked the day the
runs are made (benchmarks/gpu_*.sh at 8 GPUs), not results.

Runs, as issue 12 lists them: core speed at TP=8 against the floor; Shift (SP=8 <-> TP=8) against TP=8 and DP=8;
Parallel Track with 8 tracks against TP=8 of the dense model; the t_e sweep up to TP=8. The fused all-reduce + RMSNorm
is not in the model (its kernel has no 8-GPU measurement to scale from), so it has no row.

Usage: python benchmarks/predict_x8.py (writes benchmarks/results/predicted_x8.json and .md)
"""

from __future__ import annotations

import argparse
import dataclasses

from plait.bench.floors import decode_floor_s
from plait.bench.results import write_result
from plait.plan.calibration import h200_defaults
from plait.plan.planner import effective_tp, latency_tp
from plait.plan.predict import EngineLimits, predict
from plait.plan.shapes import Layout, load_model_config
from plait.plan.shift import choose_threshold
from plait.plan.workload import Workload

GPUS = 8


def _figures(p) -> dict:
    return {"fits": p.fits, "ttft_ms": 1e3 * p.ttft_s, "tpot_ms": 1e3 * p.tpot_s, "throughput_tok_s": p.throughput,
            "comm_share": p.comm_share, "max_batch_per_replica": p.max_batch}


def core(calib, lim) -> list[dict]:
    """TP=8 decode at batch 1 and 64 against the floor (weights / (8 x HBM) + 2 x layers x one small all-reduce), and
    TTFT of 2k and 8k prompts."""
    rows = []
    for model in ("llama3-70b", "llama3-8b"):
        m = load_model_config(model)
        ar_s = calib.collective_time("all_reduce", m.hidden_size * lim.itemsize, GPUS, graph=True)
        for batch, inp, out in ((1, 128, 256), (64, 512, 192)):
            p = predict(m, Layout(GPUS), batch, inp, out, calib, lim)
            context = batch * (inp + out // 2)  # the mean live KV of a decode step
            floor = decode_floor_s(m, lim.itemsize, context, GPUS, calib.copy_bytes_s) + 2 * m.num_layers * ar_s
            rows.append({"model": model, "run": f"tpot_bs{batch}", "input_len": inp, "output_len": out,
                         **_figures(p), "floor_ms": 1e3 * floor, "over_floor": p.tpot_s / floor})
        for inp in (2048, 8192):
            p = predict(m, Layout(GPUS), 1, inp, 2, calib, dataclasses.replace(lim, max_num_batched_tokens=inp))
            rows.append({"model": model, "run": f"ttft_{inp // 1024}k", "input_len": inp, "output_len": 2, **_figures(p)})
    return rows


def shift(calib, lim) -> list[dict]:
    """Llama-3.1-8B and 70B: TP=8, DP=8, SP=8 and Shift over the same 8 GPUs at low load (one request of 512 / 4k /
    16k tokens, 256 out) and at saturation (the most sequences each layout holds, 1024 in / 256 out)."""
    rows = []
    for model in ("llama3-8b", "llama3-70b"):
        m = load_model_config(model)
        threshold = choose_threshold(m, model, GPUS, 1, calib, lim).threshold
        layouts = {"tp8": Layout(GPUS), "dp8": Layout(1, dp=GPUS), "sp8": Layout(1, sp=GPUS),
                   "shift8": Layout(1, sp=GPUS, shift_threshold=threshold)}
        for name, layout in layouts.items():
            try:
                layout.check(m)
            except ValueError as e:
                rows.append({"model": model, "layout": name, "refused": str(e)})
                continue
            for inp in (512, 4096, 16384):
                p = predict(m, layout, 1, inp, 256, calib, dataclasses.replace(lim, max_num_batched_tokens=max(inp, 8192)))
                rows.append({"model": model, "layout": name, "run": f"low_load_{inp}", "latency_ms": 1e3 * p.latency_s,
                             **_figures(p)})
            cap = predict(m, layout, 1, 1024, 256, calib, lim).max_batch * layout.dp
            p = predict(m, layout, max(cap, 1), 1024, 256, calib, lim)
            rows.append({"model": model, "layout": name, "run": "saturation", "batch": cap, **_figures(p),
                         "shift_threshold": layout.shift_threshold})
    return rows


def tracks(calib, lim) -> list[dict]:
    """8-track PT models of Llama-3.1-8B's size (one track per GPU) against the dense model at TP=8."""
    rows = []
    for model in ["llama3-8b"] + [f"pt-llama3-8b-t8-d{d}" for d in (1, 2, 4, 8)]:
        m = load_model_config(model)
        for run, batch, inp, out in (("bs1", 1, 2048, 128), ("bs64", 64, 1024, 128)):
            p = predict(m, Layout(GPUS), batch, inp, out, calib, lim)
            rows.append({"model": model, "run": run, "batch": batch, "input_len": inp, "output_len": out, **_figures(p)})
    return rows


def te_sweep(calib, lim) -> list[dict]:
    """TP = 1, 2, 4, 8 with the rest as replicas (DP = 8 / TP), each at the most sequences its replicas hold (256 in /
    128 out, as `plait bench tp-sweep` measures): the throughput t_e. Beside it the degree of one replica with the
    lowest latency for one request."""
    rows = []
    for model in ("llama3-8b", "qwen2.5-32b", "llama3-70b"):
        m = load_model_config(model)
        te, preds = effective_tp(m, GPUS, Workload(256, 128), calib, lim)
        rows += [{"model": model, "tp": p.layout.tp, "dp": p.layout.dp, "batch": p.batch, **_figures(p)} for p in preds]
        rows.append({"model": model, "t_e_throughput": te,
                     "t_e_latency": latency_tp(m, GPUS, Workload(256, 128, 1), calib, lim)[0]})
    return rows


def markdown(r: dict) -> str:
    """The predictions as tables, for docs: every figure a prediction (the header says so)."""
    ms = lambda v: f"{v:.1f}" if v < 100 else f"{v:.0f}"  # noqa: E731
    out = [f"# Eight H200s: what the model predicts (not measured)\n\nWritten by `python benchmarks/predict_x8.py` "
           f"from {r['calibration']}; 8-GPU collectives scaled from 4-GPU measurements by the ring model. "
           f"max_num_batched_tokens {r['limits']['max_num_batched_tokens']}, max_num_seqs {r['limits']['max_num_seqs']}.\n",
           "## Core speed at TP=8\n", "| model | run | TTFT ms | TPOT ms | floor ms | TPOT / floor | comm share |", "|---|---|---|---|---|---|---|"]
    for x in r["core_tp8"]:
        floor = (ms(x["floor_ms"]), f"{x['over_floor']:.2f}x") if "floor_ms" in x else ("", "")
        out.append(f"| {x['model']} | {x['run']} | {ms(x['ttft_ms'])} | {ms(x['tpot_ms'])} | {floor[0]} | {floor[1]} | "
                   f"{100 * x['comm_share']:.0f}% |")
    out += ["\n## Shift (SP=8 <-> TP=8) against TP=8, DP=8, SP=8\n",
            "| model | layout | run | TTFT ms | TPOT ms | request ms | output tok/s |", "|---|---|---|---|---|---|---|"]
    for x in r["shift"]:
        if "refused" in x or not x["fits"]:
            out.append(f"| {x['model']} | {x['layout']} | {x.get('run', '')} | does not fit | | | |")
            continue
        request = ms(x["latency_ms"]) if "latency_ms" in x else f"batch {x['batch']}"
        out.append(f"| {x['model']} | {x['layout']} | {x['run']} | {ms(x['ttft_ms'])} | {ms(x['tpot_ms'])} | {request} | "
                   f"{x['throughput_tok_s']:.0f} |")
    out += ["\n## Parallel Track, 8 tracks on 8 GPUs, against dense TP=8 (Llama-3.1-8B size)\n",
            "| model | run | TTFT ms | TPOT ms | output tok/s | comm share |", "|---|---|---|---|---|---|"]
    for x in r["parallel_track"]:
        out.append(f"| {x['model']} | {x['run']} | {ms(x['ttft_ms'])} | {ms(x['tpot_ms'])} | {x['throughput_tok_s']:.0f} | "
                   f"{100 * x['comm_share']:.0f}% |")
    out += ["\n## t_e over 8 GPUs (TP x replicas = 8, each at its most sequences, 256 in / 128 out)\n",
            "| model | TP=1 | TP=2 | TP=4 | TP=8 | t_e (throughput) | t_e (latency, one request) |", "|---|---|---|---|---|---|---|"]
    for model in dict.fromkeys(x["model"] for x in r["te_sweep"]):
        rows = [x for x in r["te_sweep"] if x["model"] == model]
        tok = {x["tp"]: (f"{x['throughput_tok_s']:.0f}" if x["fits"] else "does not fit") for x in rows if "tp" in x}
        te = rows[-1]
        cells = " | ".join(tok.get(tp, "does not fit") for tp in (1, 2, 4, 8))
        out.append(f"| {model} | {cells} | {te['t_e_throughput']} | {te['t_e_latency']} |")
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-json", default="benchmarks/results/predicted_x8.json")
    parser.add_argument("--markdown", default="benchmarks/results/predicted_x8.md")
    args = parser.parse_args()
    calib = h200_defaults()
    lim = EngineLimits(max_num_batched_tokens=8192, max_num_seqs=256)
    result = {"benchmark": "predicted_x8", "gpus": GPUS, "calibration": calib.source, "notes": calib.notes,
              "limits": dataclasses.asdict(lim), "core_tp8": core(calib, lim), "shift": shift(calib, lim),
              "parallel_track": tracks(calib, lim), "te_sweep": te_sweep(calib, lim)}
    write_result(result, args.output_json)
    text = markdown(result)
    with open(args.markdown, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
