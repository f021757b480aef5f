"""The three real services answer the way the worker uses them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis.asyncio as redis_async
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from sink.clickhouse import ClickHouse
from tests.conftest import Services


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
