"""Prometheus metrics of `sink serve`: requests by route and status, their latency, rows.

Routes are labelled by their template (`/api/v1/meters/{meterIdOrSlug}/query`), never by
the path asked for, so neither slugs nor probes of unknown paths grow the label set.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, Info
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sink import __version__

_LATENCY = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_ROWS = (0, 1, 10, 100, 1000, 10_000, 50_000, 100_000, 500_000)
UNMATCHED = "unmatched"


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "sink_api_requests",
            "HTTP requests answered, by route template, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "sink_api_request_seconds",
            "Time to answer a request, by route template",
            ["route"],
            buckets=_LATENCY,
            registry=r,
        )
        self.rows = Histogram(
            "sink_api_query_rows", "Rows in a meter query's answer", buckets=_ROWS, registry=r
        )
        Info("sink_build", "Build information", registry=r).info({"version": __version__})


class MetricsMiddleware:
    """Counts and times every HTTP request (plain ASGI: it does not buffer the body)."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        began = time.perf_counter()
        status = 500  # unless a response starts: an error escaped every handler

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            # The router writes the matched route into the scope it was handed.
            route = getattr(scope.get("route"), "path", None) or UNMATCHED
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - began)
