"""`--plot`: a latency CDF per metric, and output throughput with requests in flight over the run."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server or in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from plait.bench.serve_client import RequestResult  # noqa: E402
from plait.bench.serve_metrics import METRICS, samples_ms  # noqa: E402


def plot_latency_cdf(results: list[RequestResult], path: str, title: str) -> None:
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for ax, (name, values) in zip(axes.flat, samples_ms(results).items()):
        v = np.sort(values)
        ax.plot(v, np.arange(1, len(v) + 1) / max(len(v), 1), drawstyle="steps-post")
        ax.set_title(METRICS[name], fontsize=10)
        ax.set_xlabel(f"{name.upper()} (ms)")
        ax.set_ylabel("fraction of samples")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _chunk_times(r: RequestResult) -> np.ndarray:
    """When each text chunk of a request arrived, in seconds after the benchmark began."""
    return r.start + r.ttft + np.concatenate([[0.0], np.cumsum(r.itl)])


def plot_throughput(results: list[RequestResult], duration: float, path: str, title: str) -> None:
    ok = [r for r in results if r.success]
    width = max(duration / 60, 0.1)  # about 60 bins whatever the run's length
    edges = np.arange(0.0, duration + width, width)
    tokens = np.zeros(len(edges) - 1)
    for r in ok:
        times = _chunk_times(r)  # a chunk may carry several tokens: spread the request's count over its chunks
        counts, _ = np.histogram(times, edges)
        tokens += counts * (r.output_tokens / len(times))
    mids = (edges[:-1] + edges[1:]) / 2
    in_flight = [sum(r.start <= t < r.start + r.latency for r in results) for t in mids]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.plot(mids, tokens / width, color="tab:blue", label="output tokens/s")
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("output tokens/s", color="tab:blue")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(mids, in_flight, color="tab:orange", label="requests in flight")
    ax2.set_ylabel("requests in flight", color="tab:orange")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
