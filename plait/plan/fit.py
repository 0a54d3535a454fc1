"""The engine's terms fitted to a measured validation grid: `plait calibrate --fit-from comm_validation.json`.

Microbenchmarks price GEMMs, copies and collectives; what they cannot see is how the engine drives them: the host's
work per step and per sequence, the per-layer kernels replayed in a graph, the CPU issuing eager steps (per layer,
per prompt, per collective), the split-KV decode kernel's walk and the paged prefill kernel's rate. Those are
fitted here to the TTFT and TPOT that `benchmarks/comm_validate.py` measured, by least squares on log(predicted /
measured) (every point weighs the same whatever its scale) through the whole model: the step replay is not
linear in them (eager steps take the larger of CPU and GPU time, and the CPU floor hides or not).

Only the configurations named (by default TP=1 and TP=2) are fitted, so the others (TP=4, pipelines, hybrids)
test the model out of sample; the calibration records which were used (`fit_configs`) and the report splits its
accuracy by it. The profiled communication time is not fitted either. `plait calibrate --engine-model` remains
the way to fit the host and graph terms by running the engine on a machine without a validation grid.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from plait.plan.calibration import Calibration
from plait.plan.predict import EngineLimits, predict
from plait.plan.shapes import Layout, load_model_config

DEFAULT_CONFIGS = ("tp1", "tp2")
# Fitted terms and where the search starts when the calibration has them at zero.
TERMS = {"host_step_s": 100e-6, "host_per_seq_s": 10e-6, "graph_layer_s": 10e-6, "sync_per_collective_s": 5e-6,
         "eager_layer_s": 300e-6, "eager_seq_layer_s": 20e-6, "eager_collective_s": 50e-6, "decode_token_s": 10e-9,
         "paged_attention_efficiency": 0.3}
SHARES = ("paged_attention_efficiency",)  # fractions of a rate: at most 1


@dataclass(frozen=True)
class Measured:
    """One timed point of the grid and the engine settings it ran with."""

    config: str
    layout: Layout
    batch: int
    input_len: int
    output_len: int
    ttft_s: float
    tpot_s: float
    lim: EngineLimits


def measured_points(data: dict, configs: tuple[str, ...] | None = None) -> list[Measured]:
    """The timed (graph-enabled) points of a comm_validation.json, of the named configurations (None: all)."""
    out = []
    for name, cfg in data["configs"].items():
        if configs is not None and name not in configs:
            continue
        lim = EngineLimits.recorded(cfg["engine"], cfg.get("features"))
        out += [Measured(name, Layout(cfg["tp"], cfg["pp"]), p["batch"], p["input_len"], p["output_len"],
                         p["ttft_ms"] / 1e3, p["tpot_ms"] / 1e3, lim) for p in cfg["points"]]
    return out


def _with(calib: Calibration, x: np.ndarray) -> Calibration:
    """The calibration with the terms at exp(x) (log-parameters keep every term positive), shares capped at 1."""
    values = {k: float(math.exp(v)) for k, v in zip(TERMS, x)}
    return dataclasses.replace(calib, **{k: min(v, 1.0) if k in SHARES else v for k, v in values.items()})


def log_errors(data_model, points: list[Measured], calib: Calibration) -> np.ndarray:
    """log(predicted / measured) of TTFT and TPOT at every point (TPOT only where more than one token is made)."""
    out = []
    for p in points:
        pred = predict(data_model, p.layout, p.batch, p.input_len, p.output_len, calib, p.lim)
        out.append(math.log(pred.ttft_s / p.ttft_s))
        if p.output_len > 1:
            out.append(math.log(pred.tpot_s / p.tpot_s))
    return np.array(out)


def levenberg_marquardt(residuals: Callable[[np.ndarray], np.ndarray], x0: np.ndarray, iters: int = 60,
                        step: float = 1e-3) -> np.ndarray:
    """Minimise |residuals(x)|^2 from x0: Gauss-Newton steps damped towards gradient descent while they fail
    (forward-difference Jacobian; the model has kinks where a max() switches, which damping rides over)."""
    x, lam = x0.astype(float), 1e-2
    r = residuals(x)
    cost = float(r @ r)
    for _ in range(iters):
        jac = np.stack([(residuals(x + step * e) - r) / step for e in np.eye(len(x))], axis=1)
        a, g = jac.T @ jac, jac.T @ r
        while lam < 1e8:
            dx = np.linalg.solve(a + lam * np.diag(np.diag(a) + 1e-9), -g)
            r_new = residuals(x + dx)
            if float(r_new @ r_new) < cost:
                break
            lam *= 4
        else:
            return x
        gain = cost - float(r_new @ r_new)
        x, r, cost, lam = x + dx, r_new, float(r_new @ r_new), lam / 3
        if gain < 1e-9 * max(cost, 1e-12):
            break
    return x


def fit_validation(calib: Calibration, grids: list[dict], configs: tuple[str, ...] = DEFAULT_CONFIGS) -> Calibration:
    """The calibration with TERMS fitted to the points of `configs` in every grid (module doc); says so in its notes.
    Grids of one model measured with each scheduling are fitted together: synchronous steps add the host's work to
    the GPU's, asynchronous ones hide it, so each mode holds the terms the other cannot see. Fitted to synchronous
    runs alone, the host terms took up per-step GPU time too, and asynchronous decode was priced 9-13% short."""
    points = [p for data in grids for p in measured_points(data, configs)]
    if not points:
        have = ", ".join(sorted({c for data in grids for c in data["configs"]})) or "none"
        raise ValueError(f"the validation results have no timed points of {', '.join(configs)}; they have: {have}")
    models = {data["model"] for data in grids}
    if len(models) > 1:
        raise ValueError(f"the validation results are of different models ({', '.join(sorted(models))}): fit one")
    m = load_model_config(models.pop())
    x0 = np.array([math.log(getattr(calib, k) or seed) for k, seed in TERMS.items()])
    x = levenberg_marquardt(lambda x: log_errors(m, points, _with(calib, x)), x0)
    fitted = _with(calib, x)
    shown = ", ".join(f"{k}={getattr(fitted, k) * (1 if k in SHARES else 1e6):.4g}{'' if k in SHARES else ' us'}"
                      for k in TERMS)
    modes = sorted({"async" if p.lim.resolved_async_scheduling(calib, p.layout) else "sync" for p in points})
    where = "; ".join(sorted({f"{data.get('device', '?')} at {data.get('git_commit', '?')}" for data in grids}))
    note = (f"engine terms fitted to {len(points)} timed points of {', '.join(configs)} ({'+'.join(modes)} "
            f"scheduling; {where}; {grids[0]['model']}): {shown}")
    kept = [n for n in calib.notes if not n.startswith(("engine overheads:", "engine terms fitted"))]
    return dataclasses.replace(fitted, fit_configs=list(configs), notes=[*kept, note])
