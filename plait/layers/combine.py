"""The tracks' meeting point: at the end of each block of a Parallel Track model, h = mean (or sum) of the states."""

from __future__ import annotations

import torch
from torch import nn

from plait.comm.communicator import Communicator


class TrackCombine(nn.Module):
    """Sums the tracks this rank ran, then one all-reduce over the combine group adds every other track's: the
    only collective of a block (docs/parallel_track.md). A group of one rank (all tracks here) costs nothing."""

    def __init__(self, num_tracks: int, mode: str, comm: Communicator):
        super().__init__()
        self.num_tracks, self.mode, self.comm = num_tracks, mode, comm

    def forward(self, states: torch.Tensor) -> torch.Tensor:  # [local tracks, T, hidden] -> [T, hidden]
        total = self.comm.all_reduce(states.sum(0))
        return total / self.num_tracks if self.mode == "mean" else total
