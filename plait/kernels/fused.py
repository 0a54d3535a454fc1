"""Small fused Triton kernels for the elementwise work between GEMMs.

In a decode step each of these ops is a few microseconds of GPU time, but unfused the norm alone is ~8
kernels; fused, each op is one launch that reads its input once. Each function matches a PyTorch
reference in `plait.layers` (checked under TRITON_INTERPRET=1 on CPU and on the GPU).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(X, R, W, OUT, stride_x, stride_r, stride_o, N, eps, rows_per_w, num_w,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(R + row * stride_r + cols, x.to(R.dtype.element_ty), mask=mask)
    x_low = x.to(OUT.dtype.element_ty).to(tl.float32)  # HF rounds the residual sum to the model dtype first
    rstd = tl.rsqrt(tl.sum(x_low * x_low, 0) / N + eps)
    w = tl.load(W + (row // rows_per_w) % num_w * N + cols, mask=mask, other=0.0)
    y = (x_low * rstd).to(OUT.dtype.element_ty) * w
    tl.store(OUT + row * stride_o + cols, y, mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x: [..., N]; weight: [N], or several weights that broadcast against x along one dimension (one per track of a
    Parallel Track layer: [tracks, 1, N] against x [tracks, T, N]). With `residual`, adds x into it in place first
    (residual becomes x + residual)."""
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.empty_like(x2)
    r = residual.view(-1, x.shape[-1]) if residual is not None else x2
    _rms_norm_kernel[(x2.shape[0],)](
        x2, r, weight, out, x2.stride(0), r.stride(0), out.stride(0), x2.shape[1], eps, *_weight_rows(x.shape, weight.shape),
        HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(x2.shape[1]),
    )
    return out.view(x.shape)


def _weight_rows(x_shape: torch.Size, w_shape: torch.Size) -> tuple[int, int]:
    """(rows of x per weight, number of weights): row r of x flattened to [rows, N] takes weight (r // first) % second.
    The weight's one dimension of more than one weight is aligned with x's from the right, as broadcasting does."""
    lead = [(i, n) for i, n in enumerate(w_shape[:-1], start=len(x_shape) - len(w_shape)) if n > 1]
    assert len(lead) <= 1 and all(x_shape[i] == n for i, n in lead), f"weight {tuple(w_shape)} against {tuple(x_shape)}"
    if not lead:
        return 1, 1
    i, n = lead[0]
    return max(1, math.prod(x_shape[i + 1 : -1])), n


@triton.jit
def _silu_mul_kernel(X, OUT, stride_x, stride_o, N, BLOCK: tl.constexpr):
    row, blk = tl.program_id(0), tl.program_id(1)
    cols = blk * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + N + cols, mask=mask, other=0.0)
    y = (gate / (1.0 + tl.exp(-gate))).to(OUT.dtype.element_ty) * up
    tl.store(OUT + row * stride_o + cols, y, mask=mask)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [..., 2N] = [gate | up] -> silu(gate) * up: [..., N]."""
    x2 = x.reshape(-1, x.shape[-1])
    T, n = x2.shape[0], x2.shape[1] // 2
    out = torch.empty(T, n, dtype=x.dtype, device=x.device)
    block = 1024
    _silu_mul_kernel[(T, triton.cdiv(n, block))](x2, out, x2.stride(0), out.stride(0), n, BLOCK=block)
    return out.view(*x.shape[:-1], n)


@triton.jit
def _rotary_kernel(X, COS, SIN, POS, stride_t, stride_h, HALF: tl.constexpr, BLOCK_H: tl.constexpr, H):
    t = tl.program_id(0)
    pos = tl.load(POS + t)
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, HALF)[None, :]
    mask = h < H
    cos = tl.load(COS + pos * HALF + d)
    sin = tl.load(SIN + pos * HALF + d)
    ptr = X + t * stride_t + h * stride_h + d
    x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(ptr, (x1 * cos - x2 * sin).to(X.dtype.element_ty), mask=mask)
    tl.store(ptr + HALF, (x2 * cos + x1 * sin).to(X.dtype.element_ty), mask=mask)


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate x: [T, heads, D] in place by each token's position; cos/sin: [max_pos, D/2] fp32."""
    T, H, D = x.shape
    _rotary_kernel[(T,)](x, cos, sin, positions, x.stride(0), x.stride(1), HALF=D // 2, BLOCK_H=triton.next_power_of_2(H), H=H)
    return x


@triton.jit
def _rope_store_kernel(Q, K, V, KC, VC, COS, SIN, POS, SLOTS, stride_qt, stride_qh, stride_kt, stride_kh,
                       stride_vt, stride_vh, stride_cs, stride_ch,
                       HQ, HKV, HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr):
    t = tl.program_id(0)
    pos, slot = tl.load(POS + t), tl.load(SLOTS + t).to(tl.int64)
    d = tl.arange(0, HALF)[None, :]
    cos, sin = tl.load(COS + pos * HALF + d), tl.load(SIN + pos * HALF + d)
    hq = tl.arange(0, BLOCK_HQ)[:, None]
    qm = hq < HQ
    qp = Q + t * stride_qt + hq * stride_qh + d
    q1, q2 = tl.load(qp, mask=qm, other=0.0).to(tl.float32), tl.load(qp + HALF, mask=qm, other=0.0).to(tl.float32)
    tl.store(qp, (q1 * cos - q2 * sin).to(Q.dtype.element_ty), mask=qm)
    tl.store(qp + HALF, (q2 * cos + q1 * sin).to(Q.dtype.element_ty), mask=qm)
    hk = tl.arange(0, BLOCK_HKV)[:, None]
    km = hk < HKV
    kp = K + t * stride_kt + hk * stride_kh + d
    k1, k2 = tl.load(kp, mask=km, other=0.0).to(tl.float32), tl.load(kp + HALF, mask=km, other=0.0).to(tl.float32)
    cp = slot * stride_cs + hk * stride_ch + d
    r1, r2 = (k1 * cos - k2 * sin).to(KC.dtype.element_ty), (k2 * cos + k1 * sin).to(KC.dtype.element_ty)
    tl.store(KC + cp, r1, mask=km)
    tl.store(KC + cp + HALF, r2, mask=km)
    tl.store(kp, r1, mask=km)  # k rotated in place too: a fresh prompt's attention reads it without the cache
    tl.store(kp + HALF, r2, mask=km)
    vp = V + t * stride_vt + hk * stride_vh + d
    tl.store(VC + cp, tl.load(vp, mask=km, other=0.0), mask=km)
    tl.store(VC + cp + HALF, tl.load(vp + HALF, mask=km, other=0.0), mask=km)


def rope_store_kv(q, k, v, k_cache, v_cache, cos, sin, positions, slots) -> None:
    """Rotate q and k in place and write k and v into the paged cache at `slots`: one launch per layer.
    q: [T, Hq, D], k/v: [T, Hkv, D] (strided views are fine); caches: [num_blocks, block_size, Hkv, D]."""
    T, HQ, D = q.shape
    HKV = k.shape[1]
    kc, vc = k_cache.view(-1, HKV, D), v_cache.view(-1, HKV, D)
    _rope_store_kernel[(T,)](
        q, k, v, kc, vc, cos, sin, positions, slots, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), kc.stride(0), kc.stride(1), HQ, HKV,
        HALF=D // 2, BLOCK_HQ=triton.next_power_of_2(HQ), BLOCK_HKV=triton.next_power_of_2(HKV),
    )
