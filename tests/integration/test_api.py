"""`sink serve` against the real stack, read through OpenMeter's own Python client.

Two customer namespaces land through a real `sink run`; a real `sink serve` (ClickHouse in
read-only mode) answers. Every aggregation, window size and time zone, with and without a
subject filter, groupBy and filterGroupBy, must give what a Python computation over the
produced events gives and what `sink usage` prints; every error is a problem naming its
parameter; and a namespace token never reads another namespace's numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import orjson
import pytest
import yaml
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from corehttp.exceptions import HttpResponseError
from jsonschema import Draft202012Validator
from openmeter import Client
from prometheus_client.parser import text_string_to_metric_families

from sink.api.auth import digest
from sink.errors import ClickHouseUnavailable
from sink.metering.meters import Meter, group_value
from sink.stores.clickhouse.connection import ClickHouse
from tests.conftest import ROOT, Services
from tests.integration.conftest import SinkProcess, wait_for_topics
from tests.integration.workload import free_port, wait_landed

# Kolkata's day and month start at 18:30 UTC; UTC's month ends at 00:00 on Feb 1.
BASE = datetime(2026, 1, 31, 17, 0, tzinfo=UTC)
STEP = timedelta(seconds=37)
EVENTS = 900  # per namespace
SUBJECTS = {"acme": ["s1", "s2", "s3", "s4"], "globex": ["s1", "s2", "g3"]}
MODELS = {"acme": ["small", "large", 7], "globex": ["small", "xl"]}
TOKENS = {"acme": "tok-acme-7f3a", "globex": "tok-globex-91c2", "*": "tok-operator-55e0"}
MAX_ROWS = 2000
METERS: list[dict[str, Any]] = [
    {"slug": "calls", "event_type": "call", "aggregation": "COUNT", "group_by": {"route": "route"}},
    {
        "slug": "tokens",
        "event_type": "tokens",
        "aggregation": "SUM",
        "value_property": "n",
        "group_by": {"model": "model", "region": "region"},
    },
    {
        "slug": "low",
        "event_type": "tokens",
        "aggregation": "MIN",
        "value_property": "n",
        "group_by": {"model": "model"},
    },
    {"slug": "high", "event_type": "tokens", "aggregation": "MAX", "value_property": "n"},
    {
        "slug": "mean",
        "event_type": "tokens",
        "aggregation": "AVG",
        "value_property": "n",
        "group_by": {"region": "region"},
    },
    {
        "slug": "users",
        "event_type": "call",
        "aggregation": "UNIQUE_COUNT",
        "value_property": "user",
        "group_by": {"route": "route"},
    },
    {
        "slug": "gauge",
        "event_type": "level",
        "aggregation": "LATEST",
        "value_property": "v",
        "group_by": {"tier": "tier"},
    },
]
# (window, time zone, from, to): each window size, in UTC and in a zone with a half-hour
# offset, over the whole history and over a range that cuts it.
SHAPES: list[tuple[str | None, str, str | None, str | None]] = [
    (None, "UTC", None, None),
    (None, "UTC", "2026-01-31T21:13:00Z", "2026-02-01T02:47:00Z"),
    ("MINUTE", "UTC", "2026-01-31T21:13:00Z", "2026-01-31T23:47:00Z"),
    ("HOUR", "UTC", None, None),
    ("HOUR", "Asia/Kolkata", "2026-01-31T19:30:00Z", "2026-02-01T02:30:00Z"),
    ("DAY", "UTC", "2026-02-01T00:00:00Z", "2026-02-02T00:00:00Z"),
    ("DAY", "Asia/Kolkata", None, None),
    ("MONTH", "UTC", None, None),
    ("MONTH", "Asia/Kolkata", "2026-01-31T18:30:00Z", "2026-02-28T18:30:00Z"),
]


def generate(namespace: str, seed: int) -> list[dict[str, Any]]:
    """Events at distinct seconds, across namespaces too (LATEST is unambiguous at second
    resolution, also when an operator reads both namespaces together); globex's values are
    of another magnitude, so numbers mixed across namespaces cannot pass."""
    rng = random.Random(seed)
    scale = 1000 if namespace == "globex" else 1
    shift = timedelta(seconds=1 if namespace == "globex" else 0)
    events = []
    for i in range(EVENTS):
        kind = rng.choice(["call", "tokens", "level"])
        data: dict[str, Any]
        if kind == "call":
            data = {"route": rng.choice(["/a", "/b"]), "user": f"u{rng.randrange(25 * scale)}"}
        elif kind == "tokens":
            data = {"model": rng.choice(MODELS[namespace]), "n": rng.randrange(1, 500) * scale}
            if rng.random() < 0.7:
                data["region"] = rng.choice(["eu", "us"])
            if rng.random() < 0.05:
                data["n"] = "lots"  # not a number: stored with validation_error, not counted
        else:
            data = {"tier": rng.choice(["gold", "free"]), "v": rng.randrange(100) / 4 * scale}
        events.append(
            {
                "specversion": "1.0",
                "id": f"{namespace}-{i}",
                "source": "api-test",
                "type": kind,
                "subject": rng.choice(SUBJECTS[namespace]),
                "time": (BASE + STEP * i + shift).isoformat().replace("+00:00", "Z"),
                "data": data,
            }
        )
    return events


# --- the Python computation ---------------------------------------------------------------------


@dataclass(frozen=True)
class Ask:
    """One query, as the API takes it."""

    window: str | None = None
    tz: str = "UTC"
    start: str | None = None
    end: str | None = None
    subjects: tuple[str, ...] = ()
    group_by: tuple[str, ...] = ()
    filters: tuple[tuple[str, str], ...] = ()

    @property
    def groups(self) -> tuple[str, ...]:
        """OpenMeter: a subject filter groups by subject too."""
        return self.group_by + (
            ("subject",) if self.subjects and "subject" not in self.group_by else ()
        )


def window_start(at: datetime, window: str, zone: ZoneInfo) -> datetime:
    local = at.astimezone(zone)
    return {
        "MINUTE": local.replace(second=0, microsecond=0),
        "HOUR": local.replace(minute=0, second=0, microsecond=0),
        "DAY": local.replace(hour=0, minute=0, second=0, microsecond=0),
        "MONTH": local.replace(day=1, hour=0, minute=0, second=0, microsecond=0),
    }[window]


def expected(events: list[dict[str, Any]], meter: Meter, ask: Ask) -> dict[tuple[Any, ...], float]:
    """(window start epoch, window end epoch, subject or None, groups...) -> value."""
    zone = ZoneInfo(ask.tz)
    start = datetime.fromisoformat(ask.start) if ask.start else None
    end = datetime.fromisoformat(ask.end) if ask.end else None
    cells: dict[tuple[Any, ...], list[tuple[datetime, Any]]] = defaultdict(list)
    for e in events:
        if e["type"] != meter.event_type:
            continue
        value = e["data"].get(meter.value_property) if meter.value_property else None
        numeric = meter.aggregation not in ("COUNT", "UNIQUE_COUNT")
        if numeric and not isinstance(value, int | float):
            continue
        at = datetime.fromisoformat(e["time"])
        if (
            (start and at < start)
            or (end and at >= end)
            or (ask.subjects and e["subject"] not in ask.subjects)
        ):
            continue
        groups = {g: group_value(e["data"].get(meter.group_by[g])) for g in meter.group_by}
        if any(groups[name] != wanted for name, wanted in ask.filters):
            continue
        key: list[Any] = []
        if ask.window:
            began = window_start(at, ask.window, zone)
            key.append(int(began.timestamp()))
        key.append(e["subject"] if "subject" in ask.groups else None)
        key += [groups[g] for g in ask.groups if g != "subject"]
        cells[tuple(key)].append((at, value))
    out = {}
    for key, values in cells.items():
        if ask.window:
            out[key] = aggregate(meter.aggregation, values)
            continue
        # One row for the whole period: its window is the period asked for, else the first
        # and the end of the last minute with usage.
        first = int(min(at for at, _ in values).timestamp()) // 60 * 60
        last = int(max(at for at, _ in values).timestamp()) // 60 * 60 + 60
        bounds = (int(start.timestamp()) if start else first, int(end.timestamp()) if end else last)
        out[(*bounds, *key)] = aggregate(meter.aggregation, values)
    return out


def aggregate(aggregation: str, values: list[tuple[datetime, Any]]) -> float:
    numbers = [v for _, v in values]
    if aggregation == "COUNT":
        return len(values)
    if aggregation == "SUM":
        return sum(numbers)
    if aggregation == "MIN":
        return min(numbers)
    if aggregation == "MAX":
        return max(numbers)
    if aggregation == "AVG":
        return sum(numbers) / len(numbers)
    if aggregation == "UNIQUE_COUNT":
        return len({orjson.dumps(v) for v in numbers})
    return float(max(values, key=lambda p: p[0])[1])  # LATEST


def observed_rows(rows: list[dict[str, Any]], ask: Ask) -> dict[tuple[Any, ...], float]:
    """The API's rows (JSON field names) keyed like `expected`."""
    out = {}
    for row in rows:
        key: list[Any] = []
        start = int(_moment(row["windowStart"]).timestamp())
        if ask.window:
            key.append(start)
            assert _moment(row["windowEnd"]) == _next_window(_moment(row["windowStart"]), ask)
        else:
            key += [start, int(_moment(row["windowEnd"]).timestamp())]
        key.append(row["subject"])
        key += [row["groupBy"][g] for g in ask.groups if g != "subject"]
        assert set(row["groupBy"]) == {g for g in ask.groups if g != "subject"}
        out[tuple(key)] = row["value"]
    return out


def _moment(value: Any) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)


def _next_window(start: datetime, ask: Ask) -> datetime:
    local = start.astimezone(ZoneInfo(ask.tz))
    if ask.window == "MONTH":
        year, month = (local.year + 1, 1) if local.month == 12 else (local.year, local.month + 1)
        return local.replace(year=year, month=month)
    if ask.window == "DAY":
        return local + timedelta(days=1)
    return start + (timedelta(minutes=1) if ask.window == "MINUTE" else timedelta(hours=1))


def assert_same(
    got: dict[tuple[Any, ...], float], want: dict[tuple[Any, ...], float], case: Any
) -> None:
    assert got.keys() == want.keys(), (case, sorted(set(got) ^ set(want))[:5])
    for key, value in want.items():
        assert got[key] == pytest.approx(value), (case, key)


# --- the stack: two namespaces landed by `sink run`, answered by `sink serve` -------------------


@dataclass
class Stack:
    url: str
    config: Path
    events: dict[str, list[dict[str, Any]]]
    meters: dict[str, Meter]
    database: ClickHouse
    log: Path

    def client(self, namespace: str) -> Client:
        return Client(endpoint=self.url, token=TOKENS[namespace])

    def http(self, namespace: str | None = "acme") -> httpx.Client:
        headers = {"Authorization": f"Bearer {TOKENS[namespace]}"} if namespace else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


class ServeProcess(SinkProcess):
    """`python -m sink serve -c FILE`."""

    def start(self) -> ServeProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sink", "serve", "-c", str(self.config_path)],
            stdout=log,
            stderr=log,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
        return self


def serve(config: Path, log: Path) -> tuple[ServeProcess, str]:
    port = yaml.safe_load(config.read_text())["api"]["port"]
    proc = ServeProcess(config, log).start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        if not proc.running or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"sink serve did not become ready:\n{proc.logs()[-3000:]}")
        time.sleep(0.2)


def write_config(path: Path, services: Services, uid: str, **api: Any) -> Path:
    base = services.clickhouse.rsplit("/", 1)[0]
    data = {
        "meters": METERS,
        "kafka": {
            "bootstrap_servers": services.kafka,
            "group_id": f"sink-{uid}",
            "topics_regex": rf"^om_(?P<namespace>[a-z]+)_{uid}$",
        },
        "dedup": {"redis_url": services.redis, "key_prefix": f"t{uid}:"},
        "clickhouse": {"url": f"{base}/t_{uid}"},
        "batch": {"max_rows": 2000, "max_wait": "300ms", "max_in_flight": 20000},
        "http": {"port": 0},
        "worker": {"drain_timeout": "20s", "log_format": "json", "retry_max": "2s"},
        "api": {
            "host": "127.0.0.1",
            "port": free_port(),
            "max_rows": MAX_ROWS,
            "tokens": [{"namespace": ns, "sha256": digest(t)} for ns, t in TOKENS.items()],
            **api,
        },
    }
    path.write_text(yaml.safe_dump(data))
    return path


def read_only(config: Path, name: str) -> Path:
    """The same configuration, ClickHouse in read-only mode: the API needs nothing more."""
    data = yaml.safe_load(config.read_text())
    data["clickhouse"]["url"] += "?readonly=1"
    path = config.with_name(name)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
async def stack(
    services: Services, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Stack]:
    uid = uuid.uuid4().hex[:10]
    tmp = tmp_path_factory.mktemp("api")
    base = services.clickhouse.rsplit("/", 1)[0]
    root = ClickHouse(base + "/default", connect_timeout=5, query_timeout=60)
    await root.execute(f"CREATE DATABASE IF NOT EXISTS t_{uid}")
    db = ClickHouse(f"{base}/t_{uid}", connect_timeout=5, query_timeout=60)
    admin = AIOKafkaAdminClient(bootstrap_servers=services.kafka)
    await admin.start()
    topics = {ns: f"om_{ns}_{uid}" for ns in SUBJECTS}
    await admin.create_topics([NewTopic(t, 2, 1) for t in topics.values()])
    await wait_for_topics(admin, list(topics.values()))
    producer = AIOKafkaProducer(bootstrap_servers=services.kafka, acks="all", linger_ms=5)
    await producer.start()
    serving: ServeProcess | None = None
    stopped = 0
    try:
        events = {ns: generate(ns, seed) for seed, ns in enumerate(SUBJECTS)}
        ends: dict[Any, int] = {}
        futures = [
            await producer.send(topics[ns], orjson.dumps(e), key=e["subject"].encode())
            for ns, batch in events.items()
            for e in batch
        ]
        for meta in await asyncio.gather(*futures):
            tp = (meta.topic, meta.partition)
            ends[tp] = max(ends.get(tp, 0), meta.offset + 1)
        config = write_config(tmp / "sink.yaml", services, uid)
        worker = SinkProcess(config, tmp / "worker.log").start()
        try:
            await wait_landed(db, ends, timeout=180, alive=lambda: worker.running)
        finally:
            assert worker.stop() == 0, worker.logs()[-3000:]
        api_config = read_only(config, "serve.yaml")
        with pytest.raises(ClickHouseUnavailable, match="readonly"):
            probe = ClickHouse(
                yaml.safe_load(api_config.read_text())["clickhouse"]["url"],
                connect_timeout=5,
                query_timeout=10,
            )
            try:
                await probe.execute("CREATE TABLE ro_probe (a UInt8) ENGINE = Memory")
            finally:
                await probe.close()
        serving, url = serve(api_config, tmp / "serve.log")
        yield Stack(
            url=url,
            config=config,
            events=events,
            meters={m["slug"]: Meter.model_validate(m) for m in METERS},
            database=db,
            log=tmp / "serve.log",
        )
    finally:
        if serving is not None:
            stopped = serving.stop(20)
        await producer.stop()
        with contextlib.suppress(Exception):
            await admin.delete_topics(list(topics.values()))
        await admin.close()
        await db.close()
        await root.execute(f"DROP DATABASE IF EXISTS t_{uid}")
        await root.close()
    assert stopped == 0, "sink serve did not stop cleanly on SIGTERM"


def asks_for(meter: Meter) -> Iterator[Ask]:
    """Each shape with: no grouping; a subject filter; every group and subject; a filter on
    one group (with subject)."""
    first = next(iter(meter.group_by), None)
    filter_values = {"route": "/b", "model": "small", "region": "eu", "tier": "gold"}
    for index, (window, tz, start, end) in enumerate(SHAPES):
        yield Ask(window, tz, start, end)
        yield Ask(window, tz, start, end, subjects=("s1", "s3"))
        yield Ask(window, tz, start, end, group_by=(*meter.group_by, "subject"))
        if first is not None:
            yield Ask(
                window,
                tz,
                start,
                end,
                group_by=("subject",) if index % 2 else (),
                filters=((first, filter_values[first]),),
            )


def client_query(
    client: Client, slug: str, ask: Ask, extra: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """The official client's queryMeter. Its `filter_group_by` keyword is sent as
    `filterGroupBy={'model': 'x'}` (the dict's Python text), not OpenMeter's deepObject, so
    filters go through its `params` keyword as `filterGroupBy[NAME]=VALUE`."""
    result = client.meters.query_json(
        slug,
        from_parameter=datetime.fromisoformat(ask.start) if ask.start else None,
        to=datetime.fromisoformat(ask.end) if ask.end else None,
        window_size=ask.window,
        window_time_zone=ask.tz,
        subject=list(ask.subjects) or None,
        group_by=list(ask.group_by) or None,
        params={**{f"filterGroupBy[{n}]": v for n, v in ask.filters}, **(extra or {})},
    )
    assert result.window_size == ask.window
    assert result.from_property == (datetime.fromisoformat(ask.start) if ask.start else None)
    assert result.to == (datetime.fromisoformat(ask.end) if ask.end else None)
    return [
        {
            "value": r.value,
            "windowStart": r.window_start,
            "windowEnd": r.window_end,
            "subject": r.subject,
            "groupBy": dict(r.group_by),
        }
        for r in result.data
    ]


# --- numbers --------------------------------------------------------------------------------------


def test_openmeter_client_gets_the_numbers_python_computes(stack: Stack) -> None:
    client = stack.client("acme")
    asked = 0
    for meter in stack.meters.values():
        for ask in asks_for(meter):
            want = expected(stack.events["acme"], meter, ask)
            got = observed_rows(client_query(client, meter.slug, ask), ask)
            assert want or ask.filters, (meter.slug, ask)
            assert_same(got, want, (meter.slug, ask))
            asked += 1
    assert asked > 200


async def test_sink_usage_prints_the_same_numbers_as_the_api(stack: Stack) -> None:
    cases = [
        (
            slug,
            Ask(
                "DAY",
                "Asia/Kolkata",
                "2026-01-30T18:30:00Z",
                "2026-02-02T18:30:00Z",
                group_by=(*m["group_by"], "subject") if "group_by" in m else ("subject",),
            ),
        )
        for slug, m in ((m["slug"], m) for m in METERS)
    ]
    cases += [
        ("tokens", Ask("MONTH", "Asia/Kolkata", group_by=("model",))),
        (
            "tokens",
            Ask("HOUR", "UTC", "2026-01-31T20:00:00Z", "2026-02-01T03:00:00Z", subjects=("s2",)),
        ),
        (
            "gauge",
            Ask(
                "MINUTE", "UTC", "2026-01-31T22:00:00Z", "2026-01-31T23:00:00Z", group_by=("tier",)
            ),
        ),
    ]

    async def cli(slug: str, ask: Ask) -> list[dict[str, Any]]:
        args = [
            "--meter",
            slug,
            "--namespace",
            "acme",
            "--window",
            str(ask.window),
            "--tz",
            ask.tz,
            "--format",
            "json",
        ]
        args += [a for g in ask.groups for a in ("--group-by", g)]
        args += [a for s in ask.subjects for a in ("--subject", s)]
        args += ["--from", ask.start] if ask.start else []
        args += ["--to", ask.end] if ask.end else []
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sink",
            "usage",
            "-c",
            str(stack.config),
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=ROOT,
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        return list(orjson.loads(out))

    printed = await asyncio.gather(*(cli(slug, ask) for slug, ask in cases))
    client = stack.client("acme")
    for (slug, ask), rows in zip(cases, printed, strict=True):
        from_cli = {
            (
                int(datetime.fromisoformat(r["window_start"]).timestamp()),
                r.get("subject"),
                *(r[g] for g in ask.groups if g != "subject"),
            ): r["value"]
            for r in rows
        }
        from_api = observed_rows(client_query(client, slug, ask), ask)
        assert from_cli, (slug, ask)
        assert_same(from_api, from_cli, (slug, ask))
        assert_same(from_api, expected(stack.events["acme"], stack.meters[slug], ask), (slug, ask))


def test_csv_holds_the_rows_of_the_json(stack: Stack) -> None:
    ask = Ask(
        "HOUR",
        "Asia/Kolkata",
        "2026-01-31T18:30:00Z",
        "2026-02-01T04:30:00Z",
        group_by=("model", "subject"),
    )
    client = stack.client("acme")
    text = client.meters.query_csv(
        "tokens",
        from_parameter=datetime.fromisoformat(str(ask.start)),
        to=datetime.fromisoformat(str(ask.end)),
        window_size="HOUR",
        window_time_zone=ask.tz,
        group_by=list(ask.group_by),
    )
    lines = text.splitlines()
    assert lines[0] == "window_start,window_end,subject,model,value"
    from_csv = {}
    for line in lines[1:]:
        start, end, subject, model, value = line.split(",")
        assert _moment(end) == _next_window(_moment(start), ask)
        from_csv[(int(_moment(start).timestamp()), subject, model)] = float(value)
    assert_same(from_csv, observed_rows(client_query(client, "tokens", ask), ask), ask)
    assert_same(from_csv, expected(stack.events["acme"], stack.meters["tokens"], ask), ask)


def test_meters_are_listed_as_openmeter_meters(stack: Stack) -> None:
    listed = stack.client("acme").meters.list()
    assert [m.slug for m in listed] == sorted(m["slug"] for m in METERS)
    tokens = stack.client("globex").meters.get("tokens")
    assert tokens.aggregation == "SUM" and tokens.event_type == "tokens"
    assert tokens.value_property == "$.n"
    assert tokens.group_by == {"model": "$.model", "region": "$.region"}
    assert tokens.annotations == {"sink.meter.state": "applied"}
    assert tokens.created_at is not None and tokens.created_at <= datetime.now(UTC)
    assert stack.client("acme").meters.get(tokens.id).slug == "tokens"


# --- tenancy -------------------------------------------------------------------------------------


def test_each_namespace_token_reads_its_own_numbers_only(stack: Stack) -> None:
    mine, theirs = stack.client("acme"), stack.client("globex")
    for meter in stack.meters.values():
        for ask in (Ask("DAY", "UTC", group_by=("subject",)), Ask(subjects=("s1", "s2", "g3"))):
            for client, ns in ((mine, "acme"), (theirs, "globex")):
                got = observed_rows(client_query(client, meter.slug, ask), ask)
                assert_same(got, expected(stack.events[ns], meter, ask), (ns, meter.slug, ask))
    # A subject or group value only the other namespace has finds nothing.
    assert client_query(mine, "calls", Ask(subjects=("g3",))) == []
    assert client_query(mine, "tokens", Ask(filters=(("model", "xl"),))) == []
    assert client_query(theirs, "tokens", Ask(filters=(("model", "large"),))) == []
    subjects = {
        r["subject"] for r in client_query(mine, "calls", Ask("MINUTE", group_by=("subject",)))
    }
    assert subjects == set(SUBJECTS["acme"])


def test_another_namespace_is_refused_on_every_endpoint_and_parameter(stack: Stack) -> None:
    with stack.http("acme") as http:
        refused = []
        for ns in ("globex", "no-such-namespace", "acme' OR '1'='1", "*", ""):
            for extra in (
                "",
                "&windowSize=DAY",
                "&groupBy=subject",
                "&subject=s1",
                "&filterGroupBy[route]=/a",
            ):
                for accept in ("application/json", "text/csv"):
                    r = http.get(
                        f"/api/v1/meters/calls/query?namespace={ns}{extra}",
                        headers={"Accept": accept},
                    )
                    refused.append((r.status_code, r.json()["detail"], r.json()["parameter"]))
                    assert "globex" not in r.text and "no-such" not in r.text
        assert set(refused) == {(403, "this token may not read that namespace", "namespace")}
        # Its own namespace, named, is its own numbers.
        own = http.get("/api/v1/meters/calls/query?namespace=acme").json()["data"]
        want = expected(stack.events["acme"], stack.meters["calls"], Ask())
        assert_same(observed_rows(own, Ask()), want, "named")
        # Meters are shared definitions: every token sees the same list, no usage in it.
        listed = http.get("/api/v1/meters").json()
    with stack.http("globex") as other:
        assert other.get("/api/v1/meters").json() == listed
    # An unknown meter is 404 for every token; the path does not reach another namespace.
    for ns in ("acme", "*"):
        with stack.http(ns) as http:
            for path in (
                "/api/v1/meters/globex",
                "/api/v1/meters/..%2Fglobex/query",
                "/api/v1/meters/calls%27--/query",
            ):
                assert http.get(path).status_code == 404, path


def test_an_operator_token_reads_one_namespace_or_all_together(stack: Stack) -> None:
    operator = stack.client("*")
    for meter in (stack.meters["calls"], stack.meters["tokens"]):
        ask = Ask("DAY", "UTC", group_by=("subject",))
        for ns in ("acme", "globex"):
            got = observed_rows(
                client_query(operator, meter.slug, ask, extra={"namespace": ns}), ask
            )
            assert_same(got, expected(stack.events[ns], meter, ask), (ns, meter.slug))
        together = observed_rows(client_query(operator, meter.slug, ask), ask)
        assert_same(
            together,
            expected(stack.events["acme"] + stack.events["globex"], meter, ask),
            meter.slug,
        )
    both = stack.events["acme"] + stack.events["globex"]
    for shape in (Ask(), Ask("MONTH", "Asia/Kolkata")):
        for meter in stack.meters.values():
            got = observed_rows(client_query(operator, meter.slug, shape), shape)
            assert_same(got, expected(both, meter, shape), (meter.slug, shape))
    quoted = client_query(operator, "calls", Ask(), extra={"namespace": "acme' OR '1'='1"})
    assert quoted == []


# --- errors ---------------------------------------------------------------------------


def assert_problem(response: httpx.Response, status: int, parameter: str | None) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == status and body["title"] and body["detail"]
    assert body["instance"] == response.url.path
    assert body.get("parameter") == parameter, body
    for secret in (*TOKENS.values(), "readonly", "clickhouse://", "19000"):
        assert secret not in response.text


ERRORS = [
    ("/api/v1/meters/nope", 404, "meterIdOrSlug"),
    ("/api/v1/meters/nope/query", 404, "meterIdOrSlug"),
    ("/api/v1/meters/tokens/query?groupBy=colour", 400, "groupBy"),
    ("/api/v1/meters/high/query?groupBy=model", 400, "groupBy"),
    ("/api/v1/meters/tokens/query?filterGroupBy[colour]=red", 400, "filterGroupBy"),
    (
        "/api/v1/meters/tokens/query?filterGroupBy=%7B%27model%27%3A+%27x%27%7D",
        400,
        "filterGroupBy",
    ),
    ("/api/v1/meters/tokens/query?windowSize=HOUR&from=2026-01-31T20:30:00Z", 400, "from"),
    (
        "/api/v1/meters/tokens/query?windowSize=DAY&windowTimeZone=Asia/Kolkata&to=2026-02-01T00:00:00Z",
        400,
        "to",
    ),
    ("/api/v1/meters/tokens/query?from=2026-01-31T20:00:30Z", 400, "from"),
    ("/api/v1/meters/tokens/query?from=2026-02-01T00:00:00Z&to=2026-01-31T00:00:00Z", 400, "to"),
    ("/api/v1/meters/tokens/query?from=2026-02-01T00:00:00Z&to=2026-02-01T00:00:00Z", 400, "to"),
    ("/api/v1/meters/tokens/query?from=2026-02-01T00:00:00", 400, "from"),
    (
        "/api/v1/meters/tokens/query?windowSize=DAY&windowTimeZone=Mars/Olympus",
        400,
        "windowTimeZone",
    ),
    ("/api/v1/meters/tokens/query?windowSize=WEEK", 400, "windowSize"),
    (
        "/api/v1/meters/tokens/query?windowSize=MINUTE&from=2026-01-01T00:00:00Z&to=2026-02-01T00:00:00Z",
        400,
        "windowSize",
    ),
    ("/api/v1/meters/tokens/query?namespace=globex", 403, "namespace"),
    ("/api/v1/nowhere", 404, None),
]


def test_every_error_is_a_problem_naming_its_parameter(stack: Stack) -> None:
    with stack.http("acme") as http:
        for path, status, parameter in ERRORS:
            assert_problem(http.get(path), status, parameter)
            assert_problem(http.get(path, headers={"Accept": "text/csv"}), status, parameter)


def test_no_token_or_a_wrong_one_is_401_everywhere(stack: Stack) -> None:
    paths = [
        "/api/v1/meters",
        "/api/v1/meters/tokens",
        "/api/v1/meters/tokens/query",
        "/api/v1/openapi.json",
    ]
    paths += [p for p, _, _ in ERRORS]
    wrong = [
        None,
        "Bearer",
        "Bearer tok-acme-7f3",
        f"Bearer {digest(TOKENS['acme'])}",
        f"Basic {TOKENS['acme']}",
        f"bearer {TOKENS['acme']}x",
    ]
    with stack.http(None) as http:
        for path in paths:
            for header in wrong:
                response = http.get(path, headers={"Authorization": header} if header else {})
                assert_problem(response, 401, None)
    with pytest.raises(HttpResponseError) as caught:
        Client(endpoint=stack.url, token="tok-nobody").meters.query_json("tokens")
    assert caught.value.status_code == 401


def test_an_answer_over_max_rows_is_refused_by_the_real_store(stack: Stack, tmp_path: Path) -> None:
    data = yaml.safe_load(stack.config.read_text())
    data["api"].update(port=free_port(), max_rows=40)
    config = tmp_path / "small.yaml"
    config.write_text(yaml.safe_dump(data))
    proc, url = serve(config, tmp_path / "small.log")
    try:
        headers = {"Authorization": f"Bearer {TOKENS['acme']}"}
        with httpx.Client(base_url=url, headers=headers) as http:
            ok = http.get("/api/v1/meters/calls/query?windowSize=HOUR")
            assert ok.status_code == 200 and 0 < len(ok.json()["data"]) <= 40
            assert_problem(
                http.get("/api/v1/meters/calls/query?windowSize=MINUTE"), 400, "windowSize"
            )
            assert_problem(
                http.get(
                    "/api/v1/meters/calls/query?groupBy=route&groupBy=subject&windowSize=HOUR"
                ),
                400,
                "windowSize",
            )
    finally:
        proc.stop(20)


# --- the document and the metrics -----------------------------------------------------


def test_the_openapi_document_matches_what_is_served(stack: Stack) -> None:
    with stack.http("acme") as http:
        doc = http.get("/api/v1/openapi.json").json()

        def check(response: httpx.Response, path: str) -> None:
            operation = doc["paths"][path]["get"]
            declared = operation["responses"][str(response.status_code)]["content"]
            media = response.headers["content-type"].split(";")[0]
            assert media in declared, (path, response.status_code, media)
            schema = declared[media]["schema"]
            if media != "text/csv":
                Draft202012Validator({**schema, "components": doc["components"]}).validate(
                    response.json()
                )

        check(http.get("/api/v1/meters"), "/api/v1/meters")
        check(http.get("/api/v1/meters/users"), "/api/v1/meters/{meterIdOrSlug}")
        query = "/api/v1/meters/{meterIdOrSlug}/query"
        for suffix in ("", "?windowSize=DAY&groupBy=route&subject=s1", "?filterGroupBy[route]=/a"):
            check(http.get(f"/api/v1/meters/users/query{suffix}"), query)
        check(
            http.get("/api/v1/meters/users/query?windowSize=DAY", headers={"Accept": "text/csv"}),
            query,
        )
        for path, _status, _ in ERRORS[:-1]:
            template = "/api/v1/meters/{meterIdOrSlug}" + ("/query" if "/query" in path else "")
            check(http.get(path), template)
        check(httpx.get(f"{stack.url}/api/v1/meters"), "/api/v1/meters")  # 401
        # Every parameter the document lists for queryMeter is one the server reads.
        params = {p["name"] for p in doc["paths"][query]["get"]["parameters"]}
        assert params == {
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


def test_metrics_count_requests_by_route_and_status(stack: Stack) -> None:
    with stack.http("acme") as http:
        http.get("/api/v1/meters/calls/query?windowSize=HOUR")
        http.get("/api/v1/meters/calls/query?windowSize=WEEK")
    text = httpx.get(f"{stack.url}/metrics").text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    route = ("route", "/api/v1/meters/{meterIdOrSlug}/query")
    assert samples[("sink_api_requests_total", (("method", "GET"), route, ("status", "200")))] >= 1
    assert samples[("sink_api_requests_total", (("method", "GET"), route, ("status", "400")))] >= 1
    assert samples[("sink_api_request_seconds_count", (route,))] >= 2
    assert samples[("sink_api_request_seconds_bucket", (("le", "+Inf"), route))] >= 2
    for token in TOKENS.values():
        assert token not in text
