"""The flags of `plait bench serve`, named as vLLM's `vllm bench serve` names them.

Kept apart from serve.py so building the CLI's parser imports neither aiohttp nor matplotlib.
"""

from __future__ import annotations

import argparse
import os

BACKENDS = {"openai": "/v1/completions", "openai-chat": "/v1/chat/completions"}
DATASETS = ("random", "sharegpt", "trace")


def add_bench_serve_args(p: argparse.ArgumentParser) -> None:
    server = p.add_argument_group("server")
    server.add_argument("--backend", choices=sorted(BACKENDS), default="openai",
                        help="openai: /v1/completions; openai-chat: /v1/chat/completions.")
    server.add_argument("--base-url", default=None, help="Server URL, e.g. http://127.0.0.1:8000 (wins over --host/--port).")
    server.add_argument("--host", default="127.0.0.1")
    server.add_argument("--port", type=int, default=8000)
    server.add_argument("--endpoint", default=None, help="API path (default: the backend's).")
    server.add_argument("--model", default=None, help="Model name to send (default: the first of the server's /v1/models).")
    server.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="Bearer key (default: $OPENAI_API_KEY).")

    data = p.add_argument_group("dataset")
    data.add_argument("--dataset-name", choices=DATASETS, default="random")
    data.add_argument("--dataset-path", default=None, help="ShareGPT JSON file, or trace JSONL of "
                      '{"timestamp": seconds, "input_len": tokens, "output_len": tokens} per line.')
    data.add_argument("--num-prompts", type=int, default=1000, help="Requests to send (a trace sends at most its lines).")
    data.add_argument("--random-input-len", type=int, default=1024)
    data.add_argument("--random-output-len", type=int, default=128)
    data.add_argument("--random-range-ratio", type=float, default=0.0,
                      help="Lengths are drawn uniformly from [len * (1 - r), len * (1 + r)]; r in [0, 1).")
    data.add_argument("--random-prefix-len", type=int, default=0,
                      help="Tokens of one random prefix that every random prompt starts with (a shared system "
                           "prompt: what prefix caching serves), before its own --random-input-len tokens.")
    data.add_argument("--sharegpt-output-len", type=int, default=None,
                      help="Output length of every ShareGPT request (default: its recorded answer's length).")
    data.add_argument("--seed", type=int, default=0)

    load = p.add_argument_group("load")
    load.add_argument("--request-rate", type=float, default=float("inf"),
                      help="Requests per second, Poisson arrivals (shaped by --burstiness); inf sends all at once. "
                           "A trace keeps its own timestamps.")
    load.add_argument("--burstiness", type=float, default=1.0,
                      help="Shape of the gamma-distributed gaps: 1 = Poisson, < 1 burstier, > 1 more even.")
    load.add_argument("--max-concurrency", type=int, default=None, help="Most requests in flight at once.")
    load.add_argument("--ignore-eos", action="store_true", help="Ask for exactly the output length (vLLM's extension).")
    load.add_argument("--temperature", type=float, default=0.0)

    out = p.add_argument_group("results")
    out.add_argument("--goodput", nargs="+", default=None, metavar="KEY:MS",
                     help="Service-level objectives in ms, e.g. ttft:500 tpot:50 (keys: ttft, tpot, e2el).")
    out.add_argument("--percentile-metrics", default="ttft,tpot,itl,e2el",
                     help="Metrics whose statistics are printed, comma-separated: ttft, tpot, itl, e2el.")
    out.add_argument("--metric-percentiles", default="99", help="Percentiles to print, comma-separated, e.g. 50,90,99.")
    out.add_argument("--output-json", default=None, help="Write the results, the command and its context here.")
    out.add_argument("--plot", default=None, metavar="PREFIX",
                     help="Write PREFIX-latency-cdf.png and PREFIX-throughput.png.")
    out.add_argument("--disable-tqdm", action="store_true", help="No progress bar.")
