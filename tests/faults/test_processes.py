"""Process faults under load: workers killed in a loop while others run, a worker frozen past
the session timeout in the middle of a slow insert, the Kafka broker restarted or frozen,
ClickHouse restarted, Redis restarted with its data and without it.

The Kafka faults act on the broker process (stack.sh restart, SIGSTOP), not through
toxiproxy: the broker advertises its own address, so a proxy would only carry the bootstrap.
Each service is stopped one at a time and always brought back (`finally`)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sink.stores.clickhouse.connection import ClickHouse
from tests.conftest import Services
from tests.faults.conftest import (
    Load,
    Proxy,
    RedisServer,
    count,
    host_port,
    log_ends,
    next_landed,
    record_result,
    stack_pid,
    via,
    workload,
)
from tests.integration.conftest import SinkProcess
from tests.integration.test_failures import _stack
from tests.integration.test_worker import REGEX, topics_for
from tests.integration.workload import assert_exact, read_topic, wait_landed

pytestmark = pytest.mark.faults


async def test_kill_9_one_of_three_workers_in_a_loop_while_the_others_keep_landing(
    services: Services,
    make_topics: Callable[..., Any],
    clickhouse_db: ClickHouse,
    sink_config: Callable[..., Path],
    run_sink: Callable[..., SinkProcess],
    uid: str,
) -> None:
    """Three workers of one group; every 2-5 s one of them (at random) is killed with SIGKILL
    and started again, eight times, while records keep arriving. The others take over its
    partitions after the session timeout; the table stays exact."""
    topics, namespaces = await topics_for(make_topics, uid, partitions=4)
    work = workload(topics, namespaces, 4, seed=200, unique=30_000)
    config = sink_config(
        kafka={"topics_regex": REGEX.format(uid=uid)},
        batch={"max_rows": 1500, "max_wait": "200ms", "max_in_flight": 6000},
    )
    workers = [run_sink(config, name=f"w{i}") for i in range(3)]
    load = Load(services.kafka, work.records, chunk=500, pace=0.6).start()
    rng = random.Random(200)
    measured: dict[str, Any] = {"records": len(work.records), "workers": 3}
    try:
        await next_landed(workers[0], 0, timeout=120)
        kills = 0
        while kills < 8:
            await asyncio.sleep(rng.uniform(2.0, 5.0))
            victim = rng.randrange(3)
            workers[victim].kill()
            kills += 1
            for i, other in enumerate(workers):
                assert i == victim or other.running, f"worker {i} died:\n{other.logs()[-2000:]}"
            workers[victim] = run_sink(config, name=f"w{victim}-{kills}")
        last_kill = time.monotonic()
        measured["kills"] = kills
        await load.done()
        ends = await log_ends(services.kafka, topics)
        await wait_landed(
            clickhouse_db, ends, timeout=240, alive=lambda: all(w.running for w in workers)
        )
        measured["last_kill_to_all_landed_s"] = round(time.monotonic() - last_kill, 1)
        measured["load_end_to_all_landed_s"] = round(time.monotonic() - load.finished, 1)
        await assert_exact(clickhouse_db, work.expected)
        dlq = await read_topic(services.kafka, f"sink-{uid}.dlq", want=len(set(work.invalid)))
        assert {r.value for r in dlq} == set(work.invalid)
        measured["dead_letters"] = len(dlq)
    finally:
        record_result("kill-9-loop-3-workers", **measured)
    for w in workers:
        assert w.stop() == 0


async def test_stale_owner_frozen_inside_a_slow_insert_does_not_land_it_after_takeover(
    services: Services,
    make_topics: Callable[..., Any],
    clickhouse_db: ClickHouse,
    sink_config: Callable[..., Path],
    run_sink: Callable[..., SinkProcess],
    proxies: Callable[[str, str], Proxy],
    uid: str,
) -> None:
    """Worker A talks to ClickHouse through a link whose answers take 3 s. A is frozen
    (SIGSTOP) at the moment ClickHouse shows A's INSERT running: the query has reached the
    server, A passed its ownership check, the server's answer is on its way. Worker B joins,
    the group evicts A after the session timeout, B lands A's partitions. A is woken (SIGCONT)
    18 s later: it must not complete the insert of records it no longer owns."""
    topics, namespaces = await topics_for(make_topics, uid, partitions=2)
    work = workload(topics, namespaces, 2, seed=210, unique=16_000, invalid_share=0.0)
    ch_a = proxies("ch-a", host_port(services.clickhouse))
    base = services.clickhouse.rsplit("/", 1)[0]
    common = {
        "kafka": {"topics_regex": REGEX.format(uid=uid)},
        "batch": {"max_rows": 1000, "max_wait": "200ms", "max_in_flight": 3000},
    }
    config_a = sink_config("a", clickhouse={"url": via(f"{base}/t_{uid}", ch_a)}, **common)
    config_b = sink_config("b", **common)
    load = Load(services.kafka, work.records, chunk=400, pace=0.4).start()
    stale = run_sink(config_a, name="stale")
    other: SinkProcess | None = None
    measured: dict[str, Any] = {"records": len(work.records)}
    running = (
        f"SELECT count() FROM system.processes WHERE query LIKE 'INSERT INTO `t_{uid}`.`events`%'"
    )
    try:
        await next_landed(stale, 0, timeout=120)
        ch_a.add("latency", "downstream", latency=3000)
        # An insert that began before the toxic may be past its sample block already: wait
        # for it to end, then catch the start of a new one (its sample block now takes 3 s).
        await asyncio.sleep(4)
        deadline = time.monotonic() + 60
        for want in (0, 1):
            while True:
                [(inserting,)] = await clickhouse_db.query(running)
                if (inserting > 0) == bool(want):
                    break
                assert time.monotonic() < deadline, "no new insert of A seen"
                await asyncio.sleep(0.02)
        stale.signal(signal.SIGSTOP)
        frozen_at = time.time()
        other = run_sink(config_b, name="other")
        await asyncio.sleep(18)  # three session timeouts: A is out of the group, B lands
        assert count(other, "batch landed") > 0, "B did not take over"
        stale.signal(signal.SIGCONT)
        measured["frozen_s"] = round(time.time() - frozen_at, 1)
        await load.done()
        ends = await log_ends(services.kafka, topics)
        await wait_landed(clickhouse_db, ends, timeout=240, alive=lambda: other.running)
        await asyncio.sleep(5)  # a stale insert would show itself by now
        measured["stale_inserts_found_landed_by_b"] = count(
            other, "rows of an interrupted insert not inserted again"
        )
        measured["rows_minus_unique"] = await _surplus_rows(clickhouse_db, work.expected)
        await assert_exact(clickhouse_db, work.expected)
        assert stale.running and other.running
    finally:
        stale.signal(signal.SIGCONT)
        record_result("sigstop-stale-owner-mid-insert", **measured)
    assert stale.stop() == 0
    assert other.stop() == 0


async def _surplus_rows(ch: ClickHouse, expected: set[Any]) -> int:
    """Raw rows beyond the unique events expected (rows landed twice, if positive)."""
    [(rows,)] = await ch.query(f"SELECT count() FROM {ch.table('events')}")
    return int(rows) - len(expected)


async def test_worker_frozen_while_holding_records_drops_them_when_the_group_moved_on(
    services: Services,
    make_topics: Callable[..., Any],
    clickhouse_db: ClickHouse,
    sink_config: Callable[..., Path],
    run_sink: Callable[..., SinkProcess],
    uid: str,
) -> None:
    """Worker A holds fetched records in an open batch (a long batch.max_wait) when it is
    frozen past the session timeout; B takes the partitions over and lands everything. When A
    wakes, the group has already expired it: the revoke it then sees is a loss, and A must
    not land what it held (found by the soak: a revoke handler that drained the batch landed
    it a second time)."""
    topics, namespaces = await topics_for(make_topics, uid, partitions=2)
    work = workload(topics, namespaces, 2, seed=220, unique=3000, invalid_share=0.0)
    regex = {"topics_regex": REGEX.format(uid=uid)}
    holding = sink_config(
        "a", kafka=regex, batch={"max_rows": 100_000, "max_wait": "60s", "max_in_flight": 200_000}
    )
    stale = run_sink(holding, name="holding")
    other: SinkProcess | None = None
    measured: dict[str, Any] = {"records": len(work.records)}
    try:
        await asyncio.sleep(8)  # A joined and owns every partition
        await Load(services.kafka, work.records, pace=0.0).start().done()
        await asyncio.sleep(4)  # A fetched them into its open batch (sealed only after 60 s)
        stale.signal(signal.SIGSTOP)
        other = run_sink(sink_config("b", kafka=regex), name="other")
        await wait_landed(
            clickhouse_db,
            await log_ends(services.kafka, topics),
            timeout=120,
            alive=lambda: other is not None and other.running,
        )
        stale.signal(signal.SIGCONT)
        await asyncio.sleep(12)  # A notices it was expired and rejoins; a stale insert shows
        measured["lost_logged"] = count(
            stale, "partitions lost: the group expired this member, nothing held is inserted"
        )
        measured["rows_minus_unique"] = await _surplus_rows(clickhouse_db, work.expected)
        await assert_exact(clickhouse_db, work.expected)
        assert measured["lost_logged"] > 0, "A did not see its partitions as lost"
        assert stale.running and other.running
    finally:
        stale.signal(signal.SIGCONT)
        record_result("sigstop-holding-records", **measured)
    assert stale.stop() == 0
    assert other.stop() == 0


async def _restart_under_load(
    service: str,
    scenario: Callable[..., Any],
    services: Services,
    *,
    seed: int,
    down: float = 5.0,
    how: str = "restart",
) -> dict[str, Any]:
    async def fault(proc: SinkProcess, load: Load, measured: dict[str, Any]) -> float:
        await load.reached(0.3)
        t0 = time.monotonic()
        if how == "freeze":
            pid = stack_pid(service)
            os.kill(pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(down)
            finally:
                os.kill(pid, signal.SIGCONT)
        else:
            try:
                await asyncio.to_thread(_stack, services, "down", service)
                await asyncio.sleep(down)
            finally:
                await asyncio.to_thread(_stack, services, "up", service)
        measured["outage_s"] = round(time.monotonic() - t0, 1)
        end = time.time()
        # Records sent well before the fault (most landed by then) are sent again: they must
        # still be recognised as duplicates after the restart.
        early = [r for r in load.records[: len(load.records) // 5] if r[2] != b"bad"]
        again = random.Random(seed).sample(early, 300)
        await Load(services.kafka, again, pace=0.0).start().done()
        measured["resent_after_fault"] = len(again)
        return end

    outcome = await scenario(
        fault,
        name=f"{how}-{service}",
        seed=seed,
        unique=25_000,
        pace=0.6,
        rebalance_ok=service == "kafka",
        land_timeout=300,
        batch={"max_rows": 2000, "max_wait": "300ms", "max_in_flight": 10000},
    )
    return dict(outcome.measured)


@pytest.mark.parametrize("service", ["kafka", "clickhouse"])
async def test_service_restart_under_load(
    service: str, scenario: Callable[..., Any], services: Services
) -> None:
    """The broker or ClickHouse stopped (SIGTERM) for 5 s and started again while records keep
    arriving; the producer resends what failed. The worker resumes by itself; records resent
    after the restart are still dropped as duplicates."""
    await _restart_under_load(service, scenario, services, seed=220 + len(service))


async def test_kafka_broker_frozen_past_the_session_timeout(
    scenario: Callable[..., Any], services: Services
) -> None:
    """The broker process stopped with SIGSTOP for 12 s (two session timeouts): connections
    stay open but nothing answers, then everything answers at once. The group coordinator
    may expire the member when it wakes; the worker rejoins and lands exactly once."""
    await _restart_under_load("kafka", scenario, services, seed=230, down=12.0, how="freeze")


async def test_redis_restart_keeps_its_markers(
    scenario: Callable[..., Any], services: Services
) -> None:
    """The stack's Redis (AOF on) restarted under load. Markers survive: events that landed
    before the restart and are sent again after it are still dropped as duplicates."""
    await _restart_under_load("redis", scenario, services, seed=240)


async def test_redis_loses_its_data_under_load(
    services: Services,
    make_topics: Callable[..., Any],
    clickhouse_db: ClickHouse,
    sink_config: Callable[..., Path],
    run_sink: Callable[..., SinkProcess],
    own_redis: Callable[..., RedisServer],
    uid: str,
) -> None:
    """A Redis of the test's own, without persistence, killed and started empty while a
    stream of unique events is landing. README: "Redis losing its data forgets event
    identities: a duplicate that arrives afterwards lands. Landed records are never
    replayed, so a Redis restart alone causes no duplicate."

    Phase A (before the loss): events with duplicates, all landed. Phase B: unique events,
    streaming while Redis is wiped: none lost, none doubled. Phase C (after the loss): new
    events with duplicates among themselves (dedup works again), plus copies of some phase-A
    events: the documented window; how many of those land again is measured."""
    redis = own_redis()
    topics, namespaces = await topics_for(make_topics, uid, partitions=3)
    phase_a = workload(topics, namespaces, 3, seed=250, unique=8000)
    phase_b = workload(topics, namespaces, 3, seed=251, unique=15_000, duplicate_share=0.0)
    phase_c = workload(topics, namespaces, 3, seed=252, unique=5000)
    resent = random.Random(253).sample(
        [r for r in phase_a.records if r[2] != b"bad"], 500
    )  # valid records of phase A, sent again after the loss
    config = sink_config(
        kafka={"topics_regex": REGEX.format(uid=uid)},
        dedup={"redis_url": redis.url, "socket_timeout": "2s"},
        batch={"max_rows": 1500, "max_wait": "200ms", "max_in_flight": 6000},
    )
    proc = run_sink(config)
    assert proc.proc is not None
    pid = proc.proc.pid
    measured: dict[str, Any] = {}
    try:
        await Load(services.kafka, phase_a.records, pace=0.05).start().done()
        await wait_landed(
            clickhouse_db,
            await log_ends(services.kafka, topics),
            timeout=180,
            alive=lambda: proc.running,
        )
        await assert_exact(clickhouse_db, phase_a.expected)

        load = Load(services.kafka, phase_b.records, pace=0.5).start()
        await load.reached(0.4)
        redis.kill()
        await asyncio.sleep(3)
        redis.start()  # same port, empty
        wiped_at = time.time()
        measured["redis_back_to_next_batch_s"] = await next_landed(proc, wiped_at)
        await load.done()

        resend = Load(services.kafka, [*phase_c.records, *resent], pace=0.1).start()
        await resend.done()
        await wait_landed(
            clickhouse_db,
            await log_ends(services.kafka, topics),
            timeout=240,
            alive=lambda: proc.running,
        )
        table = clickhouse_db.table("events")
        rows = await clickhouse_db.query(
            f"SELECT namespace, source, id, count() FROM {table} GROUP BY namespace, source, id"
        )
        counts = {(n, s, i): c for n, s, i, c in rows}
        resent_ids = {
            (namespaces[topic], "gateway", _event_id(value)) for topic, _, _, value in resent
        }
        everything = phase_a.expected | phase_b.expected | phase_c.expected
        missing = everything - counts.keys()
        assert not missing, f"{len(missing)} events lost, e.g. {sorted(missing)[:3]}"
        assert counts.keys() == everything
        doubled = {k for k, c in counts.items() if c > 1}
        assert all(c <= 2 for c in counts.values())
        not_resent = doubled - resent_ids
        assert not not_resent, f"{len(not_resent)} events doubled that were not resent"
        measured["resent_after_loss"] = len(resent_ids)
        measured["resent_landed_twice"] = len(doubled & resent_ids)
        [(offsets, rows_total)] = await clickhouse_db.query(
            f"SELECT uniqExact(_topic, _partition, _offset), count() FROM {table}"
        )
        assert offsets == rows_total, "an offset landed twice"
        assert proc.running and proc.proc.pid == pid
    finally:
        record_result("redis-without-data", **measured)
    assert proc.stop() == 0


def _event_id(value: bytes) -> str:
    import orjson

    return str(orjson.loads(value)["id"])
