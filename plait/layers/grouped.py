"""Layers of all the Parallel Track tracks a rank holds at once: each weight stacked on a leading track dimension, so
a projection is one batched GEMM (torch.bmm) for every local track instead of one GEMM per track.

Activations are [tracks, T, width]. Inside a track the tensor-parallel plan shards as for a dense layer (the same
rows or columns of every track). The checkpoint stays per track (model.tracks.{k}.layers.{i}...): the model hands a
track's tensor to its layer as "{k}.{name}" (ParallelTrackForCausalLM.grouped_target) and the layer fills slice
k - first of its stacked parameter.
"""

from __future__ import annotations

import torch
from torch import nn

from plait.comm.communicator import Communicator
from plait.layers.linear import Segment, linear_shape, load_columns, load_segments, segment_shape
from plait.layers.norm import RMSNorm, load_norm


class TrackSlots:
    """Which checkpoint tracks the leading dimension of a grouped layer's parameters holds, in order."""

    tracks: range

    def tensor_names(self, leaf: str) -> list[str]:
        """The checkpoint tensors this layer expects (leaf: its own name in the model), one per track."""
        return [f"{k}.{leaf}" for k in self.tracks]

    def slot(self, name: str) -> tuple[int, str]:
        """A tensor's name as the model hands it over, "{k}.{name}" -> (track k's index in the stacked dim, name)."""
        track, name = name.split(".", 1)
        return int(track) - self.tracks.start, name


class GroupedColumnLinear(TrackSlots, nn.Module):
    """y[k] = x[k] @ W[k][segments].T (+ b[k]) for each local track k, in one batched GEMM; no communication.
    `segments`: one track's rows (q|k|v or gate|up), as the tensor-parallel plan inside a track shards them."""

    def __init__(self, tracks: range, in_features: int, segments: list[Segment], bias: bool):
        super().__init__()
        self.tracks, self.in_features, self.segments = tracks, in_features, segments
        out = sum(s.rows for s in segments)
        self.weight = nn.Parameter(torch.empty(len(tracks), out, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(len(tracks), 1, out), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [tracks, T, in] -> [tracks, T, sum(rows)]
        w = self.weight.transpose(1, 2)
        return torch.bmm(x, w) if self.bias is None else torch.baddbmm(self.bias, x, w)

    def tensor_names(self, leaf: str) -> list[str]:
        """One tensor per segment (q, k, v or gate, up) per track."""
        return [f"{k}.{s.name}" for k in self.tracks for s in self.segments]

    def expected_shape(self, name: str, kind: str) -> tuple[int, ...]:
        return segment_shape(self.segments, self.slot(name)[1], kind, self.in_features)

    def load(self, name: str, kind: str, read) -> None:
        slot, name = self.slot(name)
        load_segments(self.weight[slot] if kind == "weight" else self.bias[slot, 0], self.segments, name, read)


class GroupedRowLinear(TrackSlots, nn.Module):
    """y[k] = x[k] @ W[k][:, cols].T, summed over the ranks of a track (one all-reduce of all local tracks; none when
    a track is on one rank), then + b[k]. `cols`: this rank's columns of one track's weight."""

    def __init__(self, tracks: range, in_features: int, out_features: int, cols: tuple[int, int], comm: Communicator,
                 bias: bool):
        super().__init__()
        self.tracks, self.in_features, self.out_features = tracks, in_features, out_features
        self.cols, self.comm = cols, comm
        self.weight = nn.Parameter(torch.empty(len(tracks), out_features, cols[1] - cols[0]), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(len(tracks), 1, out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [tracks, T, local in] -> [tracks, T, out]
        y = self.comm.all_reduce(torch.bmm(x, self.weight.transpose(1, 2)))
        return y if self.bias is None else y + self.bias

    def expected_shape(self, name: str, kind: str) -> tuple[int, ...]:
        return linear_shape(self.out_features, self.in_features, kind)

    def load(self, name: str, kind: str, read) -> None:
        slot, _ = self.slot(name)
        load_columns(self.weight[slot] if kind == "weight" else self.bias[slot, 0], kind, self.cols, read)


class GroupedRMSNorm(TrackSlots, RMSNorm):
    """Each local track's own norm weights, [tracks, 1, dim], applied to x: [tracks, T, dim] in one op (the weight
    broadcasts over the tokens; on GPU the fused kernel picks each row's track)."""

    def __init__(self, tracks: range, dim: int, eps: float):
        super().__init__((len(tracks), 1, dim), eps)
        self.tracks = tracks

    def expected_shape(self, name: str, kind: str) -> tuple[int, ...]:
        return (self.weight.shape[-1],)

    def load(self, name: str, kind: str, read) -> None:
        load_norm(self.weight[self.slot(name)[0], 0], read)


class GroupedHeadNorm(GroupedRMSNorm):
    """A per-head norm (Qwen3's q/k norm) of each track's own weights, over heads laid side by side, track-major:
    x: [T, tracks * heads, head_dim] -> the same shape."""

    def forward(self, x: torch.Tensor, residual: None = None) -> torch.Tensor:
        T, _, D = x.shape
        return super().forward(x.view(T, len(self.tracks), -1, D)).view(x.shape)


class TrackHeadLayout(nn.Module):
    """Between the grouped projections' layout, [tracks, T, heads * D], and attention's, [T, tracks * heads, D] (the
    tracks' heads side by side, track-major: one attention over all local tracks). The head exchange of a grouped
    plan: nothing moves between ranks, only a transpose (a copy when more than one track)."""

    def __init__(self, num_q: int, num_kv: int, head_dim: int):
        super().__init__()
        self.num_q, self.num_kv, self.D = num_q, num_kv, head_dim

    def qkv(self, x: torch.Tensor):
        """x: [tracks, T, q|k|v columns of one track] -> q [T, tracks * heads, D], k, v [T, tracks * kv_heads, D]."""
        n, T, _ = x.shape
        parts = x.split([self.num_q * self.D, self.num_kv * self.D, self.num_kv * self.D], dim=2)
        return tuple(p.view(n, T, -1, self.D).transpose(0, 1).reshape(T, -1, self.D) for p in parts)

    def out(self, o: torch.Tensor) -> torch.Tensor:
        """o: [T, tracks * heads * D] -> [tracks, T, heads * D] (a strided view: the batched GEMM reads it as is)."""
        T = o.shape[0]
        return o.view(T, -1, self.num_q * self.D).transpose(0, 1)
