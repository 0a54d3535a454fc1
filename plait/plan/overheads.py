"""The engine's own overheads, fitted from timed runs of the engine (`plait calibrate --engine-model MODEL`).

Microbenchmarks price GEMMs and collectives; a real step also pays the driver (schedule, IPC, sampling), the
kernels around the GEMMs, and collectives that wait for the slower rank. These are fitted as the residual of
measured decode TPOT over the model's prediction with every overhead at zero:

    residual(L, b, n) = host_step + host_per_seq * b + layer * L + sync * n

with L layers (the model, and a copy cut to `SHORT_LAYERS` layers, so the per-layer and per-step terms come
apart), b sequences and n collectives per step (TP=1 and TP=world). `layer` is the per-layer cost of decode as
the engine runs it: graph replay on GPU, eager on CPU. Eager prefill's per-layer launch floor comes from the
TTFT of a short prompt at both depths. Negative fits are clamped to zero.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from dataclasses import dataclass

import numpy as np

from plait.plan.calibration import Calibration
from plait.plan.predict import EngineLimits, predict
from plait.plan.shapes import Layout, load_model_config

SHORT_LAYERS = 2
BATCHES = (1, 16)
INPUT_LEN, OUTPUT_LEN = 128, 32


@dataclass(frozen=True)
class Point:
    """One timed run: layers, TP degree, batch, and its measured TTFT / TPOT against the zero-overhead prediction."""

    layers: int
    tp: int
    batch: int
    collectives: int  # per decode step per rank
    ttft_s: float
    tpot_s: float
    base_ttft_s: float
    base_tpot_s: float


def fit(points: list[Point], device: str) -> dict[str, float]:
    """Least squares over the decode residuals; the eager layer floor from the TTFT residuals (see module doc)."""
    rows = [[1.0, p.batch, p.layers, p.collectives] for p in points]
    resid = [p.tpot_s - p.base_tpot_s for p in points]
    (host, per_seq, layer, sync), *_ = np.linalg.lstsq(np.array(rows), np.array(resid), rcond=None)
    out = {"host_step_s": host, "host_per_seq_s": per_seq, "sync_per_collective_s": sync,
           ("graph_layer_s" if device == "cuda" else "eager_layer_s"): layer}
    if device == "cuda":
        one = sorted((p for p in points if p.tp == 1 and p.batch == 1), key=lambda p: p.layers)
        short, full = one[0], one[-1]
        out["eager_layer_s"] = (full.ttft_s - short.ttft_s) / (full.layers - short.layers)
    return {k: max(float(v), 0.0) for k, v in out.items()}


def _cut(model: str | None, layers: int, folder: str) -> str:
    """A config-only copy of `model` with `layers` layers (served with dummy weights)."""
    from plait.models.loader import load_hf_config, resolve_model

    hf = load_hf_config(resolve_model(model))
    hf.num_hidden_layers = layers
    hf.save_pretrained(folder)
    return folder


def _measure(model: str, tp: int, device: str, itemsize: int) -> list[tuple[int, float, float]]:
    """(batch, TTFT, TPOT) for each batch size, one engine (graphs on GPU), after a warm-up batch."""
    from plait.bench.comm_profile import run_batch
    from plait.config import EngineConfig
    from plait.engine.engine import LLMEngine

    # synchronous scheduling: the residuals are fitted as host + GPU overheads added to each step (module doc)
    cfg = EngineConfig(model=model, load_format="dummy", device=device, dtype="bfloat16" if itemsize == 2 else "float32",
                       async_scheduling=False,
                       tensor_parallel_size=tp, max_model_len=INPUT_LEN + OUTPUT_LEN + 16, max_num_seqs=max(BATCHES),
                       max_num_batched_tokens=max(BATCHES) * INPUT_LEN,
                       enable_prefix_caching=False)  # every batch computes its prompts: the model prices no cache hits
    engine = LLMEngine(cfg)
    try:
        run_batch(engine, 1, INPUT_LEN, 4)
        return [(b, *dataclasses.astuple(run_batch(engine, b, INPUT_LEN, OUTPUT_LEN))[:2]) for b in BATCHES]
    finally:
        engine.shutdown()


def fit_overheads(calib: Calibration, model: str | None, world: int) -> Calibration:
    """Time the engine at TP=1 (full and cut depth) and TP=world (full depth); fit; return the updated calibration."""
    from tqdm.auto import tqdm

    itemsize = 2 if calib.device == "cuda" else 4
    zero = dataclasses.replace(calib, host_step_s=0.0, host_per_seq_s=0.0, graph_layer_s=0.0, eager_layer_s=0.0,
                               sync_per_collective_s=0.0)
    lim = EngineLimits(max(BATCHES) * INPUT_LEN, max(BATCHES), itemsize, async_scheduling=False)
    points = []
    with tempfile.TemporaryDirectory() as tmp:
        full = load_model_config(model).num_layers
        runs = [(full, 1), (SHORT_LAYERS, 1), (full, world)]
        for layers, tp in tqdm(runs, desc="Timing the engine"):
            folder = _cut(model, layers, os.path.join(tmp, f"l{layers}"))
            m = load_model_config(folder)
            for batch, ttft, tpot in _measure(folder, tp, calib.device, itemsize):
                base = predict(m, Layout(tp), batch, INPUT_LEN, OUTPUT_LEN, zero, lim)
                n = len(base.last_step_collectives)
                points.append(Point(layers, tp, batch, n, ttft, tpot, base.ttft_s, base.tpot_s))
    fitted = fit(points, calib.device)
    note = f"overheads fitted by running {model or 'SmolLM2'} ({', '.join(f'{k}={v * 1e6:.1f} us' for k, v in fitted.items())})"
    kept = [n for n in calib.notes if not n.startswith("engine overheads:")]  # the unfitted figures' note
    return dataclasses.replace(calib, **fitted, notes=[*kept, note])
