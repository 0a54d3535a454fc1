"""Moving attention heads between the projections' layout and attention's.

Under tensor parallelism the QKV projection already yields this rank's heads for every token: the exchange
only splits q, k, v. Under (Ulysses) sequence parallelism each rank projects every head for its slice of the
tokens; one all-to-all sends each rank the heads it attends with, for all tokens, and a second one returns
the attention output to the token owners. A rank's `pack` is its q, k, v heads side by side.
"""

from __future__ import annotations

import torch
from torch import nn

from plait.comm.communicator import Communicator


class HeadExchange(nn.Module):
    def __init__(self, heads: list[tuple[int, int]], rank: int, head_dim: int, comm: Communicator | None = None, plan=None):
        """heads[j] = (query heads, KV heads) rank j attends with; `comm` is the sequence-parallel group (None: TP)."""
        super().__init__()
        self.heads, self.rank, self.D, self.comm, self.plan = heads, rank, head_dim, comm, plan
        self.packs = [(q + 2 * kv) * head_dim for q, kv in heads]  # columns of each rank's q|k|v in the projection

    def _exchanging(self) -> bool:
        return self.comm is not None and not self.plan.shifted

    def qkv(self, x: torch.Tensor):
        """x: [T_local, projection columns] -> q [T, heads, D], k, v [T, kv_heads, D] (T: every token under SP)."""
        nq, nkv = self.heads[self.rank]
        if self._exchanging():
            t_local, me = x.shape[0], self.packs[self.rank]
            send = torch.cat([part.reshape(-1) for part in x.split(self.packs, dim=1)])
            x = self.comm.all_to_all(send, [t_local * p for p in self.packs], [t_local * me] * self.comm.size).view(-1, me)
        q, k, v = x.split([nq * self.D, nkv * self.D, nkv * self.D], dim=1)
        return q.view(-1, nq, self.D), k.view(-1, nkv, self.D), v.view(-1, nkv, self.D)

    def out(self, o: torch.Tensor) -> torch.Tensor:
        """o: [T, my heads * D] -> [T_local, heads * D] in the o-projection's (global head) order."""
        if not self._exchanging():
            return o
        size = self.comm.size
        t_local = o.shape[0] // size
        widths = [q * self.D for q, _ in self.heads]
        recv = self.comm.all_to_all(o.reshape(-1), [t_local * widths[self.rank]] * size, [t_local * w for w in widths])
        return torch.cat([part.view(t_local, w) for part, w in zip(recv.split([t_local * w for w in widths]), widths)], dim=1)
