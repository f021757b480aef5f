"""The API application and its process (`sink serve -c PATH`), on uvicorn.

Besides `/api/v1`: `/healthz` (the process answers), `/readyz` (ClickHouse answers) and
`/metrics` (Prometheus), without a token, as the worker's are: they carry no usage.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator
from typing import Any

import structlog
import uvicorn
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from sink import __version__
from sink.api import problems, routes
from sink.api.auth import Tokens
from sink.api.metrics import ApiMetrics, MetricsMiddleware
from sink.api.store import ClickHouseStore, UsageStore
from sink.config import Config
from sink.errors import ConfigError, DependencyError

log = structlog.get_logger("sink.api")

READY_TIMEOUT = 2.0
DESCRIPTION = (
    "Usage of sink's meters over HTTP, compatible with OpenMeter's meter API "
    "(`listMeters`, `getMeter`, `queryMeter`). Every request carries a bearer token bound to "
    "one namespace (or to all); a namespace token reads its own usage only."
)


def create_app(config: Config, store: UsageStore) -> FastAPI:
    metrics = ApiMetrics()

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        log.info("api listening", host=config.api.host, port=config.api.port)
        try:
            yield
        finally:
            await store.close()

    app = FastAPI(
        title="sink usage API",
        version=__version__,
        description=DESCRIPTION,
        openapi_url=None,  # served behind the token, by routes.openapi_document
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    tokens = Tokens(config.api.tokens)
    app.state.service = routes.Service(
        tokens=tokens,
        store=store,
        metrics=metrics,
        meters=config.meters,
        max_rows=config.api.max_rows,
    )
    problems.install(
        app, lambda r: tokens.grant(r.headers.get("authorization")) is not None, routes.PREFIX
    )
    app.include_router(routes.router)

    async def healthz(_request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def readyz(_request: Request) -> Response:
        try:
            await asyncio.wait_for(store.ping(), READY_TIMEOUT)
        except (DependencyError, TimeoutError):
            return PlainTextResponse("clickhouse unavailable\n", 503)
        return PlainTextResponse("ok\n")

    async def prometheus(_request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app.add_route("/healthz", healthz, include_in_schema=False)
    app.add_route("/readyz", readyz, include_in_schema=False)
    app.add_route("/metrics", prometheus, include_in_schema=False)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, told what FastAPI does not know: errors are problems
    (application/problem+json, never its 422), and `filterGroupBy` is a deepObject."""
    if app.openapi_schema is None:
        doc = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        for operations in doc["paths"].values():
            for operation in operations.values():
                responses = operation["responses"]
                responses.pop("422", None)
                for status, response in responses.items():
                    if int(status) >= 400:
                        schema = response["content"].pop("application/json")["schema"]
                        response["content"][problems.MEDIA_TYPE] = {"schema": schema}
        for name in ("HTTPValidationError", "ValidationError"):
            doc["components"]["schemas"].pop(name, None)
        app.openapi_schema = doc
    return app.openapi_schema


async def serve(config: Config) -> None:
    """Serve until SIGTERM/SIGINT (uvicorn's handlers), then finish the requests in flight."""
    if not config.api.tokens:
        raise ConfigError("api.tokens is empty: sink serve would refuse every request")
    app = create_app(config, ClickHouseStore(config))
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.api.host,
            port=config.api.port,
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=10,
        )
    )
    # uvicorn handles SIGTERM/SIGINT while it serves, then raises the signal again to the
    # handler it found. That handler (also the one before uvicorn's are in place) asks the
    # server to stop, so a graceful stop ends `sink serve` with 0, like `sink run`.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: setattr(server, "should_exit", True))
    await server.serve()
