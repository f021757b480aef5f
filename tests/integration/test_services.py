"""The three real services answer the way the worker uses them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis.asyncio as redis_async
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from sink.errors import ClickHouseUnavailable
from sink.pipeline.decode import Event
from sink.stores.clickhouse.connection import ClickHouse
from sink.stores.clickhouse.native import InsertWithdrawn
from sink.stores.clickhouse.schema import EVENT_COLUMNS, Schema, event_columns, time_divisor
from tests.conftest import Services
from tests.items import as_item


async def test_kafka_produce_consume_and_commit(
    services: Services, make_topics: Callable[..., Any], producer: AIOKafkaProducer, uid: str
) -> None:
    (topic,) = await make_topics(f"probe_{uid}", partitions=2)
    for i in range(10):
        await producer.send_and_wait(topic, f"v{i}".encode(), key=f"k{i}".encode())

    group = f"g_{uid}"
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=services.kafka,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        seen: list[bytes] = []
        while len(seen) < 10:
            batch = await consumer.getmany(timeout_ms=5000)
            assert batch, "no records within 5 s"
            for records in batch.values():
                seen.extend(r.value for r in records)
        await consumer.commit()
        committed = {p: await consumer.committed(TopicPartition(topic, p)) for p in (0, 1)}
    finally:
        await consumer.stop()

    assert sorted(seen) == sorted(f"v{i}".encode() for i in range(10))
    assert sum(committed.values()) == 10

    again = AIOKafkaConsumer(
        topic,
        bootstrap_servers=services.kafka,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await again.start()
    try:
        assert await again.getmany(timeout_ms=1500) == {}
    finally:
        await again.stop()


async def test_redis_set_nx_get_ex_round_trip(services: Services, uid: str) -> None:
    client = redis_async.Redis.from_url(services.redis)
    key = f"probe:{uid}"
    try:
        first = await client.set(key, "t:0:1", nx=True, get=True, ex=60)
        second = await client.set(key, "t:0:2", nx=True, get=True, ex=60)
        ttl = await client.ttl(key)
        held = await client.get(key)
    finally:
        await client.delete(key)
        await client.aclose()
    assert first is None
    assert second == b"t:0:1"
    assert held == b"t:0:1"
    assert 0 < ttl <= 60


async def test_clickhouse_native_insert_and_read_back(clickhouse_db: ClickHouse) -> None:
    table = clickhouse_db.table("probe")
    await clickhouse_db.execute(
        f"CREATE TABLE {table} (id UInt64, name String, at DateTime) "
        "ENGINE = MergeTree() ORDER BY id"
    )
    ids = list(range(1000))
    names = [f"n{i}" for i in ids]
    times = [1_700_000_000 + i for i in ids]
    inserted = await clickhouse_db.insert_columns(
        "probe", ("id", "name", "at"), [ids, names, times]
    )
    rows = await clickhouse_db.query(
        f"SELECT count(), sum(id), max(name), toUnixTimestamp(max(at)) FROM {table}"
    )
    assert inserted == 1000
    assert rows == [(1000, sum(ids), "n999", 1_700_000_999)]


async def test_event_columns_round_trip_through_the_native_insert(
    clickhouse_db: ClickHouse,
) -> None:
    """The worker's own block (columns as event_columns makes them: tuples, String columns
    encoded by sink, the rest by the driver) into the real raw table, read back value for
    value: repeating and unique strings, multi-byte UTF-8, empty and long values."""
    features = await clickhouse_db.features()
    await Schema(clickhouse_db, features, "events", "offsets").apply()
    long_data = '{"blob":"' + "x" * 20_000 + '"}'
    items = [
        as_item(
            Event(
                ns,
                f"id-{i}-{'é' * (i % 3)}",
                "api.request" if i % 2 else "llm.tokens",
                "//gw/eu",
                f"customer-{i % 7}",
                1_700_000_000_000 + i * 1001,
                long_data if i == 5 else f'{{"n":{i},"s":"日本😀"}}',
                "" if i % 4 else "[meter] reason",
            ),
            "topic-a",
            i % 3,
            1000 + i,
            1_700_000_000_500 + i,
        )
        for i, ns in enumerate(["acme", "globex", ""] * 40)
    ]
    columns = event_columns(items, await time_divisor(clickhouse_db, "events"))
    assert await clickhouse_db.insert_columns("events", EVENT_COLUMNS, columns) == len(items)
    selected = [
        f"toUnixTimestamp({c})" if c in ("time", "ingested_at") else c for c in EVENT_COLUMNS
    ]
    rows = await clickhouse_db.query(
        f"SELECT {', '.join(selected)} FROM {clickhouse_db.table('events')} ORDER BY _offset"
    )
    expected = [
        (
            *e[:5],
            e.time_ms // 1000,
            e.data,
            e.timestamp_ms // 1000,
            e.validation_error,
            e.topic,
            e.partition,
            e.offset,
        )
        for e in items
    ]
    assert [tuple(row) for row in rows] == expected


async def test_an_insert_withdrawn_after_the_sample_block_writes_nothing(
    clickhouse_db: ClickHouse,
) -> None:
    """`prepare` runs after the server answered the query; returning None sends no rows,
    and the client goes on working with a new connection."""
    table = clickhouse_db.table("withdrawn")
    await clickhouse_db.execute(f"CREATE TABLE {table} (x UInt32) ENGINE = MergeTree ORDER BY x")
    asked: list[int] = []

    def prepare() -> list[list[int]] | None:
        asked.append(1)
        return None

    with pytest.raises(InsertWithdrawn):
        await clickhouse_db.insert_columns("withdrawn", ("x",), prepare=prepare)
    assert asked == [1]
    assert await clickhouse_db.insert_columns("withdrawn", ("x",), prepare=lambda: [[7, 8]]) == 2
    assert await clickhouse_db.query(f"SELECT groupArray(x) FROM {table}") == [([7, 8],)]


async def test_the_server_drops_an_insert_whose_client_stalls_before_the_rows(
    clickhouse_db: ClickHouse,
) -> None:
    """The stall timeout the worker sets on its inserts: a client that stops between the
    server's answer and the rows (a frozen process) finds its insert gone when it resumes."""
    table = clickhouse_db.table("stalled")
    await clickhouse_db.execute(f"CREATE TABLE {table} (x UInt32) ENGINE = MergeTree ORDER BY x")

    def frozen() -> list[list[int]]:
        time.sleep(3.5)  # blocks the event loop as SIGSTOP would
        return [[1, 2, 3]]

    with pytest.raises(ClickHouseUnavailable):
        await clickhouse_db.insert_columns(
            "stalled",
            ("x",),
            settings={"receive_timeout": 1, "send_timeout": 1},
            prepare=frozen,
        )
    await asyncio.sleep(0.5)
    assert await clickhouse_db.query(f"SELECT count() FROM {table}") == [(0,)]
