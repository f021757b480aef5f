"""Resource faults: ClickHouse refusing every insert for a while, a disk-full write error, a
topic deleted and recreated under the worker."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError

from sink.stores.clickhouse.connection import ClickHouse
from tests.conftest import Services
from tests.faults.conftest import (
    Load,
    log_ends,
    log_events,
    next_landed,
    record_result,
    workload,
)
from tests.integration.conftest import SinkProcess
from tests.integration.test_worker import REGEX, topics_for
from tests.integration.workload import Workload, assert_exact, wait_landed

pytestmark = pytest.mark.faults


async def test_clickhouse_refusing_inserts_for_a_while_is_retried(
    scenario: Callable[..., Any], clickhouse_db: ClickHouse
) -> None:
    """The raw table renamed away for 12 s under load (ClickHouse 18.16 answers every insert
    with a server error: table doesn't exist), then renamed back: retried with backoff, no
    rows dead-lettered for it, nothing lost or doubled."""
    events, away = clickhouse_db.table("events"), clickhouse_db.table("events_away")

    async def fault(proc: SinkProcess, load: Load, measured: dict[str, Any]) -> float:
        await load.reached(0.3)
        await clickhouse_db.execute(f"RENAME TABLE {events} TO {away}")
        try:
            await asyncio.sleep(12)
        finally:
            await clickhouse_db.execute(f"RENAME TABLE {away} TO {events}")
        errors = [
            e["error"]
            for e in log_events(proc)
            if e.get("event") == "dependency failed, retrying"
            and e.get("dependency") == "clickhouse"
        ]
        assert errors, "no insert was refused"
        measured["first_error"] = errors[0][:120]
        return time.time()

    outcome = await scenario(fault, name="clickhouse-table-missing", seed=300)
    assert "rejected_by_clickhouse" not in outcome.proc.logs()


@pytest.mark.skip(
    reason="disk full cannot be provoked safely here: the shared ClickHouse writes to the "
    "machine's only disk (filling it would break every other user of the stack) and a second "
    "ClickHouse on a small loop/tmpfs mount needs root mounts and ~1 GB; a disk-full write "
    "error (code 243 NOT_ENOUGH_SPACE) is a server error like the one the rename test "
    "provokes, so it takes the same path (ClickHouseUnavailable -> retry with backoff)"
)
async def test_clickhouse_disk_full() -> None:
    raise AssertionError("skipped")


async def _recreate(admin: AIOKafkaAdminClient, topic: str, partitions: int) -> None:
    await admin.delete_topics([topic])
    deadline = time.monotonic() + 60
    while True:
        try:
            await admin.create_topics([NewTopic(topic, partitions, 1)])
            break
        except KafkaError:  # still being deleted
            assert time.monotonic() < deadline, f"{topic} could not be recreated"
            await asyncio.sleep(0.5)
    while topic not in set(await admin.list_topics()):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)


async def _present(ch: ClickHouse, expected: set[tuple[str, str, str]]) -> dict[Any, int]:
    rows = await ch.query(
        f"SELECT namespace, source, id, count() FROM {ch.table('events')} "
        "GROUP BY namespace, source, id"
    )
    return {(n, s, i): c for n, s, i, c in rows if (n, s, i) in expected}


async def _until_present(
    ch: ClickHouse, expected: set[tuple[str, str, str]], timeout: float
) -> dict[Any, int]:
    deadline = time.monotonic() + timeout
    while True:
        found = await _present(ch, expected)
        if len(found) == len(expected) or time.monotonic() > deadline:
            return found
        await asyncio.sleep(1)


async def _setup_recreate(
    services: Services,
    make_topics: Callable[..., Any],
    clickhouse_db: ClickHouse,
    sink_config: Callable[..., Path],
    run_sink: Callable[..., SinkProcess],
    uid: str,
) -> tuple[list[str], dict[str, str], Path, SinkProcess, Workload]:
    topics, namespaces = await topics_for(make_topics, uid, partitions=2)
    first = workload(topics, namespaces, 2, seed=310, unique=9000, invalid_share=0.0)
    config = sink_config(
        kafka={"topics_regex": REGEX.format(uid=uid)},
        batch={"max_rows": 2000, "max_wait": "300ms", "max_in_flight": 8000},
    )
    proc = run_sink(config)
    await Load(services.kafka, first.records, pace=0.05).start().done()
    await wait_landed(
        clickhouse_db,
        await log_ends(services.kafka, topics),
        timeout=180,
        alive=lambda: proc.running,
    )
    await assert_exact(clickhouse_db, first.expected)
    return topics, namespaces, config, proc, first


async def test_topic_recreated_while_the_worker_runs_lands_its_records_once(
    services: Services,
    make_topics: Callable[..., Any],
    admin: AIOKafkaAdminClient,
    clickhouse_db: ClickHouse,
    sink_config: Callable[..., Path],
    run_sink: Callable[..., SinkProcess],
    uid: str,
) -> None:
    """A topic is deleted and recreated while the worker runs and the other topics keep
    receiving records; its new records (offsets from 0 again, below the landed offset of
    the old topic) must land exactly once, also after the worker restarts."""
    topics, namespaces, config, proc, first = await _setup_recreate(
        services, make_topics, clickhouse_db, sink_config, run_sink, uid
    )
    measured: dict[str, Any] = {}
    try:
        recreated = topics[0]
        others = workload(topics[1:], namespaces, 2, seed=311, unique=6000, invalid_share=0.0)
        load = Load(services.kafka, others.records, pace=0.3).start()
        await _recreate(admin, recreated, 2)
        t0 = time.monotonic()
        fresh = Workload([recreated], namespaces, partitions=2, seed=312)
        fresh.add(600, duplicate_share=0.0, invalid_share=0.0)
        await Load(services.kafka, fresh.records, pace=0.0).start().done()
        found = await _until_present(clickhouse_db, fresh.expected, timeout=90)
        measured["recreated_topic_records_landed"] = f"{len(found)}/{len(fresh.expected)}"
        measured["recreate_to_landed_s"] = round(time.monotonic() - t0, 1)
        assert proc.running, proc.logs()[-3000:]
        assert len(found) == len(fresh.expected), (
            "records of the recreated topic missing:\n" + (proc.logs()[-3000:])
        )
        await load.done()
        # A restart (or any rebalance) positions the partitions from ClickHouse again; the
        # recreated topic's records must not be read again, later ones must land.
        assert proc.stop() == 0
        proc = run_sink(config, name="again")
        later = Workload([recreated], namespaces, partitions=2, seed=314)
        later.add(400, duplicate_share=0.0, invalid_share=0.0)
        await Load(services.kafka, later.records, pace=0.0).start().done()
        landed_later = await _until_present(clickhouse_db, later.expected, timeout=120)
        assert len(landed_later) == len(later.expected), "records after the restart missing"
        await asyncio.sleep(5)
        counts = await _present(clickhouse_db, fresh.expected)
        measured["after_restart_landed_twice"] = sum(1 for c in counts.values() if c > 1)
        assert len(found) == len(fresh.expected), "records of the recreated topic skipped"
        everything = first.expected | others.expected | fresh.expected | later.expected
        await assert_exact(clickhouse_db, everything)
    finally:
        record_result("topic-recreated-while-running", **measured)
        with contextlib.suppress(Exception):
            proc.signal(signal.SIGTERM)


async def test_topic_recreated_and_refilled_while_the_worker_is_down_loses_nothing(
    services: Services,
    make_topics: Callable[..., Any],
    admin: AIOKafkaAdminClient,
    clickhouse_db: ClickHouse,
    sink_config: Callable[..., Path],
    run_sink: Callable[..., SinkProcess],
    uid: str,
) -> None:
    topics, namespaces, config, proc, first = await _setup_recreate(
        services, make_topics, clickhouse_db, sink_config, run_sink, uid
    )
    measured: dict[str, Any] = {}
    try:
        assert proc.stop() == 0
        recreated = topics[0]
        await _recreate(admin, recreated, 2)
        fresh = Workload([recreated], namespaces, partitions=2, seed=313)
        fresh.add(8000, duplicate_share=0.0, invalid_share=0.0)  # more than the old topic held
        await Load(services.kafka, fresh.records, pace=0.0).start().done()
        proc = run_sink(config, name="again")
        await next_landed(proc, 0, timeout=120)
        found = await _until_present(clickhouse_db, fresh.expected, timeout=40)
        measured["recreated_topic_records_landed"] = f"{len(found)}/{len(fresh.expected)}"
        assert len(found) == len(fresh.expected), (
            f"{len(fresh.expected) - len(found)} records of the recreated topic skipped"
        )
        await assert_exact(clickhouse_db, first.expected | fresh.expected)
    finally:
        record_result("topic-recreated-while-down", **measured)
        with contextlib.suppress(Exception):
            proc.signal(signal.SIGTERM)
