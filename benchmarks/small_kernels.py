"""How fast are the elementwise kernels between the GEMMs, and would other launch settings be faster?

A Llama-3.1-8B decode step at batch 64 on one H200 spends ~0.55 ms in three small Triton kernels (the profile in
benchmarks/results/latency_tp1_bs64.json): RMSNorm with the residual add (65 a step, ~3.6 us each), SiLU-and-mul
(32, ~5.6 us) and the fused RoPE + KV-cache store (32, ~4 us). Each moves 0.5-5.5 MB, which the HBM streams in
about a microsecond: they wait on memory latency with too little in flight, not on bandwidth. This times each kernel
as `plait.kernels.fused` launches it and with other warps per program and block sizes, at 1 to 2048 tokens, each
captured 20 times in a CUDA graph (as a decode step runs it); the figure is microseconds per call.

    python benchmarks/small_kernels.py --output-json OUT.json      # on the GPU
"""

from __future__ import annotations

import argparse
import json

import torch
import triton

from plait.kernels import fused
from plait.plan.microbench import time_graph

HIDDEN, INTER, HQ, HKV, D = 4096, 14336, 32, 8, 128  # Llama-3.1-8B at TP=1
TOKENS = (1, 8, 64, 256, 2048)


def _us(fn) -> float:
    return time_graph(fn, replays=20) * 1e6


def rms_norm_rows(t: int) -> list[dict]:
    x = torch.randn(t, HIDDEN, device="cuda", dtype=torch.bfloat16)
    r, w, out = torch.randn_like(x), torch.ones(HIDDEN, device="cuda", dtype=torch.bfloat16), torch.empty_like(x)
    rows = [{"variant": "as launched", "us": _us(lambda: fused.rms_norm(x, w, 1e-5, r))}]
    for warps in (1, 2, 8, 16):
        launch = lambda warps=warps: fused._rms_norm_kernel[(t,)](  # noqa: E731
            x, r, w, out, HIDDEN, HIDDEN, HIDDEN, HIDDEN, 1e-5, HAS_RESIDUAL=True, BLOCK=HIDDEN, num_warps=warps)
        rows.append({"variant": f"num_warps={warps}", "us": _us(launch)})
    return [dict(row, kernel="rms_norm+residual", tokens=t, bytes=4 * x.numel() * 2) for row in rows]


def silu_mul_rows(t: int) -> list[dict]:
    x = torch.randn(t, 2 * INTER, device="cuda", dtype=torch.bfloat16)
    out = torch.empty(t, INTER, device="cuda", dtype=torch.bfloat16)
    rows = [{"variant": "as launched", "us": _us(lambda: fused.silu_mul(x))}]
    for block in (256, 512, 2048, 4096):
        for warps in (2, 4, 8):
            launch = lambda block=block, warps=warps: fused._silu_mul_kernel[(t, triton.cdiv(INTER, block))](  # noqa: E731
                x, out, x.stride(0), out.stride(0), INTER, BLOCK=block, num_warps=warps)
            rows.append({"variant": f"BLOCK={block} num_warps={warps}", "us": _us(launch)})
    return [dict(row, kernel="silu_mul", tokens=t, bytes=3 * out.numel() * 2) for row in rows]


def rope_store_rows(t: int) -> list[dict]:
    qkv = torch.randn(t, (HQ + 2 * HKV) * D, device="cuda", dtype=torch.bfloat16)
    q, k, v = (p.view(t, -1, D) for p in qkv.split([HQ * D, HKV * D, HKV * D], dim=1))
    blocks = -(-t // 16) + 1
    kc, vc = (torch.zeros(blocks, 16, HKV, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    cos, sin = torch.randn(4096, D // 2, device="cuda"), torch.randn(4096, D // 2, device="cuda")
    pos, slots = torch.arange(t, device="cuda"), torch.arange(t, device="cuda")
    kcv, vcv = kc.view(-1, HKV, D), vc.view(-1, HKV, D)
    rows = [{"variant": "as launched", "us": _us(lambda: fused.rope_store_kv(q, k, v, kc, vc, cos, sin, pos, slots))}]
    for warps in (1, 2, 8):
        launch = lambda warps=warps: fused._rope_store_kernel[(t,)](  # noqa: E731
            q, k, v, kcv, vcv, cos, sin, pos, slots, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            v.stride(0), v.stride(1), kcv.stride(0), kcv.stride(1), HQ, HKV,
            HALF=D // 2, BLOCK_HQ=HQ, BLOCK_HKV=HKV, num_warps=warps)
        rows.append({"variant": f"num_warps={warps}", "us": _us(launch)})
    return [dict(row, kernel="rope_store_kv", tokens=t, bytes=2 * (HQ + 4 * HKV) * D * t * 2) for row in rows]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    rows = []
    for t in TOKENS:
        for kernel_rows in (rms_norm_rows, silu_mul_rows, rope_store_rows):
            rows += kernel_rows(t)
    for (kernel, t) in dict.fromkeys((r["kernel"], r["tokens"]) for r in rows):
        mine = [r for r in rows if (r["kernel"], r["tokens"]) == (kernel, t)]
        best = min(mine, key=lambda r: r["us"])
        print(f"{kernel:18s} T={t:5d}  as launched {mine[0]['us']:7.2f} us ({mine[0]['bytes'] / mine[0]['us'] / 1e6:5.2f} TB/s)"
              f"  best {best['us']:7.2f} us  {best['variant']}")
    if args.output_json:
        from plait.bench.results import provenance

        with open(args.output_json, "w") as f:
            json.dump({"benchmark": "small_kernels", "rows": rows, **provenance()}, f, indent=1)


if __name__ == "__main__":
    main()
