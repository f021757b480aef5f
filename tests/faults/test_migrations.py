"""`kill -9` of a migrator at each point of adding a meter: a new worker lands events at once,
the lease of the dead migrator is taken over within seconds, and the meter ends complete,
recorded once and exact.

The migrator talks to ClickHouse through a proxy that delays every answer, so each of its
steps takes long enough for the test to see it from outside and kill it right there.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import IO, Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from sink.metering.ledger import BackfillRecords
from sink.stores.clickhouse.connection import ClickHouse
from tests.conftest import ROOT
from tests.faults.conftest import Proxy, host_port, http_port, metric, record_result, via
from tests.integration.history import (
    CALLS,
    TOKENS,
    Stream,
    applied_once,
    combined,
    history_sums,
    meter_sums,
    staging_left,
    write_history,
)
from tests.integration.workload import landed, wait_landed

# A lease renewed every 1.6 s and lost after 6 s without one: the slow link (150 ms a round
# trip) and a busy machine must not make the migrator give up on its own before the kill.
LEASE = {"lease_timeout": "8s", "backfill_piece_rows": 20_000, "check_interval": "1s"}


async def _scalar(ch: ClickHouse, sql: str) -> int:
    [(value,)] = await ch.query(sql)
    return int(value)


def probes(ch: ClickHouse) -> dict[str, Callable[[], Awaitable[int]]]:
    db, ledger = ch.database, ch.table("schema_migrations")
    return {
        "epoch": lambda: _scalar(
            ch,
            "SELECT max(toUInt64OrZero(replaceOne(name, 'schema_migrations_lock_', ''))) "
            f"FROM system.tables WHERE database = '{db}'",
        ),
        "live": lambda: _scalar(
            ch,
            f"SELECT count() FROM {ledger} WHERE version = 'meter:tokens' "
            "AND startsWith(state, 'live')",
        ),
        "table": lambda: _scalar(
            ch,
            f"SELECT count() FROM system.tables WHERE database = '{db}' AND name = 'meter_tokens'",
        ),
        "pieces": lambda: _scalar(
            ch,
            f"SELECT count() FROM {ledger} WHERE startsWith(version, 'backfill:tokens:') "
            "AND startsWith(state, 'piece')",
        ),
    }


async def _reached(point: str, state: dict[str, int], first_epoch: int) -> bool:
    if point == "before the meter's DDL":
        return state["epoch"] > first_epoch and not state["live"]
    if point == "during the meter's DDL":  # its table made, its view not yet recorded live
        return bool(state["table"]) and not state["live"]
    if point == "after the meter's DDL":
        return bool(state["live"]) and not state["pieces"]
    return state["pieces"] >= 2  # during the backfill


@pytest.mark.parametrize(
    "point",
    [
        "before the meter's DDL",
        "during the meter's DDL",
        "after the meter's DDL",
        "during the backfill",
    ],
)
async def test_a_migrator_killed_at_any_point_is_taken_over_and_the_meter_ends_exact(
    point: str,
    make_topics: Callable[..., Any],
    producer: AIOKafkaProducer,
    clickhouse_db: ClickHouse,
    sink_config: Callable[..., Path],
    run_sink: Callable[..., Any],
    proxies: Callable[[str, str], Proxy],
    services: Any,
    uid: str,
    tmp_path: Path,
) -> None:
    (topic,) = await make_topics(f"om_acme_{uid}", partitions=2)
    assert await _migrate(sink_config(name="old", meters=[CALLS])) == 0
    await write_history(clickhouse_db, rows=200_000, seconds=3 * 86400)

    slow = proxies("clickhouse", host_port(services.clickhouse))
    slow.add("latency", latency=150)
    url = f"{services.clickhouse.rsplit('/', 1)[0]}/{clickhouse_db.database}"
    migrator_log = (tmp_path / "migrator.log").open("wb")
    migrator = await _start_migrate(
        sink_config(
            name="slow",
            meters=[CALLS, TOKENS],
            clickhouse={"url": via(url, slow)},
            migrations=LEASE,
        ),
        stderr=migrator_log,
    )
    look = probes(clickhouse_db)
    first_epoch = await look["epoch"]()
    deadline = time.monotonic() + 90
    while True:
        state = {name: await probe() for name, probe in look.items()}
        if await _reached(point, state, first_epoch):
            break
        assert migrator.returncode is None, (
            f"the migrator ended before {point}: {state}",
            (tmp_path / "migrator.log").read_text()[-3000:],
        )
        assert time.monotonic() < deadline, f"never saw {point}: {state}"
        await asyncio.sleep(0.02)
    migrator.kill()
    await migrator.wait()
    migrator_log.close()
    killed = time.monotonic()
    if point == "during the backfill":
        report = await _check(sink_config(name="check", meters=[CALLS, TOKENS]))
        assert "backfill of meter tokens: " in report and " of 200,000 rows" in report, report

    worker = run_sink(sink_config(name="new", meters=[CALLS, TOKENS], migrations=LEASE))
    stream = Stream(producer, topic)
    async with stream.running():
        await stream.sending.wait()
        first = dict(stream.ends)
        await wait_landed(clickhouse_db, first, timeout=30, alive=lambda: worker.running)
        landed_after = time.monotonic() - killed
        await _until_applied(clickhouse_db, timeout=90)
        taken_over_after = time.monotonic() - killed
        # The running worker resumed the backfill, and says so.
        progress = _status(worker)["meters"]["backfills"]["tokens"]
        assert progress["rows_done"] == progress["rows_total"] >= 200_000, progress
        assert metric(worker, "sink_backfill_rows_done", meter="tokens") == progress["rows_done"]
        assert (await landed(clickhouse_db)).keys() >= first.keys()
    await wait_landed(clickhouse_db, stream.ends, timeout=60, alive=lambda: worker.running)
    assert worker.stop() == 0
    record_result(
        f"migrator killed {point}",
        landed_after_s=round(landed_after, 1),
        meter_applied_after_s=round(taken_over_after, 1),
    )

    assert landed_after < 30
    versions = await applied_once(clickhouse_db)
    assert versions and all(n == 1 for n in versions.values()), versions
    assert "meter:tokens" in versions
    assert await staging_left(clickhouse_db) == []
    want = combined(await history_sums(clickhouse_db), stream.sums)
    assert await meter_sums(clickhouse_db) == want


def _status(worker: Any) -> Any:
    url = f"http://127.0.0.1:{http_port(worker)}/status"
    with urllib.request.urlopen(url, timeout=5) as response:
        return orjson.loads(response.read())


async def _check(config: Path) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sink",
        "check",
        "-c",
        str(config),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await proc.communicate()
    return out.decode()


async def _until_applied(ch: ClickHouse, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (await applied_once(ch)).get("meter:tokens", 0) == 0:
        assert time.monotonic() < deadline, "the meter was not applied in time"
        await asyncio.sleep(0.5)


async def _start_migrate(
    config: Path, stderr: int | IO[bytes] = asyncio.subprocess.DEVNULL
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sink",
        "migrate",
        "-c",
        str(config),
        cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=stderr,
    )


async def _migrate(config: Path) -> int:
    proc = await _start_migrate(config)
    return await proc.wait()


HISTORY_ROWS = 20_000_000
MEMORY_LIMIT = 300_000_000


async def test_a_meter_added_to_a_large_table_backfills_exactly_in_little_memory_as_workers_land(
    make_topics: Callable[..., Any],
    producer: AIOKafkaProducer,
    clickhouse_db: ClickHouse,
    sink_config: Callable[..., Path],
    run_sink: Callable[..., Any],
    services: Any,
    uid: str,
) -> None:
    """20 million rows of history, a migrator limited to 300 MB a query, killed once in the
    middle of the backfill; a worker without the new meter lands a stream all along."""
    (topic,) = await make_topics(f"om_acme_{uid}", partitions=2)
    old = sink_config(name="old", meters=[CALLS])
    assert await _migrate(old) == 0
    await write_history(clickhouse_db, rows=HISTORY_ROWS, seconds=20 * 86400)
    worker = run_sink(old)
    small = await _small_memory_url(clickhouse_db, services)
    new = sink_config(name="new", meters=[CALLS, TOKENS], clickhouse={"url": small})
    look = probes(clickhouse_db)
    peak = _Peak(f"{services.clickhouse.rsplit('/', 1)[0]}/{clickhouse_db.database}")
    stream = Stream(producer, topic)
    async with stream.running(), peak.watching():
        await stream.sending.wait()
        before = dict(stream.ends)
        migrator = await _start_migrate(new)
        while await look["pieces"]() < 3:
            assert migrator.returncode is None, "the migrator ended before it was killed"
            await asyncio.sleep(0.1)
        migrator.kill()
        await migrator.wait()
        # The worker landed throughout: what was sent before the migration has landed.
        await wait_landed(clickhouse_db, before, timeout=30, alive=lambda: worker.running)

        done_before = await _backfilled(clickhouse_db)
        started = time.monotonic()
        resumed = await _start_migrate(new, stderr=asyncio.subprocess.PIPE)
        _, err = await resumed.communicate()
        took = time.monotonic() - started
        assert resumed.returncode == 0, err.decode()[-2000:]
        assert "backfill progress" in err.decode()  # log lines where stderr is no terminal
        rows = await _backfilled(clickhouse_db) - done_before
        during = dict(stream.ends)
        await wait_landed(clickhouse_db, during, timeout=30, alive=lambda: worker.running)
    await wait_landed(clickhouse_db, stream.ends, timeout=60, alive=lambda: worker.running)
    assert worker.stop() == 0

    record_result(
        "backfill of 20 million rows, resumed after kill -9",
        resumed_run_s=round(took, 1),
        resumed_rows=rows,
        rows_per_s=round(rows / took),
        peak_query_memory_mb=round(peak.bytes / 1e6),
    )
    assert 0 < peak.bytes < MEMORY_LIMIT
    versions = await applied_once(clickhouse_db)
    assert versions.get("meter:tokens") == 1, versions
    assert await staging_left(clickhouse_db) == []
    want = combined(await history_sums(clickhouse_db), stream.sums)
    assert await meter_sums(clickhouse_db) == want


async def _backfilled(ch: ClickHouse) -> int:
    """Rows the backfill of `tokens` has recorded done."""
    states = await ch.query(
        f"SELECT state FROM {ch.table('schema_migrations')} "
        "WHERE startsWith(version, 'backfill:tokens:') ORDER BY seq"
    )
    return BackfillRecords.parse([str(s) for (s,) in states]).rows_done


async def _small_memory_url(ch: ClickHouse, services: Any) -> str:
    """The database's URL as the stack's user `sink_small` (a 300 MB profile), or, on a
    server without that user, with the limit as a query setting."""
    base = services.clickhouse.rsplit("/", 1)[0]
    scheme, rest = base.split("://", 1)
    url = f"{scheme}://sink_small:@{rest.rsplit('@', 1)[-1]}/{ch.database}"
    probe = ClickHouse(url, connect_timeout=5, query_timeout=10)
    try:
        [(limit,)] = await probe.query(
            "SELECT value FROM system.settings WHERE name = 'max_memory_usage'"
        )
        if int(limit) == MEMORY_LIMIT:
            return url
    except Exception:  # the user does not exist here
        pass
    finally:
        await probe.close()
    return f"{base}/{ch.database}?max_memory_usage={MEMORY_LIMIT}"


class _Peak:
    """The largest memory a backfill query of this database used, sampled from the server
    over a connection of its own."""

    def __init__(self, url: str) -> None:
        self.ch = ClickHouse(url, connect_timeout=5, query_timeout=10)
        self.bytes = 0

    async def _sample(self) -> None:
        pattern = f"%{self.ch.database}%"
        while True:
            [(used,)] = await self.ch.query(
                "SELECT max(peak_memory_usage) FROM system.processes WHERE query LIKE "
                f"'{pattern}' AND (query LIKE '%_backfill%' OR query LIKE '%intDiv(toUInt32%')"
                " AND query NOT LIKE '%system.processes%'"
            )
            self.bytes = max(self.bytes, int(used))
            await asyncio.sleep(0.2)

    @contextlib.asynccontextmanager
    async def watching(self) -> AsyncIterator[_Peak]:
        task = asyncio.create_task(self._sample())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await self.ch.close()
