"""The fused all-reduce + residual add + RMSNorm of one tensor-parallel group, over symmetric memory (GPU only).

One buffer of `max_tokens x hidden` per rank is allocated and rendezvoused once at start (a rendezvous cannot be
captured in a CUDA graph). The row-parallel layer before a norm writes its partial sums straight into it
(`input`), and the op is: barrier (every rank's partial sums are in place), the kernel of
plait.kernels.allreduce_norm (each rank reduces, adds and normalises its own rows and writes them to every peer),
barrier (every rank's rows have arrived). The barriers are symmetric memory's own signal-pad kernels
(release/acquire at system scope), so the op is three launches and can be captured in a graph.

How many thread blocks the kernel takes, and for which step sizes it beats the best unfused path (two-shot or NCCL
all-reduce, then the add+norm kernel), is measured per group size and hidden size by benchmarks/fused_norm.py and
kept in `fused_norm_table.json` beside this file; without an entry, a guess is used.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
from dataclasses import dataclass

import torch

from plait.kernels.allreduce_norm import owned_rows, reduce_add_rms_norm_

TABLE_PATH = pathlib.Path(__file__).with_name("fused_norm_table.json")


@dataclass(frozen=True)
class FusedNormTuning:
    """For steps of at most `tokens[i]` tokens (the last entry for any more): `blocks[i]` thread blocks, and whether
    the fused op beat the unfused path there when measured (`wins[i]`; auto mode fuses only those steps)."""

    tokens: tuple[int, ...] = (16, 256)
    blocks: tuple[int, ...] = (4, 16)
    wins: tuple[bool, ...] = (True, True)

    def _bucket(self, num_tokens: int) -> int:
        return next((i for i, t in enumerate(self.tokens) if num_tokens <= t), len(self.tokens) - 1)

    def blocks_for(self, num_tokens: int) -> int:
        return self.blocks[self._bucket(num_tokens)]

    def wins_for(self, num_tokens: int) -> bool:
        return self.wins[self._bucket(num_tokens)]

    @classmethod
    def load(cls, world: int, hidden: int, path: pathlib.Path = TABLE_PATH) -> "FusedNormTuning":
        """The measured entry for this group and hidden size; the built-in guess where none was measured."""
        entry = json.loads(path.read_text()).get(f"tp{world}_h{hidden}") if path.exists() else None
        if entry is None:
            return cls()
        return cls(tuple(entry["tokens"]), tuple(entry["blocks"]), tuple(entry["wins"]))


class SymmAllReduceNorm:
    def __init__(self, group_name: str, rank: int, world: int, max_tokens: int, hidden: int, dtype: torch.dtype,
                 device: torch.device, tuning: FusedNormTuning, forced: bool):
        """Raises RuntimeError where symmetric memory is unavailable. `forced` (--fused-allreduce-norm on): use it
        for every step that fits the buffer, not only where it was measured to win."""
        import torch.distributed._symmetric_memory as symm_mem

        self.rank, self.world, self.max_tokens, self.tuning, self.forced = rank, world, max_tokens, tuning, forced
        self.offset = 0  # first buffer row of the current op: a split step gives each half its own rows
        buf = symm_mem.empty(max_tokens * hidden, dtype=dtype, device=device)
        self.handle = symm_mem.rendezvous(buf, group_name)
        self.local = buf.view(max_tokens, hidden)
        self.peers = [self.local if p == rank else self.handle.get_buffer(p, (max_tokens, hidden), dtype)
                      for p in range(world)]

    def takes(self, num_tokens: int) -> bool:
        return self.offset + num_tokens <= self.max_tokens and (self.forced or self.tuning.wins_for(num_tokens))

    @contextlib.contextmanager
    def region(self, offset: int):
        """Ops issued inside use buffer rows from `offset` on, and fuse whatever their size: a split step's halves
        (plait.engine.overlap) each have their own rows, and there the op runs under the other half's compute,
        so its speed alone does not decide."""
        saved = self.offset, self.forced
        self.offset, self.forced = offset, True
        try:
            yield
        finally:
            self.offset, self.forced = saved

    def input(self, num_tokens: int) -> torch.Tensor:
        """Where the layer before writes its partial sums, so the op needs no copy in."""
        return self.local[self.offset : self.offset + num_tokens]

    def __call__(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
        """(rmsnorm(sum_r x_r + residual), residual + sum_r x_r); the residual is updated on this rank's rows only."""
        T, a = x.shape[0], self.offset
        mine = self.local[a : a + T]
        if x.data_ptr() != mine.data_ptr():
            mine.copy_(x)
        self.handle.barrier(channel=0)
        reduce_add_rms_norm_([p[a : a + T] for p in self.peers], residual, weight, eps,
                             owned_rows(T, self.world, self.rank), self.tuning.blocks_for(T))
        self.handle.barrier(channel=0)
        return mine, residual
