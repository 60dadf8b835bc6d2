"""/metrics: Prometheus metrics through prometheus_client, under vLLM's names.

vLLM's names (`vllm:num_requests_running`, `vllm:time_to_first_token_seconds`, ...) with its
`model_name` label, so dashboards and alerts written for a vLLM server read this one as they
are; the process collector adds CPU, memory and file descriptors. Each app has its own registry,
so two servers in one process (tests) do not share counts. The engine thread observes requests
as their events pass (`EngineThread(metrics=...)`); the gauges are read when scraped.
"""

from __future__ import annotations

import time

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               ProcessCollector, generate_latest)
from prometheus_client.core import CounterMetricFamily

# vLLM's buckets, in seconds
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                 7.5, 10.0, 20.0, 40.0, 80.0)
_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                  7.5, 10.0, 20.0, 40.0, 80.0)
_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class _PrefixCacheCollector:
    """vLLM's prefix cache counters, in prompt tokens: looked up, and found kept. Read from the
    engine's PrefixCache when scraped (its counts only grow)."""

    def __init__(self, model_name: str, prefix_cache):
        self.model_name, self.prefix_cache = model_name, prefix_cache

    def collect(self):
        cache = self.prefix_cache
        for name, doc, value in (
                ("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", cache.queried_tokens),
                ("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", cache.reused_tokens)):
            family = CounterMetricFamily(name, doc, labels=["model_name"])
            family.add_metric([self.model_name], value)
            yield family


class ServerMetrics:
    def __init__(self, model_name: str, running, waiting, prefix_cache=None):
        """running, waiting: callables giving the sequences decoding and those queued;
        prefix_cache: the engine's PrefixCache, whose counts are exported."""
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        if prefix_cache is not None:
            registry.register(_PrefixCacheCollector(model_name, prefix_cache))
        label = {"labelnames": ["model_name"], "registry": registry}

        def gauge(name, doc, read):
            Gauge(name, doc, **label).labels(model_name).set_function(read)

        gauge("vllm:num_requests_running", "Requests in the decode batch.", running)
        gauge("vllm:num_requests_waiting", "Requests waiting to be admitted.", waiting)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed.",
                                     **label).labels(model_name)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated.",
                                         **label).labels(model_name)
        self._success = Counter("vllm:request_success", "Requests finished, by finish reason.",
                                labelnames=["model_name", "finished_reason"], registry=registry)
        self._model_name = model_name
        self.time_to_first_token = Histogram(
            "vllm:time_to_first_token_seconds", "Time to the first generated token.",
            buckets=_TTFT_BUCKETS, **label).labels(model_name)
        self.inter_token_latency = Histogram(
            "vllm:inter_token_latency_seconds", "Time between a request's tokens.",
            buckets=_TOKEN_BUCKETS, **label).labels(model_name)
        self.e2e_request_latency = Histogram(
            "vllm:e2e_request_latency_seconds", "Time from a request's arrival to its end.",
            buckets=_REQUEST_BUCKETS, **label).labels(model_name)

    # -- observed by the engine thread ------------------------------------------------------------

    def token(self, request, n_new: int) -> None:
        """Request `request` got n_new more tokens (its first, or later ones)."""
        now = time.perf_counter()
        last = getattr(request, "_metrics_last", None)
        if last is None:
            self.time_to_first_token.observe(now - request.started)
        elif n_new:
            for _ in range(n_new):  # tokens that arrived together share the gap
                self.inter_token_latency.observe((now - last) / n_new)
        request._metrics_last = now
        self.generation_tokens.inc(n_new)

    def finished(self, request, reason: str) -> None:
        self.prompt_tokens.inc(request.prompt_tokens)
        self.e2e_request_latency.observe(time.perf_counter() - request.started)
        self._success.labels(self._model_name, reason).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
