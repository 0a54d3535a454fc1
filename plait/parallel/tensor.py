"""Tensor parallelism as data: which slice of each weight a rank holds, and the group it sums over.

Layers ask the plan for their slice; the model never branches on the degree. Splits are contiguous and
may be uneven (9 heads over 2 ranks: 5 + 4), because a row-parallel layer only sums partial products and
needs no equal parts. A rank keeps the KV heads its query heads read, so a KV head is replicated on every
rank whose query heads straddle it (GQA with fewer KV heads than ranks, or groups cut by the split).
"""

from __future__ import annotations

from dataclasses import dataclass

from plait.comm.communicator import Communicator
from plait.layers.activation import silu_mul
from plait.layers.heads import HeadExchange
from plait.layers.linear import ColumnParallelLinear, RowParallelLinear, Segment
from plait.layers.norm import AllReduceRMSNorm, RMSNorm


def split_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """Contiguous near-equal chunk `index` of `parts` over range(n); the first n % parts chunks get one more."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (index < extra)


@dataclass(frozen=True)
class HeadShard:
    q_start: int
    q_end: int
    kv_start: int
    kv_end: int
    group: int  # query heads per KV head in the full model

    @property
    def num_q(self) -> int:
        return self.q_end - self.q_start

    @property
    def num_kv(self) -> int:
        return self.kv_end - self.kv_start

    def kv_index(self) -> list[int]:
        """For each local query head, the local KV head it attends with."""
        return [q // self.group - self.kv_start for q in range(self.q_start, self.q_end)]


class TensorParallel:
    """The plan handed to every layer: slices for this rank and the communicator of the TP group.

    The model asks the plan for its parallel layers (`qkv_proj`, `o_proj`, ...), so which rows a rank holds and
    where partial sums are reduced is decided here, not in the model.
    """

    shifted = False  # only a Shift plan ever runs a step in another mode

    def __init__(self, comm: Communicator, defer_reduce: bool = False):
        """`defer_reduce`: the row-parallel layers leave their sums to the norm that follows, which reduces, adds the
        residual and normalises in one op (plait.comm.fused_norm on GPU; all-reduce then add+norm elsewhere)."""
        self.comm, self.defer_reduce = comm, defer_reduce

    @property
    def rank(self) -> int:
        return self.comm.rank

    @property
    def size(self) -> int:
        return self.comm.size

    def split(self, n: int) -> tuple[int, int]:
        return split_range(n, self.size, self.rank)

    def sizes(self, n: int) -> list[int]:
        return [b - a for a, b in (split_range(n, self.size, r) for r in range(self.size))]

    def heads(self, num_heads: int, num_kv_heads: int) -> HeadShard:
        q_start, q_end = self.split(num_heads)
        group = num_heads // num_kv_heads
        return HeadShard(q_start, q_end, q_start // group, -(-q_end // group), group)

    def norm(self, dim: int, eps: float) -> RMSNorm:
        """A norm of the residual stream: the one after a row-parallel layer finishes its all-reduce when deferred."""
        return AllReduceRMSNorm(dim, eps, self.comm) if self.defer_reduce else RMSNorm(dim, eps)

    def head_norm(self, dim: int, eps: float) -> RMSNorm:
        """A per-head norm (Qwen3's q/k norm): every head is whole on its rank, so nothing to reduce."""
        return RMSNorm(dim, eps)

    def qkv_proj(self, hidden: int, H: int, KV: int, D: int, bias: bool) -> ColumnParallelLinear:
        return ColumnParallelLinear(hidden, qkv_segments(self.heads(H, KV), H, KV, D), bias)

    def head_exchange(self, H: int, KV: int, D: int) -> HeadExchange:
        h = self.heads(H, KV)
        return HeadExchange([(h.num_q, h.num_kv)], 0, D)

    def o_proj(self, H: int, KV: int, D: int, hidden: int, bias: bool) -> RowParallelLinear:
        h = self.heads(H, KV)
        return RowParallelLinear(H * D, hidden, (h.q_start * D, h.q_end * D), self.comm, bias, defer=self.defer_reduce)

    def gate_up_proj(self, hidden: int, inter: int, bias: bool) -> ColumnParallelLinear:
        return ColumnParallelLinear(hidden, gate_up_segments(inter, *self.split(inter)), bias)

    def activation(self, inter: int):
        return silu_mul

    def down_proj(self, inter: int, hidden: int, bias: bool) -> RowParallelLinear:
        return RowParallelLinear(inter, hidden, self.split(inter), self.comm, bias, defer=self.defer_reduce)


def qkv_segments(h: HeadShard, H: int, KV: int, D: int) -> list[Segment]:
    return [
        Segment("q_proj", H * D, h.q_start * D, h.q_end * D),
        Segment("k_proj", KV * D, h.kv_start * D, h.kv_end * D),
        Segment("v_proj", KV * D, h.kv_start * D, h.kv_end * D),
    ]


def gate_up_segments(inter: int, start: int, end: int) -> list[Segment]:
    return [Segment("gate_proj", inter, start, end), Segment("up_proj", inter, start, end)]


def check_tensor_parallel(tp: int, num_heads: int, num_kv_heads: int) -> None:
    """Refuse degrees that leave a rank without a query head; every other degree works (uneven is fine)."""
    if tp > num_heads:
        raise ValueError(
            f"tensor_parallel_size ({tp}) is larger than the model's attention heads ({num_heads}, "
            f"{num_kv_heads} KV heads): a rank would hold no head. Use tensor_parallel_size <= {num_heads}."
        )
