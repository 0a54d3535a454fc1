"""SiLU-and-multiply of the merged gate/up projection (one fused kernel on GPU)."""

from __future__ import annotations

import torch
from torch import nn


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2N] = [gate | up] -> silu(gate) * up: [T, N]."""
    if x.is_cuda:
        from plait.kernels.fused import silu_mul as fused

        return fused(x)
    gate, up = x.chunk(2, dim=-1)
    return nn.functional.silu(gate) * up
