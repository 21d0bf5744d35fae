"""Prometheus metrics of the HTTP layer (`cascade_*`); the engine adds its own (`vllm:*` or `llamacpp:*`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from serve.engine import SpecDecodeStats

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
        # Speculative decoding, the same for every engine (set from the engine's counters at each scrape).
        self.spec_draft_tokens = Gauge("cascade_spec_decode_draft_tokens", "Tokens the drafter proposed",
                                       registry=r)
        self.spec_accepted_tokens = Gauge("cascade_spec_decode_accepted_tokens",
                                          "Drafted tokens the target accepted", registry=r)
        self.spec_acceptance_rate = Gauge("cascade_spec_decode_acceptance_rate",
                                          "Accepted / drafted tokens since start", registry=r)
        self.spec_mean_accepted_length = Gauge("cascade_spec_decode_mean_accepted_length",
                                               "Tokens per target step with a drafter (1 + accepted per draft)",
                                               registry=r)

    def render(self, spec: SpecDecodeStats | None = None) -> bytes:
        if spec is not None:
            self.spec_draft_tokens.set(spec.draft_tokens)
            self.spec_accepted_tokens.set(spec.accepted_tokens)
            self.spec_acceptance_rate.set(spec.acceptance_rate)
            self.spec_mean_accepted_length.set(spec.mean_accepted_length)
        return generate_latest(self.registry)
