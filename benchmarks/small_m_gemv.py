"""Would a Triton GEMV beat cuBLAS for decode's small batches? The probe behind issue 13's next step.

At batch 1 a Llama-3.1-8B decode step on one H200 spends 3.86 ms in cuBLAS GEMMs (floor 3.54 ms for the weights):
gate_up and down run at ~4.1-4.2 TB/s, but qkv and o_proj at ~3.1 TB/s, and both row-parallel projections add a
split-K reduce kernel; the SiLU-and-mul between gate_up and down is one more kernel. This times, for each
projection of that shape and M = 1, 2, 4, 8 rows, cuBLAS (`x @ W.T`, plus the SiLU kernel for down) against one
Triton kernel that streams W once per output block and, for down, computes SiLU(gate) * up from the gate_up output
as it loads it (no SiLU kernel, no split-K reduce). Each op is captured 20 times in a CUDA graph (the microbenchmarks'
`time_graph`), as in a decode step; the figure is microseconds per op and the weight bytes over that time.

    TRITON_INTERPRET=1 python benchmarks/small_m_gemv.py --check     # correctness against PyTorch, on CPU
    python benchmarks/small_m_gemv.py --output-json OUT.json         # on the GPU: the table
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import triton
import triton.language as tl

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _gemv_kernel(X, W, Y, M, N, K, stride_x, stride_w, stride_y, SILU_MUL: tl.constexpr, M_PAD: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Y[:, n block] = act(X) @ W[n block].T with act(X) = X, or SiLU(X[:, :K]) * X[:, K:] when SILU_MUL."""
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, M_PAD)
    nmask, mmask = n < N, m < M
    acc = tl.zeros([M_PAD, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < K
        w = tl.load(W + n[:, None] * stride_w + k[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
        xmask = mmask[:, None] & kmask[None, :]
        x = tl.load(X + m[:, None] * stride_x + k[None, :], mask=xmask, other=0.0)
        if SILU_MUL:
            gate = x.to(tl.float32)
            up = tl.load(X + m[:, None] * stride_x + K + k[None, :], mask=xmask, other=0.0)
            x = (gate / (1.0 + tl.exp(-gate))).to(up.dtype) * up
        acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
    tl.store(Y + m[:, None] * stride_y + n[None, :], acc.to(Y.dtype.element_ty), mask=mmask[:, None] & nmask[None, :])


_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=4, num_stages=s)  # 12: ~30 s of tuning
            for bn in (16, 32, 64) for bk in (256, 512) for s in (3, 4)]
_gemv = _gemv_kernel if _INTERPRET else triton.autotune(_CONFIGS, key=["M", "N", "K", "SILU_MUL"])(_gemv_kernel)


def gemv(x: torch.Tensor, w: torch.Tensor, silu_mul: bool = False) -> torch.Tensor:
    """x: [M, K] (or [M, 2K] = [gate | up] with silu_mul), w: [N, K] -> [M, N]; M up to 16."""
    M, N, K = x.shape[0], w.shape[0], w.shape[1]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731 - the autotuner's grid takes its config
    _gemv[grid](x, w, y, M, N, K, x.stride(0), w.stride(0), y.stride(0), SILU_MUL=silu_mul, M_PAD=16,
                PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # fp32 checks stay fp32
                **({"BLOCK_N": 16, "BLOCK_K": 32} if _INTERPRET else {}))
    return y


def reference(x: torch.Tensor, w: torch.Tensor, silu_mul: bool) -> torch.Tensor:
    if silu_mul:
        gate, up = x.float().chunk(2, dim=-1)
        x = (torch.nn.functional.silu(gate) * up).to(x.dtype)
    return x @ w.t()


def check(device: str = "cpu") -> None:
    """Shapes with ragged edges (N, K not multiples of the blocks), every M the probe times, both prologues."""
    g = torch.Generator().manual_seed(0)
    for m in (1, 3, 8):
        for n, k, act in ((40, 72, False), (24, 50, True)):
            x = torch.randn(m, 2 * k if act else k, generator=g).to(device)
            w = (torch.randn(n, k, generator=g) / k**0.5).to(device)
            torch.testing.assert_close(gemv(x, w, act), reference(x, w, act), atol=1e-4, rtol=1e-4)
    print("gemv: every shape matches PyTorch")


# Llama-3.1-8B at TP=1: (name, out features N, in features K, SiLU prologue)
SHAPES = [("qkv", 6144, 4096, False), ("o_proj", 4096, 4096, False), ("gate_up", 28672, 4096, False),
          ("down", 4096, 14336, True), ("lm_head", 128256, 4096, False)]


def _graph_us(fn) -> float:
    """Microseconds per call of fn, captured many times in one CUDA graph (as a decode step runs it)."""
    from plait.plan.microbench import time_graph

    return time_graph(fn, replays=20) * 1e6


def sweep() -> list[dict]:
    from plait.kernels.fused import silu_mul as silu_kernel

    rows = []
    for name, n, k, act in SHAPES:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        for m in (1, 2, 4, 8):
            x = torch.randn(m, 2 * k if act else k, device="cuda", dtype=torch.bfloat16)
            torch.testing.assert_close(gemv(x, w, act), reference(x, w, act), atol=2e-2, rtol=2e-2)
            cublas = _graph_us((lambda: silu_kernel(x) @ w.t()) if act else (lambda: x @ w.t()))
            triton_us = _graph_us(lambda: gemv(x, w, act))
            tb = n * k * 2 / 1e12
            rows.append({"shape": name, "n": n, "k": k, "m": m, "silu_mul": act, "cublas_us": cublas,
                         "triton_us": triton_us, "cublas_tb_s": tb / (cublas * 1e-6), "triton_tb_s": tb / (triton_us * 1e-6),
                         "speedup": cublas / triton_us})
            r = rows[-1]
            print(f"{name:8s} m={m}  cuBLAS{' + SiLU' if act else '       '} {cublas:8.2f} us ({r['cublas_tb_s']:.2f} TB/s)"
                  f"  Triton {triton_us:8.2f} us ({r['triton_tb_s']:.2f} TB/s)  x{r['speedup']:.2f}")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="correctness only (CPU with TRITON_INTERPRET=1, or GPU)")
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    if args.check or not torch.cuda.is_available():
        check("cpu" if _INTERPRET else "cuda")
        return
    rows = sweep()
    if args.output_json:
        from plait.bench.results import provenance

        with open(args.output_json, "w") as f:
            json.dump({"benchmark": "small_m_gemv", "rows": rows, **provenance()}, f, indent=1)


if __name__ == "__main__":
    main()
