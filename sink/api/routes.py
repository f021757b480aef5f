"""The endpoints: OpenMeter's `listMeters`, `getMeter` and `queryMeter`, and the OpenAPI
document, every one behind a bearer token."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.responses import Response

from sink.api import documents, query
from sink.api.auth import Grant, Tokens
from sink.api.metrics import ApiMetrics
from sink.api.problems import Problem, ProblemDocument, bad_parameter, unauthorized
from sink.api.store import UsageStore
from sink.metering.meters import Meter
from sink.metering.usage import Window

PREFIX = "/api/v1"
CSV = "text/csv"
JSON = "application/json"


@dataclass(frozen=True)
class Service:
    """What the endpoints share, built once per process."""

    tokens: Tokens
    store: UsageStore
    metrics: ApiMetrics
    meters: tuple[Meter, ...]
    max_rows: int

    def find(self, id_or_slug: str) -> Meter:
        for meter in self.meters:
            if id_or_slug in (meter.slug, meter.checksum()):
                return meter
        raise Problem(404, "no meter has this id or slug", "meterIdOrSlug")


def service(request: Request) -> Service:
    found: Service = request.app.state.service
    return found


_bearer = HTTPBearer(
    auto_error=False,
    description="A token of `api.tokens`: bound to one namespace, or to all (`'*'`).",
)


async def authorized(
    request: Request,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> Grant:
    grant = service(request).tokens.grant(request.headers.get("authorization"))
    if grant is None:
        raise unauthorized()
    return grant


def _problem(description: str) -> dict[str, Any]:
    return {"model": ProblemDocument, "description": description}


ERRORS: dict[int | str, dict[str, Any]] = {
    400: _problem("A parameter is invalid; `parameter` names it."),
    401: _problem("No bearer token, or not a valid one."),
    503: _problem("The usage store is unavailable; retry."),
}
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: _problem("No meter has this id or slug.")}
FORBIDDEN: dict[int | str, dict[str, Any]] = {
    403: _problem("The token may not read that namespace (whether it exists or not).")
}

router = APIRouter(prefix=PREFIX, dependencies=[Depends(authorized)], responses=ERRORS)
MeterKey = Literal["key", "name", "aggregation", "createdAt", "updatedAt"]
MeterIdOrSlug = Annotated[str, Path(description="A meter's slug, or its id.")]


@router.get(
    "/meters",
    operation_id="listMeters",
    summary="List meters",
    response_model=list[documents.MeterDocument],
    tags=["Meters"],
)
async def list_meters(
    request: Request,
    page: Annotated[int, Query(ge=1, description="Page index, from 1.")] = 1,
    pageSize: Annotated[int, Query(ge=1, le=1000, description="Meters per page.")] = 100,
    order: Annotated[Literal["ASC", "DESC"], Query()] = "ASC",
    orderBy: Annotated[MeterKey, Query(description="`key` is the slug.")] = "key",
    includeDeleted: Annotated[
        bool, Query(description="Accepted; meters no longer configured are never listed.")
    ] = False,
) -> Response:
    """The configured meters. Every namespace has the same meters; each sees its own usage."""
    svc = service(request)
    records = await svc.store.records(svc.meters)
    docs = [documents.meter_document(m, records[m.slug]) for m in svc.meters]
    field = {"key": "slug"}.get(orderBy, orderBy)
    docs.sort(key=lambda d: (d[field] is None, d[field] or "", d["slug"]), reverse=order == "DESC")
    first = (page - 1) * pageSize
    return Response(documents.dumps(docs[first : first + pageSize]), media_type=JSON)


@router.get(
    "/meters/{meterIdOrSlug}",
    operation_id="getMeter",
    summary="Get meter",
    response_model=documents.MeterDocument,
    responses=NOT_FOUND,
    tags=["Meters"],
)
async def get_meter(request: Request, meterIdOrSlug: MeterIdOrSlug) -> Response:
    """A meter by its id or slug."""
    svc = service(request)
    meter = svc.find(meterIdOrSlug)
    records = await svc.store.records([meter])
    return Response(
        documents.dumps(documents.meter_document(meter, records[meter.slug])), media_type=JSON
    )


FILTER_PARAMETER = {
    "name": "filterGroupBy",
    "in": "query",
    "style": "deepObject",
    "explode": True,
    "required": False,
    "description": "Keep the events whose group NAME has VALUE: `filterGroupBy[NAME]=VALUE` "
    "(one value per group; NAME is a group of the meter).",
    "schema": {"type": "object", "additionalProperties": {"type": "string"}},
}


@router.get(
    "/meters/{meterIdOrSlug}/query",
    operation_id="queryMeter",
    summary="Query meter",
    response_model=documents.UsageDocument,
    responses={
        **NOT_FOUND,
        **FORBIDDEN,
        200: {
            "description": "Usage per window (JSON), or the same rows as CSV when the client "
            "asks for text/csv.",
            "content": {CSV: {"schema": {"type": "string"}}},
        },
    },
    openapi_extra={"parameters": [FILTER_PARAMETER]},
    tags=["Meters"],
)
async def query_meter(
    request: Request,
    meterIdOrSlug: MeterIdOrSlug,
    grant: Annotated[Grant, Depends(authorized)],
    from_: Annotated[
        str | None,
        Query(
            alias="from",
            description="Start, inclusive (RFC 3339), aligned to the window in windowTimeZone "
            "(to the minute without windowSize).",
            json_schema_extra={"format": "date-time"},
        ),
    ] = None,
    to: Annotated[
        str | None,
        Query(
            description="End, exclusive (RFC 3339), aligned like `from`.",
            json_schema_extra={"format": "date-time"},
        ),
    ] = None,
    windowSize: Annotated[
        Window | None,
        Query(description="Without it: one aggregate for the whole period per subject and group."),
    ] = None,
    windowTimeZone: Annotated[
        str, Query(description="IANA time zone the windows are aligned to.")
    ] = "UTC",
    subject: Annotated[
        list[str] | None, Query(description="Filter by subject (repeatable); groups by subject.")
    ] = None,
    groupBy: Annotated[
        list[str] | None,
        Query(description="`subject` or a group of the meter (repeatable)."),
    ] = None,
    namespace: Annotated[
        str | None,
        Query(
            description="sink: the namespace to read. A namespace token reads its own (the "
            "default); an operator token reads the one named, or all of them together."
        ),
    ] = None,
    clientId: Annotated[
        str | None, Query(description="Accepted for OpenMeter's clients; not used.")
    ] = None,
) -> Response:
    """Usage of a meter per window, subject and group, in the token's namespace."""
    svc = service(request)
    scope = query.scope(grant, namespace)
    meter = svc.find(meterIdOrSlug)
    asked = query.parse(
        meter,
        scope,
        start=from_,
        end=to,
        window=windowSize,
        tz=windowTimeZone,
        subjects=subject or [],
        group_by=groupBy or [],
        raw=request.query_params.multi_items(),
        max_rows=svc.max_rows,
    )
    rows = await svc.store.usage(meter, asked)
    if len(rows) > asked.limit:
        what = "windowSize" if asked.window else "groupBy"
        raise bad_parameter(
            what,
            f"the answer has more than {asked.limit} rows; ask for larger windows, a shorter "
            "range, fewer groups or some subjects",
        )
    svc.metrics.rows.observe(len(rows))
    if _wants_csv(request.headers.get("accept")):
        return Response(
            documents.usage_csv(asked, rows),
            media_type=CSV,
            headers={"Content-Disposition": f'attachment; filename="{meter.slug}.csv"'},
        )
    return Response(documents.usage_json(asked, rows), media_type=JSON)


def _wants_csv(accept: str | None) -> bool:
    """Whether the client prefers CSV to JSON (by quality; JSON on a tie and by default)."""
    best = {CSV: -1.0, JSON: -1.0}
    for part in (accept or "").split(","):
        kind, *params = (p.strip() for p in part.split(";"))
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        for media in (CSV, JSON):
            if kind.lower() in (media, media.split("/")[0] + "/*", "*/*"):
                best[media] = max(best[media], quality - (0.001 if kind != media else 0))
    return best[CSV] > 0 and best[CSV] > best[JSON]


@router.get("/openapi.json", include_in_schema=False)
async def openapi_document(request: Request) -> Response:
    return Response(documents.dumps(request.app.openapi()), media_type=JSON)
