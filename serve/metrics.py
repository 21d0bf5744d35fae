"""Prometheus metrics of the HTTP layer, plus vLLM's own `vllm:*` metrics from the default registry."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter("cascade_http_requests", "HTTP requests by route and status",
                                     ["route", "status"], registry=r)
        self.ttft = Histogram("cascade_time_to_first_token_seconds", "Request arrival to first generated token",
                              ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("cascade_e2e_request_latency_seconds", "Request arrival to last generated token",
                             ["route"], buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("cascade_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("cascade_generation_tokens", "Tokens generated", registry=r)
        self.running = Gauge("cascade_requests_running", "Requests producing tokens", registry=r)
        self.waiting = Gauge("cascade_requests_waiting", "Admitted requests with no token yet", registry=r)
        self.rejected = Counter("cascade_requests_rejected", "Requests refused because the queue was full",
                                registry=r)
        self.aborted = Counter("cascade_requests_aborted", "Requests aborted (client went away)", registry=r)

    def render(self) -> bytes:
        # vLLM's engine (in this process) registers its `vllm:` metrics in the default registry.
        return generate_latest(self.registry) + generate_latest(REGISTRY)
