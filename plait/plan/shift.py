"""Shift's threshold: the step size (scheduled tokens) above which sequence-parallel mode beats tensor-parallel mode.

A small step reads weights more than it computes: TP mode over all S*T ranks reads 1/(S*T) of them per rank, SP
mode reads its whole TP shard (weights are replicated over SP), and only TP mode replays decode graphs. A big step
computes: both modes split the work over the ranks, but SP mode moves heads by two all-to-alls per layer where TP
mode all-reduces the whole step's hidden states twice. So TP wins up to some step size and SP past it. When
`--shift-threshold` is not given and `--calibration` is, the engine asks the model (`costs.stage_time` on one step
of each size in both modes) for that size, and a table of measured step times in the calibration file
(`Calibration.shift_steps`) overrides the model; without a calibration file it uses 256. At start-up
the engine also says what each mode costs in memory (`memory_line`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from plait.config import EngineConfig, ModelConfig
from plait.plan.calibration import Calibration, Curve
from plait.plan.costs import rank_weights, stage_time, uses_graph
from plait.plan.predict import EngineLimits
from plait.plan.shapes import Layout, sequence_shards
from plait.plan.workload import StepShape

DEFAULT_THRESHOLD = 256  # without a calibration file: the value of the measured shift4 runs (README)
PROBE_CONTEXT = 1024  # tokens each decoding sequence of a probe step has cached (attention costs the same in both modes)


@dataclass(frozen=True)
class ShiftChoice:
    """Steps of at most `threshold` tokens run TP mode; `source` says where the number comes from."""

    threshold: int
    source: str
    budget: int  # the step's token budget: a threshold there means every step runs TP mode

    def message(self, layout: Layout) -> str:
        ranks = layout.sp * layout.tp
        if self.threshold >= self.budget:
            return (f"shift threshold {self.threshold} tokens ({self.source}): TP mode is predicted faster at every "
                    f"step size up to the token budget, so every step runs tensor-parallel over all {ranks} ranks")
        if self.threshold == 0:
            return (f"shift threshold 0 tokens ({self.source}): SP mode is predicted faster at every step size, so "
                    f"every step runs sequence-parallel")
        return (f"shift threshold {self.threshold} tokens ({self.source}): steps of at most {self.threshold} tokens "
                f"run tensor-parallel over all {ranks} ranks, larger ones sequence-parallel (SP{layout.sp}xTP{layout.tp})")


def table_key(model: str, sp: int, tp: int) -> str:
    """The key of a measured step-time table in `Calibration.shift_steps`."""
    return f"{model}/sp{sp}xtp{tp}"


def crossover(sp_s: Callable[[int], float], tp_s: Callable[[int], float], limit: int) -> int:
    """The largest step size n <= limit at which TP mode is no slower than SP mode, with SP faster at every size above
    it that is checked (powers of two up to `limit`, then bisection of the last switch): the threshold. `limit`
    when TP wins at `limit`; 0 when SP wins from 1 token on."""
    grid = sorted({1 << i for i in range(limit.bit_length()) if 1 << i <= limit} | {limit})
    tp_wins = [tp_s(n) <= sp_s(n) for n in grid]
    if not any(tp_wins):
        return 0
    last = max(i for i, w in enumerate(tp_wins) if w)
    if last == len(grid) - 1:
        return limit
    lo, hi = grid[last], grid[last + 1]  # TP wins at lo, SP at hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if tp_s(mid) <= sp_s(mid) else (lo, mid)
    return lo


def probe_shape(tokens: int, max_num_seqs: int, context: int = PROBE_CONTEXT) -> StepShape:
    """A step of `tokens` as continuous batching makes it: up to `max_num_seqs` decodes at `context` cached tokens;
    past that, max_num_seqs - 1 decodes beside one prompt chunk of the remaining tokens."""
    if tokens <= max_num_seqs:
        return StepShape(((context, 1),) * tokens, tokens, "decode")
    decodes = max_num_seqs - 1
    return StepShape(((context, 1),) * decodes + ((0, tokens - decodes),), decodes + 1, "mixed")


def mode_step_s(m: ModelConfig, sp: int, tp: int, tokens: int, calib: Calibration, lim: EngineLimits,
                tp_mode: bool) -> float:
    """The modelled time of one step of `tokens` on SP x TP ranks, in TP mode (over all ranks) or SP mode."""
    layout = Layout(tp, sp=sp, shift_threshold=tokens if tp_mode else None)
    shape = probe_shape(tokens, lim.max_num_seqs)
    graph = uses_graph(calib, layout, shape, lim)
    return stage_time(m, layout, 0, shape, calib, lim.itemsize, graph, lim.sampling(calib, layout)).total_s


def choose_threshold(m: ModelConfig, model_name: str | None, sp: int, tp: int, calib: Calibration,
                     lim: EngineLimits) -> ShiftChoice:
    """From the calibration's measured table for this model (by name) and degree if it has one, else the model."""
    budget = lim.max_num_batched_tokens
    rows = calib.shift_steps.get(table_key(model_name, sp, tp)) if model_name else None
    if rows:
        tokens = [int(r[0]) for r in rows]
        sp_curve, tp_curve = Curve(tokens, [r[1] for r in rows]), Curve(tokens, [r[2] for r in rows])
        n = crossover(sp_curve.time, tp_curve.time, budget)
        return ShiftChoice(n, f"measured step times in {calib.source}", budget)
    n = crossover(lambda k: mode_step_s(m, sp, tp, k, calib, lim, False),
                  lambda k: mode_step_s(m, sp, tp, k, calib, lim, True), budget)
    return ShiftChoice(n, f"model: SP vs TP step time on {calib.source}", budget)


def resolve_threshold(cfg: EngineConfig, m: ModelConfig, model_name: str, budget: int, itemsize: int) -> tuple[EngineConfig, str]:
    """The engine's config with Shift's threshold set (an explicit one is kept), and the start-up line that says
    which it is and where it comes from."""
    if cfg.shift_threshold is not None:
        return cfg, f"shift threshold {cfg.shift_threshold} tokens (--shift-threshold)"
    if not cfg.calibration:
        # The built-in figures' eager terms were fitted on TP runs only, and priced that way SP never wins for
        # Llama-3-8B at SP4, against the measured shift4 run (TTFT 272 ms vs TP4's 332 at batch 64 x 512): the
        # engine does not let them pick; `plait plan` still prints what they predict.
        return cfg.replace(shift_threshold=DEFAULT_THRESHOLD), (
            f"shift threshold {DEFAULT_THRESHOLD} tokens (default: no --calibration with measured or fitted figures "
            f"for this machine)")
    calib = Calibration.load(cfg.calibration)
    lim = EngineLimits.of(cfg, budget, itemsize)
    sp, tp = cfg.sequence_parallel_size, cfg.tensor_parallel_size
    choice = choose_threshold(m, model_name, sp, tp, calib, lim)
    return cfg.replace(shift_threshold=choice.threshold), choice.message(Layout(tp, sp=sp))


def memory_line(m: ModelConfig, layout: Layout, itemsize: int, kv_tokens: int) -> str:
    """What each mode costs per GPU under sequence parallelism (the fullest rank): the weights held, replicated over
    SP and all read by an SP-mode step; the share a Shift TP-mode step reads through its view (no second copy); the
    KV cache of `kv_tokens` tokens, laid out by the rank's own heads and shared by both modes."""
    held, own = max((sequence_shards(m, layout, r) for r in range(layout.replica)),
                    key=lambda shards: rank_weights(m, shards[0], itemsize))
    gib = 2**30
    kv = kv_tokens * 2 * own.kv_heads * m.head_dim * itemsize * len(own.layers)
    weights = f"weights held {rank_weights(m, held, itemsize) / gib:.2f} GiB (replicated over SP{layout.sp}: SP mode reads all"
    if layout.shift_threshold is not None:
        weights += f"; TP mode reads a {rank_weights(m, own, itemsize) / gib:.2f} GiB view of them, no copy"
    return (f"memory per GPU ({layout.name}): {weights}); KV cache {kv / gib:.2f} GiB for {kv_tokens} tokens "
            f"({own.kv_heads} KV heads of its own, shared by both modes)")
