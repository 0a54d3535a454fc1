"""Rotary position embedding. transformers computes the inverse frequencies for every rope variant
(default, llama3, linear, yarn, ...), so plait reads them from there instead of re-deriving each one."""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS


def _rope_type(hf_config) -> str:
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    return params.get("rope_type", params.get("type", "default"))


def _default_inv_freq(hf_config, head_dim: int) -> tuple[torch.Tensor, float]:
    params = getattr(hf_config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    # fp32 arithmetic, as transformers does, so positions rotate bit-for-bit alike.
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim), 1.0


class RotaryEmbedding(nn.Module):
    def __init__(self, hf_config, head_dim: int, max_positions: int):
        super().__init__()
        kind = _rope_type(hf_config)
        if kind == "default":
            inv_freq, scale = _default_inv_freq(hf_config, head_dim)
        elif kind in ROPE_INIT_FUNCTIONS:
            inv_freq, scale = ROPE_INIT_FUNCTIONS[kind](hf_config, "cpu")
        else:
            raise ValueError(f"rope type {kind!r} is not supported; known: default, {', '.join(ROPE_INIT_FUNCTIONS)}")
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32, device="cpu"), inv_freq.float().cpu())
        freqs = freqs.to(torch.get_default_device())  # computed on the CPU, kept where the model is being built
        # cos/sin: [max_positions, head_dim // 2], in fp32 whatever the model dtype (cast at use).
        self.register_buffer("cos", freqs.cos() * scale, persistent=False)
        self.register_buffer("sin", freqs.sin() * scale, persistent=False)

    def forward(self, positions: torch.Tensor, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Rotate each x: [T, heads, head_dim] by its token's position (HF's rotate-half layout); in place on GPU."""
        if positions.is_cuda:
            from plait.kernels.fused import rotary_

            return tuple(rotary_(x, self.cos, self.sin, positions) for x in xs)
        cos = self.cos[positions].unsqueeze(1)  # [T, 1, head_dim // 2]
        sin = self.sin[positions].unsqueeze(1)
        out = []
        for x in xs:
            x1, x2 = x.float().chunk(2, dim=-1)
            out.append(torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype))
        return tuple(out)
