"""Column- and row-parallel linears whose slices come from the parallel plan.

A column-parallel layer may merge several checkpoint weights (q/k/v, gate/up) into one matmul: its output
rows are a list of `Segment`s, each a row range of one named checkpoint tensor. Loading reads only those
rows, so a rank never holds a whole weight it needs a shard of.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from plait.comm.communicator import Communicator


@dataclass(frozen=True)
class Segment:
    name: str  # checkpoint sub-name, e.g. "q_proj"
    full_rows: int  # rows of the whole checkpoint tensor
    start: int  # first row this rank holds
    end: int

    @property
    def rows(self) -> int:
        return self.end - self.start


class ColumnParallelLinear(nn.Module):
    """y[:, segments] = x @ W[segments].T (+ b): no communication; the output stays sharded.

    `shift_rows`: under Shift parallelism the layer holds every rank's rows (sequence-parallel mode); in a
    tensor-parallel step (`plan.shifted`) it uses only this rank's rows, a view: no second copy of the weight.
    """

    def __init__(self, in_features: int, segments: list[Segment], bias: bool,
                 shift_rows: tuple[int, int] | None = None, plan=None):
        super().__init__()
        self.in_features, self.segments = in_features, segments
        self.shift_rows, self.plan = shift_rows, plan
        out = sum(s.rows for s in segments)
        self.weight = nn.Parameter(torch.empty(out, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out), requires_grad=False) if bias else None
        self.output_sizes = [s.rows for s in segments]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, in] -> [T, sum(rows)]
        if self.shift_rows is not None and self.plan.shifted:
            a, b = self.shift_rows
            return nn.functional.linear(x, self.weight[a:b], None if self.bias is None else self.bias[a:b])
        return nn.functional.linear(x, self.weight, self.bias)

    def expected_shape(self, name: str, kind: str) -> tuple[int, ...]:
        seg = self._segment(name)
        return (seg.full_rows, self.in_features) if kind == "weight" else (seg.full_rows,)

    def load(self, name: str, kind: str, read) -> None:
        """read(dim, start, end) -> the checkpoint tensor's slice; `kind` is "weight" or "bias". A name may have
        several segments (sequence parallelism groups every rank's q, k, v rows together)."""
        offset = 0
        for seg in self.segments:
            if seg.name == name:
                dst = (self.weight if kind == "weight" else self.bias)[offset : offset + seg.rows]
                dst.copy_(read(0, seg.start, seg.end))
            offset += seg.rows

    def _segment(self, name: str) -> Segment:
        return next(s for s in self.segments if s.name == name)


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_r @ W[:, cols_r].T, then + b once: one all-reduce per call, or none with `defer`,
    where the norm that follows reduces (fused with the residual add and the norm).

    `shift`: (columns, group) of a tensor-parallel step under Shift parallelism, where the layer holds every
    column (sequence-parallel mode, no reduce) and a shifted step uses a view of its own columns and reduces.
    """

    def __init__(self, in_features: int, out_features: int, cols: tuple[int, int], comm: Communicator, bias: bool,
                 shift: tuple[tuple[int, int], Communicator] | None = None, plan=None, defer: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.cols, self.comm = in_features, out_features, cols, comm
        self.shift, self.plan, self.defer = shift, plan, defer
        self.weight = nn.Parameter(torch.empty(out_features, cols[1] - cols[0]), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, local in] -> [T, out], summed over ranks
        if self.defer:
            return self._partial_sum(x)
        if self.shift is not None and self.plan.shifted:
            (a, b), comm = self.shift
            y = comm.all_reduce(nn.functional.linear(x, self.weight[:, a - self.cols[0] : b - self.cols[0]]))
        else:
            y = self.comm.all_reduce(nn.functional.linear(x, self.weight))
        return y if self.bias is None else y + self.bias

    def _partial_sum(self, x: torch.Tensor) -> torch.Tensor:
        """`defer`: this rank's share of the sum, reduced by the norm after (plait.layers.norm.AllReduceRMSNorm);
        written straight into the fused op's buffer when it takes this step. The bias is added once, by rank 0."""
        out = self.comm.partial_sum_buffer(x.shape[0])
        y = nn.functional.linear(x, self.weight) if out is None else torch.mm(x, self.weight.t(), out=out)
        if self.bias is not None and self.comm.rank == 0:
            y += self.bias
        return y

    def expected_shape(self, name: str, kind: str) -> tuple[int, ...]:
        return (self.out_features, self.in_features) if kind == "weight" else (self.out_features,)

    def load(self, name: str, kind: str, read) -> None:
        if kind == "weight":
            self.weight.copy_(read(1, *self.cols))
        else:
            self.bias.copy_(read(0, 0, None))
