"""The long variant (`-m slow`): three workers under sustained load for several minutes while
random faults follow one another - network toxics on Redis and ClickHouse, kill -9 of a
worker, a worker frozen (SIGSTOP) past the session timeout, restarts of Redis, ClickHouse and
the broker. Exact at the end.

`SINK_SOAK_SECONDS` (default 480) sets how long records keep arriving."""

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
    host_port,
    log_ends,
    record_result,
    via,
    workload,
)
from tests.integration.conftest import SinkProcess
from tests.integration.test_failures import _stack
from tests.integration.test_worker import REGEX, topics_for
from tests.integration.workload import assert_exact, read_topic, wait_landed

pytestmark = [pytest.mark.faults, pytest.mark.slow]


async def _rows(ch: ClickHouse) -> int:
    try:
        [(n,)] = await ch.query(f"SELECT count() FROM {ch.table('events')}")
        return int(n)
    except Exception:
        return -1


async def _progress_after(ch: ClickHouse, timeout: float = 180) -> float | None:
    """Seconds until the raw table grows again; None if it did not (nothing left to land)."""
    start, before = time.monotonic(), await _rows(ch)
    while time.monotonic() - start < timeout:
        await asyncio.sleep(0.5)
        now = await _rows(ch)
        if now > before >= 0:
            return round(time.monotonic() - start, 1)
        if before < 0:
            before = now
    return None


@pytest.mark.timeout(1800)
async def test_soak_random_faults_under_sustained_load(
    services: Services,
    make_topics: Callable[..., Any],
    clickhouse_db: ClickHouse,
    sink_config: Callable[..., Path],
    run_sink: Callable[..., SinkProcess],
    proxies: Callable[[str, str], Proxy],
    uid: str,
) -> None:
    seconds = float(os.environ.get("SINK_SOAK_SECONDS", "480"))
    unique = int(seconds * 300)
    topics, namespaces = await topics_for(make_topics, uid, partitions=4)
    work = workload(topics, namespaces, 4, seed=900, unique=unique)
    ch = proxies("ch", host_port(services.clickhouse))
    redis = proxies("redis", host_port(services.redis))
    base = services.clickhouse.rsplit("/", 1)[0]
    config = sink_config(
        kafka={"topics_regex": REGEX.format(uid=uid)},
        clickhouse={"url": via(f"{base}/t_{uid}", ch), "query_timeout": "15s"},
        dedup={"redis_url": via(services.redis, redis), "socket_timeout": "3s"},
        batch={"max_rows": 3000, "max_wait": "300ms", "max_in_flight": 12000},
    )
    workers = [run_sink(config, name=f"w{i}") for i in range(3)]
    chunks = max(1, len(work.records) // 500)
    load = Load(services.kafka, work.records, chunk=500, pace=seconds / chunks).start()
    rng = random.Random(900)

    async def toxic(proxy: Proxy, kind: str, hold: float, **attributes: Any) -> None:
        names = [proxy.add(kind, s, **attributes) for s in ("upstream", "downstream")]
        await asyncio.sleep(hold)
        for name in names:
            proxy.remove(name)

    async def kill(_: int) -> None:
        victim = rng.randrange(len(workers))
        workers[victim].kill()
        workers[victim] = run_sink(config, name=f"w{victim}-{time.monotonic():.0f}")

    async def freeze(_: int) -> None:
        victim = workers[rng.randrange(len(workers))]
        victim.signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(rng.uniform(8, 18))  # beyond the 6 s session timeout
        finally:
            victim.signal(signal.SIGCONT)

    async def restart(service: str) -> None:
        try:
            await asyncio.to_thread(_stack, services, "down", service)
            await asyncio.sleep(3)
        finally:
            await asyncio.to_thread(_stack, services, "up", service)

    menu: dict[str, Callable[[int], Any]] = {
        "clickhouse-latency": lambda _: toxic(ch, "latency", 8, latency=1000, jitter=500),
        "redis-latency": lambda _: toxic(redis, "latency", 8, latency=800),
        "clickhouse-cut": lambda _: toxic(ch, "reset_peer", 0.5, timeout=0),
        "redis-cut": lambda _: toxic(redis, "reset_peer", 0.5, timeout=0),
        "clickhouse-blackhole": lambda _: toxic(ch, "timeout", 15, timeout=0),
        "redis-blackhole": lambda _: toxic(redis, "timeout", 15, timeout=0),
        "kill-9-worker": kill,
        "sigstop-worker": freeze,
    }
    once = ["restart-redis", "restart-clickhouse", "restart-kafka"]
    faults: list[dict[str, Any]] = []
    deck: list[str] = []  # every kind of fault in turn, in a shuffled order each round
    try:
        while not load.task.done():  # type: ignore[union-attr]
            await asyncio.sleep(rng.uniform(5, 12))
            if once and rng.random() < 0.15:
                name = once.pop(0)
                await restart(name.removeprefix("restart-"))
            else:
                if not deck:
                    deck = sorted(menu)
                    rng.shuffle(deck)
                name = deck.pop()
                await menu[name](0)
            recovery = await _progress_after(clickhouse_db)
            faults.append({"fault": name, "to_progress_s": recovery})
            for i, w in enumerate(workers):
                assert w.running, f"worker {i} died:\n{w.logs()[-3000:]}"
        await load.done()
        await wait_landed(
            clickhouse_db,
            await log_ends(services.kafka, topics),
            timeout=600,
            alive=lambda: all(w.running for w in workers),
        )
        await assert_exact(clickhouse_db, work.expected)
        dlq = await read_topic(services.kafka, f"sink-{uid}.dlq", want=len(set(work.invalid)))
        assert {r.value for r in dlq} == set(work.invalid)
    finally:
        ch.clear()
        redis.clear()
        record_result(
            "soak",
            records=len(work.records),
            seconds=seconds,
            faults=len(faults),
            worst_to_progress_s=max(
                (f["to_progress_s"] for f in faults if f["to_progress_s"] is not None),
                default=None,
            ),
            detail=faults,
        )
    for w in workers:
        assert w.stop() == 0
