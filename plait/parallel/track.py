"""Parallel Track serving as data: which tracks a rank runs, and the groups it talks in.

M ranks serve a model of T tracks (docs/parallel_track.md):
- M = T x t: track k runs on ranks k*t .. k*t+t-1, tensor-parallel over them (the "track" group of t ranks);
  ranks at the same position of their tracks form a "combine" group of T ranks, whose one all-reduce per block
  of D layers sums the tracks (every rank of a track holds the track's whole state).
- M < T: rank r runs a contiguous range of tracks (near-equal; uneven is legal, as for heads), sums them, and the
  combine all-reduce runs over all M ranks.
- M = 1: every track on one rank and no collective at all: the reference the other layouts are tested against.
The vocabulary (embedding, LM head) is split over all M ranks, as tensor parallelism splits it.

A rank's tracks run side by side, not one after another: the plan hands the model grouped layers
(plait.layers.grouped) whose weights stack the local tracks on a leading dimension, so each projection is one
batched GEMM, each norm one op and each layer's attention one call over all the local tracks' heads. The same
layers serve every layout (a single track is a stack of one), sharded inside a track by the tensor-parallel plan.
"""

from __future__ import annotations

from dataclasses import dataclass

from plait.comm.communicator import Communicator
from plait.config import ModelConfig, ParallelConfig
from plait.layers.activation import silu_mul
from plait.layers.grouped import (GroupedColumnLinear, GroupedHeadNorm, GroupedRMSNorm, GroupedRowLinear,
                                  TrackHeadLayout)
from plait.parallel.tensor import HeadShard, TensorParallel, gate_up_segments, qkv_segments, split_range


@dataclass(frozen=True)
class TrackLayout:
    """Pure arithmetic of the layout, so it can be checked on the driver and tested without processes."""

    num_tracks: int
    num_ranks: int

    def __post_init__(self) -> None:
        T, M = self.num_tracks, self.num_ranks
        if M > T and M % T:
            raise ValueError(
                f"{M} ranks cannot serve {T} tracks: use at most {T} ranks (several tracks each) or a multiple of {T} "
                f"(each track tensor-parallel over its own ranks)"
            )

    @property
    def ranks_per_track(self) -> int:
        return max(1, self.num_ranks // self.num_tracks)

    def tracks_of(self, rank: int) -> range:
        if self.num_ranks >= self.num_tracks:
            track = rank // self.ranks_per_track
            return range(track, track + 1)
        return range(*split_range(self.num_tracks, self.num_ranks, rank))

    def track_groups(self) -> list[list[int]]:
        """The ranks that run one track together, tensor-parallel (parts of one rank when t = 1)."""
        t = self.ranks_per_track
        return [list(range(first, first + t)) for first in range(0, self.num_ranks, t)]

    def combine_groups(self) -> list[list[int]]:
        """The ranks whose all-reduce combines the tracks: one per position inside a track."""
        t = self.ranks_per_track
        return [list(range(j, self.num_ranks, t)) for j in range(t)]


@dataclass(frozen=True)
class TrackHeads:
    """The heads a rank attends with: each local track's shard of its own heads, side by side, track-major. Query head
    j of local track s reads KV head s * shard.num_kv + shard.kv_index()[j], so one attention over them all is each
    track's attention over its own heads (and one KV cache per layer holds every local track's KV heads)."""

    shard: HeadShard  # one track's heads on this rank (the tensor-parallel plan inside a track)
    num_tracks: int  # local tracks

    @property
    def num_q(self) -> int:
        return self.num_tracks * self.shard.num_q

    @property
    def num_kv(self) -> int:
        return self.num_tracks * self.shard.num_kv

    def kv_index(self) -> list[int]:
        return [s * self.shard.num_kv + j for s in range(self.num_tracks) for j in self.shard.kv_index()]


class TrackParallel:
    """The plan handed to a PT model: its tracks on this rank, the TP plan inside a track, the vocabulary's TP plan
    over all M ranks, and the communicator that combines the tracks.

    It hands out the layers of one decoder layer of every local track at once (the same calls as TensorParallel's,
    so the Llama decoder layer is built from it unchanged): activations [local tracks, T, width], weights stacked."""

    def __init__(self, tracks: range, track: TensorParallel, vocab: TensorParallel, combine: Communicator):
        self.tracks, self.track, self.vocab, self.combine = tracks, track, vocab, combine

    def heads(self, H: int, KV: int) -> TrackHeads:
        return TrackHeads(self.track.heads(H, KV), len(self.tracks))

    def norm(self, dim: int, eps: float) -> GroupedRMSNorm:
        return GroupedRMSNorm(self.tracks, dim, eps)

    def head_norm(self, dim: int, eps: float) -> GroupedHeadNorm:
        return GroupedHeadNorm(self.tracks, dim, eps)

    def qkv_proj(self, hidden: int, H: int, KV: int, D: int, bias: bool) -> GroupedColumnLinear:
        return GroupedColumnLinear(self.tracks, hidden, qkv_segments(self.track.heads(H, KV), H, KV, D), bias)

    def head_exchange(self, H: int, KV: int, D: int) -> TrackHeadLayout:
        h = self.track.heads(H, KV)
        return TrackHeadLayout(h.num_q, h.num_kv, D)

    def o_proj(self, H: int, KV: int, D: int, hidden: int, bias: bool) -> GroupedRowLinear:
        h = self.track.heads(H, KV)
        return GroupedRowLinear(self.tracks, H * D, hidden, (h.q_start * D, h.q_end * D), self.track.comm, bias)

    def gate_up_proj(self, hidden: int, inter: int, bias: bool) -> GroupedColumnLinear:
        return GroupedColumnLinear(self.tracks, hidden, gate_up_segments(inter, *self.track.split(inter)), bias)

    def activation(self, inter: int):
        return silu_mul  # on [tracks, T, 2 x inter]: elementwise, so the same op as one track's

    def down_proj(self, inter: int, hidden: int, bias: bool) -> GroupedRowLinear:
        return GroupedRowLinear(self.tracks, inter, hidden, self.track.split(inter), self.track.comm, bias)

    @classmethod
    def over(cls, comm: Communicator, num_tracks: int) -> "TrackParallel":
        """Lay T tracks over the ranks of `comm`; every rank creates the same sub-groups in the same order."""
        layout = TrackLayout(num_tracks, comm.size)
        track_comm = comm.split(layout.track_groups())
        combine_comm = comm.split(layout.combine_groups())
        return cls(layout.tracks_of(comm.rank), TensorParallel(track_comm), TensorParallel(comm), combine_comm)


def check_track_parallel(par: ParallelConfig, cfg: ModelConfig) -> None:
    """Refuse, before any rank starts, a layout the model cannot run (nothing to check for a dense model)."""
    if cfg.tracks is None:
        return
    if par.pipeline_parallel_size > 1 or par.sequence_parallel_size > 1:
        raise ValueError(
            f"a Parallel Track model runs its tracks over --tp ranks only (one pipeline stage, no sequence parallelism); "
            f"got pipeline_parallel_size {par.pipeline_parallel_size}, sequence_parallel_size {par.sequence_parallel_size}"
        )
    T, heads = cfg.tracks.num_tracks, cfg.tracks.num_heads
    t = TrackLayout(T, par.tensor_parallel_size).ranks_per_track
    if t > heads:
        raise ValueError(
            f"{par.tensor_parallel_size} ranks put each of the {T} tracks on {t} ranks, more than a track's {heads} "
            f"query heads: use at most {T * heads} ranks"
        )
