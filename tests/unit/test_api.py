"""`sink serve` without services: parameter checks, tokens, problems, negotiation, the OpenAPI
document, metrics; the usage store is an in-memory fake that records what it was asked."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from openapi_spec_validator import validate
from prometheus_client.parser import text_string_to_metric_families

from sink import config
from sink.api import query
from sink.api.auth import Grant, Tokens, digest
from sink.api.problems import Problem
from sink.api.routes import _wants_csv
from sink.api.server import create_app
from sink.api.store import MeterRecord
from sink.config import ApiToken
from sink.errors import ClickHouseUnavailable, ConfigError
from sink.metering.meters import Meter
from sink.metering.usage import UsageRow

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # starlette's note about httpx
    from fastapi.testclient import TestClient

METER = Meter(
    slug="tokens",
    event_type="llm",
    aggregation="SUM",
    value_property="n",
    group_by={"model": "model", "region": "region"},
)
KOLKATA = ZoneInfo("Asia/Kolkata")


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def parse(**given: Any) -> query.UsageQuery:
    args: dict[str, Any] = {
        "start": None,
        "end": None,
        "window": None,
        "tz": "UTC",
        "subjects": [],
        "group_by": [],
        "raw": [],
        "max_rows": 1000,
    }
    args.update(given)
    return query.parse(METER, "acme", **args)


def problem_of(**given: Any) -> Problem:
    with pytest.raises(Problem) as caught:
        parse(**given)
    return caught.value


# --- parameters -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("window", "tz", "good", "bad"),
    [
        (None, "UTC", "2026-01-31T21:07:00Z", "2026-01-31T21:07:30Z"),
        ("MINUTE", "UTC", "2026-01-31T21:07:00Z", "2026-01-31T21:07:00.5Z"),
        ("HOUR", "UTC", "2026-01-31T21:00:00Z", "2026-01-31T21:30:00Z"),
        ("HOUR", "Asia/Kolkata", "2026-01-31T21:30:00Z", "2026-01-31T21:00:00Z"),
        ("DAY", "UTC", "2026-01-31T00:00:00Z", "2026-01-31T01:00:00Z"),
        ("DAY", "Asia/Kolkata", "2026-01-30T18:30:00Z", "2026-01-31T00:00:00Z"),
        ("DAY", "Europe/Paris", "2026-03-29T00:00:00+01:00", "2026-03-29T00:00:00+02:00"),
        ("MONTH", "UTC", "2026-02-01T00:00:00Z", "2026-02-02T00:00:00Z"),
        ("MONTH", "Asia/Kolkata", "2026-01-31T18:30:00Z", "2026-02-01T00:00:00Z"),
    ],
)
def test_from_and_to_must_start_a_window_in_the_time_zone(
    window: Any, tz: str, good: str, bad: str
) -> None:
    far = datetime(2027, 1, 1, tzinfo=ZoneInfo(tz)).isoformat()
    asked = parse(start=good, end=far, window=window, tz=tz, max_rows=10**7)
    assert asked.start == at(good)
    assert asked.start.tzinfo == UTC
    for name, given in (("from", {"start": bad, "end": far}), ("to", {"end": bad})):
        p = problem_of(window=window, tz=tz, max_rows=10**7, **given)
        assert (p.status, p.parameter) == (400, name), (window, tz, name)


def test_a_reversed_or_empty_range_names_to() -> None:
    for end in ("2026-01-01T00:00:00Z", "2025-12-31T00:00:00Z"):
        p = problem_of(start="2026-01-01T00:00:00Z", end=end)
        assert (p.status, p.parameter) == (400, "to")


@pytest.mark.parametrize("text", ["yesterday", "2026-01-01", "2026-01-01T00:00:00", "1767225600"])
def test_a_time_without_offset_or_not_rfc3339_is_refused(text: str) -> None:
    assert problem_of(start=text).parameter == "from"
    assert problem_of(end=text).parameter == "to"


@pytest.mark.parametrize("tz", ["Mars/Olympus", "UTC+5", "../../etc/passwd", ""])
def test_an_unknown_time_zone_names_window_time_zone(tz: str) -> None:
    assert problem_of(tz=tz, window="DAY").parameter == "windowTimeZone"


def test_group_by_takes_subject_and_the_meters_groups_only() -> None:
    assert parse(group_by=["region", "subject", "region"]).group_by == ("region", "subject")
    p = problem_of(group_by=["model", "colour"])
    assert p.parameter == "groupBy"
    assert "colour" in p.detail and "model" in p.detail


def test_a_subject_filter_groups_by_subject_too() -> None:
    asked = parse(subjects=["s2", "s1", "s2"], group_by=["model"])
    assert asked.subjects == ("s2", "s1")
    assert asked.group_by == ("model", "subject")
    assert asked.groups == ["model"]


def test_filter_group_by_is_a_deep_object_of_the_meters_groups() -> None:
    raw = [("filterGroupBy[model]", "gpt 4"), ("filterGroupBy[region]", ""), ("other", "x")]
    assert parse(raw=raw).filters == {"model": "gpt 4", "region": ""}
    for bad in (
        [("filterGroupBy[colour]", "red")],
        [("filterGroupBy[subject]", "s1")],
        [("filterGroupBy[model", "x")],
        [("filterGroupBy[model]", "a"), ("filterGroupBy[model]", "b")],
    ):
        assert problem_of(raw=bad).parameter == "filterGroupBy", bad


@pytest.mark.parametrize(
    "name", ["filterGroupBy", "filterCustomerId", "advancedMeterGroupByFilters"]
)
def test_filters_sink_cannot_apply_are_refused_not_ignored(name: str) -> None:
    # The openmeter client sends filter_group_by as filterGroupBy={'model': 'x'}: ignoring it
    # would answer unfiltered numbers.
    assert problem_of(raw=[(name, "{'model': 'x'}")]).parameter == name


@pytest.mark.parametrize(
    ("window", "tz", "start", "end", "count"),
    [
        ("MINUTE", "UTC", "2026-01-01T00:00:00Z", "2026-01-01T01:00:00Z", 60),
        ("HOUR", "Asia/Kolkata", "2026-01-01T00:30:00Z", "2026-01-02T00:30:00Z", 24),
        ("DAY", "UTC", "2026-01-01T00:00:00Z", "2026-02-01T00:00:00Z", 31),
        ("DAY", "Europe/Paris", "2026-03-28T00:00:00+01:00", "2026-03-31T00:00:00+02:00", 3),
        ("MONTH", "UTC", "2025-11-01T00:00:00Z", "2026-03-01T00:00:00Z", 4),
    ],
)
def test_windows_between_counts_exactly(
    window: Any, tz: str, start: str, end: str, count: int
) -> None:
    assert query.windows_between(at(start), at(end), window, ZoneInfo(tz)) == count
    parse(start=start, end=end, window=window, tz=tz, max_rows=count)
    p = problem_of(start=start, end=end, window=window, tz=tz, max_rows=count - 1)
    assert p.parameter == "windowSize"


def test_aligned_minutes_hours_days_months() -> None:
    moment = at("2026-02-01T00:00:00+05:30")
    assert all(query.aligned(moment, w, KOLKATA) for w in ("MINUTE", "HOUR", "DAY", "MONTH"))
    assert not query.aligned(moment + timedelta(days=1), "MONTH", KOLKATA)
    assert not query.aligned(moment + timedelta(hours=1), "DAY", KOLKATA)
    assert not query.aligned(moment + timedelta(minutes=30), "HOUR", KOLKATA)


def test_a_namespace_token_reads_its_own_namespace_only() -> None:
    assert query.scope(Grant("acme"), None) == "acme"
    assert query.scope(Grant("acme"), "acme") == "acme"
    with pytest.raises(Problem) as caught:
        query.scope(Grant("acme"), "globex")
    assert caught.value.status == 403
    assert query.scope(Grant(None), None) is None
    assert query.scope(Grant(None), "globex") == "globex"


# --- tokens and configuration -----------------------------------------------------------------


def test_tokens_grant_by_their_sha256() -> None:
    tokens = Tokens(
        [
            ApiToken(namespace="acme", sha256=digest("t-acme")),
            ApiToken(namespace="*", sha256=digest("t-operator").upper()),
        ]
    )
    assert tokens.grant("Bearer t-acme") == Grant("acme")
    assert tokens.grant("bearer   t-acme ") == Grant("acme")
    assert tokens.grant("Bearer t-operator") == Grant(None)
    for header in (None, "", "Bearer", "Bearer ", "Basic t-acme", "t-acme", "Bearer t-acm"):
        assert tokens.grant(header) is None, header
    assert tokens.grant(f"Bearer {digest('t-acme')}") is None  # the hash is not the token


def test_api_tokens_come_from_file_or_environment_and_a_bad_one_is_not_echoed() -> None:
    env = {"SINK__API__TOKENS": f"[{{namespace: acme, sha256: {digest('x')}}}]"}
    cfg = config.build({}, env)
    assert cfg.api.tokens == (ApiToken(namespace="acme", sha256=digest("x")),)
    with pytest.raises(ConfigError) as caught:
        config.build({"api": {"tokens": [{"namespace": "acme", "sha256": "the-raw-token"}]}})
    assert "the-raw-token" not in str(caught.value)
    assert "api.tokens[0].sha256" in str(caught.value)
    same = {"namespace": "a", "sha256": digest("x")}
    with pytest.raises(ConfigError):
        config.build({"api": {"tokens": [same, {**same, "namespace": "b"}]}})


# --- HTTP, with a fake store ------------------------------------------------------------------


class FakeStore:
    def __init__(self) -> None:
        self.asked: list[query.UsageQuery] = []
        self.rows: int = 1
        self.fail: Exception | None = None

    async def usage(self, meter: Meter, asked: query.UsageQuery) -> list[UsageRow]:
        self.asked.append(asked)
        if self.fail is not None:
            raise self.fail
        start = asked.start or at("2026-01-01T00:00:00Z")
        return [
            UsageRow(
                start + timedelta(minutes=i),
                start + timedelta(minutes=i + 1),
                asked.namespace or "*",
                i + 0.5,
                f"s{i}" if "subject" in asked.group_by else None,
                {g: f"{g}-{i}" for g in asked.groups},
            )
            for i in range(self.rows)
        ]

    async def records(self, meters: Sequence[Meter]) -> dict[str, MeterRecord]:
        when = at("2026-01-01T00:00:00+00:00")
        return {m.slug: MeterRecord("applied", when, when) for m in meters}

    async def ping(self) -> None:
        if self.fail is not None:
            raise self.fail

    async def close(self) -> None:
        pass


ACME = {"Authorization": "Bearer t-acme"}
OPERATOR = {"Authorization": "Bearer t-operator"}
QUERY = "/api/v1/meters/tokens/query"


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
def client(store: FakeStore) -> Iterator[TestClient]:
    cfg = config.build(
        {
            "meters": [
                METER.model_dump(),
                {"slug": "calls", "event_type": "call", "aggregation": "COUNT"},
            ],
            "api": {
                "tokens": [
                    {"namespace": "acme", "sha256": digest("t-acme")},
                    {"namespace": "*", "sha256": digest("t-operator")},
                ],
                "max_rows": 5,
            },
        },
        {},
    )
    with TestClient(create_app(cfg, store), raise_server_exceptions=False) as c:
        yield c


def assert_problem(response: Any, status: int, parameter: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["status"] == status
    assert body["type"] == "about:blank" and body["title"] and body["detail"]
    assert body["instance"] == response.request.url.path
    assert body.get("parameter") == parameter
    return body


@pytest.mark.parametrize(
    "path", ["/api/v1/meters", "/api/v1/meters/tokens", QUERY, "/api/v1/openapi.json"]
)
def test_every_api_endpoint_needs_a_valid_token_before_anything_else(
    client: TestClient, store: FakeStore, path: str
) -> None:
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic t-acme"}):
        response = client.get(path + "?windowSize=WEEK&namespace=globex", headers=headers)
        body = assert_problem(response, 401)
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert "nope" not in response.text and "t-acme" not in response.text
        assert "windowSize" not in body["detail"]
    assert store.asked == []


def test_operational_endpoints_need_no_token(client: TestClient, store: FakeStore) -> None:
    assert client.get("/healthz").text == "ok\n"
    assert client.get("/readyz").status_code == 200
    store.fail = ClickHouseUnavailable("server error 210: connection refused to default:pw@h")
    assert client.get("/readyz").status_code == 503


def test_query_answers_openmeters_shape_and_passes_the_parameters_on(
    client: TestClient, store: FakeStore
) -> None:
    response = client.get(
        QUERY + "?from=2026-01-31T18:30:00Z&to=2026-02-02T18:30:00Z&windowSize=DAY"
        "&windowTimeZone=Asia/Kolkata&subject=s0&groupBy=model&filterGroupBy[region]=eu",
        headers=ACME,
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {
        "from": "2026-01-31T18:30:00Z",
        "to": "2026-02-02T18:30:00Z",
        "windowSize": "DAY",
        "data": [
            {
                "value": 0.5,
                "windowStart": "2026-01-31T18:30:00Z",
                "windowEnd": "2026-01-31T18:31:00Z",
                "subject": "s0",
                "groupBy": {"model": "model-0"},
            }
        ],
    }
    [asked] = store.asked
    assert asked.namespace == "acme"
    assert (asked.window, asked.tz, asked.subjects) == ("DAY", "Asia/Kolkata", ("s0",))
    assert asked.group_by == ("model", "subject")
    assert asked.filters == {"region": "eu"}
    assert asked.limit == 5


def test_a_query_without_window_echoes_no_window(client: TestClient, store: FakeStore) -> None:
    body = client.get(QUERY, headers=ACME).json()
    assert body["windowSize"] is None and body["from"] is None and body["to"] is None
    assert body["data"][0]["subject"] is None and body["data"][0]["groupBy"] == {}
    assert store.asked[0].window is None


def test_the_meter_is_found_by_slug_or_id(client: TestClient, store: FakeStore) -> None:
    by_id = client.get(f"/api/v1/meters/{METER.checksum()}", headers=ACME).json()
    by_slug = client.get("/api/v1/meters/tokens", headers=ACME).json()
    assert by_id == by_slug
    assert by_slug["id"] == METER.checksum()
    assert by_slug["valueProperty"] == "$.n"
    assert by_slug["groupBy"] == {"model": "$.model", "region": "$.region"}
    assert by_slug["annotations"] == {"sink.meter.state": "applied"}
    assert client.get(f"/api/v1/meters/{METER.checksum()}/query", headers=ACME).status_code == 200
    assert_problem(client.get("/api/v1/meters/nope", headers=ACME), 404, "meterIdOrSlug")
    assert_problem(client.get("/api/v1/meters/nope/query", headers=ACME), 404, "meterIdOrSlug")


def test_meters_are_listed_paged_and_ordered(client: TestClient) -> None:
    listed = client.get("/api/v1/meters", headers=ACME).json()
    assert [m["slug"] for m in listed] == ["calls", "tokens"]
    desc = client.get("/api/v1/meters?order=DESC&orderBy=aggregation", headers=ACME).json()
    assert [m["aggregation"] for m in desc] == ["SUM", "COUNT"]
    assert [
        m["slug"] for m in client.get("/api/v1/meters?page=2&pageSize=1", headers=ACME).json()
    ] == ["tokens"]
    assert_problem(client.get("/api/v1/meters?pageSize=0", headers=ACME), 400, "pageSize")
    assert_problem(client.get("/api/v1/meters?orderBy=colour", headers=ACME), 400, "orderBy")


@pytest.mark.parametrize(
    ("query_string", "parameter"),
    [
        ("windowSize=WEEK", "windowSize"),
        ("windowSize=HOUR&from=2026-01-01T00:30:00Z", "from"),
        ("windowSize=MONTH&to=2026-01-02T00:00:00Z", "to"),
        ("from=2026-01-02T00:00:00Z&to=2026-01-01T00:00:00Z", "to"),
        ("windowTimeZone=Nowhere/Town", "windowTimeZone"),
        ("groupBy=colour", "groupBy"),
        ("filterGroupBy[colour]=red", "filterGroupBy"),
        ("filterGroupBy=%7B%27model%27%3A+%27x%27%7D", "filterGroupBy"),
        ("windowSize=MINUTE&from=2026-01-01T00:00:00Z&to=2026-01-01T00:06:00Z", "windowSize"),
    ],
)
def test_bad_parameters_are_problems_naming_the_parameter(
    client: TestClient, store: FakeStore, query_string: str, parameter: str
) -> None:
    assert_problem(client.get(f"{QUERY}?{query_string}", headers=ACME), 400, parameter)
    assert store.asked == []


def test_an_answer_over_max_rows_is_refused(client: TestClient, store: FakeStore) -> None:
    store.rows = 5
    assert client.get(QUERY + "?windowSize=MINUTE", headers=ACME).status_code == 200
    store.rows = 6  # the store reads limit + 1 to know
    assert_problem(client.get(QUERY + "?windowSize=MINUTE", headers=ACME), 400, "windowSize")
    assert_problem(client.get(QUERY + "?groupBy=subject", headers=ACME), 400, "groupBy")


def test_another_namespace_is_forbidden_alike_whether_it_exists_or_not(
    client: TestClient, store: FakeStore
) -> None:
    bodies = []
    for ns in ("globex", "no-such-namespace"):
        response = client.get(f"{QUERY}?namespace={ns}", headers=ACME)
        bodies.append(assert_problem(response, 403, "namespace"))
        assert ns not in response.text
    assert bodies[0] == bodies[1]
    assert store.asked == []
    assert client.get(f"{QUERY}?namespace=acme", headers=ACME).status_code == 200
    assert client.get(f"{QUERY}?namespace=globex", headers=OPERATOR).status_code == 200
    assert client.get(QUERY, headers=OPERATOR).status_code == 200
    assert [a.namespace for a in store.asked] == ["acme", "globex", None]


def test_csv_when_the_client_prefers_it(client: TestClient, store: FakeStore) -> None:
    store.rows = 2
    response = client.get(
        QUERY + "?groupBy=region&groupBy=subject", headers={**ACME, "Accept": "text/csv"}
    )
    assert response.headers["content-type"] == "text/csv; charset=utf-8"
    assert response.headers["content-disposition"] == 'attachment; filename="tokens.csv"'
    assert response.text.splitlines() == [
        "window_start,window_end,subject,region,value",
        "2026-01-01T00:00:00Z,2026-01-01T00:01:00Z,s0,region-0,0.5",
        "2026-01-01T00:01:00Z,2026-01-01T00:02:00Z,s1,region-1,1.5",
    ]
    assert _wants_csv("text/csv")
    assert _wants_csv("application/json;q=0.5, text/csv")
    assert not _wants_csv("text/csv;q=0.5, application/json")
    assert not _wants_csv("*/*") and not _wants_csv(None) and not _wants_csv("text/*, */*")
    assert not _wants_csv("text/csv;q=0")


def test_a_store_failure_is_503_and_says_nothing_of_it(
    client: TestClient, store: FakeStore
) -> None:
    store.fail = ClickHouseUnavailable("server error 516: default:s3cret@ch:9000 refused")
    response = client.get(QUERY, headers=ACME)
    assert_problem(response, 503)
    assert response.headers["retry-after"] == "1"
    assert "s3cret" not in response.text and "516" not in response.text
    store.fail = RuntimeError("bug with s3cret inside")
    response = client.get(QUERY, headers=ACME)
    assert_problem(response, 500)
    assert "s3cret" not in response.text


def test_unknown_paths_are_problems_too(client: TestClient) -> None:
    assert_problem(client.get("/api/v1/nothing", headers=ACME), 404)
    assert_problem(client.post("/api/v1/meters", headers=ACME), 405)
    # Without a token nothing under /api/v1 tells whether it exists.
    assert_problem(client.get("/api/v1/nothing"), 401)
    assert_problem(client.post("/api/v1/meters"), 401)
    assert_problem(client.get("/nothing"), 404)


def test_metrics_count_requests_by_route_template_and_status(client: TestClient) -> None:
    client.get(QUERY, headers=ACME)
    client.get("/api/v1/meters/calls/query?windowSize=WEEK", headers=ACME)
    client.get("/api/v1/meters/secret-probe-123", headers=ACME)
    client.get("/no/such/path")
    text = client.get("/metrics").text
    assert "secret-probe-123" not in text and "/no/such/path" not in text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    route = "/api/v1/meters/{meterIdOrSlug}/query"

    def count(route: str, status: str) -> float:
        key = (("method", "GET"), ("route", route), ("status", status))
        return samples.get(("sink_api_requests_total", key), 0.0)

    assert count(route, "200") == 1
    assert count(route, "400") == 1
    assert count("/api/v1/meters/{meterIdOrSlug}", "404") == 1
    assert count("unmatched", "404") == 1
    assert samples[("sink_api_request_seconds_count", (("route", route),))] == 2
    assert samples[("sink_api_query_rows_count", ())] == 1


def test_the_openapi_document_is_valid_and_describes_what_is_served(client: TestClient) -> None:
    doc = client.get("/api/v1/openapi.json", headers=ACME).json()
    validate(doc)
    assert set(doc["paths"]) == {
        "/api/v1/meters",
        "/api/v1/meters/{meterIdOrSlug}",
        "/api/v1/meters/{meterIdOrSlug}/query",
    }
    for path, operations in doc["paths"].items():
        url = path.replace("{meterIdOrSlug}", "tokens")
        assert set(operations) == {"get"}
        assert client.get(url, headers=ACME).status_code == 200, url
        for method in ("post", "put", "patch", "delete"):
            assert client.request(method, url, headers=ACME).status_code == 405, (method, url)
    for url in ("/api/v1/events", "/api/v1/meters/tokens/subjects", "/api/v1/subjects"):
        assert client.get(url, headers=ACME).status_code == 404, url
    operation = doc["paths"]["/api/v1/meters/{meterIdOrSlug}/query"]["get"]
    assert operation["operationId"] == "queryMeter"
    params = {p["name"]: p for p in operation["parameters"]}
    assert set(params) == {
        "meterIdOrSlug",
        "from",
        "to",
        "windowSize",
        "windowTimeZone",
        "subject",
        "groupBy",
        "filterGroupBy",
        "namespace",
        "clientId",
    }
    assert params["filterGroupBy"]["style"] == "deepObject"
    responses = operation["responses"]
    assert set(responses) == {"200", "400", "401", "403", "404", "503"}
    assert set(responses["200"]["content"]) == {"application/json", "text/csv"}
    for status in ("400", "401", "403", "404", "503"):
        assert set(responses[status]["content"]) == {"application/problem+json"}
    assert doc["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
