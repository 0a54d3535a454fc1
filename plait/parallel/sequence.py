"""Ulysses sequence parallelism for inference, alone or with tensor parallelism, and Shift parallelism on top.

Sequence parallelism (SP) over S ranks, times tensor parallelism (TP) over T: S*T ranks, replica rank r = s*T + t
(TP innermost, so a TP group is T consecutive ranks, on one machine where it can be). A TP group of S=1 is plain
TP; T=1 is plain SP. Rank (s, t) holds TP shard t of the weights (replicated over the S ranks of its SP group)
and a contiguous 1/S slice of the step's tokens (padded to a multiple of S). Around attention, one all-to-all
within the SP group sends each rank the q/k/v of the heads it attends with, for every token, and one sends the
attention output back to the tokens' owners; the row-parallel layers all-reduce their partial sums within the
TP group. The final hidden states are gathered over the SP group, so the LM head and the sampler see every token.

Heads and MLP columns are split S*T ways as a TP split over all ranks would split them, rank (s, t) taking part
j = t*S + s (`SequenceGrid`). So TP shard t (parts t*S .. t*S + S-1) is a contiguous range of heads and columns,
and the KV cache is laid out by heads exactly as a TP-mode step over all S*T ranks needs it. Shift uses that: a
step with few tokens runs as tensor parallelism over the whole stage (`shifted`), each layer taking a view of
its own part of the weights it already holds (the projections store the SP peers' parts contiguously for this),
all-reducing over all S*T ranks; one KV cache serves both modes, nothing moves on a switch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from plait.comm.communicator import Communicator
from plait.layers.activation import silu_mul
from plait.layers.attention import AttentionMetadata
from plait.layers.heads import HeadExchange
from plait.layers.linear import ColumnParallelLinear, RowParallelLinear
from plait.layers.norm import RMSNorm
from plait.parallel.tensor import HeadShard, TensorParallel, gate_up_segments, qkv_segments


@dataclass(frozen=True)
class SequenceGrid:
    """A rank's place in the S x T grid, and each of its SP peers' part of the S*T-way head and column split."""

    sp_rank: int
    sp_size: int
    tp_rank: int
    tp_size: int

    @property
    def part(self) -> int:
        """This rank's part of the S*T-way split (its heads and its TP-mode columns)."""
        return self.tp_rank * self.sp_size + self.sp_rank

    def peers(self) -> list[TensorParallel]:
        """The TP-mode plan of each rank of this SP group, in SP rank order: the parts of TP shard `tp_rank`."""
        size = self.sp_size * self.tp_size
        return [TensorParallel(_Position(self.tp_rank * self.sp_size + k, size)) for k in range(self.sp_size)]


class SequenceParallel:
    defer_reduce = False  # each row-parallel layer reduces its own sum: the norm after it never does

    def __init__(self, sp: Communicator, tp: Communicator, stage: Communicator, shift_threshold: int | None = None):
        """sp: this rank's SP group (same weights, other tokens); tp: its TP group (same tokens, other weights), over
        which SP-mode partial sums are reduced; stage: all S*T ranks, over which a shifted step reduces.
        `shift_threshold`: steps of at most this many tokens run tensor-parallel (Shift); None = always SP."""
        assert stage.size == sp.size * tp.size, f"a stage of {stage.size} ranks is not SP {sp.size} x TP {tp.size}"
        self.sp, self.comm, self.stage, self.shift_threshold = sp, tp, stage, shift_threshold
        self.shifted = False
        self._shard = TensorParallel(tp)  # the TP group's split: embedding and LM head rows
        self._tp = SequenceGrid(sp.rank, sp.size, tp.rank, tp.size).peers()  # each SP peer's TP-mode view

    @property
    def rank(self) -> int:
        return self.sp.rank

    @property
    def size(self) -> int:
        return self.sp.size

    def choose_mode(self, num_tokens: int) -> None:
        """Every rank sees the same plan, so every rank makes the same choice."""
        self.shifted = self.shift_threshold is not None and num_tokens <= self.shift_threshold

    @contextlib.contextmanager
    def mode(self, shifted: bool):
        """Layers traced inside run in this mode, whatever the step's size: how a CUDA graph of either mode is
        captured (a replayed graph keeps the mode it was captured in). The mode before is restored after."""
        saved, self.shifted = self.shifted, shifted
        try:
            yield
        finally:
            self.shifted = saved

    def forward(self, model: nn.Module, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """An SP-mode step: this rank embeds and runs its contiguous 1/S of the tokens (T, a multiple of S),
        attention sees them all through the head exchange, and the final hidden states are gathered so the LM head
        and the sampler see every token. -> [T, hidden]"""
        local = ids.shape[0] // self.size
        hidden = model(ids[self.rank * local : (self.rank + 1) * local], positions, meta)  # [T/S, hidden]
        return self.sp.all_gather(hidden, [local] * self.size, dim=0)

    def split(self, n: int) -> tuple[int, int]:
        """Embedding and LM head rows: vocab-parallel over the TP group, the same in both modes."""
        return self._shard.split(n)

    def sizes(self, n: int) -> list[int]:
        return self._shard.sizes(n)

    def heads(self, H: int, KV: int) -> HeadShard:
        return self._tp[self.rank].heads(H, KV)

    def norm(self, dim: int, eps: float) -> RMSNorm:
        return RMSNorm(dim, eps)  # every row-parallel layer reduces its own sum, in either mode

    def head_norm(self, dim: int, eps: float) -> RMSNorm:
        return RMSNorm(dim, eps)  # after the head exchange every head is whole on the rank that attends with it

    def qkv_proj(self, hidden: int, H: int, KV: int, D: int, bias: bool) -> ColumnParallelLinear:
        """The SP peers' q|k|v rows, grouped by peer: the projection's output is already packed per destination."""
        groups = [qkv_segments(tp.heads(H, KV), H, KV, D) for tp in self._tp]
        return ColumnParallelLinear(hidden, [seg for g in groups for seg in g], bias, self._rows(groups), self)

    def head_exchange(self, H: int, KV: int, D: int) -> HeadExchange:
        heads = [(h.num_q, h.num_kv) for h in (tp.heads(H, KV) for tp in self._tp)]
        return HeadExchange(heads, self.rank, D, self.sp, self)

    def o_proj(self, H: int, KV: int, D: int, hidden: int, bias: bool) -> RowParallelLinear:
        first, last, mine = (tp.heads(H, KV) for tp in (self._tp[0], self._tp[-1], self._tp[self.rank]))
        shard, own = (first.q_start * D, last.q_end * D), (mine.q_start * D, mine.q_end * D)
        return RowParallelLinear(H * D, hidden, shard, self.comm, bias, (own, self.stage), self)

    def gate_up_proj(self, hidden: int, inter: int, bias: bool) -> ColumnParallelLinear:
        groups = [gate_up_segments(inter, *tp.split(inter)) for tp in self._tp]
        return ColumnParallelLinear(hidden, [seg for g in groups for seg in g], bias, self._rows(groups), self)

    def activation(self, inter: int):
        widths = [2 * (b - a) for a, b in (tp.split(inter) for tp in self._tp)]

        def grouped_silu_mul(x: torch.Tensor) -> torch.Tensor:
            """x: [T, (gate|up) per peer] -> [T, TP shard's columns] in natural order; shifted: own group only."""
            if self.shifted:
                return silu_mul(x)
            return torch.cat([silu_mul(part) for part in x.split(widths, dim=1)], dim=1)

        return grouped_silu_mul

    def down_proj(self, inter: int, hidden: int, bias: bool) -> RowParallelLinear:
        shard = (self._tp[0].split(inter)[0], self._tp[-1].split(inter)[1])
        return RowParallelLinear(inter, hidden, shard, self.comm, bias, (self._tp[self.rank].split(inter), self.stage), self)

    def _rows(self, groups) -> tuple[int, int]:
        """This rank's rows within a projection that stores every SP peer's group in SP rank order."""
        start = sum(seg.rows for g in groups[: self.rank] for seg in g)
        return start, start + sum(seg.rows for seg in groups[self.rank])


def check_sequence_parallel(sp: int, tp: int, num_heads: int, num_kv_heads: int) -> None:
    """Every rank of the S*T grid attends with at least one query head (uneven splits and KV-head replication work)."""
    if sp * tp > num_heads:
        raise ValueError(
            f"sequence_parallel_size ({sp}) x tensor_parallel_size ({tp}) = {sp * tp} ranks split the model's "
            f"{num_heads} attention heads ({num_kv_heads} KV heads): a rank would attend with no head. "
            f"Use sp x tp <= {num_heads}."
        )


@dataclass(frozen=True)
class _Position:
    """A rank's place in a group, for computing its tensor-parallel slices (no collective is called on it)."""

    rank: int
    size: int
