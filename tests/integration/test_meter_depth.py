"""Meters read top-level properties only, against the real ClickHouse: a property that is only
nested, nested beside a top-level one, quoted inside a string value, an object or array, or
missing is never counted as the top-level one, whichever worker landed the row; the usage
equals a Python computation that reads top-level properties only."""

from __future__ import annotations

import asyncio
import random
import re
import sys
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from sink.metering import usage
from sink.metering.meter_sql import json_key, member_pattern
from sink.metering.meters import Meter, MeterIndex, group_value, lookup, path
from sink.stores.clickhouse.connection import ClickHouse
from sink.stores.clickhouse.sql import ServerFeatures, quote
from tests.integration.test_meters import aggregate, observed, send
from tests.integration.workload import wait_landed
from tests.items import flat_first

BASE = datetime(2026, 3, 31, 23, 30, tzinfo=UTC)  # spans minutes, a day and a month end
TYPE = "usage"
METERS = [
    {
        "slug": f"depth_{aggregation.lower()}",
        "event_type": TYPE,
        "aggregation": aggregation,
        **({} if aggregation == "COUNT" else {"value_property": "tokens"}),
        "group_by": {"model": "model"},
    }
    for aggregation in ("SUM", "COUNT", "MIN", "MAX", "AVG", "UNIQUE_COUNT", "LATEST")
]
NESTED = 999_999
"""A nested or quoted `tokens`: were it read, it would show in every result."""
WINDOWS: list[tuple[usage.Window, list[str]]] = [("MINUTE", ["model"]), ("DAY", [])]
MODELS = ["small", "large", 'q"uote', "back\\", "日本", "tab\t", "ctl\x01", 7, True, None]


def shapes(rng: random.Random) -> list[dict[str, Any]]:
    """Event data, in the producer's member order."""
    n = rng.randrange(1, 500)
    model = rng.choice(MODELS)
    inner = {"tokens": NESTED, "model": "nested"}
    return [
        {"model": model, "tokens": n},
        {"tokens": n / 4, "model": model},
        {"model": model, "meta": inner},  # only nested
        {"meta": inner, "tokens": n, "model": model},  # nested before the top-level one
        {"tokens": n, "model": model, "meta": inner, "list": [inner]},  # nested after it
        {"note": f'x","tokens":{NESTED},"model":"quoted', "model": model},  # inside a string
        {"note": f'"tokens":{NESTED}', "tokens": n, "model": model},
        {"model": model},  # missing
        {"tokens": [NESTED], "model": model},
        {"tokens": inner, "model": inner},
        {"tokens": "lots", "model": model},
        {"tokens": None, "model": model},
        {"tokens": True, "model": ["nested"]},
        {"meta": inner, "tokens": n},
    ]


def generate(topic: str, count: int, seed: int, start: int = 0) -> list[dict[str, Any]]:
    """Events at distinct seconds (LATEST is then unambiguous at second resolution)."""
    rng = random.Random(seed)
    return [
        {
            "specversion": "1.0",
            "id": f"d{seed}-{i}",
            "source": "depth-test",
            "type": TYPE,
            "subject": "s1",
            "time": (BASE + timedelta(seconds=7 * i)).isoformat().replace("+00:00", "Z"),
            "data": rng.choice(shapes(rng)),
            "_topic": topic,
        }
        for i in range(start, start + count)
    ]


def expected(
    events: list[dict[str, Any]],
    meter: Meter,
    features: ServerFeatures,
    window: str,
    group_by: list[str],
) -> dict[tuple[Any, ...], float]:
    """The meter computed from the events' top-level properties (`MeterIndex.check`)."""
    readable = MeterIndex([meter]).check
    cells: dict[tuple[Any, ...], list[tuple[datetime, Any]]] = defaultdict(list)
    for e in events:
        if readable(e["type"], e["data"]):
            continue
        at = datetime.fromisoformat(e["time"])
        start = (
            at.replace(second=0) if window == "MINUTE" else at.replace(hour=0, minute=0, second=0)
        )
        key: list[Any] = [int(start.timestamp()), "acme"]
        if group_by:
            key.append(group_key(e["data"].get("model"), features))
        value = lookup(e["data"], path(meter.value_property)) if meter.value_property else None
        cells[tuple(key)].append((at, value))
    return {key: aggregate(meter.aggregation, values) for key, values in cells.items()}


def group_key(value: Any, features: ServerFeatures) -> str:
    """Without JSONExtract an object or array group value reads as missing."""
    if isinstance(value, dict | list) and not features.json_extract:
        return ""
    return group_value(value)


async def assert_usage_reads_top_level_only(ch: ClickHouse, events: list[dict[str, Any]]) -> None:
    features = await ch.features()
    for spec in METERS:
        meter = Meter.model_validate(spec)
        for window, group_by in WINDOWS:
            rows = await usage.query(ch, meter, namespace="acme", window=window, group_by=group_by)
            want = expected(events, meter, features, window, group_by)
            got = observed(rows, group_by)
            case = (meter.slug, window)
            assert want, case
            assert got.keys() == want.keys(), case
            for key, value in want.items():
                assert got[key] == pytest.approx(value), (case, key)


async def test_meters_read_top_level_properties_only(
    make_topics: Callable[..., Any],
    producer: AIOKafkaProducer,
    clickhouse_db: ClickHouse,
    sink_config: Callable[..., Any],
    run_sink: Callable[..., Any],
    uid: str,
) -> None:
    (topic,) = await make_topics(f"om_acme_{uid}", partitions=2)
    events = generate(topic, 400, seed=21)
    ends = await send(producer, events)
    worker = run_sink(sink_config(meters=METERS))
    await wait_landed(clickhouse_db, ends, timeout=60, alive=lambda: worker.running)
    assert worker.stop() == 0
    await assert_usage_reads_top_level_only(clickhouse_db, events)


async def test_meters_added_later_read_top_level_properties_only(
    make_topics: Callable[..., Any],
    producer: AIOKafkaProducer,
    clickhouse_db: ClickHouse,
    sink_config: Callable[..., Any],
    run_sink: Callable[..., Any],
    uid: str,
) -> None:
    """Rows landed by a worker that knows no meter were never checked: the backfill and the
    view alone keep nested and quoted properties out."""
    (topic,) = await make_topics(f"om_acme_{uid}", partitions=2)
    first = generate(topic, 200, seed=22)
    ends = await send(producer, first)
    worker = run_sink(sink_config(name="old", batch={"max_rows": 50, "max_wait": "100ms"}))
    await wait_landed(clickhouse_db, ends, timeout=60, alive=lambda: worker.running)

    later = generate(topic, 200, seed=22, start=len(first))

    async def trickle() -> dict[Any, int]:
        last: dict[Any, int] = {}
        for i in range(0, len(later), 10):
            last.update(await send(producer, later[i : i + 10]))
            await asyncio.sleep(0.1)  # spans the migration: before and after the cutoff
        return last

    sender = asyncio.create_task(trickle())
    migrate = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sink",
        "migrate",
        "-c",
        str(sink_config(name="new", meters=METERS)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await migrate.communicate()
    assert migrate.returncode == 0, err.decode()
    for spec in METERS:
        assert f"applied meter:{spec['slug']}" in out.decode()
    ends.update(await sender)
    await wait_landed(clickhouse_db, ends, timeout=60, alive=lambda: worker.running)
    assert worker.stop() == 0
    [(unchecked,)] = await clickhouse_db.query(
        f"SELECT count() FROM {clickhouse_db.table('events')} WHERE validation_error = ''"
    )
    assert unchecked == len(first) + len(later)
    await assert_usage_reads_top_level_only(clickhouse_db, first + later)


NAMES = ["tokens", "model", 'to"ken', "back\\slash", "tab\tkey", "日本語", "it's"]


def random_data(rng: random.Random) -> dict[str, Any]:
    def value(depth: int) -> Any:
        draw = rng.random()
        if depth < 2 and draw < 0.2:
            return {rng.choice(NAMES): value(depth + 1) for _ in range(rng.randrange(3))}
        if depth < 2 and draw < 0.3:
            return [value(depth + 1) for _ in range(rng.randrange(3))]
        return rng.choice(
            [
                None,
                rng.random() < 0.5,
                rng.randrange(-(2**63), 2**63),
                rng.uniform(-1e6, 1e6),
                rng.choice(NAMES) + rng.choice(['"', "\\", "\n", "", "é"]),
                f'x","{rng.choice(NAMES)}":{NESTED},"y":"',
            ]
        )

    return {rng.choice(NAMES): value(0) for _ in range(rng.randrange(6))}


async def test_the_server_reads_the_member_python_reads(clickhouse_db: ClickHouse) -> None:
    """re2 in ClickHouse and Python's `re` agree on the pattern, and the member's value reads
    back as the top-level property."""
    rng = random.Random(23)
    datas = [random_data(rng) for _ in range(300)]
    texts = [orjson.dumps(flat_first(d)).decode() for d in datas]
    for name in NAMES:
        pattern = member_pattern(name)
        member = f"extract(t, {quote(pattern)})"
        [(found,)] = await clickhouse_db.query(
            f"SELECT arrayMap(t -> ({member}, visitParamExtractString({member}, "
            f"{quote(json_key(name))})), [{', '.join(quote(t) for t in texts)}])"
        )
        want = []
        for data, text in zip(datas, texts, strict=True):
            match = re.search(pattern, text)
            value = data.get(name)
            want.append(
                (match.group(1) if match else "", value if match and isinstance(value, str) else "")
            )
        assert [tuple(f) for f in found] == want, name
        assert any(m for m, _ in want), name
