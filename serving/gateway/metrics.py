"""Prometheus metrics of the gateway, per tenant (``GET /metrics`` with the admin key)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


@dataclass
class GatewayMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter("pissa_gateway_requests", "Requests by tenant, model and status",
                                ["tenant", "model", "status"], registry=r)
        self.tokens = Counter("pissa_gateway_tokens", "Tokens by tenant and kind (prompt, completion)",
                              ["tenant", "kind"], registry=r)
        self.latency = Histogram("pissa_gateway_request_seconds", "Request latency through the gateway",
                                 ["tenant"], registry=r,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.in_flight = Gauge("pissa_gateway_in_flight", "Requests in flight by tenant", ["tenant"], registry=r)
        self.refused = Counter("pissa_gateway_refused", "Requests refused by the gateway, by tenant and reason",
                               ["tenant", "reason"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
