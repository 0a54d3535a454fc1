"""Predicted figures of one configuration on one workload: the engine's step loop replayed on modeled step times.

The batch becomes steps (`workload.fixed_batch_steps`); each step's time on each pipeline stage comes from
`costs.stage_time`; then the driver loop is replayed as `LLMEngine.step` runs it: submit a plan for every
micro-batch with room in flight, wait for the oldest, pay the host's per-step work, repeat.

Synchronously a micro-batch has one plan in flight, so the host's work adds to every step. With asynchronous
scheduling (one stage) it has two: plan N+1 is queued on the GPU before the host waits for plan N, so the host's
work on N's tokens runs while the GPU runs N+1, and a step takes the longer of the two (TPOT = max(GPU step, host
step)). A token still reaches the host when its own step is collected, so TTFT pays the host once, as
synchronously.

Each stage runs its plans in order, so a plan waits for its stage to be free: that is the pipeline bubble,
(p - 1) / (m + p - 1) of a run of m micro-batches over p stages, here played out step by step. Eager steps also
wait for the CPU: each stage's CPU issues its kernels from the moment the plan is submitted (all stages at once),
so a stage finishes no sooner than its CPU does; that is how short eager pipeline steps run faster than one GPU's
eager step. Data-parallel replicas run side by side on their share of the batch. TTFT, TPOT and throughput are
measured on the replayed timeline the way `plait bench latency` measures the real one.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from plait.config import EngineConfig, ModelConfig, default_async_scheduling
from plait.plan.calibration import Calibration
from plait.plan.collectives import Collective, Sampling, rank_collectives
from plait.plan.costs import Memory, rank_memory, stage_time, uses_graph
from plait.plan.shapes import Layout
from plait.plan.workload import StepShape, fixed_batch_steps


# Engine features the model prices that no EngineConfig field names: a validation record lists the ones its engine
# had (benchmarks/comm_validate.py), so that it is priced with the engine that made it.
FEATURES = ("layout_graphs", "mixed_graphs", "one_launch_prompts")


@dataclass(frozen=True)
class EngineLimits:
    """The engine settings that shape the steps (EngineConfig fields of the same names, but `itemsize` and the
    FEATURES: `layout_graphs` and `mixed_graphs` say whether the engine had decode graphs for pipeline stages and
    sequence-parallel mode, and graphs for mixed steps; `one_launch_prompts` whether it attended several short new
    prompts in one launch (commit 28ed6e2). Records made before a feature existed were made without it.)"""

    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    itemsize: int = 2  # bytes per element of weights and activations (bf16)
    enforce_eager: bool = False
    gpu_memory_utilization: float = 0.9
    block_size: int = 16
    prompt_logprobs: bool = False
    max_prefill_graph_tokens: int = 512
    layout_graphs: bool = True  # decode steps of a pipeline stage and in SP mode replay from graphs
    mixed_graphs: bool = True  # steps of several sequences with prompt tokens replay from graphs
    one_launch_prompts: bool = True  # several short new prompts attend in one launch (else prompt by prompt)
    async_scheduling: bool | None = None  # None: as the engine resolves it, on with a GPU and one pipeline stage
    sampling_parallel: bool = False

    @classmethod
    def of(cls, cfg: EngineConfig, max_num_batched_tokens: int, itemsize: int) -> "EngineLimits":
        """The limits of an engine built from `cfg`. The step budget and the element size are resolved at start-up
        (`resolve_scheduler_config`, the checkpoint's dtype), so the caller passes the engine's. Asynchronous
        scheduling left to its default resolves by the calibration's device, the machine the prediction is for."""
        return cls(max_num_batched_tokens, cfg.max_num_seqs, itemsize, cfg.enforce_eager, cfg.gpu_memory_utilization,
                   cfg.block_size, max_prefill_graph_tokens=cfg.max_prefill_graph_tokens,
                   async_scheduling=cfg.async_scheduling, sampling_parallel=cfg.sampling_parallel)

    def features(self) -> dict[str, bool]:
        """What a validation record stores beside its EngineConfig (`recorded` reads it back)."""
        return {name: getattr(self, name) for name in FEATURES}

    @classmethod
    def recorded(cls, eng: dict, features: dict[str, bool] | None = None) -> "EngineLimits":
        """The limits of an engine recorded as `dataclasses.asdict(EngineConfig)` and `features()`
        (benchmarks/comm_validate.py); a feature the record does not list, its engine did not have. Records written
        before features were recorded: one without max_prefill_graph_tokens comes from an engine before prefill
        graphs and pipeline decode graphs (no record was made between that engine and the one with SP-mode decode
        graphs and mixed graphs, so the same mark stands for them); none has one-launch attention (the last of them
        was made at dc8ffd5, before 28ed6e2). Before the async_scheduling field, scheduling was synchronous."""
        new = "max_prefill_graph_tokens" in eng
        if features is None:
            features = {"layout_graphs": new, "mixed_graphs": new}
        return cls(eng["max_num_batched_tokens"], eng["max_num_seqs"], 4 if eng["dtype"] == "float32" else 2,
                   max_prefill_graph_tokens=eng["max_prefill_graph_tokens"] if new else 0,
                   async_scheduling=eng.get("async_scheduling", False),
                   sampling_parallel=eng.get("sampling_parallel", False),
                   **{name: bool(features.get(name, False)) for name in FEATURES})

    def resolved_async_scheduling(self, calib: Calibration, layout: Layout) -> bool:
        """As `EngineConfig.resolved_async_scheduling`, on the calibration's device."""
        if self.async_scheduling is None:
            return default_async_scheduling(calib.device, layout.pp)
        return self.async_scheduling

    def sampling(self, calib: Calibration, layout: Layout) -> Sampling:
        return Sampling(self.sampling_parallel, self.resolved_async_scheduling(calib, layout))

    def steps(self, layout: Layout, batch: int, input_len: int, output_len: int) -> list[list[StepShape]]:
        """The steps of one replica's `batch` sequences, per micro-batch, as this engine schedules and attends them."""
        return fixed_batch_steps(batch, input_len, output_len, self.max_num_batched_tokens, self.max_num_seqs,
                                 layout.pp, self.prompt_logprobs, self.one_launch_prompts)


@dataclass
class PhaseComm:
    """Steps of one phase: collectives and bytes per rank per step, and time (summed over the phase's steps)."""

    steps: int = 0
    collectives: float = 0.0
    bytes: float = 0.0
    comm_s: float = 0.0  # inside collectives and stage-to-stage transfers, along one micro-batch's path
    step_s: float = 0.0  # the path's whole time (all stages, plus host)

    @property
    def share(self) -> float:
        return self.comm_s / self.step_s if self.step_s else 0.0


@dataclass
class Prediction:
    layout: Layout
    batch: int  # concurrent sequences, all replicas
    input_len: int
    output_len: int
    ttft_s: float
    tpot_s: float
    total_s: float  # the whole batch, first step to last token
    memory: Memory
    max_batch: int  # sequences of this workload's length one replica holds (KV cache, sequence limits)
    max_seqs: int  # the schedulers' sequence limit alone (max_num_seqs per micro-batch)
    phases: dict[str, PhaseComm] = field(default_factory=dict)
    first_step_collectives: list = field(default_factory=list)  # rank 0's collectives in the first step
    last_step_collectives: list = field(default_factory=list)  # and in the last (a decode step when output_len > 1)

    @property
    def fits(self) -> bool:
        return self.memory.kv_cache > 0 and math.ceil(self.batch / self.layout.dp) <= self.max_batch

    @property
    def latency_s(self) -> float:
        """One request's end-to-end time: first token, then the rest at TPOT."""
        return self.ttft_s + (self.output_len - 1) * self.tpot_s

    @property
    def throughput(self) -> float:
        """Output tokens per second over all replicas."""
        return self.batch * self.output_len / self.total_s

    @property
    def comm_share(self) -> float:
        """Share of communication in decode steps (the steady state), else over every step."""
        p = self.phases.get("decode")
        if p and p.steps:
            return p.share
        comm = sum(p.comm_s for p in self.phases.values())
        total = sum(p.step_s for p in self.phases.values())
        return comm / total if total else 0.0


@dataclass
class _Timeline:
    ttft_s: float = 0.0
    tpot_s: float = 0.0
    total_s: float = 0.0
    phases: dict[str, PhaseComm] = field(default_factory=dict)


def _replay(m: ModelConfig, layout: Layout, mb_steps: list[list[StepShape]], calib: Calibration, lim: EngineLimits,
            output_len: int) -> _Timeline:
    """The engine loop on modeled times: one plan in flight per micro-batch, two with asynchronous scheduling
    (module doc); stages run plans first come first served. A phase's step time is how long each of its steps held
    the GPU path (from its submission, or from the end of the plan ahead of it), plus, synchronously, the host."""
    depth = 2 if lim.resolved_async_scheduling(calib, layout) else 1
    sampling = lim.sampling(calib, layout)
    stage_free = [0.0] * layout.pp  # when each stage's GPU finishes what it was given
    cpu_free = [0.0] * layout.pp  # and its CPU, issuing eager steps
    nxt = [0] * len(mb_steps)
    flight: deque[tuple[int, StepShape, float]] = deque()  # (micro-batch, step, when its last stage is done)
    t, firsts, first_sum, finish_sum = 0.0, 0, 0.0, 0.0
    batch = sum(sum(s.first_tokens for s in steps) for steps in mb_steps)
    out = _Timeline()
    while True:
        for j, steps in enumerate(mb_steps):
            while sum(i == j for i, *_ in flight) < depth and nxt[j] < len(steps):
                shape = steps[nxt[j]]
                nxt[j] += 1
                graph = uses_graph(calib, layout, shape, lim)
                begin = max([t] + [done for i, _, done in flight if i == j])
                arrive, comm = t, 0.0
                ph = out.phases.setdefault(shape.phase, PhaseComm())
                ph.steps += 1
                for s in range(layout.pp):
                    # Every stage gets the plan at once: its CPU issues while earlier stages compute; its GPU starts
                    # when its input arrives, and finishes no sooner than its CPU has issued the last kernel.
                    st = stage_time(m, layout, s, shape, calib, lim.itemsize, graph, sampling)
                    issued = cpu_free[s] = max(t, cpu_free[s]) + st.cpu_s
                    arrive = stage_free[s] = max(max(arrive, stage_free[s]) + st.gpu_s, issued)
                    comm += st.comm_s + st.p2p_s
                    ph.collectives += len(st.collectives) / layout.pp
                    ph.bytes += sum(c.bytes for c in st.collectives) / layout.pp
                flight.append((j, shape, arrive))
                ph.comm_s += comm
                ph.step_s += arrive - begin
        if not flight:
            break
        _, shape, done = flight.popleft()
        host = calib.host_step_s + calib.host_per_seq_s * shape.seqs
        t = max(t, done) + host  # the step's tokens reach the host, which then plans the next
        if depth == 1:
            out.phases[shape.phase].step_s += host
        firsts += shape.first_tokens
        first_sum += shape.first_tokens * t
        finish_sum += shape.finished * t
        if shape.first_tokens and firsts == batch:
            out.ttft_s = t
    for ph in out.phases.values():
        ph.collectives /= max(ph.steps, 1)
        ph.bytes /= max(ph.steps, 1)
    out.total_s = t
    out.tpot_s = (finish_sum - first_sum) / (batch * (output_len - 1)) if output_len > 1 else 0.0
    return out


def kv_batch(memory: Memory, input_len: int, output_len: int, block_size: int) -> int:
    """Sequences whose whole length (in blocks) the KV cache of one replica holds at once."""
    blocks = math.ceil((input_len + output_len) / block_size)
    return memory.kv_tokens // (blocks * block_size)


def capacity(m: ModelConfig, layout: Layout, input_len: int, output_len: int, calib: Calibration,
             lim: EngineLimits) -> tuple[Memory, int, int]:
    """(memory per GPU, sequences of this length one replica holds, the schedulers' sequence limit alone): what
    does not depend on the batch, so finding the largest batch needs no step replay."""
    graphs = calib.device == "cuda" and not lim.enforce_eager
    mem = rank_memory(m, layout, calib, lim.itemsize, lim.max_num_batched_tokens, lim.gpu_memory_utilization,
                      lim.max_num_seqs if graphs else 0)
    seqs = lim.max_num_seqs * layout.pp  # one scheduler per stage
    return mem, min(kv_batch(mem, input_len, output_len, lim.block_size), seqs), seqs


def predict(m: ModelConfig, layout: Layout, batch: int, input_len: int, output_len: int, calib: Calibration,
            lim: EngineLimits = EngineLimits()) -> Prediction:
    """A fixed batch of `batch` equal prompts, all arriving at once (as `plait bench latency` runs it)."""
    layout.check(m)
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    per_replica = math.ceil(batch / layout.dp)  # the fullest replica sets the pace
    mb = lim.steps(layout, per_replica, input_len, output_len)
    tl = _replay(m, layout, mb, calib, lim, output_len)
    first, last = mb[0][0], mb[0][-1]
    sampling = lim.sampling(calib, layout)
    return Prediction(
        layout, batch, input_len, output_len, tl.ttft_s, tl.tpot_s, tl.total_s,
        *capacity(m, layout, input_len, output_len, calib, lim), tl.phases,
        *(rank_collectives(m, layout, 0, s.tokens, s.logit_rows, lim.itemsize, s.samples, sampling)
          for s in (first, last)),
    )


def profiled_collective_s(calib: Calibration, c: Collective, graph: bool) -> float:
    """What the profiler's CUDA events around one collective measure. The GPU time of the collective; eagerly,
    no less than the CPU's time to issue it: the events are enqueued before and after the issue, and a GPU that
    waits for its CPU (short eager steps) runs each event as soon as it is enqueued."""
    gpu = calib.collective_time(c.op, c.wire_bytes, c.group_size, graph) + calib.sync_per_collective_s
    return gpu if graph else max(gpu, calib.eager_collective_s)


def comm_totals(m: ModelConfig, layout: Layout, batch: int, input_len: int, output_len: int, calib: Calibration,
                lim: EngineLimits = EngineLimits()) -> dict[str, dict[str, float]]:
    """Per op, per rank (mean over a replica's ranks) over the whole fixed-batch run: count, bytes and seconds, as
    the profiler sums its records. send / recv are priced as transfers; a profiled recv also waits for the stage
    before it, so only the other ops compare like for like."""
    per_replica = math.ceil(batch / layout.dp)
    sampling = lim.sampling(calib, layout)
    out: dict[str, dict[str, float]] = {}
    for steps in lim.steps(layout, per_replica, input_len, output_len):
        for shape in steps:
            graph = uses_graph(calib, layout, shape, lim)
            for rank in range(layout.replica):
                for c in rank_collectives(m, layout, rank, shape.tokens, shape.logit_rows, lim.itemsize, shape.samples,
                                          sampling):
                    op = out.setdefault(c.op, {"n": 0.0, "bytes": 0.0, "s": 0.0})
                    op["n"] += 1 / layout.replica
                    op["bytes"] += c.bytes / layout.replica
                    if c.op in ("send", "recv"):
                        op["s"] += calib.collective_time("send_recv", c.wire_bytes, 2, False) / layout.replica
                    else:
                        op["s"] += profiled_collective_s(calib, c, graph) / layout.replica
    return out
