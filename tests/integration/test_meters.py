"""Meters against the real ClickHouse: every aggregation equals the same aggregation computed
in Python from the generated events, per window, time zone and group; backfill; migrations."""

from __future__ import annotations

import asyncio
import random
import sys
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from sink.metering import usage
from sink.metering.meters import Meter, group_value
from sink.stores.clickhouse.connection import ClickHouse
from tests.integration.workload import wait_landed

BASE = datetime(2026, 1, 31, 21, 0, tzinfo=UTC)  # spans minutes, hours, days and a month end

METERS = [
    {"slug": "calls", "event_type": "call", "aggregation": "COUNT", "group_by": {"route": "route"}},
    {
        "slug": "tokens",
        "event_type": "tokens",
        "aggregation": "SUM",
        "value_property": "n",
        "group_by": {"model": "model"},
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
        "group_by": {"model": "model"},
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


def generate(topic: str, count: int, seed: int, start: int = 0) -> list[dict[str, Any]]:
    """Events at distinct seconds (LATEST is then unambiguous at second resolution)."""
    rng = random.Random(seed)
    events = []
    for i in range(start, start + count):
        kind = rng.choice(["call", "tokens", "level"])
        data: dict[str, Any]
        if kind == "call":
            data = {"route": rng.choice(["/a", "/b"]), "user": f"u{rng.randrange(30)}"}
        elif kind == "tokens":
            data = {"model": rng.choice(["small", "large", 7]), "n": rng.randrange(1, 500)}
            if rng.random() < 0.05:
                data["n"] = "lots"  # not a number: stored with validation_error, excluded
        else:
            data = {"tier": rng.choice(["gold", "free"]), "v": rng.randrange(100) / 4}
        events.append(
            {
                "specversion": "1.0",
                "id": f"m{seed}-{i}",
                "source": "meter-test",
                "type": kind,
                "subject": rng.choice(["s1", "s2", "s3"]),
                "time": (BASE + timedelta(seconds=7 * i)).isoformat().replace("+00:00", "Z"),
                "data": data,
                "_topic": topic,
            }
        )
    return events


def expected(
    events: list[dict[str, Any]],
    meter: Meter,
    namespace: str,
    window: str,
    tz: str,
    group_by: list[str],
) -> dict[tuple[Any, ...], float]:
    zone = ZoneInfo(tz)
    cells: dict[tuple[Any, ...], list[tuple[datetime, Any]]] = defaultdict(list)
    for e in events:
        if e["type"] != meter.event_type:
            continue
        value = e["data"].get(meter.value_property) if meter.value_property else None
        numeric = meter.aggregation not in ("COUNT", "UNIQUE_COUNT")
        if numeric and not isinstance(value, int | float):
            continue
        at = datetime.fromisoformat(e["time"]).astimezone(zone)
        start = {
            "MINUTE": at.replace(second=0, microsecond=0),
            "HOUR": at.replace(minute=0, second=0, microsecond=0),
            "DAY": at.replace(hour=0, minute=0, second=0, microsecond=0),
            "MONTH": at.replace(day=1, hour=0, minute=0, second=0, microsecond=0),
        }[window]
        key = [int(start.timestamp()), namespace]
        for g in group_by:
            key.append(
                e["subject"] if g == "subject" else group_value(e["data"].get(meter.group_by[g]))
            )
        cells[tuple(key)].append((at, value))
    return {key: aggregate(meter.aggregation, values) for key, values in cells.items()}


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


def observed(rows: list[usage.UsageRow], group_by: list[str]) -> dict[tuple[Any, ...], float]:
    out = {}
    for r in rows:
        key = [int(r.window_start.timestamp()), r.namespace]
        for g in group_by:
            key.append(r.subject if g == "subject" else r.groups[g])
        out[tuple(key)] = r.value
    return out


async def send(producer: AIOKafkaProducer, events: list[dict[str, Any]]) -> dict[Any, int]:
    ends: dict[Any, int] = {}
    futures = []
    for e in events:
        body = {k: v for k, v in e.items() if k != "_topic"}
        futures.append(await producer.send(e["_topic"], orjson.dumps(body)))
    for meta in await asyncio.gather(*futures):
        tp = (meta.topic, meta.partition)
        ends[tp] = max(ends.get(tp, 0), meta.offset + 1)
    return ends


@pytest.fixture
async def metered(
    make_topics: Callable[..., Any],
    producer: AIOKafkaProducer,
    clickhouse_db: ClickHouse,
    sink_config: Callable[..., Any],
    run_sink: Callable[..., Any],
    uid: str,
) -> Any:
    (topic,) = await make_topics(f"om_acme_{uid}", partitions=2)
    events = generate(topic, 2000, seed=1)
    config = sink_config(meters=METERS)
    ends = await send(producer, events)
    proc = run_sink(config)
    await wait_landed(clickhouse_db, ends, timeout=180, alive=lambda: proc.running)
    assert proc.stop() == 0
    return events, config


async def test_every_aggregation_matches_python_for_every_window_and_grouping(
    metered: Any, clickhouse_db: ClickHouse
) -> None:
    events, _ = metered
    for spec in METERS:
        meter = Meter.model_validate(spec)
        groupings = [[], ["subject"], [*meter.group_by]] if meter.group_by else [[], ["subject"]]
        for window in ("MINUTE", "HOUR", "DAY", "MONTH"):
            for tz in ("UTC", "Asia/Kolkata"):
                for group_by in groupings:
                    case = (meter.slug, window, tz, group_by)
                    rows = await usage.query(
                        clickhouse_db,
                        meter,
                        namespace="acme",
                        window=window,
                        tz=tz,
                        group_by=group_by,
                    )  # type: ignore[arg-type]
                    want = expected(events, meter, "acme", window, tz, group_by)
                    got = observed(rows, group_by)
                    assert want, case
                    assert got.keys() == want.keys(), case
                    for key, value in want.items():
                        assert got[key] == pytest.approx(value), (case, key)


async def test_cli_usage_prints_the_same_numbers(metered: Any, clickhouse_db: ClickHouse) -> None:
    events, config = metered
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sink",
        "usage",
        "-c",
        str(config),
        "--meter",
        "tokens",
        "--namespace",
        "acme",
        "--window",
        "DAY",
        "--group-by",
        "model",
        "--from",
        "2026-01-31T00:00:00Z",
        "--to",
        "2026-03-01T00:00:00Z",
        "--format",
        "json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    rows = orjson.loads(out)
    meter = Meter.model_validate(METERS[1])
    want = expected(events, meter, "acme", "DAY", "UTC", ["model"])
    got = {
        (int(datetime.fromisoformat(r["window_start"]).timestamp()), r["namespace"], r["model"]): r[
            "value"
        ]
        for r in rows
    }
    assert got == want
    assert {r["model"] for r in rows} == {"small", "large", "7"}


async def test_meter_invalid_events_are_stored_with_the_reason_and_excluded(
    metered: Any, clickhouse_db: ClickHouse
) -> None:
    events, _ = metered
    bad = {e["id"] for e in events if e["type"] == "tokens" and e["data"]["n"] == "lots"}
    assert bad, "the workload has meter-invalid events"
    rows = await clickhouse_db.query(
        f"SELECT id, validation_error FROM {clickhouse_db.table('events')} "
        "WHERE validation_error != ''"
    )
    assert {r[0] for r in rows} == bad
    assert all("[tokens] 'n' is not a number" in r[1] for r in rows)
    [(counted,)] = await clickhouse_db.query(
        f"SELECT countMerge(value) FROM {clickhouse_db.table('meter_calls')}"
    )
    assert counted == sum(1 for e in events if e["type"] == "call")


async def test_adding_a_meter_backfills_without_double_counting_while_events_arrive(
    make_topics: Callable[..., Any],
    producer: AIOKafkaProducer,
    clickhouse_db: ClickHouse,
    sink_config: Callable[..., Any],
    run_sink: Callable[..., Any],
    uid: str,
) -> None:
    (topic,) = await make_topics(f"om_acme_{uid}", partitions=2)
    first = generate(topic, 1500, seed=3)
    ends = await send(producer, first)
    worker = run_sink(
        sink_config(name="before", meters=METERS[:1], batch={"max_rows": 200, "max_wait": "100ms"})
    )
    await wait_landed(clickhouse_db, ends, timeout=120, alive=lambda: worker.running)

    # Keep events coming while the new meter is created and backfilled.
    later = generate(topic, 1500, seed=3, start=1500)

    async def trickle() -> dict[Any, int]:
        last: dict[Any, int] = {}
        for i in range(0, len(later), 50):
            last.update(await send(producer, later[i : i + 50]))
            await asyncio.sleep(0.3)  # spans the migration: before and after the cutoff
        return last

    sender = asyncio.create_task(trickle())
    added = sink_config(name="after", meters=METERS[:2])
    migrate = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sink",
        "migrate",
        "-c",
        str(added),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await migrate.communicate()
    assert migrate.returncode == 0, err.decode()
    assert "applied meter:tokens" in out.decode()
    ends.update(await sender)
    await wait_landed(clickhouse_db, ends, timeout=120, alive=lambda: worker.running)
    assert worker.stop() == 0

    meter = Meter.model_validate(METERS[1])
    rows = await usage.query(
        clickhouse_db, meter, namespace="acme", window="MINUTE", group_by=["model"]
    )
    assert observed(rows, ["model"]) == expected(
        first + later, meter, "acme", "MINUTE", "UTC", ["model"]
    )


async def _migrate(config: Any, *extra: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sink",
        "migrate",
        "-c",
        str(config),
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    return proc.returncode or 0, out.decode(), err.decode()


async def test_migrations_are_idempotent_serialised_and_refuse_changed_checksums(
    clickhouse_db: ClickHouse,
    sink_config: Callable[..., Any],
) -> None:
    config = sink_config(meters=METERS[:3])
    results = await asyncio.gather(_migrate(config), _migrate(config))
    assert [code for code, _, _ in results] == [0, 0], results
    applied = await clickhouse_db.query(
        f"SELECT version, countIf(state = 'applied') FROM "
        f"{clickhouse_db.table('schema_migrations')} "
        "WHERE NOT startsWith(version, 'backfill:') GROUP BY version ORDER BY version"
    )
    assert [v for v, _ in applied] == sorted(
        [
            "0001_events:events",
            "0002_offsets:sink_offsets",
            "0003_topics:sink_offsets",
            "meter:calls",
            "meter:low",
            "meter:tokens",
        ]
    )
    assert all(n == 1 for _, n in applied), applied

    code, out, _ = await _migrate(config)
    assert (code, out.strip()) == (0, "nothing to do: schema is up to date")
    code, out, _ = await _migrate(config, "--dry-run")
    assert (code, out.strip()) == (0, "-- nothing to do: schema is up to date")

    changed = dict(METERS[1], aggregation="MAX")
    code, _, err = await _migrate(sink_config(name="changed", meters=[METERS[0], changed]))
    assert code == 2
    assert "meter tokens was applied with checksum" in err and "new slug" in err

    code, out, _ = await _migrate(sink_config(name="fewer", meters=METERS[:1]))
    assert code == 0
    tables = {
        r[0]
        for r in await clickhouse_db.query(
            f"SELECT name FROM system.tables WHERE database = '{clickhouse_db.database}'"
        )
    }
    assert {"meter_tokens", "meter_low"} <= tables, "removing a meter keeps its data"

    code, out, _ = await _migrate(sink_config(name="drop", meters=METERS[:1]), "--drop-removed")
    assert code == 0 and "drop meter:tokens" in out
    tables = {
        r[0]
        for r in await clickhouse_db.query(
            f"SELECT name FROM system.tables WHERE database = '{clickhouse_db.database}'"
        )
    }
    assert not {"meter_tokens", "meter_low", "meter_tokens_mv"} & tables
