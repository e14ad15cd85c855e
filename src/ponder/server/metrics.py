"""``GET /metrics``: the figures vLLM's users watch, in Prometheus' text format
(``prometheus-client``), under vLLM's names with ``ponder:`` for ``vllm:`` so that
existing dashboards need one substitution.

Per app, not global: each ``create_app`` has its own registry, so two servers (or
tests) in one process never share counters.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# seconds; vLLM's buckets, cut to what a CPU server meets
_TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
_TPOT = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0)
_E2E = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 60.0, 120.0)


class ServerMetrics:
    """Counters and histograms fed by the service and the engine; gauges read from the
    engine when scraped."""

    def __init__(self, model: str) -> None:
        self.registry = CollectorRegistry()
        label = {"model_name": model}
        r, names = self.registry, ("model_name",)
        self.running = Gauge("ponder:num_requests_running", "Requests in the engine's running batch.", names,
                             registry=r).labels(**label)
        self.waiting = Gauge("ponder:num_requests_waiting", "Requests waiting to join the batch.", names,
                             registry=r).labels(**label)
        self.inflight = Gauge("ponder:num_http_requests_inflight", "Completions requests being served.", names,
                              registry=r).labels(**label)
        self.kv_bytes = Gauge("ponder:kv_cache_bytes", "KV-cache bytes held: the running batch's valid tokens.",
                              names, registry=r).labels(**label)
        self.prefix_bytes = Gauge("ponder:prefix_cache_bytes", "KV bytes held by the radix prefix cache.", names,
                                  registry=r).labels(**label)
        self.prefix_queries = Gauge("ponder:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                    names, registry=r).labels(**label)
        self.prefix_hits = Gauge("ponder:prefix_cache_hits", "Prompt tokens served from the prefix cache.", names,
                                 registry=r).labels(**label)
        self.prompt_tokens = Counter("ponder:prompt_tokens", "Prompt tokens of finished requests.", names,
                                     registry=r).labels(**label)
        self.generation_tokens = Counter("ponder:generation_tokens",
                                         "Generated tokens of finished requests (every internal token of a "
                                         "strategy).", names, registry=r).labels(**label)
        self.requests = Counter("ponder:request_success", "Finished requests by finish reason.",
                                ("model_name", "finished_reason"), registry=r)
        self.errors = Counter("ponder:request_errors", "Requests answered with an error, by HTTP status.",
                              ("model_name", "status"), registry=r)
        self.ttft = Histogram("ponder:time_to_first_token_seconds", "Time from submission to the first token.",
                              names, buckets=_TTFT, registry=r).labels(**label)
        self.tpot = Histogram("ponder:time_per_output_token_seconds", "Time per generated token after the first.",
                              names, buckets=_TPOT, registry=r).labels(**label)
        self.e2e = Histogram("ponder:e2e_request_latency_seconds", "Time from arrival to the answer.", names,
                             buckets=_E2E, registry=r).labels(**label)
        self.model = model

    def observe(self, name: str, seconds: float) -> None:
        """The engine's hook (``Engine.observe``); called on the engine's threads."""
        (self.ttft if name == "time_to_first_token" else self.tpot).observe(max(seconds, 0.0))

    def finished(self, usage: Any, reasons: list[str], seconds: float) -> None:
        self.prompt_tokens.inc(int(usage.prompt_tokens))
        self.generation_tokens.inc(int(usage.generated_tokens))
        for why in reasons:
            self.requests.labels(model_name=self.model, finished_reason=why or "stop").inc()
        self.e2e.observe(seconds)

    def failed(self, status: int) -> None:
        self.errors.labels(model_name=self.model, status=str(status)).inc()

    def render(self, engine: Any, inflight: int) -> bytes:
        self.running.set(engine.in_batch)
        self.waiting.set(engine.queued)
        self.inflight.set(inflight)
        self.kv_bytes.set(engine.live_kv_bytes())
        pc = engine.prefix_cache
        self.prefix_bytes.set(pc.nbytes if pc is not None else 0)
        self.prefix_queries.set(pc.stats.tokens_looked_up if pc is not None else 0)
        self.prefix_hits.set(pc.stats.tokens_reused if pc is not None else 0)
        return generate_latest(self.registry)
