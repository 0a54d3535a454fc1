"""`plait plan`: every way to lay a model over N GPUs, predicted, ranked by the user's goal, with t_e.

Goals: `latency` (lowest end-to-end time of a request at the workload's concurrency), `throughput` (most output
tokens per second), `slo` (most output tokens per second with TTFT and TPOT within the SLOs).
With a fixed batch (or none): latency at that batch (default 1); throughput at the largest batch that fits; slo at
the largest batch whose TTFT and TPOT meet the SLOs.
With a request rate, every goal sizes each configuration by Little's law: sequences in flight = rate x latency,
solved per configuration (one that cannot keep up is marked saturated). It serves min(rate, capacity) x output_len
output tokens per second, its capacity being the same law read the other way: the most sequences it holds at once
over their latency at that batch (so a saturated one serves less than the rate asks). The throughput and slo goals
rank by what is served (served alike, the lower latency first), and the SLOs are checked at the concurrency the
rate implies.
Sequence parallelism (SP, SP x TP, and Shift switching SP <-> TP per step at its modelled threshold) is laid out
on one stage beside them.
t_e (Albireo): over a fixed number of GPUs laid out as replicas of TP ranks (replicas = GPUs / TP), the TP degree
with the most output throughput, each replica as full as its KV cache and max_num_seqs allow; past it, more GPUs in
one TP group cost more in communication and fixed work than another replica would give. Beside it, the degree of
one replica with the lowest latency for the workload's own concurrency (where one request's speed is the goal).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from plait.config import ModelConfig
from plait.plan.calibration import Calibration
from plait.plan.predict import EngineLimits, Prediction, capacity, predict
from plait.plan.shapes import Layout
from plait.plan.shift import choose_threshold
from plait.plan.workload import Workload

GOALS = ("latency", "throughput", "slo")


@dataclass(frozen=True)
class Slo:
    ttft_s: float | None = None
    tpot_s: float | None = None

    def met(self, p: Prediction) -> bool:
        return (self.ttft_s is None or p.ttft_s <= self.ttft_s) and (self.tpot_s is None or p.tpot_s <= self.tpot_s)


@dataclass
class Choice:
    """One configuration's prediction under the goal, and why it ranks where it does."""

    prediction: Prediction
    ok: bool  # fits in memory, keeps up with the rate, meets the SLOs (as the goal requires)
    why: str
    served: float  # output tokens/s: at a request rate what it serves of it, else the prediction's throughput

    def rank(self, goal: str) -> tuple[bool, float, float]:
        """Sort key, best first: those that satisfy the goal, then by the goal's figure; equal ones (every layout
        that keeps up with a rate serves the same) by request latency."""
        latency = self.prediction.latency_s
        return not self.ok, latency if goal == "latency" else -self.served, latency


def layouts(m: ModelConfig, gpus: int) -> list[Layout]:
    """Every TP x PP x DP = gpus (even pipeline splits) and SP x TP x DP = gpus (one stage) the engine accepts."""
    if gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {gpus}")
    out = []
    for sp in range(1, gpus + 1):
        for tp in range(1, gpus // sp + 1):
            for pp in range(1, gpus // (sp * tp) + 1) if sp == 1 else (1,):
                if gpus % (sp * tp * pp):
                    continue
                layout = Layout(tp, pp, gpus // (sp * tp * pp), sp=sp)
                try:
                    layout.check(m)
                except ValueError:
                    continue
                out.append(layout)
    return out


def candidates(m: ModelConfig, gpus: int, calib: Calibration, lim: EngineLimits,
               model_name: str | None = None) -> list[Layout]:
    """`layouts`, and each SP layout again as Shift at the threshold the engine would pick (`shift.choose_threshold`):
    past it SP-mode steps are predicted faster, so a Shift step costs the cheaper of the two modes."""
    out = layouts(m, gpus)
    for layout in [lay for lay in out if lay.sp > 1]:
        choice = choose_threshold(m, model_name, layout.sp, layout.tp, calib, lim)
        out.append(dataclasses.replace(layout, shift_threshold=choice.threshold))
    return out


def _batch_sizes(limit: int) -> list[int]:
    sizes = [1 << i for i in range(max(limit, 1).bit_length()) if 1 << i <= limit]
    return sizes + ([limit] if limit not in sizes else [])


def _at_rate(m, layout, w: Workload, calib, lim) -> tuple[Prediction, bool]:
    """Concurrency = rate x latency, iterated to a fixed point; False if the configuration cannot keep up."""
    batch = layout.dp
    p = predict(m, layout, batch, w.input_len, w.output_len, calib, lim)
    if p.max_batch < 1:
        return p, False
    for _ in range(30):
        need = max(layout.dp, math.ceil(w.request_rate * p.latency_s))
        if need > p.max_batch * layout.dp:
            return predict(m, layout, p.max_batch * layout.dp, w.input_len, w.output_len, calib, lim), False
        if need == batch:
            break
        batch = need
        p = predict(m, layout, batch, w.input_len, w.output_len, calib, lim)
    return p, p.throughput / w.output_len >= w.request_rate * 0.999


def _at_concurrency(m, layout, w: Workload, calib, lim) -> tuple[Prediction, bool]:
    """At the workload's own concurrency: by Little's law from its rate (`_at_rate`: False if saturated), else at
    its batch (default 1: False if that does not fit)."""
    if w.request_rate is not None:
        return _at_rate(m, layout, w, calib, lim)
    p = predict(m, layout, w.batch or 1, w.input_len, w.output_len, calib, lim)
    return p, p.fits


def _largest_batch(m, layout, w: Workload, goal: str, slo: Slo, calib, lim, cap: int) -> Prediction | None:
    """Without a rate, the throughput and slo goals: the largest batch that fits (and meets the SLOs)."""
    best = None
    for b in _batch_sizes(cap):
        p = predict(m, layout, b, w.input_len, w.output_len, calib, lim)
        if goal == "slo" and not slo.met(p):
            break
        best = p
    return best


def evaluate(m: ModelConfig, layout: Layout, w: Workload, goal: str, slo: Slo, calib: Calibration,
             lim: EngineLimits) -> Choice:
    probe = predict(m, layout, layout.dp, w.input_len, w.output_len, calib, lim)
    if probe.max_batch < 1 or probe.memory.kv_cache <= 0:
        return Choice(probe, False, f"does not fit: weights {probe.memory.weights / 2**30:.1f} GiB per GPU",
                      probe.throughput)
    cap = probe.max_batch * layout.dp
    if goal in ("throughput", "slo") and w.request_rate is None:
        best = _largest_batch(m, layout, w, goal, slo, calib, lim, cap)
        if best is None:
            return Choice(probe, False, f"misses the SLOs even at batch {layout.dp}: TTFT {probe.ttft_s * 1e3:.1f} ms, "
                                        f"TPOT {probe.tpot_s * 1e3:.2f} ms", probe.throughput)
        return Choice(best, True, _why(best, cap), best.throughput)
    p, holds = _at_concurrency(m, layout, w, calib, lim)
    short = f"; saturated below {w.request_rate:g} req/s" if w.request_rate else f"; batch {p.batch} does not fit"
    why = _why(p, cap) + ("" if holds else short)
    return Choice(p, holds and slo.met(p), why, _served(m, layout, w, p, holds, cap, calib, lim))


def _served(m, layout, w: Workload, p: Prediction, holds: bool, cap: int, calib, lim) -> float:
    """Output tokens/s: at a rate, the rate's if the layout keeps up with it, else its capacity's, Little's law read
    the other way (the largest batch that fits over the latency at that batch); without a rate, the prediction's."""
    if w.request_rate is None:
        return p.throughput
    if holds:
        return w.request_rate * w.output_len
    full = p if p.batch == cap else predict(m, layout, cap, w.input_len, w.output_len, calib, lim)
    return min(w.request_rate, cap / full.latency_s) * w.output_len


def _why(p: Prediction, cap: int) -> str:
    bound = "max_num_seqs" if p.max_batch == p.max_seqs else "KV cache"
    why = f"comm {100 * p.comm_share:.0f}% of decode; holds {cap} seqs ({cap / p.batch:.1f}x this batch; {bound})"
    if p.layout.sp > 1:
        why += f"; weights x{p.layout.sp} (replicated over SP)"
    if p.layout.shift_threshold is not None:
        why += f"; steps <= {p.layout.shift_threshold} tokens run TP"
    return why


def plan(m: ModelConfig, gpus: int, w: Workload, goal: str, slo: Slo, calib: Calibration,
         lim: EngineLimits, progress=None, model_name: str | None = None) -> list[Choice]:
    """Every candidate layout, best first: those that satisfy the goal, then the rest. `model_name` finds the
    calibration's measured Shift table, as the engine does."""
    if goal not in GOALS:
        raise ValueError(f"goal must be one of {', '.join(GOALS)}; got {goal!r}")
    if goal == "slo" and slo.ttft_s is None and slo.tpot_s is None:
        raise ValueError("goal 'slo' needs --slo-ttft and/or --slo-tpot")
    choices = []
    for layout in candidates(m, gpus, calib, lim, model_name):
        choices.append(evaluate(m, layout, w, goal, slo, calib, lim))
        if progress is not None:
            progress.update(1)
    return sorted(choices, key=lambda c: c.rank(goal))


def effective_tp(m: ModelConfig, gpus: int, w: Workload, calib: Calibration, lim: EngineLimits,
                 tp_sizes: list[int] | None = None) -> tuple[int | None, list[Prediction]]:
    """t_e: the TP degree (a divisor of gpus, replicas = gpus / TP) with the most throughput at saturation, with each
    degree's prediction (None if no degree fits). What `plait bench tp-sweep` measures, which passes the degrees it
    measured as `tp_sizes` (default: every divisor) so that both pick among the same ones."""
    preds = []
    for tp in tp_sizes or [t for t in range(1, gpus + 1) if gpus % t == 0]:
        layout = Layout(tp, dp=gpus // tp)
        try:
            layout.check(m)
        except ValueError:
            continue
        full = capacity(m, layout, w.input_len, w.output_len, calib, lim)[1] * layout.dp
        if full >= 1:  # at its largest batch, which therefore fits
            preds.append(predict(m, layout, full, w.input_len, w.output_len, calib, lim))
    best = max(preds, key=lambda p: p.throughput, default=None)
    return (best.layout.tp if best else None), preds


def latency_tp(m: ModelConfig, gpus: int, w: Workload, calib: Calibration,
               lim: EngineLimits) -> tuple[int | None, list[Prediction]]:
    """The TP degree (1 .. gpus, one replica, one stage) with the lowest latency at the workload's concurrency (its
    batch, or what its rate implies), among those that hold it (None if none does)."""
    preds = []
    for tp in range(1, gpus + 1):
        layout = Layout(tp)
        try:
            layout.check(m)
        except ValueError:
            continue
        p, holds = _at_concurrency(m, layout, w, calib, lim)
        if holds:
            preds.append(p)
    best = min(preds, key=lambda p: p.latency_s, default=None)
    return (best.layout.tp if best else None), preds
