"""The real `sink run` against real Kafka, Redis and ClickHouse: exactly once, end to end."""

from __future__ import annotations

import asyncio
import random
import signal
import urllib.request
from collections.abc import Callable
from functools import partial
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from sink.stores.clickhouse.connection import ClickHouse
from tests.conftest import Services
from tests.integration.workload import (
    REGEX,
    Workload,
    assert_exact,
    free_port,
    landed_exactly,
    read_topic,
    topics_for,
    wait_landed,
)

__all__ = ["REGEX", "free_port", "topics_for"]  # used by the other suites


async def until(condition: Callable[[], bool], timeout: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


def _landing_or_done(proc: Any, sender: asyncio.Task[None]) -> bool:
    return '"batch landed"' in proc.logs() or sender.done()


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name_labels, _, value = line.rpartition(" ")
            name = name_labels.split("{", 1)[0]
            totals[name] = totals.get(name, 0.0) + float(value)
    return totals


async def test_end_to_end_exactly_once_with_duplicates_and_dead_letters(
    services: Services,
    make_topics: Callable[..., Any],
    producer: AIOKafkaProducer,
    clickhouse_db: ClickHouse,
    sink_config: Callable[..., Any],
    run_sink: Callable[..., Any],
    uid: str,
) -> None:
    topics, namespaces = await topics_for(make_topics, uid)
    work = Workload(topics, namespaces, partitions=3, seed=1)
    work.add(3000, duplicate_share=0.1, invalid_share=0.02)
    await work.send(producer)
    port = free_port()
    proc = run_sink(sink_config(kafka={"topics_regex": REGEX.format(uid=uid)}, http={"port": port}))

    await wait_landed(clickhouse_db, work.ends, timeout=120, alive=lambda: proc.running)
    await assert_exact(clickhouse_db, work.expected)

    dlq = await read_topic(services.kafka, f"sink-{uid}.dlq", want=len(work.invalid))
    assert sorted(r.value for r in dlq) == sorted(work.invalid)
    headers = dict(dlq[0].headers)
    assert headers["sink.error.code"]
    assert headers["sink.source.topic"].decode() in topics
    assert int(headers["sink.source.offset"]) >= 0

    metrics = scrape(port)
    duplicates_sent = len(work.records) - len(work.expected) - len(work.invalid)
    assert metrics["sink_duplicates_dropped_total"] == duplicates_sent
    assert metrics["sink_dead_letters_total"] == len(work.invalid)
    assert metrics["sink_events_inserted_total"] == len(work.expected)
    assert proc.stop() == 0


async def test_kill_9_at_random_moments_keeps_the_table_exact(
    services: Services,
    scenario: Callable[..., Any],
    producer: AIOKafkaProducer,
    clickhouse_db: ClickHouse,
    run_sink: Callable[..., Any],
    uid: str,
) -> None:
    work, config = await scenario(
        seed=2, events=30_000, invalid_share=0.005, max_rows=1500, max_in_flight=6000
    )
    # The stream lasts about as long as the ten kill cycles.
    sender = asyncio.create_task(work.send(producer, chunk=250, pace=0.6))

    rng = random.Random(99)
    proc = run_sink(config)
    for _ in range(10):
        # Kill while the worker is landing batches, not while it is still starting.
        await until(partial(_landing_or_done, proc, sender), timeout=60)
        await asyncio.sleep(rng.uniform(0.0, 1.5))
        proc.kill()
        proc = run_sink(config)
    await sender

    await landed_exactly(clickhouse_db, work, alive=lambda: proc.running, timeout=240)
    dlq = await read_topic(services.kafka, f"sink-{uid}.dlq", want=len(work.invalid))
    assert set(r.value for r in dlq) == set(work.invalid)
    assert proc.stop() == 0


async def test_workers_joining_and_leaving_mid_stream(
    scenario: Callable[..., Any],
    producer: AIOKafkaProducer,
    clickhouse_db: ClickHouse,
    run_sink: Callable[..., Any],
) -> None:
    work, config = await scenario(seed=3, events=20_000, partitions=4)
    sender = asyncio.create_task(work.send(producer, pace=0.1))

    first = run_sink(config, name="a")
    await asyncio.sleep(4)
    second = run_sink(config, name="b")
    third = run_sink(config, name="c")
    await asyncio.sleep(6)
    assert second.stop() == 0
    await asyncio.sleep(3)
    assert third.stop() == 0
    await sender

    await landed_exactly(clickhouse_db, work, alive=lambda: first.running)
    assert first.stop() == 0


async def test_two_worker_processes_with_default_batches_land_exactly_once(
    scenario: Callable[..., Any],
    producer: AIOKafkaProducer,
    clickhouse_db: ClickHouse,
    run_sink: Callable[..., Any],
) -> None:
    # Default-sized batches make the first flushes slow, so the second process joins while
    # the first is still landing: its revoke must land (or give up) before the group moves on.
    work, config = await scenario(
        seed=6,
        events=80_000,
        partitions=4,
        max_rows=25_000,
        max_wait="1s",
        max_in_flight=100_000,
    )
    await work.send(producer, chunk=2000)
    proc = run_sink(config, workers=2)
    await landed_exactly(clickhouse_db, work, alive=lambda: proc.running, timeout=300)
    assert proc.stop() == 0


async def test_stale_owner_frozen_past_session_timeout_does_not_insert_twice(
    scenario: Callable[..., Any],
    producer: AIOKafkaProducer,
    clickhouse_db: ClickHouse,
    run_sink: Callable[..., Any],
) -> None:
    work, config = await scenario(seed=4, events=12_000, partitions=2)
    sender = asyncio.create_task(work.send(producer, pace=0.1))
    stale = run_sink(config, name="stale")
    await asyncio.sleep(4)
    stale.signal(signal.SIGSTOP)
    other = run_sink(config, name="other")
    await asyncio.sleep(12)  # longer than the 6 s session timeout: the group moves on
    stale.signal(signal.SIGCONT)
    await sender

    await wait_landed(clickhouse_db, work.ends, timeout=180, alive=lambda: other.running)
    await asyncio.sleep(3)  # give a stale insert the chance to show itself
    await assert_exact(clickhouse_db, work.expected)
    assert stale.stop() == 0
    assert other.stop() == 0


async def test_sigterm_drains_commits_and_restart_replays_nothing(
    services: Services,
    scenario: Callable[..., Any],
    producer: AIOKafkaProducer,
    clickhouse_db: ClickHouse,
    run_sink: Callable[..., Any],
    uid: str,
) -> None:
    work, config = await scenario(seed=5, events=15_000, partitions=2)
    sender = asyncio.create_task(work.send(producer, chunk=250, pace=0.4))
    proc = run_sink(config)
    await asyncio.sleep(6)
    assert proc.stop(timeout=30) == 0, proc.logs()[-3000:]
    assert '"drained"' in proc.logs()

    # Everything fetched before the stop landed and was committed: Kafka's committed offset
    # equals the landed offset + 1 on every partition the worker touched.
    from tests.integration.workload import landed

    at_stop = await landed(clickhouse_db)
    assert at_stop, "nothing landed before SIGTERM"
    consumer = AIOKafkaConsumer(
        bootstrap_servers=services.kafka, group_id=f"sink-{uid}", enable_auto_commit=False
    )
    await consumer.start()
    try:
        for (topic, partition), offset in at_stop.items():
            assert await consumer.committed(TopicPartition(topic, partition)) == offset + 1
    finally:
        await consumer.stop()

    await sender
    again = run_sink(config, name="again")
    await wait_landed(clickhouse_db, work.ends, timeout=120, alive=lambda: again.running)
    await assert_exact(clickhouse_db, work.expected)
    first_batches = [line for line in again.logs().splitlines() if '"batch landed"' in line]
    for (topic, partition), offset in at_stop.items():
        if work.ends[(topic, partition)] - 1 == offset:
            continue  # nothing arrived there after the stop
        assert any(f"{topic}/{partition}:{offset + 1}-" in line for line in first_batches), (
            f"{topic}/{partition} did not resume at {offset + 1}"
        )
    assert again.stop() == 0
