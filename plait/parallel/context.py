"""Where a rank sits in its replica: its tensor- and sequence-parallel groups, its pipeline stage, its neighbours.

Built once per process by the executor's worker; the model runner reads it to shape the model (the parallel plan,
the stage's layers) and to decide which rank samples (rank 0 of the last stage's group).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from plait.comm.communicator import Communicator


@dataclass
class RankContext:
    rank: int  # within the replica
    tp: Communicator  # this stage's tensor-parallel group: the ranks that shard the weights
    pipe: Communicator | None  # the replica's world group, for send/recv across stage boundaries (None if 1 stage)
    stage: int = 0
    num_stages: int = 1
    sp: Communicator = field(default_factory=Communicator.single)  # sequence-parallel group: same weights, other tokens
    stage_group: Communicator | None = None  # every rank of this stage (sp x tp); None: the tp group is the stage

    def __post_init__(self) -> None:
        if self.stage_group is None:
            self.stage_group = self.tp

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
        return self.stage == self.num_stages - 1 and self.stage_group.rank == 0

    @classmethod
    def single(cls) -> "RankContext":
        return cls(0, Communicator.single(), None)

    @classmethod
    def sequence_parallel(cls, world: Communicator, sp: int, tp: int) -> "RankContext":
        """One stage of sp x tp ranks, rank r = s*tp + t (TP innermost: plait.parallel.sequence). Every rank
        creates every group, TP groups first, in the same order, as torch.distributed requires."""
        assert world.size == sp * tp, f"a world of {world.size} ranks is not sp {sp} x tp {tp}"
        tp_comm = world.split([list(range(s * tp, (s + 1) * tp)) for s in range(sp)])
        sp_comm = world.split([list(range(t, sp * tp, tp)) for t in range(tp)])
        return cls(world.rank, tp_comm, None, sp=sp_comm, stage_group=world)
