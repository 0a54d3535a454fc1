"""Vocab-parallel embedding and LM head: each rank holds a contiguous slice of the vocabulary rows."""

from __future__ import annotations

import torch
from torch import nn

from plait.parallel.tensor import TensorParallel


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, plan: TensorParallel):
        super().__init__()
        self.vocab_size, self.comm = vocab_size, plan.comm
        self.rows = plan.split(vocab_size)
        self.weight = nn.Parameter(torch.empty(self.rows[1] - self.rows[0], hidden), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # ids: [T] -> [T, hidden]
        if self.comm.size == 1:
            return nn.functional.embedding(ids, self.weight)
        start, end = self.rows
        local = (ids >= start) & (ids < end)
        out = nn.functional.embedding((ids - start).clamp(0, end - start - 1), self.weight)
        return self.comm.all_reduce(out * local.unsqueeze(-1).to(out.dtype))

    def expected_shape(self, name: str, kind: str) -> tuple[int, ...]:
        return (self.vocab_size, self.weight.shape[1])

    def load(self, name: str, kind: str, read) -> None:
        self.weight.copy_(read(0, *self.rows))


class ParallelLMHead(VocabParallelEmbedding):
    """logits = h @ W.T over the rank's vocabulary rows, gathered so the sampler rank sees the full row. With
    `gather` off (spread sampling, plait.engine.step_sampling) each rank keeps its own columns [N, sizes[rank]]
    and the sampler exchanges logit blocks itself, a share of the rows to each rank."""

    gather = True

    def __init__(self, vocab_size: int, hidden: int, plan: TensorParallel):
        super().__init__(vocab_size, hidden, plan)
        self.sizes = plan.sizes(vocab_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # h: [N, hidden] -> logits [N, vocab] in fp32
        local = nn.functional.linear(h, self.weight).float()
        return self.comm.all_gather(local, self.sizes, dim=-1) if self.gather else local
