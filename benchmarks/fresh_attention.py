"""Attention of a step of several whole new prompts: one kernel call, or one call per prompt?

An eager prefill step of N new prompts runs attention per layer as N calls of PyTorch's flash attention
(plait.layers.attention._fresh_prompts_attention), each with its slicing and transposes: 32 prompts x 32 layers is
about 5,000 launches from Python, which leaves the GPU waiting at TP > 1 (Llama-3.1-8B, 32 x 128 tokens at TP=4:
TTFT 134 ms against 105 at TP=1, benchmarks/results/comm/comm_report.md). This times, per layer call and for a few
(prompts x length) shapes of Llama-3.1-8B's heads at TP=1 and TP=4, the per-prompt loop against one launch of the
Triton paged prefill kernel over the cache (plait.kernels.attention.paged_prefill, which the engine already uses for
prompts with a cached prefix) and, where this PyTorch has it, torch.nn.attention.varlen.varlen_attn: eagerly as the
engine issues them (wall time, CPU included) and replayed from a CUDA graph (the GPU's time alone).

    python benchmarks/fresh_attention.py --output-json OUT.json      # on the GPU
"""

from __future__ import annotations

import argparse
import inspect
import itertools
import json
import time

import torch

from plait.kernels.attention import paged_prefill
from plait.layers.attention import _fresh_prompts_attention, prefill_work
from plait.plan.microbench import time_graph

D, BLOCK = 128, 16
SHAPES = [(32, 128), (64, 64), (8, 512), (2, 2048), (1, 8192)]  # (prompts, tokens each)
HEADS = [(32, 8), (8, 2)]  # (query heads, KV heads) of Llama-3.1-8B on a rank at TP=1 and TP=4


def _varlen():
    """PyTorch's varlen flash attention as fn(q, k, v, cu, max_len, scale), causal, and its signature; (None, None)
    where this PyTorch lacks it."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, None
    params = inspect.signature(varlen_attn).parameters
    causal = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    scaled = "scale" in params

    def run(q, k, v, cu, max_len, scale):
        return varlen_attn(q, k, v, cu, cu, max_len, max_len, **causal, **({"scale": scale} if scaled else {}))

    return run, str(inspect.signature(varlen_attn))


def _eager_us(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e6


def measure(prompts: int, length: int, hq: int, hkv: int, varlen) -> dict:
    dev, dt = "cuda", torch.bfloat16
    T = prompts * length
    q = torch.randn(T, hq, D, device=dev, dtype=dt)
    k, v = torch.randn(T, hkv, D, device=dev, dtype=dt), torch.randn(T, hkv, D, device=dev, dtype=dt)
    kv_index = torch.arange(hq, device=dev) // (hq // hkv)
    starts = [i * length for i in range(prompts + 1)]
    blocks_each = -(-length // BLOCK)
    cache = [torch.zeros(prompts * blocks_each, BLOCK, hkv, D, device=dev, dtype=dt) for _ in range(2)]
    tables = torch.arange(prompts * blocks_each, device=dev).view(prompts, blocks_each)
    slots = (tables[:, :, None] * BLOCK + torch.arange(BLOCK, device=dev)).flatten(1)[:, :length].flatten()
    cache[0].view(-1, hkv, D)[slots], cache[1].view(-1, hkv, D)[slots] = k, v  # as rope_store_kv leaves them
    cu = torch.tensor(starts, device=dev, dtype=torch.int32)
    seq_lens = torch.full((prompts,), length, device=dev)
    scale = D**-0.5
    work = torch.tensor(prefill_work([length] * prompts, True), device=dev)
    calls = {
        "per_prompt_sdpa": lambda: _fresh_prompts_attention(q, k, v, starts, kv_index, scale),
        "paged_prefill": lambda: paged_prefill(q, cache[0], cache[1], tables, cu.long(), seq_lens, kv_index, work, scale),
    }
    if varlen is not None:
        calls["varlen_attn"] = lambda: varlen(q, k[:, kv_index], v[:, kv_index], cu, length, scale)
    ref = calls["per_prompt_sdpa"]().float()
    row = {"prompts": prompts, "tokens_each": length, "q_heads": hq, "kv_heads": hkv}
    for name, fn in calls.items():
        try:
            err = (fn().float() - ref).abs().max().item()
            row[name] = {"eager_us": _eager_us(fn), "graph_us": time_graph(fn, replays=5) * 1e6, "max_abs_err": err}
        except Exception as e:  # a PyTorch without the op's CUDA kernel, or a shape it refuses
            row[name] = {"error": f"{type(e).__name__}: {e}"[:200]}
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    varlen, signature = _varlen()
    print(f"torch {torch.__version__}, varlen_attn{signature or ': missing'}")
    rows = [measure(n, t, hq, hkv, varlen) for (n, t), (hq, hkv) in itertools.product(SHAPES, HEADS)]
    for r in rows:
        cells = [f"{name} " + (f"{m['eager_us']:8.1f} / {m['graph_us']:8.1f} us (err {m['max_abs_err']:.3f})"
                               if "eager_us" in m else m["error"][:60])
                 for name, m in r.items() if isinstance(m, dict)]
        print(f"{r['prompts']:3d} x {r['tokens_each']:5d} heads {r['q_heads']}/{r['kv_heads']}: " + " | ".join(cells))
    if args.output_json:
        from plait.bench.results import provenance

        with open(args.output_json, "w") as f:
            json.dump({"benchmark": "fresh_attention", "torch": torch.__version__, "varlen_signature": signature,
                       "rows": rows, **provenance()}, f, indent=1)


if __name__ == "__main__":
    main()
