"""Time and memory of one rank: GEMMs and attention against the calibrated rates, collectives against their curves.

A matmul [T, K] @ [K, N] costs the larger of its FLOPs at the matrix rate and its bytes (weight + activations) at
the weight-streaming rate: decode (small T) reads weights, prefill (large T) computes. Attention reads each
sequence's cached K/V once per layer and does 4 x heads x head_dim FLOPs per (query, key) pair; elementwise
kernels stream their activations at copy bandwidth. The rest of a layer's kernels (launches, small kernels) cost
a per-layer constant when replayed from a CUDA graph; launched eagerly, they are a floor the GPU work may hide.
Memory follows the model runner's own sizing (`ModelRunner.num_kv_blocks`).
"""
from __future__ import annotations

from dataclasses import dataclass

from plait.config import ModelConfig
from plait.plan.calibration import Calibration
from plait.plan.collectives import Collective, rank_collectives
from plait.plan.shapes import Layout, RankShard, rank_shard
from plait.plan.workload import StepShape

ACTIVATION_SLACK_BYTES = 2 << 30  # ModelRunner._activation_bytes: graphs and cuBLAS workspace


def gemm_s(calib: Calibration, tokens: int, k: int, n: int, itemsize: int) -> float:
    flops = 2.0 * tokens * k * n
    nbytes = (k * n + tokens * (k + n)) * itemsize
    return max(flops / calib.matmul_flops, nbytes / calib.gemv_bytes_s)


def layer_compute_s(m: ModelConfig, sh: RankShard, shape: StepShape, calib: Calibration, itemsize: int) -> float:
    """One decoder layer's GEMMs and attention on this rank's shard (no collectives, no launch overhead)."""
    T, H, D = shape.tokens, m.hidden_size, m.head_dim
    t = gemm_s(calib, T, H, (sh.q_heads + 2 * sh.kv_heads) * D, itemsize)  # qkv_proj
    t += gemm_s(calib, T, sh.q_heads * D, H, itemsize)  # o_proj
    t += gemm_s(calib, T, H, 2 * sh.intermediate, itemsize)  # gate_up_proj
    t += gemm_s(calib, T, sh.intermediate, H, itemsize)  # down_proj
    attn_flops = 4.0 * sh.q_heads * D * shape.attention_pairs
    kv_bytes = 2 * sh.kv_heads * D * itemsize * shape.context_tokens
    t += max(attn_flops / (calib.matmul_flops * calib.attention_efficiency), kv_bytes / calib.copy_bytes_s)
    # Norms, residual adds, rotary and silu*mul read and write about 10 hidden and 3 intermediate values a token.
    return t + T * (10 * H + 3 * sh.intermediate) * itemsize / calib.copy_bytes_s


def head_compute_s(m: ModelConfig, sh: RankShard, shape: StepShape, calib: Calibration, itemsize: int) -> float:
    return gemm_s(calib, shape.logit_rows, m.hidden_size, sh.vocab_rows, itemsize) if shape.logit_rows else 0.0


@dataclass(frozen=True)
class StageTime:
    """One step on one pipeline stage (its slowest tensor rank)."""

    compute_s: float
    comm_s: float  # collectives inside the stage (TP all-reduces and all-gather)
    p2p_s: float  # receiving this stage's input from the stage before
    overhead_s: float  # non-GEMM kernels in a graph; eagerly, the launch time the GPU work does not hide
    collectives: list[Collective]

    @property
    def total_s(self) -> float:
        return self.compute_s + self.comm_s + self.p2p_s + self.overhead_s


def uses_graph(calib: Calibration, layout: Layout, shape: StepShape, max_num_seqs: int, enforce_eager: bool = False) -> bool:
    """The model runner replays a decode step from a CUDA graph on GPU, for one stage, when it fits a bucket."""
    return (calib.device == "cuda" and not enforce_eager and layout.pp == 1 and shape.phase == "decode"
            and shape.seqs <= max_num_seqs and shape.logit_rows == shape.seqs)


def stage_time(m: ModelConfig, layout: Layout, stage: int, shape: StepShape, calib: Calibration, itemsize: int,
               graph: bool) -> StageTime:
    best = None
    for tp_rank in range(layout.tp):
        rank = stage * layout.tp + tp_rank
        sh = rank_shard(m, layout, rank)
        compute = len(sh.layers) * layer_compute_s(m, sh, shape, calib, itemsize)
        if sh.last:
            compute += head_compute_s(m, sh, shape, calib, itemsize)
        if best is None or compute > best[0]:
            best = (compute, sh, rank)
    compute, sh, rank = best
    coll = rank_collectives(m, layout, rank, shape.tokens, shape.logit_rows, itemsize)
    inside = [c for c in coll if c.op in ("all_reduce", "all_gather")]
    comm = sum(calib.collective_time(c.op, c.wire_bytes, c.group_size, graph) + calib.sync_per_collective_s for c in inside)
    # The two tensors of a boundary (hidden, residual) travel back to back: one message each.
    p2p = sum(calib.collective_time("send_recv", c.wire_bytes, 2, False) for c in coll if c.op == "recv")
    if graph:
        overhead = calib.graph_layer_s * len(sh.layers)
    else:  # eager: the CPU launches the kernels; time is lost where launching is slower than the GPU's work
        overhead = max(0.0, calib.eager_layer_s * len(sh.layers) - compute)
    return StageTime(compute, comm, p2p, overhead, coll)


@dataclass(frozen=True)
class Memory:
    """Bytes per GPU (the fullest rank of the replica) and the KV cache left for sequences."""

    weights: int
    activations: int
    usable: int  # memory x gpu_memory_utilization
    kv_bytes_per_token: int  # on the fullest rank

    @property
    def kv_cache(self) -> int:
        return max(self.usable - self.weights - self.activations, 0)

    @property
    def kv_tokens(self) -> int:
        return self.kv_cache // self.kv_bytes_per_token if self.kv_bytes_per_token else 0


def rank_weights(m: ModelConfig, sh: RankShard, itemsize: int) -> int:
    H, D = m.hidden_size, m.head_dim
    per_layer = H * (sh.q_heads + 2 * sh.kv_heads) * D + sh.q_heads * D * H + 3 * H * sh.intermediate + 2 * H
    params = len(sh.layers) * per_layer
    if sh.first:
        params += sh.vocab_rows * H  # embedding
    if sh.last:
        params += H  # final norm
        if not (m.tie_word_embeddings and sh.first):  # a tied head on a later stage keeps its own copy of the rows
            params += sh.vocab_rows * H
    return params * itemsize


def rank_memory(m: ModelConfig, layout: Layout, calib: Calibration, itemsize: int, max_num_batched_tokens: int,
                gpu_memory_utilization: float = 0.9) -> Memory:
    """The rank whose cache holds the fewest tokens: every rank allocates the block count of the smallest."""
    worst = None
    tp = layout.tp
    # ModelRunner._activation_bytes: a step's temporaries at the full token budget
    per_token = 3 * m.hidden_size + 2 * (m.num_heads + 2 * m.num_kv_heads) * m.head_dim // tp + 3 * m.intermediate_size // tp
    act = max_num_batched_tokens * per_token * itemsize + ACTIVATION_SLACK_BYTES
    for rank in range(layout.replica):
        sh = rank_shard(m, layout, rank)
        weights = rank_weights(m, sh, itemsize)
        kv = 2 * sh.kv_heads * m.head_dim * itemsize * len(sh.layers)
        mem = Memory(weights, act, int(calib.memory_bytes * gpu_memory_utilization), kv)
        if worst is None or mem.kv_tokens < worst.kv_tokens:
            worst = mem
    return worst
