"""The hardware ceilings a benchmark compares against, measured in the same run on the same GPU.

- HBM bandwidth: a large device-to-device copy (bytes read + written per second).
- bf16 matrix rate: an 8192^3 GEMM.
Floors follow from them: a decode step reads every weight and the live KV once (bytes / bandwidth); a prefill
does its FLOPs at the matrix rate, and reads every weight once too (a short prompt is bound by that read).
"""

from __future__ import annotations

import torch

from plait.config import ModelConfig
from plait.plan.microbench import time_fn


def hbm_bandwidth(device: str = "cuda", nbytes: int = 2 << 30) -> float:
    """Bytes per second of a device-to-device copy, counting the read and the write."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    seconds = time_fn(lambda: dst.copy_(src), device, 10)
    del src, dst
    return 2 * nbytes / seconds


def matmul_rate(device: str = "cuda", n: int = 8192) -> float:
    """bf16 FLOP/s of an n^3 GEMM."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    seconds = time_fn(lambda: a @ b, device, 20)
    return 2 * n**3 / seconds


def linear_params(m: ModelConfig) -> int:
    """Parameters of every matmul of a forward pass (layers + LM head), the bytes a decode step must read."""
    D, H, KV = m.head_dim, m.num_heads, m.num_kv_heads
    per_layer = m.hidden_size * (H + 2 * KV) * D + H * D * m.hidden_size + 3 * m.hidden_size * m.intermediate_size
    return m.num_layers * per_layer + m.vocab_size * m.hidden_size


def kv_bytes_per_token(m: ModelConfig, itemsize: int) -> int:
    return 2 * m.num_layers * m.num_kv_heads * m.head_dim * itemsize


def decode_floor_s(m: ModelConfig, itemsize: int, context_tokens: int, tp: int, bandwidth: float) -> float:
    """Seconds per decode step if every weight and cached K/V byte is read once at full bandwidth, split over tp."""
    return (linear_params(m) * itemsize + context_tokens * kv_bytes_per_token(m, itemsize)) / tp / bandwidth


def prefill_flops(m: ModelConfig, prompt_lens: list[int]) -> float:
    """Linear-layer FLOPs (LM head on the last token only) plus causal attention (QK^T and PV)."""
    layers = linear_params(m) - m.vocab_size * m.hidden_size
    flops = 0.0
    for n in prompt_lens:
        flops += 2 * layers * n + 2 * m.vocab_size * m.hidden_size
        flops += m.num_layers * 4 * m.num_heads * m.head_dim * n * (n + 1) / 2
    return flops


def prefill_floor_s(m: ModelConfig, itemsize: int, prompt_lens: list[int], tp: int, rate: float, bandwidth: float) -> float:
    """Seconds for a prefill of these prompts split over tp: its FLOPs at the matrix rate or its weights read once,
    whichever takes longer."""
    return max(prefill_flops(m, prompt_lens) / rate, linear_params(m) * itemsize / bandwidth) / tp
