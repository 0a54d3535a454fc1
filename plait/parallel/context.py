"""Where a rank sits in its replica: its tensor-parallel group, its pipeline stage, its neighbours.

Built once per process by the executor's worker; the model runner reads it to shape the model (the TP plan,
the stage's layers) and to decide which rank samples (tensor rank 0 of the last stage).
"""

from __future__ import annotations

from dataclasses import dataclass

from plait.comm.communicator import Communicator


@dataclass
class RankContext:
    rank: int  # within the replica
    tp: Communicator  # this stage's tensor-parallel group
    pipe: Communicator | None  # the replica's world group, for send/recv across stage boundaries (None if 1 stage)
    stage: int = 0
    num_stages: int = 1

    @property
    def tp_size(self) -> int:
        return self.tp.size

    @property
    def prev_rank(self) -> int:
        return self.rank - self.tp_size

    @property
    def next_rank(self) -> int:
        return self.rank + self.tp_size

    @property
    def is_sampler(self) -> bool:
        return self.stage == self.num_stages - 1 and self.tp.rank == 0

    @classmethod
    def single(cls) -> "RankContext":
        return cls(0, Communicator.single(), None)
