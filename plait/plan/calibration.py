"""The machine's figures the analytical model runs on: collective curves, matrix rate, bandwidth, overheads.

A `Calibration` is written by `plait calibrate` (measured on the machine at hand) or built in (`h200_defaults`,
from the figures measured on H200s in ../shared/DEVICE.md and plait's own benchmark results). Collectives are
kept as measured curves (seconds at message sizes) and interpolated, with an alpha-beta line (t = alpha +
bytes / beta) fitted for sizes past the largest measured: real collectives switch protocols (NCCL's LL / LL128 /
Simple, symmetric memory's one-shot / two-shot), so one line through all sizes misses small messages by 2x.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
from dataclasses import dataclass, field

SYMM_MEM_MAX_BYTES = 4 << 20  # the model runner stages all-reduces up to this size in symmetric memory
ONE_SHOT_MAX_BYTES = 256 * 1024  # and uses the one-shot kernel up to this size (Communicator.all_reduce)


def fit_alpha_beta(sizes: list[int], seconds: list[float]) -> tuple[float, float]:
    """Least-squares t = alpha + bytes / beta over the measured points (alpha >= 0); returns (alpha s, beta B/s)."""
    n = len(sizes)
    if n == 1:
        return seconds[0], float("inf")
    mx, my = sum(sizes) / n, sum(seconds) / n
    var = sum((x - mx) ** 2 for x in sizes)
    slope = sum((x - mx) * (y - my) for x, y in zip(sizes, seconds)) / var if var else 0.0
    slope = max(slope, 1e-18)
    return max(my - slope * mx, 0.0), 1.0 / slope


@dataclass
class Curve:
    """Seconds per operation measured at message sizes (bytes, ascending), and the alpha-beta fit of them."""

    sizes: list[int]
    seconds: list[float]
    alpha: float = 0.0
    beta: float = 0.0
    note: str = ""  # where the figures come from when they were not measured here

    def __post_init__(self) -> None:
        if not self.sizes or len(self.sizes) != len(self.seconds) or self.sizes != sorted(self.sizes):
            raise ValueError(f"a curve needs ascending sizes and one time per size; got {self.sizes} / {self.seconds}")
        if not self.beta:
            self.alpha, self.beta = fit_alpha_beta(self.sizes, self.seconds)

    def time(self, nbytes: float) -> float:
        """Interpolated inside the measured sizes; the smallest size's time below them (latency does not shrink);
        the last point plus bytes / beta above them."""
        if nbytes <= self.sizes[0]:
            return self.seconds[0]
        if nbytes >= self.sizes[-1]:
            return self.seconds[-1] + (nbytes - self.sizes[-1]) / self.beta
        i = bisect.bisect_left(self.sizes, nbytes)
        x0, x1, y0, y1 = self.sizes[i - 1], self.sizes[i], self.seconds[i - 1], self.seconds[i]
        return y0 + (y1 - y0) * (nbytes - x0) / (x1 - x0)


def curve_key(op: str, impl: str, mode: str, group: int) -> str:
    """op: all_reduce | all_gather | reduce_scatter | all_to_all | send_recv; impl: nccl | symm_one_shot |
    symm_two_shot | gloo; mode: graph | eager."""
    return f"{op}/{impl}/{mode}/{group}"


@dataclass
class Calibration:
    source: str  # said by `plait plan` next to every prediction
    device: str  # cuda | cpu
    device_name: str
    memory_bytes: int  # per GPU
    matmul_flops: float  # large GEMM, FLOP/s
    gemv_bytes_s: float  # weight streaming at batch 1: bytes of weight read per second
    copy_bytes_s: float  # device-to-device copy, read + write
    attention_efficiency: float = 0.5  # share of the matrix rate prefill attention reaches (flash kernels: about half)
    paged_attention_efficiency: float = 0.5  # the same for the paged Triton prefill kernel (steps with a cached prefix)
    sm_count: int = 132  # streaming multiprocessors: the split-KV decode kernel sizes its splits by them
    curves: dict[str, Curve] = field(default_factory=dict)
    host_step_s: float = 0.0  # driver + IPC + sampling per step
    host_per_seq_s: float = 0.0  # and per scheduled sequence
    graph_layer_s: float = 0.0  # non-GEMM kernels (norms, rope, attention launch) per layer, replayed in a graph
    eager_layer_s: float = 0.0  # the CPU launch floor of one layer run eagerly
    eager_seq_layer_s: float = 0.0  # and per sequence of an all-new-prompts step (attention loops over its prompts)
    eager_collective_s: float = 0.0  # the CPU time to issue one collective eagerly (staging, symmetric-memory op)
    decode_token_s: float = 0.0  # one split-KV decode program's time per context token it walks, per layer
    sync_per_collective_s: float = 0.0  # a collective inside a real step beyond its microbenchmark (ranks arrive apart)
    fit_configs: list[str] = field(default_factory=list)  # validation configurations the engine terms were fitted on
    # Shift: measured step times of both modes by step size, `shift.table_key(model, sp, tp)` -> [[tokens, SP-mode s,
    # TP-mode s], ...]; where present the engine picks its threshold from it instead of from the model (a GPU
    # measurement fills it; `plait calibrate` does not time the engine's two modes yet)
    shift_steps: dict[str, list[list[float]]] = field(default_factory=dict)
    symm_mem: bool = True  # all-reduces up to 4 MB go through symmetric memory (the engine's default on GPU)
    notes: list[str] = field(default_factory=list)

    def curve(self, op: str, impl: str, mode: str, group: int) -> tuple[Curve, float, float, str]:
        """The curve for (op, impl, mode, group): measured, or the nearest group size scaled, or the other mode's.
        Returns (curve, alpha scale, bandwidth-term scale, how it was found).

        Scaling a group size: the bandwidth term by the ring's (p-1)/p. The latency by (p-1) only over gloo (a
        ring of TCP hops); GPUs behind an NVSwitch reach every peer in one hop, so latency stays flat: H200
        all-reduce at 16 KB measures 6.6 -> 8.0 us (one-shot), 6.3 -> 7.2 us (two-shot), 21.5 -> 16.2 us (NCCL)
        from 2 to 4 ranks (../shared/DEVICE.md). The ring's 3x put TP=4 decode 26% over the measured TPOT."""
        for m in (mode, "graph" if mode == "eager" else "eager"):
            key = curve_key(op, impl, m, group)
            if key in self.curves:
                return self.curves[key], 1.0, 1.0, key if m == mode else f"{key} (no {mode} curve)"
            groups = sorted(int(k.rsplit("/", 1)[1]) for k in self.curves if k.startswith(f"{op}/{impl}/{m}/"))
            if groups:
                g = min(groups, key=lambda x: (abs(x - group), -x))
                ring, key = (group - 1) / (g - 1), curve_key(op, impl, m, g)
                alpha = ring if impl == "gloo" else 1.0
                return self.curves[key], alpha, ring * g / group, f"{key} scaled to {group} ranks"
        have = ", ".join(sorted(self.curves)) or "none"
        raise ValueError(f"the calibration ({self.source}) has no curve for {op} over {impl}; it has: {have}")

    def collective_time(self, op: str, nbytes: float, group: int, graph: bool) -> float:
        """Seconds of one collective as the engine would run it. nbytes: all-reduce buffer, all-gather output,
        broadcast or send/recv message."""
        if group < 2:
            return 0.0
        if op == "broadcast":  # not calibrated; its messages (a step's token ids) are small: one latency, as an
            op = "all_gather"  # all-gather's of the same output
        impl, mode = self.choose(op, nbytes, graph)
        curve, a, b, _ = self.curve(op, impl, mode, group)
        t = curve.time(nbytes)
        alpha = min(curve.alpha, t)
        return alpha * a + (t - alpha) * b

    def choose(self, op: str, nbytes: float, graph: bool) -> tuple[str, str]:
        """The implementation the communicator picks, and the mode (graph replay or eager)."""
        if self.device != "cuda":
            return "gloo", "eager"
        if op == "all_reduce" and self.symm_mem and nbytes <= SYMM_MEM_MAX_BYTES:
            return ("symm_one_shot" if nbytes <= ONE_SHOT_MAX_BYTES else "symm_two_shot"), "graph" if graph else "eager"
        return "nccl", "graph" if graph else "eager"

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1)

    @classmethod
    def from_json(cls, data: dict, source: str) -> "Calibration":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"calibration {source}: unknown fields {sorted(unknown)}")
        data = dict(data, curves={k: Curve(**c) for k, c in data.get("curves", {}).items()})
        data["source"] = source
        return cls(**data)

    @classmethod
    def load(cls, path: str) -> "Calibration":
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read calibration file {path!r}: {e}") from None
        return cls.from_json(data, f"measured: {path}")


_KB, _MB = 1024, 1024 * 1024
_SIZES = [16 * _KB, 64 * _KB, 256 * _KB, 1 * _MB, 4 * _MB, 16 * _MB, 64 * _MB]
_US = 1e-6


def _us(values: list[float], note: str = "") -> Curve:
    n = len(values)
    return Curve(_SIZES[:n], [v * _US for v in values], note=note)


def h200_defaults() -> Calibration:
    """H200 figures from ../shared/DEVICE.md (all-reduce table, GEMM, copy, GEMV), and the engine's terms as
    `plait calibrate --fit-from` fitted them to three grids together: the tp1 and tp2 points of
    benchmarks/results/comm (synchronous, 4x H200) and benchmarks/results/comm_tp1_h200x1 (the engine of 19ac894,
    asynchronous and synchronous), so host time and per-step GPU time each come from the mode that shows them.
    All-gather and send/recv were not measured there: they are derived, and say so."""
    ar2 = [21.5, 11.8, 13.0, 18.5, 36.3, 76.0, 257]
    ar4_eager = [76.7, 57.5, 64.9, 79.1, 59.0, 96.1, 328]
    curves = {
        curve_key("all_reduce", "nccl", "graph", 2): _us(ar2),
        curve_key("all_reduce", "symm_one_shot", "graph", 2): _us([6.6, 7.4, 8.7, 13.1, 42.2]),
        curve_key("all_reduce", "symm_two_shot", "graph", 2): _us([6.3, 7.2, 7.4, 9.8, 20.0, 57.7, 212]),
        curve_key("all_reduce", "nccl", "eager", 4): _us(ar4_eager),
        curve_key("all_reduce", "nccl", "graph", 4): _us([16.2, 33.1, 16.8, 23.2, 44.1, 98.3, 335]),
        curve_key("all_reduce", "symm_one_shot", "graph", 4): _us([8.0, 9.0, 11.2, 18.4, 48.6]),
        curve_key("all_reduce", "symm_two_shot", "graph", 4): _us([7.2, 9.4, 9.3, 13.2, 28.2, 90.6, 336]),
        # Ring all-gather of an output of S bytes moves what half of a ring all-reduce of S does.
        curve_key("all_gather", "nccl", "graph", 2): Curve([2 * s for s in _SIZES], [v * _US for v in ar2],
                                                           note="derived: NCCL all-reduce of half the size"),
        # An all-to-all of S bytes a rank (Ulysses' head exchange) sends (p-1)/p of them and receives as much: the
        # traffic of an all-gather of output S, so it too is priced as the all-reduce of half the size. SP-mode steps
        # run eager: their curve comes from the eager 4-rank NCCL all-reduce.
        curve_key("all_to_all", "nccl", "graph", 2): Curve([2 * s for s in _SIZES], [v * _US for v in ar2],
                                                           note="derived: NCCL all-reduce of half the size"),
        curve_key("all_to_all", "nccl", "eager", 4): Curve([2 * s for s in _SIZES], [v * _US for v in ar4_eager],
                                                           note="derived: eager NCCL all-reduce of half the size"),
        # Eager symmetric-memory all-reduces (prefill) were not measured: 40 us fits the TP=2 TTFT of benchmarks/results.
        curve_key("all_reduce", "symm_one_shot", "eager", 2): Curve([16 * _KB, 256 * _KB], [40 * _US, 42 * _US],
                                                                    note="derived: latency_tp2_bs1 TTFT"),
        curve_key("all_reduce", "symm_two_shot", "eager", 2): Curve([256 * _KB, 4 * _MB], [42 * _US, 60 * _US],
                                                                    note="derived: latency_tp2_bs1 TTFT"),
        curve_key("send_recv", "nccl", "eager", 2): Curve([16 * _KB, 64 * _MB], [15 * _US, 15 * _US + 64 * _MB / 300e9],
                                                          note="assumed: 15 us + 300 GB/s over NVLink"),
    }
    return Calibration(
        source="built-in defaults: H200 figures of ../shared/DEVICE.md", device="cuda", device_name="NVIDIA H200",
        memory_bytes=139 << 30, matmul_flops=0.85 * 779e12, gemv_bytes_s=3.68e12, copy_bytes_s=4.23e12,
        attention_efficiency=0.9, curves=curves, host_step_s=522e-6, host_per_seq_s=16.3e-6, graph_layer_s=20.3e-6,
        eager_layer_s=748e-6, eager_seq_layer_s=83.2e-6, eager_collective_s=215e-6, decode_token_s=60.1e-9,
        paged_attention_efficiency=0.183, sync_per_collective_s=12.6e-6, fit_configs=["tp1", "tp2"],
        notes=["matrix rate: the 8192^3 GEMM's 779 TFLOP/s at 85%, as model-shaped GEMMs ran in latency_tp1_bs64",
               "all-gather and all-to-all derived from all-reduce; send/recv assumed",
               "engine terms: fitted to the tp1 and tp2 points of benchmarks/results/comm/comm_validation.json "
               "(synchronous) and benchmarks/results/comm_tp1_h200x1/{async,sync} (`plait calibrate --fit-from`)"],
    )
