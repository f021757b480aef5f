"""A raw table with history, and a stream of events on top of it, for meters added later.

History rows are written straight into the raw table (INSERT ... SELECT from `numbers`) in the
shape the worker stores: `data` with its top-level scalars first, here `{"model": ..,
"tokens": <_offset % 1000>, "meta": {"tokens": 999999}}`, so the right SUM of `tokens` per
subject comes from the raw columns alone, and a meter that read the nested `tokens` would be
far off. Streamed events go through Kafka and a real worker.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from sink.stores.clickhouse.connection import ClickHouse

TOKENS = {
    "slug": "tokens",
    "event_type": "tokens",
    "aggregation": "SUM",
    "value_property": "tokens",
}
CALLS = {"slug": "calls", "event_type": "call", "aggregation": "COUNT"}
START = 1769731200  # 2026-01-30T00:00:00Z: history spans the end of January


async def write_history(ch: ClickHouse, rows: int, seconds: int) -> None:
    """`rows` events of type `tokens` from START over `seconds`, 100 subjects, 3 models."""
    await ch.execute(
        f"INSERT INTO {ch.table('events')} (namespace, id, type, source, subject, time, data, "
        "ingested_at, validation_error, _topic, _partition, _offset) "
        "SELECT 'acme', concat('h', toString(number)), 'tokens', 'history', "
        "concat('s', toString(number % 100)), "
        f"toDateTime({START} + intDiv(number * {seconds}, {rows})), "
        'concat(\'{"model":"m\', toString(number % 3), \'","tokens":\', '
        'toString(number % 1000), \',"meta":{"tokens":999999}}\'), '
        f"toDateTime({START} + intDiv(number * {seconds}, {rows})), '', 'history', 0, number "
        f"FROM numbers({rows})"
    )


async def history_sums(ch: ClickHouse) -> dict[str, float]:
    """SUM of `tokens` per subject over the history rows, from their raw columns."""
    rows = await ch.query(
        f"SELECT subject, sum(_offset % 1000) FROM {ch.table('events')} "
        "WHERE source = 'history' GROUP BY subject"
    )
    return {str(s): float(v) for s, v in rows}


async def meter_sums(ch: ClickHouse, slug: str = "tokens") -> dict[str, float]:
    rows = await ch.query(
        f"SELECT subject, sumMerge(value) FROM {ch.table('meter_' + slug)} GROUP BY subject"
    )
    return {str(s): float(v) for s, v in rows}


class Stream:
    """Events sent to a topic in small rounds until stopped; `sums` is their SUM of tokens per
    subject, `ends` the end offset of each partition."""

    def __init__(self, producer: AIOKafkaProducer, topic: str, every: float = 0.2) -> None:
        self.producer = producer
        self.topic = topic
        self.every = every
        self.sums: dict[str, float] = defaultdict(float)
        self.ends: dict[tuple[str, int], int] = {}
        self.sent = 0
        self.sending = asyncio.Event()
        """Set once the first round is in Kafka."""
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            futures = []
            for _ in range(20):
                i = self.sent
                self.sent += 1
                subject = f"s{i % 100}"
                event = {
                    "specversion": "1.0",
                    "id": f"stream-{i}",
                    "source": "stream",
                    "type": "tokens" if i % 2 else "call",
                    "subject": subject,
                    "time": "2026-02-03T10:00:00Z",
                    "data": {"tokens": i % 7, "meta": {"tokens": 999999}},
                }
                if event["type"] == "tokens":
                    self.sums[subject] += i % 7
                futures.append(await self.producer.send(self.topic, orjson.dumps(event)))
            for meta in await asyncio.gather(*futures):
                tp = (meta.topic, meta.partition)
                self.ends[tp] = max(self.ends.get(tp, 0), meta.offset + 1)
            self.sending.set()
            await asyncio.sleep(self.every)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Stream]:
        self._task = asyncio.create_task(self._run())
        try:
            yield self
        finally:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def combined(*parts: dict[str, float]) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for part in parts:
        for key, value in part.items():
            out[key] += value
    return {k: v for k, v in out.items() if v}


async def applied_once(ch: ClickHouse) -> dict[str, Any]:
    """version -> number of `applied` records, for every schema version."""
    rows = await ch.query(
        f"SELECT version, countIf(state = 'applied') FROM {ch.table('schema_migrations')} "
        "WHERE NOT startsWith(version, 'backfill:') GROUP BY version"
    )
    return {str(v): int(n) for v, n in rows}


async def staging_left(ch: ClickHouse) -> list[str]:
    rows = await ch.query(
        f"SELECT name FROM system.tables WHERE database = '{ch.database}' "
        "AND startsWith(name, '_backfill')"
    )
    return [str(n) for (n,) in rows]
