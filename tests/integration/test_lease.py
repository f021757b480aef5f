"""The migration lease against the real ClickHouse: a live holder is never broken into, a
released lease is free at once, a frozen holder is taken over within seconds and stops."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from sink.metering.lease import Lease
from sink.stores.clickhouse.connection import ClickHouse
from tests.conftest import ROOT

TIMEOUT = 3.0

HOLDER = """
import asyncio, sys
from sink.stores.clickhouse.connection import ClickHouse
from sink.metering.lease import Lease, LeaseLost

async def main():
    url = sys.argv[1]
    connect = lambda: ClickHouse(url, connect_timeout=5, query_timeout=30)
    lease = Lease(connect(), connect, "frozen-holder", timeout=float(sys.argv[2]))
    await lease.acquire()
    print("held", flush=True)
    while True:
        await asyncio.sleep(0.1)
        try:
            lease.check()
        except LeaseLost as exc:
            print("lost:", exc, flush=True)
            return

asyncio.run(main())
"""


def _url(db: ClickHouse, services: Any) -> str:
    return services.clickhouse.rsplit("/", 1)[0] + f"/{db.database}"


@pytest.fixture
async def connect(clickhouse_db: ClickHouse, services: Any) -> AsyncIterator[Callable[[], Any]]:
    opened: list[ClickHouse] = []

    def make() -> ClickHouse:
        ch = ClickHouse(_url(clickhouse_db, services), connect_timeout=5, query_timeout=30)
        opened.append(ch)
        return ch

    yield make
    for ch in opened:
        await ch.close()


async def test_a_live_holder_is_never_broken_into_and_a_release_frees_the_lease_at_once(
    connect: Callable[[], ClickHouse],
) -> None:
    a = Lease(connect(), connect, "a", timeout=TIMEOUT)
    b = Lease(connect(), connect, "b", timeout=TIMEOUT)
    assert await a.acquire()
    assert not await b.acquire(wait=False)
    waiting = asyncio.create_task(b.acquire())
    await asyncio.sleep(3 * TIMEOUT)  # a renews all along: b keeps waiting
    assert not waiting.done()
    a.check()
    holder = await b.holder()
    assert holder is not None and holder.owner == "a" and not holder.dead(TIMEOUT)
    await a.release()
    started = time.monotonic()
    assert await asyncio.wait_for(waiting, 5)
    assert time.monotonic() - started < 2.5
    holder = await a.holder()
    assert holder is not None and (holder.owner, holder.epoch) == ("b", 2)
    await b.release()


async def test_a_frozen_holder_is_taken_over_within_seconds_and_stops_when_it_wakes(
    clickhouse_db: ClickHouse,
    connect: Callable[[], ClickHouse],
    services: Any,
    sink_config: Callable[..., Path],
) -> None:
    holder = _hold(_url(clickhouse_db, services))
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        config = sink_config(migrations={"lease_timeout": f"{TIMEOUT}s"})
        assert "alive" in _check_lines(config)
        os.kill(holder.pid, signal.SIGSTOP)
        frozen = time.monotonic()
        await asyncio.sleep(TIMEOUT + 1.5)
        assert "looks dead" in _check_lines(config)

        b = Lease(connect(), connect, "b", timeout=TIMEOUT)
        assert await asyncio.wait_for(b.acquire(), 10)
        assert time.monotonic() - frozen < TIMEOUT + 4
        os.kill(holder.pid, signal.SIGCONT)
        line = await asyncio.to_thread(holder.stdout.readline)
        assert line.startswith("lost:"), line
        assert holder.wait(10) == 0
        b.check()
        now = await b.holder()
        assert now is not None and now.owner == "b"
        await b.release()
    finally:
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGCONT)
            holder.kill()


def _hold(url: str) -> subprocess.Popen[str]:
    """A process that takes the lease and prints `lost: ...` once it learns it lost it."""
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, url, str(TIMEOUT)],
        stdout=subprocess.PIPE,
        cwd=ROOT,
        text=True,
    )


def _check_lines(config: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "sink", "check", "-c", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    lines = [x for x in out.stdout.splitlines() if x.startswith("migration lease:")]
    assert lines, out.stdout + out.stderr
    return lines[0]


async def test_a_complete_schema_is_not_waited_for_while_another_process_holds_the_lease(
    clickhouse_db: ClickHouse, services: Any, sink_config: Callable[..., Path]
) -> None:
    config = sink_config(meters=[{"slug": "calls", "event_type": "call", "aggregation": "COUNT"}])
    assert _migrate(config).returncode == 0
    holder = _hold(_url(clickhouse_db, services))
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        done = _migrate(config)
        assert (done.returncode, done.stdout.strip()) == (0, "nothing to do: schema is up to date")
        assert time.monotonic() - started < TIMEOUT  # not a lease's wait
        assert holder.poll() is None  # and the holder was not disturbed
    finally:
        holder.kill()


def _migrate(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sink", "migrate", "-c", str(config)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
