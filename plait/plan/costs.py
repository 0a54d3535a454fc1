"""Time and memory of one rank: GEMMs and attention against the calibrated rates, collectives against their curves.

A matmul [T, K] @ [K, N] costs the larger of its FLOPs at the matrix rate and its bytes (weight + activations) at
the weight-streaming rate: decode (small T) reads weights, prefill (large T) computes. Attention follows the kernel
the model runner picks (`PagedAttention.forward`):
- all-new prompts, one or long ones (`StepShape.prompt_by_prompt`): PyTorch's flash kernel per prompt, 4 x heads x
  head_dim FLOPs per causal (query, key) pair;
- any cached prefix (chunked prefill, decodes mixed with prompts), or several short new prompts: the paged Triton
  prefill kernel in one launch, which works in tiles of `PREFILL_BLOCK` queries x `PREFILL_BLOCK` keys up to each
  tile's causal end, so a decode row mixed into the step costs a whole tile of queries over its context; it
  reaches its own share of the matrix rate;
- decode: the split-KV kernel, one program per (sequence, KV head, split); it reads the cache at copy bandwidth,
  but each program walks its split token by token, so with few programs (small batch) the walk is the floor.
Elementwise kernels stream their activations at copy bandwidth.

Launch cost: replayed from a CUDA graph (decode steps, and short steps with prompt tokens: `uses_graph`), the
non-GEMM kernels cost a per-layer constant on the GPU. Eagerly, the CPU issues every kernel, a floor the GPU work
may hide: per layer, per prompt attended by flash (the loop over prompts runs in Python), and per collective
(staging, the symmetric-memory op). Validation records from engines before the one-launch path (every all-new step
went prompt by prompt) are priced as their engine ran them (`StepShape.one_launch`).
Memory follows the model runner's own sizing (`ModelRunner.num_kv_blocks`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from plait.config import ModelConfig
from plait.engine.cuda_graph import (decode_splits, graph_output_bytes, graph_token_cap, mixed_buckets,
                                     prefill_graph_tokens)
from plait.layers.attention import prefill_block_m
from plait.plan.calibration import Calibration
from plait.plan.collectives import Collective, Sampling, rank_collectives
from plait.plan.shapes import Layout, RankShard, rank_shard, sequence_shards
from plait.plan.workload import StepShape

if TYPE_CHECKING:
    from plait.plan.predict import EngineLimits

PREFILL_BLOCK = prefill_block_m(True)  # the paged prefill kernel's query tile on GPU (its key tile is as wide)
RESIDENT_PER_SM = 2  # decode programs an SM runs at once (decode_splits sizes for about two per SM)
MAX_CONTEXT = 1 << 20  # decode_splits' cap by max_model_len: above 2048 tokens it never binds


def gemm_s(calib: Calibration, tokens: int, k: int, n: int, itemsize: int) -> float:
    flops = 2.0 * tokens * k * n
    nbytes = (k * n + tokens * (k + n)) * itemsize
    return max(flops / calib.matmul_flops, nbytes / calib.gemv_bytes_s)


def paged_prefill_pairs(chunks: tuple[tuple[int, int], ...]) -> int:
    """(query, key) pairs the paged prefill kernel computes: each tile of PREFILL_BLOCK queries (padded) against
    whole key blocks up to its causal end."""
    b = PREFILL_BLOCK
    pairs = 0
    for start, n in chunks:
        for tile in range(-(-n // b)):
            end = min(start + n, start + (tile + 1) * b)
            pairs += b * -(-end // b) * b
    return pairs


def decode_walk_s(calib: Calibration, sh: RankShard, shape: StepShape, graph: bool) -> float:
    """The split-KV decode kernel's floor: programs in waves over the SMs, each walking its split of the longest
    context. Graphs split the context as the engine does for a batch of this size (it picks the split count for the
    batch's bucket, whose padding rows end at once); eager decode runs one split."""
    splits = decode_splits(shape.seqs, sh.kv_heads, MAX_CONTEXT, calib.sm_count) if graph else 1
    waves = -(-shape.seqs * sh.kv_heads * splits // (RESIDENT_PER_SM * calib.sm_count))
    longest = max(s + n for s, n in shape.chunks)
    return waves * -(-longest // splits) * calib.decode_token_s


def attention_s(m: ModelConfig, sh: RankShard, shape: StepShape, calib: Calibration, itemsize: int, graph: bool) -> float:
    """One layer's attention on this rank's heads, priced by the kernel that runs it (module doc)."""
    kv_bytes = 2 * sh.kv_heads * m.head_dim * itemsize * shape.context_tokens
    flops_per_pair = 4.0 * sh.q_heads * m.head_dim
    if shape.prompt_by_prompt:
        rate = calib.matmul_flops * calib.attention_efficiency
        return max(flops_per_pair * shape.attention_pairs / rate, kv_bytes / calib.copy_bytes_s)
    if all(n == 1 for _, n in shape.chunks):  # decode
        return max(kv_bytes / calib.copy_bytes_s, decode_walk_s(calib, sh, shape, graph))
    rate = calib.matmul_flops * calib.paged_attention_efficiency
    return max(flops_per_pair * paged_prefill_pairs(shape.chunks) / rate, kv_bytes / calib.copy_bytes_s)


def dense_s(m: ModelConfig, sh: RankShard, tokens: int, calib: Calibration, itemsize: int) -> float:
    """One decoder layer's GEMMs and elementwise work on `tokens` rows through the weights of `sh`."""
    H, D = m.hidden_size, m.head_dim
    t = gemm_s(calib, tokens, H, (sh.q_heads + 2 * sh.kv_heads) * D, itemsize)  # qkv_proj
    t += gemm_s(calib, tokens, sh.q_heads * D, H, itemsize)  # o_proj
    t += gemm_s(calib, tokens, H, 2 * sh.intermediate, itemsize)  # gate_up_proj
    t += gemm_s(calib, tokens, sh.intermediate, H, itemsize)  # down_proj
    # Norms, residual adds, rotary and silu*mul read and write about 10 hidden and 3 intermediate values a token.
    return t + tokens * (10 * H + 3 * sh.intermediate) * itemsize / calib.copy_bytes_s


def layer_compute_s(m: ModelConfig, sh: RankShard, shape: StepShape, calib: Calibration, itemsize: int,
                    graph: bool) -> float:
    """One decoder layer's GEMMs and attention on this rank's shard (no collectives, no launch overhead)."""
    return dense_s(m, sh, shape.tokens, calib, itemsize) + attention_s(m, sh, shape, calib, itemsize, graph)


def sequence_layer_compute_s(m: ModelConfig, layout: Layout, rank: int, shape: StepShape, calib: Calibration,
                             itemsize: int, graph: bool) -> float:
    """One layer under sequence parallelism. SP mode: the GEMMs run the rank's 1/S of the padded tokens through the
    whole TP shard it holds (replicated weights: each rank reads all of them), attention runs every token for its
    own heads. A Shift TP-mode step: every token through its own part's view of the weights."""
    held, own = sequence_shards(m, layout, rank)
    if layout.shifted(shape.tokens):
        dense = dense_s(m, own, shape.tokens, calib, itemsize)
    else:
        dense = dense_s(m, held, -(-shape.tokens // layout.sp), calib, itemsize)
    return dense + attention_s(m, own, shape, calib, itemsize, graph)


def head_compute_s(m: ModelConfig, sh: RankShard, shape: StepShape, calib: Calibration, itemsize: int) -> float:
    return gemm_s(calib, shape.logit_rows, m.hidden_size, sh.vocab_rows, itemsize) if shape.logit_rows else 0.0


@dataclass(frozen=True)
class StageTime:
    """One step on one pipeline stage (its slowest tensor rank)."""

    compute_s: float
    comm_s: float  # collectives inside the stage (all-reduces, all-gathers, all-to-alls, the tokens' broadcast), GPU time
    p2p_s: float  # receiving this stage's input from the stage before
    overhead_s: float  # non-GEMM kernels replayed in a graph
    cpu_s: float  # eager: the CPU's time to issue the step's kernels, from the plan's arrival (0 in a graph)
    collectives: list[Collective]

    @property
    def gpu_s(self) -> float:
        """The GPU's work once its input is there."""
        return self.compute_s + self.comm_s + self.p2p_s + self.overhead_s

    @property
    def total_s(self) -> float:
        """The stage alone: its GPU work, or the CPU issuing it when that is slower."""
        return max(self.gpu_s, self.cpu_s)


def uses_graph(calib: Calibration, layout: Layout, shape: StepShape, lim: EngineLimits) -> bool:
    """Whether the model runner replays the step from a CUDA graph (GPU, no prompt logprobs asked): a decode step that fits
    a batch bucket (on a pipeline stage its body, the stage-to-stage transfers eager around it; in sequence-parallel
    mode its SP forward); on one stage in tensor-parallel mode (under Shift, steps up to the threshold), one whole
    new prompt alone in its step that fits a prefill bucket, or several sequences that fit a mixed bucket unless
    they are new prompts flash attends one by one (`max_prefill_graph_tokens` bounds both)."""
    if calib.device != "cuda" or lim.enforce_eager or (lim.prompt_logprobs and shape.phase != "decode"):
        return False  # a decode row never asks for prompt logprobs
    if layout.pp > 1 or (layout.sp > 1 and not layout.shifted(shape.tokens)):
        return shape.phase == "decode" and lim.layout_graphs and shape.seqs <= lim.max_num_seqs
    if shape.phase == "decode":
        return shape.seqs <= lim.max_num_seqs
    cap = graph_token_cap(lim.max_prefill_graph_tokens, lim.max_num_batched_tokens, layout.shift_threshold)
    if shape.seqs == 1:
        return shape.fresh and shape.logit_rows == 1 and shape.tokens <= prefill_graph_tokens(cap)
    return lim.mixed_graphs and shape.tokens <= max(mixed_buckets(cap), default=0) and not shape.prompt_by_prompt


def eager_issue_s(calib: Calibration, layers: int, shape: StepShape, collectives: int) -> float:
    """The CPU's time to issue one eager step's kernels (module doc): per layer, per prompt attended by flash, per
    collective."""
    per_layer = calib.eager_layer_s + (calib.eager_seq_layer_s * shape.seqs if shape.prompt_by_prompt else 0.0)
    return per_layer * layers + calib.eager_collective_s * collectives


def rank_compute_s(m: ModelConfig, layout: Layout, rank: int, shape: StepShape, calib: Calibration, itemsize: int,
                   graph: bool) -> float:
    """One step's GEMMs, attention and LM head on one rank of a replica."""
    sh = rank_shard(m, layout, rank)
    if layout.sp > 1:
        compute = len(sh.layers) * sequence_layer_compute_s(m, layout, rank, shape, calib, itemsize, graph)
    else:
        compute = len(sh.layers) * layer_compute_s(m, sh, shape, calib, itemsize, graph)
    return compute + (head_compute_s(m, sh, shape, calib, itemsize) if sh.last else 0.0)


def stage_time(m: ModelConfig, layout: Layout, stage: int, shape: StepShape, calib: Calibration, itemsize: int,
               graph: bool, sampling: Sampling = Sampling()) -> StageTime:
    width = layout.tp * layout.sp  # the ranks of one stage
    ranks = range(stage * width, (stage + 1) * width)
    times = {r: rank_compute_s(m, layout, r, shape, calib, itemsize, graph) for r in ranks}
    rank = max(times, key=times.get)  # the slowest rank sets the stage's pace
    compute = times[rank]
    layers = len(rank_shard(m, layout, rank).layers)
    coll = rank_collectives(m, layout, rank, shape.tokens, shape.logit_rows, itemsize, shape.samples, sampling)
    inside = [c for c in coll if c.op not in ("send", "recv")]
    comm = sum(calib.collective_time(c.op, c.wire_bytes, c.group_size, graph) + calib.sync_per_collective_s for c in inside)
    # The two tensors of a boundary (hidden, residual) travel back to back: one message each.
    p2p = sum(calib.collective_time("send_recv", c.wire_bytes, 2, False) for c in coll if c.op == "recv")
    if graph:
        return StageTime(compute, comm, p2p, calib.graph_layer_s * layers, 0.0, coll)
    return StageTime(compute, comm, p2p, 0.0, eager_issue_s(calib, layers, shape, len(inside)), coll)


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
                gpu_memory_utilization: float = 0.9, graph_batch: int = 0) -> Memory:
    """The rank whose cache holds the fewest tokens: every rank allocates the block count of the smallest. Under
    sequence parallelism a rank holds its whole TP shard (replicated over SP) and caches its own part's KV heads.
    `graph_batch`: the largest decode batch captured in graphs (0: none), whose outputs the graphs keep."""
    worst = None
    act = m.step_activation_bytes(max_num_batched_tokens, layout.tp, itemsize)  # ModelRunner._activation_bytes
    if graph_batch:
        act += graph_output_bytes(graph_batch, m.vocab_size, layout.sp)
    for rank in range(layout.replica):
        held, own = sequence_shards(m, layout, rank) if layout.sp > 1 else (rank_shard(m, layout, rank),) * 2
        kv = 2 * own.kv_heads * m.head_dim * itemsize * len(own.layers)
        mem = Memory(rank_weights(m, held, itemsize), act, int(calib.memory_bytes * gpu_memory_utilization), kv)
        if worst is None or mem.kv_tokens < worst.kv_tokens:
            worst = mem
    return worst
