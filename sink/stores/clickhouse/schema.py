"""The raw events table, the landed-offsets table and the view between them, and the
columnar block of the raw table built from batch items."""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence
from typing import Any

from sink.errors import ClickHouseUnavailable
from sink.pipeline.decode import Event
from sink.stores.clickhouse.connection import ClickHouse, Database
from sink.stores.clickhouse.landed import StorageKeys
from sink.stores.clickhouse.sql import Replication, ServerFeatures, quote

EVENT_COLUMNS = (
    "namespace",
    "id",
    "type",
    "source",
    "subject",
    "time",
    "data",
    "ingested_at",
    "validation_error",
    "_topic",
    "_partition",
    "_offset",
)


class Schema:
    """DDL for the raw events table, the landed-offsets table and the view between them.

    On a cluster (`replication`) every statement runs `ON CLUSTER` and every table is
    Replicated: the raw and offsets tables per shard (a partition's rows and its landed
    offsets live on one shard), the topic incarnations on every shard alike.
    """

    def __init__(
        self,
        ch: ClickHouse,
        features: ServerFeatures,
        events_table: str,
        offsets_table: str,
        replication: Replication | None = None,
    ) -> None:
        self.ch = ch
        self.features = features
        self.events_table = events_table
        self.offsets_table = offsets_table
        self.replication = replication

    @property
    def offsets_view(self) -> str:
        return f"{self.events_table}_to_{self.offsets_table}"

    @property
    def topics_table(self) -> str:
        return topics_table(self.offsets_table)

    def _lc(self, type_: str) -> str:
        return f"LowCardinality({type_})" if self.features.low_cardinality else type_

    def _time(self) -> str:
        return "DateTime64(3, 'UTC')" if self.features.datetime64 else "DateTime('UTC')"

    def _on(self) -> str:
        return self.replication.on_cluster if self.replication is not None else ""

    def _engine(self, engine: str, table: str, *args: str, every_shard: bool = False) -> str:
        if self.replication is None:
            return f"{engine}({', '.join(args)})"
        return self.replication.engine(engine, table, *args, every_shard=every_shard)

    def statements(self) -> list[str]:
        events = self.ch.table(self.events_table)
        offsets = self.ch.table(self.offsets_table)
        view = self.ch.table(self.offsets_view)
        topics = self.ch.table(self.topics_table)
        lc_string = self._lc("String")
        on = self._on()
        return [
            f"CREATE DATABASE IF NOT EXISTS `{self.ch.database}`{on}",
            f"""CREATE TABLE IF NOT EXISTS {events}{on} (
    namespace {lc_string},
    id String,
    type {lc_string},
    source String,
    subject String,
    time {self._time()},
    data String,
    ingested_at {self._time()},
    stored_at DateTime('UTC') DEFAULT now(),
    validation_error String,
    _topic {lc_string},
    _partition UInt32,
    _offset UInt64
) ENGINE = {self._engine("MergeTree", self.events_table)}
PARTITION BY toYYYYMM(time)
ORDER BY (namespace, type, subject, time, _topic, _partition, _offset)""",
            f"""CREATE TABLE IF NOT EXISTS {offsets}{on} (
    topic String,
    kafka_partition UInt32,
    landed_offset UInt64,
    updated_at DateTime('UTC') DEFAULT now()
) ENGINE = {self._engine("ReplacingMergeTree", self.offsets_table, "landed_offset")}
ORDER BY (topic, kafka_partition)""",
            f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {view}{on} TO {offsets} AS
SELECT toString(_topic) AS topic, toUInt32(_partition) AS kafka_partition,
    toUInt64(max(_offset)) AS landed_offset, now() AS updated_at
FROM {events}
GROUP BY _topic, _partition""",
            # Incarnations of each topic name, by Kafka topic id (see sink.pipeline.topics).
            f"""CREATE TABLE IF NOT EXISTS {topics}{on} (
    topic String,
    topic_id String,
    storage_key String,
    seen_at DateTime('UTC') DEFAULT now()
) ENGINE = {self._engine("ReplacingMergeTree", self.topics_table, every_shard=True)}
ORDER BY (topic, topic_id)""",
            *self.distributed(),
        ]

    def distributed(self) -> list[str]:
        """On a cluster, a Distributed table over the raw table for reads: `<events>_all`."""
        if self.replication is None:
            return []
        return [self.replication.distributed(self.ch.database, self.events_table)]

    async def apply(self) -> list[str]:
        """Create what is missing; returns the statements run (all idempotent)."""
        done = []
        for sql in self.statements():
            await self.ch.execute(sql)
            done.append(sql)
        return done


async def time_divisor(ch: Database, events_table: str) -> int:
    """From epoch milliseconds to the unit of the table's `time` column as it exists (a table
    made on an older server keeps DateTime after the server is upgraded)."""
    rows = await ch.query(
        "SELECT type FROM system.columns WHERE database = "
        f"{quote(ch.database)} AND table = {quote(events_table)} AND name = 'time'"
    )
    if not rows:
        raise ClickHouseUnavailable(f"table {events_table} has no column `time` (not migrated?)")
    return 1 if str(rows[0][0]).startswith("DateTime64") else 1000


def topics_table(offsets_table: str) -> str:
    return f"{offsets_table}_topics"


_ITEM_FIELDS = len(Event._fields)  # sink.pipeline.batch.Item is sink.pipeline.decode.Event


def event_columns(
    items: Sequence[Any], time_divisor: int, keys: StorageKeys | None = None
) -> list[Sequence[Any]]:
    """Columnar block for EVENT_COLUMNS from batch items (`sink.pipeline.batch.Item`); `_topic` is
    the topic's storage key."""
    # Transposed in one pass in C. (It makes an iterator per row for a moment; the worker
    # runs the cyclic collector on a clock, not on allocation counts, so these cost no
    # collections.)
    columns: list[Sequence[Any]] = list(zip(*items, strict=True)) or [()] * _ITEM_FIELDS
    # Item fields: the event's seven columns, then validation_error, topic, partition,
    # offset, and the record timestamp (which becomes ingested_at, after the event's).
    event, (errors, topics, partitions, offsets, stamps) = columns[:7], columns[7:]
    divisors = itertools.repeat(time_divisor)
    if time_divisor != 1:
        event[5] = list(map(operator.floordiv, event[5], divisors))
    ingested = list(map(operator.floordiv, map(max, stamps, itertools.repeat(0)), divisors))
    if keys is not None:
        stored = {t: keys.key(t) for t in set(topics)}
        if any(t != k for t, k in stored.items()):
            topics = [stored[t] for t in topics]
    return [*event, ingested, errors, topics, partitions, offsets]
