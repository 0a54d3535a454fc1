"""`plait bench serve`: load an OpenAI-compatible server with a workload and report vLLM's serving metrics.

Requests arrive on a schedule (Poisson, gamma-shaped by --burstiness, all at once, or a trace's own timestamps),
each waits for a slot under --max-concurrency, and streams its answer so TTFT and inter-token gaps are seen as a
client sees them. The JSON result records the exact command, the git commit and the server (plait.bench.results), as
the benchmarks under benchmarks/results/ must.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import sys
import time

import aiohttp
import numpy as np
from tqdm.auto import tqdm

from plait.bench import datasets
from plait.bench.datasets import SampleRequest
from plait.bench.results import write_result
from plait.bench.serve_args import BACKENDS
from plait.bench.serve_client import TIMEOUT, RequestResult, ServerTokenizer, Target, first_model, send_request
from plait.bench.serve_metrics import calculate_metrics, format_table, parse_goodput, parse_selection


def arrival_offsets(requests: list[SampleRequest], rate: float, burstiness: float,
                    rng: np.random.Generator) -> list[float]:
    """Seconds after the start at which each request is sent."""
    if requests and requests[0].timestamp is not None:
        return [r.timestamp for r in requests]
    if rate <= 0 or burstiness <= 0:
        raise ValueError(f"--request-rate and --burstiness must be > 0, got {rate}, {burstiness}")
    if math.isinf(rate):
        return [0.0] * len(requests)
    # Gamma gaps with mean 1/rate: shape 1 is Poisson; a smaller shape gives the same mean with burstier gaps.
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=len(requests))
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])]).tolist()


async def run(target: Target, requests: list[SampleRequest], offsets: list[float], max_concurrency: int | None,
              disable_tqdm: bool) -> tuple[list[RequestResult], float]:
    """Send every request at its offset; return the results in request order and the run's duration."""
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else contextlib.nullcontext()
    # The semaphore bounds concurrency, not the connection pool, so the pool is unlimited.
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=TIMEOUT, connector=connector, trust_env=False) as session:
        check = await send_request(session, target, requests[0], time.perf_counter())
        if not check.success:
            raise ValueError(f"the initial test request to {target.url} failed: {check.error}")
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="requests")
        t0 = time.perf_counter()

        async def one(req: SampleRequest, offset: float) -> RequestResult:
            await asyncio.sleep(max(0.0, t0 + offset - time.perf_counter()))
            async with slots:
                result = await send_request(session, target, req, t0)
            bar.update(1)
            return result

        results = await asyncio.gather(*(one(r, o) for r, o in zip(requests, offsets)))
        duration = time.perf_counter() - t0
        bar.close()
    return list(results), duration


def load_requests(args: argparse.Namespace, tokenizer: ServerTokenizer | None,
                  rng: np.random.Generator) -> list[SampleRequest]:
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts must be >= 1, got {args.num_prompts}")
    if args.dataset_name == "random":
        return datasets.random_requests(args.num_prompts, args.random_input_len, args.random_output_len,
                                        args.random_range_ratio, rng, tokenizer, args.random_prefix_len)
    if not args.dataset_path:
        raise ValueError(f"--dataset-name {args.dataset_name} needs --dataset-path")
    if args.dataset_name == "sharegpt":
        return datasets.sharegpt_requests(args.dataset_path, args.num_prompts, rng, tokenizer, args.sharegpt_output_len)
    return datasets.trace_requests(args.dataset_path, args.num_prompts, rng, tokenizer)


def _record(args: argparse.Namespace, target: Target, base_url: str, metrics: dict,
            results: list[RequestResult]) -> dict:
    settings = {k: (str(v) if isinstance(v, float) and math.isinf(v) else v) for k, v in vars(args).items()
                if k not in ("func", "api_key")}
    return {"benchmark": "serve", "base_url": base_url, "endpoint": target.url, "model": target.model, "settings": settings,
            **metrics,
            "input_lens": [r.prompt_len for r in results], "output_lens": [r.output_tokens for r in results],
            "start_times": [r.start for r in results], "ttfts": [r.ttft for r in results],
            "itls": [r.itl for r in results], "e2els": [r.latency for r in results],
            "errors": [r.error for r in results]}


def main(args: argparse.Namespace) -> int:
    slos = parse_goodput(args.goodput)  # every flag is checked before the server is touched
    selected, percentiles = parse_selection(args.percentile_metrics, args.metric_percentiles)
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = args.model or first_model(base_url, headers)
    rng = np.random.default_rng(args.seed)
    requests = load_requests(args, ServerTokenizer.probe(base_url, model, headers), rng)
    offsets = arrival_offsets(requests, args.request_rate, args.burstiness, rng)
    target = Target(base_url + (args.endpoint or BACKENDS[args.backend]), args.backend == "openai-chat", model,
                    headers, args.temperature, args.ignore_eos)
    print(f"{len(requests)} requests ({args.dataset_name}) to {target.url}, model {model}", flush=True)
    results, duration = asyncio.run(run(target, requests, offsets, args.max_concurrency, args.disable_tqdm))
    metrics = calculate_metrics(results, duration, slos, percentiles)
    print(format_table(metrics, selected, percentiles, args.max_concurrency, args.request_rate))
    errors = sorted({r.error for r in results if r.error})
    for error in errors[:5]:
        print(f"failed: {error}", file=sys.stderr)
    if args.output_json:
        write_result(_record(args, target, base_url, metrics, results), args.output_json)
    if args.plot:
        from plait.bench.serve_plot import plot_latency_cdf, plot_throughput

        title = f"{model} at {base_url}: {len(requests)} requests, rate {args.request_rate}"
        plot_latency_cdf(results, f"{args.plot}-latency-cdf.png", title)
        plot_throughput(results, duration, f"{args.plot}-throughput.png", title)
    return 0
