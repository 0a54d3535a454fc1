"""Ulysses sequence parallelism for inference, and Shift parallelism on top of it.

Sequence parallelism (SP) over S ranks: every rank holds the whole weights and a contiguous 1/S slice of the
step's tokens (padded to a multiple of S). Around attention, one all-to-all sends each rank the q/k/v of the
heads it attends with, for every token, and one sends the attention output back to the tokens' owners. The
final hidden states are gathered, so the LM head and the sampler see the full batch.

A rank attends with the same heads a tensor-parallel split over the same S ranks would give it, so the KV
cache is laid out by heads identically in both modes. Shift uses that: a step with few tokens runs as tensor
parallelism (`shifted`), each layer taking a view of its own rows or columns of the weights it already holds
(the projections store rank groups contiguously for this), and one KV cache serves both modes.
"""

from __future__ import annotations

import torch

from plait.comm.communicator import Communicator
from plait.layers.activation import silu_mul
from plait.layers.heads import HeadExchange
from plait.layers.linear import ColumnParallelLinear, RowParallelLinear
from plait.layers.norm import RMSNorm
from plait.parallel.tensor import HeadShard, TensorParallel, gate_up_segments, qkv_segments, split_range


class SequenceParallel:
    def __init__(self, comm: Communicator, shift_threshold: int | None = None):
        """`shift_threshold`: steps of at most this many tokens run tensor-parallel (Shift); None = always SP."""
        self.sp, self.shift_threshold = comm, shift_threshold
        self.comm = Communicator.single()  # partial sums to reduce in SP mode: none, the weights are whole
        self.shifted = False
        self._tp = [TensorParallel(_Position(j, comm.size)) for j in range(comm.size)]  # each rank's TP-mode view

    @property
    def rank(self) -> int:
        return self.sp.rank

    @property
    def size(self) -> int:
        return self.sp.size

    def choose_mode(self, num_tokens: int) -> None:
        """Every rank sees the same plan, so every rank makes the same choice."""
        self.shifted = self.shift_threshold is not None and num_tokens <= self.shift_threshold

    def split(self, n: int) -> tuple[int, int]:
        return 0, n  # embedding and LM head: whole on every rank

    def sizes(self, n: int) -> list[int]:
        return [n]

    def heads(self, H: int, KV: int) -> HeadShard:
        return self._tp[self.rank].heads(H, KV)

    def norm(self, dim: int, eps: float) -> RMSNorm:
        return RMSNorm(dim, eps)  # every row-parallel layer reduces its own sum (a shifted step's, or none)

    def qkv_proj(self, hidden: int, H: int, KV: int, D: int, bias: bool) -> ColumnParallelLinear:
        """Every rank's q|k|v rows, grouped by rank: the projection's output is already packed per destination."""
        groups = [qkv_segments(tp.heads(H, KV), H, KV, D) for tp in self._tp]
        return ColumnParallelLinear(hidden, [seg for g in groups for seg in g], bias, self._rows(groups), self)

    def head_exchange(self, H: int, KV: int, D: int) -> HeadExchange:
        heads = [(h.num_q, h.num_kv) for h in (tp.heads(H, KV) for tp in self._tp)]
        return HeadExchange(heads, self.rank, D, self.sp, self)

    def o_proj(self, H: int, KV: int, D: int, hidden: int, bias: bool) -> RowParallelLinear:
        h = self.heads(H, KV)
        return RowParallelLinear(H * D, hidden, (0, H * D), self.comm, bias, ((h.q_start * D, h.q_end * D), self.sp), self)

    def gate_up_proj(self, hidden: int, inter: int, bias: bool) -> ColumnParallelLinear:
        groups = [gate_up_segments(inter, *split_range(inter, self.size, j)) for j in range(self.size)]
        return ColumnParallelLinear(hidden, [seg for g in groups for seg in g], bias, self._rows(groups), self)

    def activation(self, inter: int):
        widths = [2 * (b - a) for a, b in (split_range(inter, self.size, j) for j in range(self.size))]

        def grouped_silu_mul(x: torch.Tensor) -> torch.Tensor:
            """x: [T, (gate|up) per rank group]; SP mode -> [T, inter] in natural order; shifted -> own group."""
            if self.shifted:
                return silu_mul(x)
            return torch.cat([silu_mul(part) for part in x.split(widths, dim=1)], dim=1)

        return grouped_silu_mul

    def down_proj(self, inter: int, hidden: int, bias: bool) -> RowParallelLinear:
        return RowParallelLinear(inter, hidden, (0, inter), self.comm, bias, (split_range(inter, self.size, self.rank), self.sp), self)

    def _rows(self, groups) -> tuple[int, int]:
        """This rank's rows within a projection that stores every rank's group in rank order."""
        start = sum(seg.rows for g in groups[: self.rank] for seg in g)
        return start, start + sum(seg.rows for seg in groups[self.rank])


class _Position:
    """A rank's place in a group, for computing its tensor-parallel slices (no collective is called on it)."""

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size
