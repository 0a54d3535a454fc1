"""How a plan is shown: the ranked table, t_e, the collectives of a step, JSON, and the latency-throughput plot."""

from __future__ import annotations

import dataclasses
from collections import Counter

from plait.plan.collectives import Collective
from plait.plan.planner import Choice
from plait.plan.predict import Prediction


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def describe_collectives(colls: list[Collective]) -> str:
    """'61 x all_reduce 1.2 KB, 1 x all_gather 98.3 KB': one rank's collectives of one step, by op and size."""
    counts = Counter((c.op, c.bytes) for c in colls)
    return ", ".join(f"{n} x {op} {_size(b)}" for (op, b), n in sorted(counts.items())) or "none"


def table(choices: list[Choice], goal: str) -> str:
    """One line per choice; tok/s is what it serves (of the request rate, when there is one)."""
    head = (f"{'#':>2s} {'config':11s} {'batch':>5s} {'TTFT ms':>9s} {'TPOT ms':>8s} {'latency ms':>10s} {'tok/s':>9s} "
            f"{'comm %':>6s} {'GiB/GPU':>7s} {'ok':>3s}  why")
    lines = [head]
    for i, c in enumerate(choices, 1):
        p = c.prediction
        lines.append(f"{i:2d} {p.layout.name:11s} {p.batch:5d} {p.ttft_s * 1e3:9.2f} {p.tpot_s * 1e3:8.3f} "
                     f"{p.latency_s * 1e3:10.1f} {c.served:9.0f} {100 * p.comm_share:6.1f} "
                     f"{(p.memory.weights + p.memory.activations) / 2**30:7.1f} {'yes' if c.ok else 'no':>3s}  {c.why}")
    return "\n".join(lines)


def te_lines(te: int | None, preds: list[Prediction], lat_tp: int | None, lat_preds: list[Prediction]) -> str:
    """t_e with each degree's throughput per GPU, then the lowest-latency degree of one replica."""
    if te is None:
        out = "t_e: no tensor-parallel degree of these GPUs holds the model"
    else:
        gpus = preds[0].layout.world
        parts = [f"{p.layout.name} {p.throughput / gpus:.0f} tok/s per GPU at batch {p.batch}" for p in preds]
        out = f"t_e = {te} (most throughput over {gpus} GPUs, replicas = GPUs / TP): " + "; ".join(parts)
    if lat_tp is None:
        return out + "\nlowest request latency at this concurrency: no TP degree of one replica holds it"
    base, base_tp = lat_preds[0].latency_s, lat_preds[0].layout.tp
    parts = [f"TP{p.layout.tp} {p.latency_s * 1e3:.1f} ms ({base / p.latency_s:.2f}x, "
             f"{100 * base / p.latency_s * base_tp / p.layout.tp:.0f}% per GPU)" for p in lat_preds]
    return out + (f"\nlowest request latency at this concurrency: TP{lat_tp} (one replica; speedup and per-GPU "
                  f"efficiency vs TP{base_tp}): " + "; ".join(parts))


def to_json(choices: list[Choice], te: int | None, preds: list[Prediction], lat_tp: int | None,
            lat_preds: list[Prediction], meta: dict) -> dict:
    def pred(p: Prediction) -> dict:
        return {
            "config": p.layout.name, "layout": dataclasses.asdict(p.layout), "batch": p.batch, "fits": p.fits,
            "ttft_ms": p.ttft_s * 1e3, "tpot_ms": p.tpot_s * 1e3, "latency_ms": p.latency_s * 1e3,
            "throughput_tok_s": p.throughput, "comm_share": p.comm_share, "max_batch_per_replica": p.max_batch,
            "memory_gib": {"weights": p.memory.weights / 2**30, "activations": p.memory.activations / 2**30,
                           "kv_cache": p.memory.kv_cache / 2**30},
            "phases": {k: dataclasses.asdict(v) | {"share": v.share} for k, v in p.phases.items()},
            "first_step_collectives_rank0": describe_collectives(p.first_step_collectives),
            "last_step_collectives_rank0": describe_collectives(p.last_step_collectives),
        }

    ranked = [pred(c.prediction) | {"ok": c.ok, "why": c.why, "served_tok_s": c.served} for c in choices]
    return meta | {"ranked": ranked,
                   "t_e": te, "tp_sweep": [pred(p) for p in preds],
                   "latency_tp": lat_tp, "latency_tp_sweep": [pred(p) for p in lat_preds]}


def plot(curves: dict[str, list[Prediction]], path: str, slo_tpot_ms: float | None) -> None:
    """TPOT against output throughput, one line per configuration, batch sizes as points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, preds in curves.items():
        ax.plot([p.throughput for p in preds], [p.tpot_s * 1e3 for p in preds], marker="o", label=name)
    if slo_tpot_ms is not None:
        ax.axhline(slo_tpot_ms, color="grey", linestyle="--", label="TPOT SLO")
    ax.set_xlabel("output throughput (tokens/s, all GPUs)")
    ax.set_ylabel("TPOT (ms)")
    ax.set_title("predicted latency vs throughput (points: batch 1, 2, 4, ...)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
