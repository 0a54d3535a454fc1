"""A bursty trace for `plait bench serve --dataset-name trace`: Poisson arrivals plus bursts of simultaneous requests,
input lengths from a long-tailed (log-normal) distribution, output lengths log-normal too.

The committed benchmarks/serving_trace.jsonl (issue 8's workload (c), replayed by benchmarks/gpu_serving.sh) is:
    python benchmarks/serving_trace.py benchmarks/serving_trace.jsonl
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def lognormal(rng: np.random.Generator, n: int, median: float, sigma: float, lo: int, hi: int) -> np.ndarray:
    return np.clip(np.round(median * np.exp(sigma * rng.standard_normal(n))), lo, hi).astype(int)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="JSONL file to write")
    p.add_argument("--duration", type=float, default=12.0, help="seconds of arrivals")
    p.add_argument("--rate", type=float, default=6.0, help="Poisson arrivals per second between bursts")
    p.add_argument("--bursts", type=int, default=2, help="bursts, evenly spread over the duration")
    p.add_argument("--burst-size", type=int, default=16, help="requests arriving within --burst-width seconds")
    p.add_argument("--burst-width", type=float, default=0.2)
    p.add_argument("--input-median", type=int, default=600, help="median input length, tokens")
    p.add_argument("--input-sigma", type=float, default=1.0, help="log-normal sigma: 1.0 puts p99 near 10x the median")
    p.add_argument("--input-max", type=int, default=6000)
    p.add_argument("--output-median", type=int, default=96)
    p.add_argument("--output-max", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    rng = np.random.default_rng(args.seed)
    poisson = np.cumsum(rng.exponential(1.0 / args.rate, size=int(args.rate * args.duration * 2)))
    times = [poisson[poisson < args.duration]]
    for b in range(args.bursts):
        start = args.duration * (b + 1) / (args.bursts + 1)
        times.append(start + rng.uniform(0, args.burst_width, size=args.burst_size))
    times = np.sort(np.concatenate(times))
    n = len(times)
    inputs = lognormal(rng, n, args.input_median, args.input_sigma, 16, args.input_max)
    outputs = lognormal(rng, n, args.output_median, 0.6, 8, args.output_max)
    with open(args.out, "w") as f:
        for t, i, o in zip(times, inputs, outputs):
            f.write(json.dumps({"timestamp": round(float(t), 4), "input_len": int(i), "output_len": int(o)}) + "\n")
    print(f"{args.out}: {n} requests over {times[-1]:.1f} s, input p50/p99/max {np.percentile(inputs, 50):.0f}/"
          f"{np.percentile(inputs, 99):.0f}/{inputs.max()}, output p50 {np.percentile(outputs, 50):.0f}, "
          f"{inputs.sum() + outputs.sum()} tokens")


if __name__ == "__main__":
    main()
