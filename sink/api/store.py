"""Where the API reads usage: the meter tables, over a small pool of ClickHouse connections.

`sink serve` only reads (SELECT on the meter tables and `schema_migrations`), so it runs as
a read-only ClickHouse user. `UsageStore` is the seam: unit tests answer from memory.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from sink.api.query import UsageQuery
from sink.config import Config
from sink.metering import ledger, usage
from sink.metering.meters import Meter
from sink.stores.clickhouse.connection import ClickHouse
from sink.stores.clickhouse.sql import ServerFeatures, quote

APPLIED = "applied"
LIVE = "live"
PENDING = "pending"


@dataclass(frozen=True)
class MeterRecord:
    """A meter's state in the schema: `applied` (complete), `live` (counting new events while
    its backfill of older ones runs), `pending` (not created yet)."""

    state: str
    created_at: datetime | None = None
    updated_at: datetime | None = None


class UsageStore(Protocol):
    async def usage(self, meter: Meter, query: UsageQuery) -> list[usage.UsageRow]:
        """Rows of the query, at most `query.limit + 1` (one more tells there are more)."""
        ...

    async def records(self, meters: Sequence[Meter]) -> dict[str, MeterRecord]: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


class ClickHouseStore:
    """`api.connections` connections; a query waits for a free one."""

    def __init__(self, config: Config) -> None:
        c = config.clickhouse
        self._events_table = c.events_table
        self._cluster = c.cluster
        self._idle: asyncio.Queue[ClickHouse] = asyncio.Queue()
        self._all = [
            ClickHouse(
                c.url.get_secret_value(),
                connect_timeout=c.connect_timeout,
                query_timeout=c.query_timeout,
                compression=c.compression,
            )
            for _ in range(config.api.connections)
        ]
        for ch in self._all:
            self._idle.put_nowait(ch)
        self._features: ServerFeatures | None = None

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[ClickHouse]:
        ch = await self._idle.get()
        try:
            yield ch
        finally:
            self._idle.put_nowait(ch)

    async def usage(self, meter: Meter, query: UsageQuery) -> list[usage.UsageRow]:
        async with self._connection() as ch:
            if self._features is None:
                self._features = await ch.features()
            return await usage.query(
                ch,
                meter,
                events_table=self._events_table,
                namespace=query.namespace,
                subjects=query.subjects,
                start=query.start,
                end=query.end,
                window=query.window,
                tz=query.tz,
                group_by=query.group_by,
                filters=query.filters,
                limit=query.limit + 1,
                merge_namespaces=query.namespace is None,
                features=self._features,
                cluster=self._cluster,
            )

    async def records(self, meters: Sequence[Meter]) -> dict[str, MeterRecord]:
        async with self._connection() as ch:
            table = ch.table("schema_migrations")
            [(exists,)] = await ch.query(f"EXISTS TABLE {table}")
            rows = []
            if int(exists):
                rows = await ch.query(
                    f"SELECT version, state, toUInt32(applied_at) FROM {table} "
                    f"WHERE startsWith(version, {quote(ledger.meter_version(''))}) "
                    "ORDER BY version, seq"
                )
        history: dict[str, list[tuple[str, int]]] = {}
        for version, state, at in rows:
            steps = history.setdefault(str(version), [])
            if state == ledger.REMOVED:
                steps.clear()  # a meter removed and added again is a new meter
            else:
                steps.append((str(state), int(at)))
        return {m.slug: _record(history.get(ledger.meter_version(m.slug), [])) for m in meters}

    async def ping(self) -> None:
        async with self._connection() as ch:
            await ch.ping()

    async def close(self) -> None:
        for ch in self._all:
            await ch.close()


def _record(steps: list[tuple[str, int]]) -> MeterRecord:
    if not steps:
        return MeterRecord(PENDING)
    state = APPLIED if steps[-1][0] == ledger.APPLIED else LIVE
    return MeterRecord(
        state,
        datetime.fromtimestamp(steps[0][1], UTC),
        datetime.fromtimestamp(steps[-1][1], UTC),
    )
