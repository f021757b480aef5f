"""Failure policy against the real services: poison rows, dependencies restarting mid-stream."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from sink.stores.clickhouse.connection import ClickHouse
from tests.conftest import Services
from tests.integration.test_worker import REGEX, topics_for
from tests.integration.workload import (
    Workload,
    assert_exact,
    landed_exactly,
    read_topic,
    wait_landed,
)


async def test_rows_clickhouse_refuses_are_isolated_and_dead_lettered(
    services: Services,
    make_topics: Callable[..., Any],
    producer: AIOKafkaProducer,
    clickhouse_db: ClickHouse,
    sink_config: Callable[..., Any],
    run_sink: Callable[..., Any],
    uid: str,
) -> None:
    # A user-made events table whose _offset column is too narrow: rows past offset 255
    # cannot be encoded. They must be bisected out and dead-lettered; the rest lands.
    await clickhouse_db.execute(f"""CREATE TABLE {clickhouse_db.table("events")} (
        namespace String, id String, type String, source String, subject String,
        time DateTime, data String, ingested_at DateTime, stored_at DateTime DEFAULT now(),
        validation_error String, _topic String, _partition UInt32, _offset UInt8
    ) ENGINE = MergeTree() ORDER BY (namespace, id)""")
    (topic,) = await make_topics(f"om_acme_{uid}", partitions=1)
    work = Workload([topic], {topic: "acme"}, partitions=1, seed=11)
    work.add(300, duplicate_share=0.0, invalid_share=0.0)
    await work.send(producer)
    proc = run_sink(
        sink_config(
            kafka={"topics_regex": REGEX.format(uid=uid)},
            batch={"max_rows": 120, "max_in_flight": 1200},
        )
    )

    await wait_landed(clickhouse_db, work.ends, timeout=120, alive=lambda: proc.running)
    [(rows, top)] = await clickhouse_db.query(
        f"SELECT count(), max(_offset) FROM {clickhouse_db.table('events')}"
    )
    assert (rows, top) == (256, 255)
    dlq = await read_topic(services.kafka, f"sink-{uid}.dlq", want=44)
    assert len(dlq) == 44
    assert {dict(r.headers)["sink.error.code"] for r in dlq} == {b"rejected_by_clickhouse"}
    assert sorted(int(dict(r.headers)["sink.source.offset"]) for r in dlq) == list(range(256, 300))
    assert all(orjson.loads(r.value)["id"].startswith("evt-11-") for r in dlq)
    assert proc.stop() == 0


async def test_server_error_after_the_raw_write_is_retried_without_duplicates(
    make_topics: Callable[..., Any],
    producer: AIOKafkaProducer,
    clickhouse_db: ClickHouse,
    sink_config: Callable[..., Any],
    run_sink: Callable[..., Any],
    uid: str,
) -> None:
    # A view of the user's on the raw table fails on every insert, after ClickHouse wrote the
    # raw part: the insert reports an error although the rows landed. Retrying blindly would
    # land them twice; the worker must look before it retries.
    config = sink_config(
        kafka={"topics_regex": REGEX.format(uid=uid)},
        batch={"max_rows": 500, "max_in_flight": 2000},
    )
    migrate = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sink",
        "migrate",
        "-c",
        str(config),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await migrate.communicate()
    assert migrate.returncode == 0, err.decode()
    await clickhouse_db.execute(
        f"CREATE MATERIALIZED VIEW {clickhouse_db.table('broken')} ENGINE = Memory AS "
        f"SELECT toUInt8(subject) AS n FROM {clickhouse_db.table('events')}"
    )
    topics, namespaces = await topics_for(make_topics, uid, partitions=2)
    work = Workload(topics, namespaces, partitions=2, seed=12)
    work.add(2000, duplicate_share=0.05, invalid_share=0.0)
    await work.send(producer)
    proc = run_sink(config)

    await wait_landed(clickhouse_db, work.ends, timeout=180, alive=lambda: proc.running)
    await assert_exact(clickhouse_db, work.expected)
    assert "had landed, not inserted again" in proc.logs()
    assert proc.stop() == 0


def _stack(services: Services, *args: str) -> None:
    if services.control is None:
        if os.environ.get("CI"):
            pytest.fail("restart tests need the local stack (scripts/stack.sh) in CI")
        pytest.skip("services are not ours to restart (no SINK_STACK_CONTROL)")
    subprocess.run(
        ["bash", services.control, *args], check=True, timeout=300, stdout=subprocess.DEVNULL
    )


@pytest.mark.parametrize("service", ["redis", "clickhouse", "kafka"])
async def test_dependency_restart_mid_stream_recovers_without_restarting_the_worker(
    service: str,
    services: Services,
    scenario: Callable[..., Any],
    producer: AIOKafkaProducer,
    clickhouse_db: ClickHouse,
    run_sink: Callable[..., Any],
) -> None:
    work, config = await scenario(seed=20, events=15_000, partitions=2, invalid_share=0.005)
    proc = run_sink(config)
    half = len(work.records) // 2
    await work.send(producer, work.records[:half], pace=0.02)
    await asyncio.sleep(2)

    await asyncio.to_thread(_stack, services, "down", service)
    await asyncio.sleep(4)
    await asyncio.to_thread(_stack, services, "up", service)
    if service == "kafka":
        await asyncio.sleep(3)
    await work.send(producer, work.records[half:], pace=0.02)

    await landed_exactly(clickhouse_db, work, alive=lambda: proc.running, timeout=240)
    assert proc.running, "the worker must recover by itself"
    assert proc.stop() == 0
