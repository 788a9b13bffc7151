"""Prometheus metrics (prometheus-client), one registry per app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

ROUTES = (
    "/health",
    "/metrics",
    "/v1/models",
    "/v1/chat/completions",
    "/v1/chat/completions/render",
    "/v1/completions",
    "/v1/responses",
    "/tokenize",
    "/detokenize",
)


def route_label(path: str) -> str:
    """A bounded label for a path: the route it belongs to, or `other` (no cardinality blow-up)."""
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    if path.startswith("/v1/responses/"):
        return "/v1/responses/{id}"
    return path if path in ROUTES else "other"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("agent_server_requests", "HTTP requests by route and status", ["route", "method", "status"], registry=r)
        self.latency = Histogram(
            "agent_server_request_latency_seconds", "Time to the end of the response", ["route"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.ttft = Histogram(
            "agent_server_time_to_first_token_seconds", "Request start to first generated token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter("agent_server_prompt_tokens", "Prompt tokens processed", registry=r)
        self.completion_tokens = Counter("agent_server_completion_tokens", "Completion tokens generated", registry=r)
        self.running = Gauge("agent_server_requests_running", "Sequences in the batch", registry=r)
        self.queued = Gauge("agent_server_requests_queued", "Requests admitted and waiting for a batch slot", registry=r)
        self.engine_info = Gauge("agent_server_engine_info", "The engine generating tokens (value 1)", ["engine"], registry=r)
        self.engine_errors = Counter("agent_server_engine_errors", "Requests failed by an engine error", registry=r)
        self.engine_unavailable = Counter(
            "agent_server_engine_unavailable", "Requests answered 503 because the engine was unreachable", registry=r
        )
        self.tool_calls = Counter("agent_server_tool_calls", "Tool calls returned to clients", registry=r)
        self.parse_failures = Counter(
            "agent_server_tool_parse_failures", "Outputs that tried a tool call that was not valid (returned as content)", registry=r
        )

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
