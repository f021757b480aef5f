"""Errors as RFC 7807 problems (`application/problem+json`), the shape OpenMeter's clients read.

A problem names the parameter at fault (`parameter`) and says what was expected. It never
carries a secret: not the presented token, not a connection URL, not a server's error text,
and never whether another namespace exists.
"""

from __future__ import annotations

from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import orjson
import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.responses import Response

from sink.errors import DependencyError

MEDIA_TYPE = "application/problem+json"

log = structlog.get_logger("sink.api")


class ProblemDocument(BaseModel):
    """A problem (RFC 7807)."""

    type: str = Field("about:blank", description="Always about:blank: the status says it.")
    title: str = Field(description="The HTTP status phrase.")
    status: int
    detail: str = Field(description="What was wrong, and what was expected.")
    instance: str = Field(description="The path of the request.")
    parameter: str | None = Field(None, description="The request parameter at fault, if one.")


class Problem(Exception):
    """An answer other than 2xx, raised anywhere in a request."""

    def __init__(
        self,
        status: int,
        detail: str,
        parameter: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.parameter = parameter
        self.headers = headers or {}


def bad_parameter(parameter: str, detail: str) -> Problem:
    return Problem(400, f"{parameter}: {detail}", parameter)


def unauthorized() -> Problem:
    return Problem(
        401,
        "a valid bearer token is required (Authorization: Bearer <token>)",
        headers={"WWW-Authenticate": 'Bearer realm="sink"'},
    )


def respond(request: Request, problem: Problem) -> Response:
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": HTTPStatus(problem.status).phrase,
        "status": problem.status,
        "detail": problem.detail,
        "instance": request.url.path,
    }
    if problem.parameter is not None:
        body["parameter"] = problem.parameter
    return Response(
        orjson.dumps(body), problem.status, headers=problem.headers, media_type=MEDIA_TYPE
    )


def install(app: FastAPI, authenticated: Callable[[Request], bool], private: str) -> None:
    """Answer every error of `app` as a problem. Under `private`, a request without a valid
    token learns nothing else, not even whether a path exists."""

    async def on_problem(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Problem)
        return respond(request, exc)

    async def on_invalid(request: Request, exc: Exception) -> Response:
        # FastAPI's own check of a typed parameter. Its message never repeats the input.
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0]
        location = [str(part) for part in first.get("loc", ())]
        parameter = location[-1] if len(location) > 1 else (location[0] if location else "")
        return respond(request, bad_parameter(parameter, str(first.get("msg", "invalid"))))

    async def on_http(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if request.url.path.startswith(private) and not authenticated(request):
            return respond(request, unauthorized())
        detail = {404: "no such endpoint", 405: "method not allowed"}.get(
            exc.status_code, HTTPStatus(exc.status_code).phrase
        )
        return respond(request, Problem(exc.status_code, detail, headers=dict(exc.headers or {})))

    async def on_dependency(request: Request, exc: Exception) -> Response:
        log.warning("usage store unavailable", path=request.url.path, error=str(exc))
        unavailable = "the usage store is unavailable; retry later"
        return respond(request, Problem(503, unavailable, headers={"Retry-After": "1"}))

    async def on_error(request: Request, exc: Exception) -> Response:
        log.error("request failed", path=request.url.path, exc_info=exc)
        return respond(request, Problem(500, "internal error"))

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(RequestValidationError, on_invalid)
    app.add_exception_handler(HTTPException, on_http)
    app.add_exception_handler(DependencyError, on_dependency)
    app.add_exception_handler(Exception, on_error)
