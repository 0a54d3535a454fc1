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
        return segment_shape(self.segments, name, kind, self.in_features)

    def load(self, name: str, kind: str, read) -> None:
        """read(dim, start, end) -> the checkpoint tensor's slice; `kind` is "weight" or "bias"."""
        load_segments(self.weight if kind == "weight" else self.bias, self.segments, name, read)


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
        return linear_shape(self.out_features, self.in_features, kind)

    def load(self, name: str, kind: str, read) -> None:
        load_columns(self.weight if kind == "weight" else self.bias, kind, self.cols, read)


# The loading shared by these layers and their grouped forms (plait.layers.grouped), which hand over one track's slice
# of their stacked parameters as `dst`.


def linear_shape(rows: int, in_features: int, kind: str) -> tuple[int, ...]:
    """A whole checkpoint weight, [rows, in], or bias, [rows]: what the loader checks a tensor against."""
    return (rows, in_features) if kind == "weight" else (rows,)


def segment_shape(segments: list[Segment], name: str, kind: str, in_features: int) -> tuple[int, ...]:
    """The whole checkpoint tensor `name` of a column-parallel layer, of which its segments hold rows."""
    return linear_shape(next(s for s in segments if s.name == name).full_rows, in_features, kind)


def load_segments(dst: torch.Tensor, segments: list[Segment], name: str, read) -> None:
    """Fill `dst`'s rows of each segment of checkpoint tensor `name` (read(dim, start, end) -> its slice). A name may
    have several segments (sequence parallelism groups every rank's q, k, v rows together)."""
    offset = 0
    for seg in segments:
        if seg.name == name:
            dst[offset : offset + seg.rows].copy_(read(0, seg.start, seg.end))
        offset += seg.rows


def load_columns(dst: torch.Tensor, kind: str, cols: tuple[int, int], read) -> None:
    """A row-parallel layer's tensor: this rank's columns `cols` of the weight, or the whole bias (added once)."""
    dst.copy_(read(1, *cols) if kind == "weight" else read(0, 0, None))
