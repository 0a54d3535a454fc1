"""Hugging Face transformers on the same shape and GPU, so plait's speed is compared as a ratio within one run.

python3 benchmarks/hf_compare.py --preset llama3-8b --output-json OUT.json
Decode: `generate` with a static cache (its fastest eager path), batch 1, 128 in / 256 out; TPOT =
(time of 256 tokens - time of 1 token) / 255. Prefill: one forward over an 8192-token prompt.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import transformers

from plait.bench.results import provenance
from plait.models.presets import preset_config


def timed(fn, iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="llama3-8b")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--prefill-len", type=int, default=8192)
    p.add_argument("--output-json", required=True)
    args = p.parse_args()
    cfg = preset_config(args.preset)
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, args.input_len), device="cuda")
    gen = dict(do_sample=False, cache_implementation="static", pad_token_id=0, eos_token_id=None,
               attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        one = timed(lambda: model.generate(ids, max_new_tokens=1, min_new_tokens=1, **gen), 2)
        full = timed(lambda: model.generate(ids, max_new_tokens=args.output_len, min_new_tokens=args.output_len, **gen), 2)
        long = torch.randint(0, cfg.vocab_size, (1, args.prefill_len), device="cuda")
        prefill = timed(lambda: model(long, logits_to_keep=1), 3)
    result = {
        "benchmark": "hf_compare", "model": args.preset, "transformers": transformers.__version__,
        "batch_size": 1, "input_len": args.input_len, "output_len": args.output_len,
        "tpot_ms": (full - one) / (args.output_len - 1) * 1e3, "ttft_ms_bs1": one * 1e3,
        "prefill_len": args.prefill_len, "prefill_ms": prefill * 1e3,
        **provenance(),
    }
    with open(args.output_json, "w") as f:
        json.dump(result, f, indent=2)
    print(f"HF {args.preset}: TPOT {result['tpot_ms']:.2f} ms, prefill {args.prefill_len} {result['prefill_ms']:.1f} ms")


if __name__ == "__main__":
    main()
