"""The figures `vllm bench serve` reports, computed from per-request results, and its table.

Definitions follow vLLM so numbers compare across engines: TTFT is send to first text chunk; TPOT is a request's
(latency - TTFT) / (output tokens - 1); ITL is every gap between text chunks; E2EL is send to last byte;
goodput counts the requests that meet every given objective.
"""

from __future__ import annotations

import numpy as np

from plait.bench.serve_client import RequestResult

METRICS = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
           "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
_SLO_KEYS = ("ttft", "tpot", "e2el")


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """["ttft:500", "tpot:50"] -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slos = {}
    for item in items or []:
        key, _, value = item.partition(":")
        if key not in _SLO_KEYS or not value:
            raise ValueError(f"--goodput takes KEY:MS with KEY one of {', '.join(_SLO_KEYS)}; got {item!r}")
        try:
            slos[key] = float(value)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: {value!r} is not a number of milliseconds") from None
        if slos[key] < 0:
            raise ValueError(f"--goodput {item!r}: the objective must be >= 0 ms")
    return slos


def parse_selection(metrics: str, percentiles: str) -> tuple[list[str], list[float]]:
    names = [m.strip() for m in metrics.split(",") if m.strip()]
    unknown = sorted(set(names) - set(METRICS))
    if unknown:
        raise ValueError(f"--percentile-metrics: unknown {unknown}; known: {', '.join(METRICS)}")
    try:
        ps = [float(p) for p in percentiles.split(",")]
    except ValueError:
        raise ValueError(f"--metric-percentiles takes numbers separated by commas, got {percentiles!r}") from None
    if any(not 0 < p <= 100 for p in ps):
        raise ValueError(f"--metric-percentiles must be in (0, 100], got {percentiles!r}")
    return names, ps


def _tpot(r: RequestResult) -> float | None:
    return (r.latency - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else None


def samples_ms(results: list[RequestResult]) -> dict[str, list[float]]:
    """Each metric's samples over the successful requests, in milliseconds."""
    ok = [r for r in results if r.success]
    return {"ttft": [r.ttft * 1e3 for r in ok],
            "tpot": [t * 1e3 for r in ok if (t := _tpot(r)) is not None],
            "itl": [g * 1e3 for r in ok for g in r.itl],
            "e2el": [r.latency * 1e3 for r in ok]}


def _meets(r: RequestResult, slos: dict[str, float]) -> bool:
    values = {"ttft": r.ttft * 1e3, "tpot": (_tpot(r) or 0.0) * 1e3, "e2el": r.latency * 1e3}
    return all(values[k] <= limit for k, limit in slos.items())


def _label(p: float) -> str:
    return str(int(p)) if p == int(p) else str(p)


def calculate_metrics(results: list[RequestResult], duration: float, slos: dict[str, float],
                      percentiles: list[float]) -> dict:
    ok = [r for r in results if r.success]
    total_in, total_out = sum(r.prompt_len for r in ok), sum(r.output_tokens for r in ok)
    m = {"duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
         "total_input_tokens": total_in, "total_output_tokens": total_out,
         "request_throughput": len(ok) / duration, "output_throughput": total_out / duration,
         "total_token_throughput": (total_in + total_out) / duration,
         "request_goodput": sum(_meets(r, slos) for r in ok) / duration if slos else None}
    for name, values in samples_ms(results).items():
        a = np.asarray(values or [0.0])
        m |= {f"mean_{name}_ms": float(a.mean()), f"median_{name}_ms": float(np.median(a)),
              f"std_{name}_ms": float(a.std())}
        m |= {f"p{_label(p)}_{name}_ms": float(np.percentile(a, p)) for p in percentiles}
    return m


def format_table(m: dict, selected: list[str], percentiles: list[float], max_concurrency: int | None,
                 request_rate: float) -> str:
    lines = ["{s:{c}^{n}}".format(s=" Serving Benchmark Result ", n=50, c="=")]

    def row(label: str, value) -> None:
        lines.append(f"{label:<40} {value:<10.2f}" if isinstance(value, float) else f"{label:<40} {value:<10}")

    row("Successful requests:", m["completed"])
    row("Failed requests:", m["failed"])
    if max_concurrency is not None:
        row("Maximum request concurrency:", max_concurrency)
    row("Request rate configured (RPS):", request_rate)
    row("Benchmark duration (s):", m["duration"])
    row("Total input tokens:", m["total_input_tokens"])
    row("Total generated tokens:", m["total_output_tokens"])
    row("Request throughput (req/s):", m["request_throughput"])
    if m["request_goodput"] is not None:
        row("Request goodput (req/s):", m["request_goodput"])
    row("Output token throughput (tok/s):", m["output_throughput"])
    row("Total Token throughput (tok/s):", m["total_token_throughput"])
    for name in selected:
        lines.append("{s:{c}^{n}}".format(s=METRICS[name], n=50, c="-"))
        short = name.upper()
        row(f"Mean {short} (ms):", m[f"mean_{name}_ms"])
        row(f"Median {short} (ms):", m[f"median_{name}_ms"])
        for p in percentiles:
            row(f"P{_label(p)} {short} (ms):", m[f"p{_label(p)}_{name}_ms"])
    lines.append("=" * 50)
    return "\n".join(lines)
