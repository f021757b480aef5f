"""Contenders that run in a process of their own (so the harness's memory and the other
contenders do not disturb them): `python -m benchmarks.contenders NAME JSON`.

- consume: the Kafka ceiling. aiokafka `getmany` in a loop with the worker's fetch settings
  (`sink.config.KafkaConfig` defaults), decoding nothing, until every record was read. Fresh
  consumer group.
- insert: the ClickHouse ceiling. The rows the worker would insert (decoded and de-duplicated
  once, before timing) inserted with asynch in blocks of `batch.max_rows`, into the worker's
  schema (`sink.stores.clickhouse.schema.Schema`: MergeTree `events`, the `sink_offsets`
  view), building each block with `event_columns` as the worker does (inside the timing).
- naive: one record at a time: decode, one Redis `SET NX EX` per record, one ClickHouse
  insert per `getmany` poll, aiokafka defaults otherwise.

Each prints one line `RESULT {json}` on stdout.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

PREFIX = "RESULT "


def _finish(result: dict[str, Any]) -> None:
    import resource

    result["cpu_s"] = round(time.process_time(), 3)
    result["max_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(PREFIX + json.dumps(result), flush=True)


async def consume(p: dict[str, Any]) -> dict[str, Any]:
    from aiokafka import AIOKafkaConsumer

    from sink.config import KafkaConfig

    defaults = KafkaConfig()  # the worker's fetch sizes
    total = int(p["total"])
    consumer = AIOKafkaConsumer(
        *p["topics"],
        bootstrap_servers=p["bootstrap"],
        group_id=p["group"],
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_bytes=defaults.fetch_max_bytes,
        max_partition_fetch_bytes=defaults.max_partition_fetch_bytes,
        isolation_level="read_committed",
    )
    cpu0 = time.process_time()
    t0 = time.monotonic()
    await consumer.start()
    n = 0
    first = None
    try:
        while n < total:
            batch = await consumer.getmany(timeout_ms=100, max_records=int(p["max_records"]))
            for records in batch.values():
                n += len(records)
            if n and first is None:
                first = time.monotonic()
                first_n = n
            if time.monotonic() - t0 > float(p["timeout"]):
                raise TimeoutError(f"read {n} of {total} records")
        end = time.monotonic()
        cpu = time.process_time() - cpu0
    finally:
        await consumer.stop()
    assert first is not None
    return {
        "records": n,
        "wall_s": end - t0,
        "startup_s": first - t0,
        "steady_s": end - first,
        "steady_records": n - first_n,
        "timed_cpu_s": cpu,
    }


async def insert(p: dict[str, Any]) -> dict[str, Any]:
    from benchmarks.workload import Spec, coordinates
    from sink.pipeline import decode as decoding
    from sink.pipeline.batch import Item
    from sink.pipeline.consumer import Namespaces
    from sink.stores.clickhouse.connection import ClickHouse
    from sink.stores.clickhouse.schema import EVENT_COLUMNS, Schema, event_columns, time_divisor
    from sink.stores.keys import identity_key

    spec = Spec(**p["spec"])
    namespaces = Namespaces(spec.topics_regex, None)
    stamp = int(p["timestamp_ms"])
    items: list[Item] = []
    seen: set[bytes] = set()
    prep0 = time.monotonic()
    for record, topic, offset in coordinates(spec):
        namespace = namespaces.of_topic(topic)
        event = decoding.decode(
            record.value, namespace, 1024 * 1024, None, topic, record.partition, offset, stamp
        )
        if type(event) is not decoding.Event:
            continue
        key = identity_key(b"", event.namespace, event.source, event.id)
        if key in seen:
            continue
        seen.add(key)
        items.append(event)
    prepare_s = time.monotonic() - prep0
    ch = ClickHouse(p["clickhouse"], connect_timeout=10, query_timeout=300)
    try:
        features = await ch.features()
        await Schema(ch, features, "events", "sink_offsets").apply()
        divisor = await time_divisor(ch, "events")
        rows = int(p["batch_rows"])
        cpu0 = time.process_time()
        columns_s = insert_s = 0.0
        t0 = time.monotonic()
        for start in range(0, len(items), rows):
            c0 = time.monotonic()
            data = event_columns(items[start : start + rows], divisor)
            c1 = time.monotonic()
            await ch.insert_columns("events", EVENT_COLUMNS, data)
            columns_s += c1 - c0
            insert_s += time.monotonic() - c1
        wall = time.monotonic() - t0
        cpu = time.process_time() - cpu0
        [(count,)] = await ch.query(f"SELECT count() FROM {ch.table('events')}")
    finally:
        await ch.close()
    return {
        "rows": len(items),
        "rows_in_table": int(count),
        "batches": -(-len(items) // rows),
        "wall_s": wall,
        "steady_s": wall,
        "columns_s": columns_s,
        "insert_s": insert_s,
        "prepare_s": prepare_s,
        "timed_cpu_s": cpu,
    }


async def naive(p: dict[str, Any]) -> dict[str, Any]:
    import redis.asyncio as redis_async
    from aiokafka import AIOKafkaConsumer

    from sink.pipeline import decode as decoding
    from sink.pipeline.batch import Item
    from sink.pipeline.consumer import Namespaces
    from sink.stores.clickhouse.connection import ClickHouse
    from sink.stores.clickhouse.schema import EVENT_COLUMNS, Schema, event_columns, time_divisor
    from sink.stores.keys import coordinates, identity_key

    limit = int(p["limit"])
    prefix = p["redis_prefix"].encode()
    namespaces = Namespaces(p["topics_regex"], None)
    ch = ClickHouse(p["clickhouse"], connect_timeout=10, query_timeout=300)
    features = await ch.features()
    await Schema(ch, features, "events", "sink_offsets").apply()
    divisor = await time_divisor(ch, "events")
    redis = redis_async.Redis.from_url(p["redis"])
    consumer = AIOKafkaConsumer(
        *p["topics"],
        bootstrap_servers=p["bootstrap"],
        group_id=p["group"],
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    cpu0 = time.process_time()
    t0 = time.monotonic()
    await consumer.start()
    n = inserted = duplicates = invalid = polls = 0
    first = None
    try:
        while n < limit:
            batch = await consumer.getmany(timeout_ms=1000)
            if not batch:
                continue
            if first is None:
                first = time.monotonic()
            polls += 1
            rows: list[Item] = []
            for tp, records in batch.items():
                namespace = namespaces.of_topic(tp.topic)
                for record in records:
                    n += 1
                    event = decoding.decode(
                        record.value,
                        namespace,
                        1024 * 1024,
                        None,
                        tp.topic,
                        tp.partition,
                        record.offset,
                        record.timestamp,
                    )
                    if type(event) is not decoding.Event:
                        invalid += 1
                        continue
                    key = identity_key(prefix, event.namespace, event.source, event.id)
                    coords = coordinates(tp.topic, tp.partition, record.offset)
                    if await redis.set(key, coords, nx=True, ex=3600):
                        rows.append(event)
                    else:
                        duplicates += 1
            if rows:
                await ch.insert_columns("events", EVENT_COLUMNS, event_columns(rows, divisor))
                inserted += len(rows)
            await consumer.commit()
        end = time.monotonic()
        cpu = time.process_time() - cpu0
    finally:
        await consumer.stop()
        await redis.aclose()
        await ch.close()
    assert first is not None
    return {
        "records": n,
        "inserted": inserted,
        "duplicates": duplicates,
        "invalid": invalid,
        "polls": polls,
        "wall_s": end - t0,
        "startup_s": first - t0,
        "steady_s": end - first,
        "steady_records": n,
        "timed_cpu_s": cpu,
    }


CONTENDERS = {"consume": consume, "insert": insert, "naive": naive}


def main() -> None:
    name, params = sys.argv[1], json.loads(sys.argv[2])
    coro = CONTENDERS[name](params)
    try:
        import uvloop

        result = uvloop.run(coro)
    except ImportError:
        result = asyncio.run(coro)
    _finish(result)


if __name__ == "__main__":
    main()
