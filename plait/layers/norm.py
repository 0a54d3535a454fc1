"""RMSNorm, with the residual add folded in: the pre-norm decoder always adds then normalises; and the variant
that also finishes the all-reduce of the row-parallel layer before it."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int | tuple[int, ...], eps: float):
        """`dim`: the normalised width, or the weight's shape when it holds several weights that broadcast against x
        (a grouped norm: one weight per Parallel Track track, plait.layers.grouped)."""
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """norm(x), or (norm(x + residual), x + residual) when a residual is given. Computed in fp32 as HF does.
        On GPU one fused kernel does it all, updating `residual` in place."""
        if x.is_cuda:
            from plait.kernels.fused import rms_norm

            out = rms_norm(x, self.weight, self.eps, residual)
            return out if residual is None else (out, residual)
        if residual is not None:
            x = x + residual
            residual = x
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        out = self.weight * h.to(x.dtype)
        return out if residual is None else (out, residual)

    def load(self, name: str, kind: str, read) -> None:
        load_norm(self.weight, read)

    def expected_shape(self, name: str, kind: str) -> tuple[int, ...]:
        return tuple(self.weight.shape)


class AllReduceRMSNorm(RMSNorm):
    """RMSNorm of a sum still spread over the tensor-parallel ranks: the row-parallel layer before it skipped its
    all-reduce (`RowParallelLinear(defer=True)`), so this norm reduces, adds the residual and normalises, in one
    symmetric-memory kernel where the communicator has one for this many tokens (TokenWeave's fusion), else as
    all-reduce then the add+norm. The first layer's norm gets the embedding, which is whole: it only normalises."""

    def __init__(self, dim: int, eps: float, comm):
        super().__init__(dim, eps)
        self.comm = comm

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return super().forward(x)
        if self.comm.fuses_norm(x.shape[0]):
            return self.comm.all_reduce_rms_norm(x, residual, self.weight, self.eps)
        return super().forward(self.comm.all_reduce(x), residual)


def load_norm(dst: torch.Tensor, read) -> None:
    """A norm's weight is whole on every rank (each normalises full hidden states): read all of it into `dst`, the
    parameter or, in a grouped norm (plait.layers.grouped), one track's slice of it."""
    dst.copy_(read(0, 0, None))
