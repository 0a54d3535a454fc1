"""Prometheus metrics with vLLM's names (`vllm:` becomes `plait:`), so existing dashboards read them unchanged.

They live in the HTTP process, whichever process steps the engine, and are recorded on its event loop: adds and
aborts as the routes make them, outputs and load as each step's report arrives, timed with the step's own
timestamp (the moment the step returned, before any pipe or HTTP latency). Each server has its own registry.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from plait.outputs import RequestOutput

prometheus_client.disable_created_metrics()  # as vLLM: no `_created` series next to every counter

# vLLM's buckets, so histograms from both engines can be compared bucket for bucket.
_TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
_TPOT_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0]
_E2E_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0, 7680.0]


@dataclass
class _Timing:
    arrival: float  # time.monotonic() when the HTTP request came in
    last_token: float | None = None


@dataclass
class Load:
    """The engine's load after its latest step, reported by the step loop for the HTTP side to read."""

    running: int = 0  # requests with a sequence in the running set
    waiting: int = 0  # requests whose sequences all wait
    kv_cache_usage: float = 0.0  # share of KV-cache blocks in use, 0..1
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache since start
    prefix_cache_hits: int = 0  # and found there


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        r, labels = self.registry, ["model_name"]

        def metric(cls, name, doc, **kw):
            return cls(f"plait:{name}", doc, labels, registry=r, **kw).labels(model_name)

        self.ttft = metric(Histogram, "time_to_first_token_seconds", "Time to first token.", buckets=_TTFT_BUCKETS)
        self.tpot = metric(Histogram, "time_per_output_token_seconds", "Time between output tokens.", buckets=_TPOT_BUCKETS)
        self.e2e = metric(Histogram, "e2e_request_latency_seconds", "Arrival to last token.", buckets=_E2E_BUCKETS)
        self.running = metric(Gauge, "num_requests_running", "Requests in the running batch.")
        self.waiting = metric(Gauge, "num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_usage = metric(Gauge, "kv_cache_usage_perc", "KV-cache usage (1 = every block in use).")
        self.prefix_queries = metric(Counter, "prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = metric(Counter, "prefix_cache_hits_total", "Prompt tokens found in the prefix cache.")
        self.prompt_tokens = metric(Counter, "prompt_tokens_total", "Prompt tokens of admitted requests.")
        self.generation_tokens = metric(Counter, "generation_tokens_total", "Generated tokens.")
        self._published = (0, 0)  # the prefix-cache token counts already added to the counters
        self._success = Counter("plait:request_success_total", "Finished requests by finish reason.",
                                ["model_name", "finished_reason"], registry=r)
        self._model_name = model_name
        self._timings: dict[str, _Timing] = {}  # the unfinished requests'

    def render(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)

    def on_added(self, request_id: str, arrival: float, num_prompt_tokens: int) -> None:
        self._timings[request_id] = _Timing(arrival)
        self.prompt_tokens.inc(num_prompt_tokens)

    def on_output(self, out: RequestOutput, now: float | None = None) -> None:
        """Record the tokens of a DELTA output; a step gives each sequence at most one, so the gap is per token."""
        now = time.monotonic() if now is None else now
        timing = self._timings[out.request_id]
        if new_tokens := sum(len(c.token_ids) for c in out.outputs):
            self.generation_tokens.inc(new_tokens)
            if timing.last_token is None:
                self.ttft.observe(now - timing.arrival)
            else:
                self.tpot.observe(now - timing.last_token)
            timing.last_token = now
        if out.finished:
            self.e2e.observe(now - timing.arrival)
            self._finish(out.request_id, out.outputs[0].finish_reason or "stop")

    def on_aborted(self, request_id: str) -> None:
        if request_id in self._timings:
            self._finish(request_id, "abort")

    def _finish(self, request_id: str, reason: str) -> None:
        del self._timings[request_id]
        self._success.labels(self._model_name, reason).inc()

    def set_load(self, load: Load) -> None:
        self.running.set(load.running)
        self.waiting.set(load.waiting)
        self.kv_usage.set(load.kv_cache_usage)
        self.prefix_queries.inc(load.prefix_cache_queries - self._published[0])
        self.prefix_hits.inc(load.prefix_cache_hits - self._published[1])
        self._published = (load.prefix_cache_queries, load.prefix_cache_hits)
