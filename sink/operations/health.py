"""HTTP endpoints on `http.port`: /healthz, /readyz, /status, /metrics.

A deliberately small HTTP/1.1 server on asyncio: four GET routes do not need a framework, and
liveness then measures the same event loop the worker runs on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


class Observable(Protocol):
    def readiness(self) -> tuple[bool, dict[str, Any]]: ...

    def status(self) -> dict[str, Any]: ...


class Starting:
    """What the endpoints report before the worker exists: alive, not ready."""

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        return False, {"state": "starting"}

    def status(self) -> dict[str, Any]:
        return {"state": "starting"}


_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


class HealthServer:
    def __init__(
        self, target: Observable, registry: CollectorRegistry, host: str, port: int
    ) -> None:
        self.target = target
        self._registry = registry
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self._routes: dict[str, Callable[[], tuple[int, str, bytes]]] = {
            "/healthz": lambda: (200, "text/plain", b"ok\n"),
            "/readyz": self._ready,
            "/status": lambda: (200, "application/json", orjson.dumps(self.target.status())),
            "/metrics": lambda: (200, CONTENT_TYPE_LATEST, generate_latest(self._registry)),
        }

    @property
    def port(self) -> int:
        if self._server is None or not self._server.sockets:
            return self._port
        return int(self._server.sockets[0].getsockname()[1])

    def _ready(self) -> tuple[int, str, bytes]:
        ok, checks = self.target.readiness()
        return (200 if ok else 503), "application/json", orjson.dumps({"ready": ok, **checks})

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self._host, self._port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            method, _, rest = head.split(b"\r\n", 1)[0].decode("latin-1").partition(" ")
            path = rest.split(" ", 1)[0].split("?", 1)[0]
            route = self._routes.get(path)
            if route is None:
                code, ctype, body = 404, "text/plain", b"not found\n"
            elif method != "GET":
                code, ctype, body = 405, "text/plain", b"GET only\n"
            else:
                code, ctype, body = route()
            writer.write(
                f"HTTP/1.1 {code} {_REASONS[code]}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (
            TimeoutError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,  # a request head over the stream limit (64 KiB)
            ConnectionError,
        ):
            pass  # not a request we answer; an unhandled error here would log a traceback
        finally:
            writer.close()
