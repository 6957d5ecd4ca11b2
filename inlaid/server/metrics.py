"""Prometheus metrics for ``GET /metrics``, in a registry of the app's own (several apps may share a
process, e.g. in tests).

Request counters and latency histograms are updated by the handlers; engine gauges (running,
waiting, KV blocks, adapters) are read at scrape time from the snapshot the engine thread keeps, so
a scrape never waits for a step.
"""

from __future__ import annotations

from collections import defaultdict

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inlaid.engine.llm_engine import RequestOutput
from inlaid.server.async_engine import AsyncEngine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


class _EngineCollector:
    def __init__(self, engine: AsyncEngine):
        self.engine = engine

    def collect(self):
        stats = defaultdict(int, self.engine.stats)  # a key the engine drops reads 0, not a 500
        gauges = {
            "inlaid_num_requests_running": ("Requests holding KV blocks", stats["running"]),
            "inlaid_num_requests_waiting": ("Requests queued in the scheduler", stats["waiting"]),
            "inlaid_num_requests_in_flight": ("Requests admitted by the server, not yet finished",
                                              stats["in_flight"]),
            "inlaid_kv_blocks_used": ("KV cache blocks held by requests", stats["kv_blocks_used"]),
            "inlaid_kv_blocks_total": ("KV cache blocks", stats["kv_blocks_total"]),
            "inlaid_adapters_registered": ("LoRA adapters registered", stats["adapters_registered"]),
            "inlaid_engine_up": ("1 while the engine serves, 0 once it failed or stopped",
                                 int(self.engine.is_accepting)),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        yield CounterMetricFamily("inlaid_adapter_loads", "Adapter loads into device slots (swaps)",
                                  value=stats["adapter_loads"])
        yield CounterMetricFamily("inlaid_adapter_prefetches",
                                  "Adapter loads done between steps for waiting requests (part of the loads)",
                                  value=stats["adapter_prefetches"])
        yield CounterMetricFamily("inlaid_engine_steps", "Engine steps run", value=stats["steps"])


class ServerMetrics:
    def __init__(self, engine: AsyncEngine):
        self.registry = registry = CollectorRegistry()
        self.http_requests = Counter("inlaid_http_requests", "HTTP requests by route and status code",
                                     ["method", "route", "status"], registry=registry)
        self.finished = Counter("inlaid_requests_finished", "Generation requests by how they ended "
                                "(stop, length, abort = client left, error)", ["reason"], registry=registry)
        self.prompt_tokens = Counter("inlaid_prompt_tokens", "Prompt tokens of finished requests",
                                     registry=registry)
        self.generation_tokens = Counter("inlaid_generation_tokens", "Tokens generated for finished "
                                         "requests", registry=registry)
        self.ttft = Histogram("inlaid_time_to_first_token_seconds", "Arrival to first token",
                              buckets=_LATENCY_BUCKETS, registry=registry)
        self.latency = Histogram("inlaid_e2e_request_latency_seconds", "Arrival to last token",
                                 buckets=_LATENCY_BUCKETS, registry=registry)
        self.adapter_changes = Counter("inlaid_adapter_api_calls", "load/unload_lora_adapter calls by "
                                       "outcome", ["op", "outcome"], registry=registry)
        registry.register(_EngineCollector(engine))

    def observe_finished(self, out: RequestOutput) -> None:
        self.finished.labels(out.finish_reason or "unknown").inc()
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        self.generation_tokens.inc(len(out.output_token_ids))
        if out.first_token_time is not None:
            self.ttft.observe(max(out.first_token_time - out.arrival_time, 0.0))
        if out.finish_time is not None:
            self.latency.observe(max(out.finish_time - out.arrival_time, 0.0))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class HttpMetricsMiddleware:
    """Counts every HTTP response by route template (not raw path: bounded label values)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def send_and_record(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.http_requests.labels(scope["method"], route, str(status[0])).inc()
