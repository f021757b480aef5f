"""ClickHouse over the native protocol: server features, schema, columnar inserts, landed offsets.

The schema works on ClickHouse 18.16 and on current servers; newer column types are used only
where the server version has them (`ServerFeatures`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import operator
import re
import struct
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from asynch.errors import ClickHouseException, ColumnException, ServerException
from asynch.proto import constants as native
from asynch.proto.block import BlockInfo, ColumnOrientedBlock
from asynch.proto.columns import write_column
from asynch.proto.connection import Connection as NativeConnection
from asynch.proto.context import ExecuteContext
from asynch.proto.protocol import ClientPacket
from asynch.proto.utils.dsn import parse_dsn

from sink.decode import Event
from sink.errors import ClickHouseRejected, ClickHouseUnavailable, ConfigError

# Error codes that mean "these rows can never be stored as they are", when the driver raises
# them while encoding the block (before anything is sent): bisect and dead-letter. A server
# error is never taken for that: the server may have written the raw part before a view
# failed, so the batch is retried after checking what landed.
DATA_ERROR_CODES = frozenset(
    {
        6,  # CANNOT_PARSE_TEXT
        27,  # CANNOT_PARSE_INPUT_ASSERTION_FAILED
        38,  # CANNOT_PARSE_DATE
        41,  # CANNOT_PARSE_DATETIME
        53,  # TYPE_MISMATCH
        69,  # ARGUMENT_OUT_OF_BOUND
        70,  # CANNOT_CONVERT_TYPE
        72,  # CANNOT_PARSE_NUMBER
        117,  # INCORRECT_DATA
        131,  # TOO_LARGE_STRING_SIZE
        321,  # VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE
        395,  # FUNCTION_THROW_IF_VALUE_IS_NON_ZERO
        469,  # VIOLATED_CONSTRAINT
    }
)

_ENCODING_ERRORS = (TypeError, ValueError, OverflowError, UnicodeError, KeyError, struct.error)

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
OFFSET_COLUMNS = ("topic", "kafka_partition", "landed_offset")


@dataclass(frozen=True)
class ServerFeatures:
    """What the connected server supports, derived from its version."""

    version: tuple[int, ...]

    @property
    def datetime64(self) -> bool:
        return self.version >= (20, 1)

    @property
    def low_cardinality(self) -> bool:
        return self.version >= (20, 1)

    @property
    def json_extract(self) -> bool:
        return self.version >= (20, 1)

    @property
    def dedup_token(self) -> bool:
        """`insert_deduplication_token` with `non_replicated_deduplication_window`."""
        return self.version >= (22, 4)

    @property
    def time_unit(self) -> int:
        """Divisor from epoch milliseconds to the stored time column's unit."""
        return 1 if self.datetime64 else 1000


def parse_version(text: str) -> tuple[int, ...]:
    parts = re.findall(r"\d+", text)[:3]
    return tuple(int(p) for p in parts) or (0,)


def quote(value: str) -> str:
    """A ClickHouse string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


class InsertWithdrawn(Exception):
    """`insert_columns(prepare=...)` was told not to send the rows: nothing was written."""


class ClickHouse:
    """One native connection with timeouts, error classification and reconnect on failure.

    A connection serves one query at a time; callers that run concurrently each own one.
    """

    def __init__(
        self, url: str, *, connect_timeout: float, query_timeout: float, compression: str = "none"
    ) -> None:
        try:
            params = parse_dsn(url)
        except Exception as exc:  # the driver raises its own DSNError or ValueError
            raise ConfigError(f"clickhouse.url: {exc}") from None
        self.database: str = params.pop("database", "default")
        params.setdefault("connect_timeout", connect_timeout)
        # No per-read or per-write timeout in the driver: it would wrap every read and every
        # drain in a task of its own (asyncio.wait_for), and each costs turns of the event
        # loop, each as long as the poll loop's work between two yields (a 25,000-row insert
        # took some 0.1 s longer that way). `_guard` bounds each query as a whole instead.
        # A URL may still set one.
        params.setdefault("send_receive_timeout", None)
        if compression != "none":
            params["compression"] = compression
        self._params = params
        self._query_timeout = query_timeout
        self._conn: NativeConnection | None = None

    def table(self, name: str) -> str:
        return f"`{self.database}`.`{name}`"

    async def _connection(self) -> NativeConnection:
        if self._conn is None:
            self._conn = NativeConnection(**self._params)  # type: ignore[no-untyped-call]
        return self._conn

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.disconnect()

    async def _run(self, query: str, **kwargs: Any) -> Any:
        conn = await self._connection()
        return await self._guard(conn.execute(query, **kwargs))

    async def _guard(self, work: Awaitable[Any]) -> Any:
        """Await `work` on the connection with the query timeout; classify failures."""
        try:
            return await asyncio.wait_for(work, self._query_timeout)
        except ServerException as exc:
            await self._drop()
            raise ClickHouseUnavailable(f"server error {exc.code}: {exc}") from exc
        except (ColumnException, *_ENCODING_ERRORS) as exc:
            # Raised while serialising a column: these rows cannot be encoded for this table.
            await self._drop()
            raise ClickHouseRejected(f"cannot encode rows: {type(exc).__name__}: {exc}") from exc
        except ClickHouseException as exc:
            await self._drop()
            if getattr(exc, "code", None) in DATA_ERROR_CODES:
                raise ClickHouseRejected(str(exc), exc.code) from exc
            raise ClickHouseUnavailable(f"{type(exc).__name__}: {exc}") from exc
        except (OSError, EOFError, TimeoutError) as exc:
            await self._drop()
            raise ClickHouseUnavailable(f"{type(exc).__name__}: {exc}") from exc
        except (asyncio.CancelledError, InsertWithdrawn):
            await self._drop()
            raise

    async def query(self, sql: str) -> list[tuple[Any, ...]]:
        rows: list[tuple[Any, ...]] = await self._run(sql)
        return rows

    async def execute(self, sql: str, settings: Mapping[str, Any] | None = None) -> None:
        await self._run(sql, settings=dict(settings) if settings else None)

    async def insert_columns(
        self,
        table: str,
        columns: Sequence[str],
        data: Sequence[Sequence[Any]] | None = None,
        settings: Mapping[str, Any] | None = None,
        *,
        prepare: Callable[[], Sequence[Sequence[Any]] | None] | None = None,
        query_id: str = "",
    ) -> int:
        """One INSERT of one columnar block.

        With `prepare`, the block is built only after the server accepted the query and
        answered with the table's structure, right before the rows are sent: `prepare`
        returns the columns, or None to withdraw (the connection is dropped before any row
        is sent, so the server writes nothing; raises `InsertWithdrawn`). That round trip can
        take long; a caller that must not send rows after losing the right to (a frozen
        process, a moved partition) decides at the last moment.
        """
        sql = f"INSERT INTO {self.table(table)} ({', '.join(columns)}) VALUES"
        if prepare is None:
            if data is None:
                raise ValueError("insert_columns: data or prepare")
            block = data
            prepare = lambda: block  # noqa: E731
        conn = await self._connection()
        inserted: int = await self._guard(
            _insert_stepwise(conn, sql, prepare, dict(settings or {}), query_id)
        )
        return inserted

    async def features(self) -> ServerFeatures:
        rows = await self.query("SELECT version()")
        return ServerFeatures(parse_version(str(rows[0][0])))

    async def ping(self) -> None:
        await self.query("SELECT 1")

    async def close(self) -> None:
        await self._drop()


async def _insert_stepwise(
    conn: Any,  # the driver's Connection; its stepwise methods carry no annotations
    sql: str,
    prepare: Callable[[], Sequence[Sequence[Any]] | None],
    settings: dict[str, Any],
    query_id: str,
) -> int:
    """The driver's INSERT, step by step: query, sample block, `prepare()`, rows, end."""
    async with ExecuteContext(conn, sql, settings):
        await conn.send_query(sql, query_id=query_id)
        await conn.send_external_tables(None)
        sample = await conn.receive_sample_block()
        data = prepare()
        if data is None:
            raise InsertWithdrawn
        inserted = await _send_columns(conn, sample.columns_with_types, data)
        packet = await conn._receive_packet()  # the driver's own end-of-insert read
        if packet.exception:
            raise packet.exception
        return inserted


async def _send_columns(
    conn: Any, columns_with_types: Sequence[tuple[str, str]], data: Sequence[Sequence[Any]]
) -> int:
    """The driver's `send_data` for one columnar block, with String columns encoded here
    (`string_column`, several times faster than the driver's per-value loop); every other
    type is written by the driver. Through the driver's block writer, so its compression
    applies. Then the empty block that ends the data."""
    if len(data) != len(columns_with_types):
        raise ValueError(f"expected {len(columns_with_types)} columns, got {len(data)}")
    rows = len(data[0]) if data else 0
    if any(len(column) != rows for column in data):
        raise ValueError("columns of different lengths")
    revision = conn.server_info.revision
    await conn.writer.write_varint(ClientPacket.DATA)
    if revision >= native.DBMS_MIN_REVISION_WITH_TEMPORARY_TABLES:
        await conn.writer.write_str("")  # no table name: the query's table
    block_writer = conn.block_writer
    out = block_writer.writer
    if revision >= native.DBMS_MIN_REVISION_WITH_BLOCK_INFO:
        await BlockInfo().write(out)  # type: ignore[no-untyped-call]
    await out.write_varint(len(data))
    await out.write_varint(rows)
    for (name, type_), items in zip(columns_with_types, data, strict=True):
        await out.write_str(name)
        await out.write_str(type_)
        if type_ == "String":
            await out.write_bytes(string_column(items))
        else:
            # The driver's column writers may replace values in place: give them a list.
            await write_column(  # type: ignore[no-untyped-call]
                block_writer.reader, out, block_writer.context, name, type_, list(items)
            )
    await block_writer.finalize()
    await conn.send_block(ColumnOrientedBlock())  # type: ignore[no-untyped-call]
    return rows


def _varint(n: int) -> bytes:
    """Unsigned LEB128, the native protocol's length prefix."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_VARINTS = [_varint(n) for n in range(1 << 14)]
"""Every one- and two-byte length prefix, made once."""
_VARINT_TEXT = [v.decode("latin-1") for v in _VARINTS]
"""The same prefixes as text, one char per byte (latin-1 encodes each char as its byte)."""


def _framed(value: str) -> bytes:
    raw = value.encode()
    return (_VARINTS[len(raw)] if len(raw) < len(_VARINTS) else _varint(len(raw))) + raw


def string_column(values: Sequence[str]) -> bytes:
    """A String column in the native format: each value's UTF-8 length (LEB128), then its
    bytes. A column of repeating values (namespaces, types, topics) frames each distinct
    value once; otherwise all values are framed in C-level passes, not one call per value."""
    distinct = set(values)
    if len(distinct) * 2 <= len(values):
        framed = {v: _framed(v) for v in distinct}
        return b"".join(map(framed.__getitem__, values))
    lengths = list(map(len, values))
    if max(lengths, default=0) < len(_VARINTS) and all(map(str.isascii, values)):
        # ASCII values (ids, most JSON): a value's length is its byte count; the column is
        # framed as text and encoded once, not value by value.
        text = [""] * (2 * len(values))
        text[0::2] = map(_VARINT_TEXT.__getitem__, lengths)
        text[1::2] = values
        return "".join(text).encode("latin-1")
    encoded = list(map(str.encode, values))
    sizes = list(map(len, encoded))
    if max(sizes, default=0) < len(_VARINTS):
        prefixes: Any = map(_VARINTS.__getitem__, sizes)
    else:
        prefixes = map(_varint, sizes)
    parts = [b""] * (2 * len(encoded))
    parts[0::2] = prefixes
    parts[1::2] = encoded
    return b"".join(parts)


class Schema:
    """DDL for the raw events table, the landed-offsets table and the view between them."""

    def __init__(
        self, ch: ClickHouse, features: ServerFeatures, events_table: str, offsets_table: str
    ) -> None:
        self.ch = ch
        self.features = features
        self.events_table = events_table
        self.offsets_table = offsets_table

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

    def statements(self) -> list[str]:
        events = self.ch.table(self.events_table)
        offsets = self.ch.table(self.offsets_table)
        view = self.ch.table(self.offsets_view)
        lc_string = self._lc("String")
        return [
            f"CREATE DATABASE IF NOT EXISTS `{self.ch.database}`",
            f"""CREATE TABLE IF NOT EXISTS {events} (
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
) ENGINE = MergeTree()
PARTITION BY toYYYYMM(time)
ORDER BY (namespace, type, subject, time, _topic, _partition, _offset)""",
            f"""CREATE TABLE IF NOT EXISTS {offsets} (
    topic String,
    kafka_partition UInt32,
    landed_offset UInt64,
    updated_at DateTime('UTC') DEFAULT now()
) ENGINE = ReplacingMergeTree(landed_offset)
ORDER BY (topic, kafka_partition)""",
            f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {view} TO {offsets} AS
SELECT toString(_topic) AS topic, toUInt32(_partition) AS kafka_partition,
    toUInt64(max(_offset)) AS landed_offset, now() AS updated_at
FROM {events}
GROUP BY _topic, _partition""",
            # Incarnations of each topic name, by Kafka topic id (see sink.topics).
            f"""CREATE TABLE IF NOT EXISTS {self.ch.table(self.topics_table)} (
    topic String,
    topic_id String,
    storage_key String,
    seen_at DateTime('UTC') DEFAULT now()
) ENGINE = ReplacingMergeTree()
ORDER BY (topic, topic_id)""",
        ]

    async def apply(self) -> list[str]:
        """Create what is missing; returns the statements run (all idempotent)."""
        done = []
        for sql in self.statements():
            await self.ch.execute(sql)
            done.append(sql)
        return done


def topics_table(offsets_table: str) -> str:
    return f"{offsets_table}_topics"


class StorageKeys(Protocol):
    """Kafka topic name <-> the name rows and offsets are stored under (`sink.topics`)."""

    def key(self, name: str) -> str: ...

    def name(self, key: str) -> str: ...


class PlainNames:
    """Every topic stored under its own name."""

    def key(self, name: str) -> str:
        return name

    def name(self, key: str) -> str:
        return key


class OffsetStore:
    """Reads and writes landed offsets in ClickHouse, the source of truth for what landed.
    Takes and returns Kafka topic names; stores under their storage keys."""

    def __init__(self, ch: ClickHouse, offsets_table: str, keys: StorageKeys | None = None) -> None:
        self.ch = ch
        self.table = offsets_table
        self.keys = keys or PlainNames()

    async def landed(self, topics: Sequence[str]) -> dict[tuple[str, int], int]:
        if not topics:
            return {}
        names = ", ".join(quote(self.keys.key(t)) for t in sorted(set(topics)))
        rows = await self.ch.query(
            f"SELECT topic, kafka_partition, max(landed_offset) FROM {self.ch.table(self.table)} "
            f"WHERE topic IN ({names}) GROUP BY topic, kafka_partition"
        )
        return {(self.keys.name(str(t)), int(p)): int(o) for t, p, o in rows}

    async def present(
        self,
        events_table: str,
        ranges: Mapping[tuple[str, int], tuple[int, int]],
        time_bounds: tuple[int, int],
    ) -> set[tuple[str, int, int]]:
        """Coordinates within `ranges` that are already in the raw table. Bounded by the
        rows' event time (epoch seconds) so only the months concerned are read."""
        if not ranges:
            return set()
        key = self.keys.key
        which = " OR ".join(
            f"(_topic = {quote(key(t))} AND _partition = {p} "
            f"AND _offset BETWEEN {first} AND {last})"
            for (t, p), (first, last) in sorted(ranges.items())
        )
        low, high = time_bounds
        rows = await self.ch.query(
            f"SELECT _topic, _partition, _offset FROM {self.ch.table(events_table)} "
            f"WHERE time >= toDateTime({int(low)}) AND time < toDateTime({int(high) + 1}) "
            f"AND ({which})"
        )
        return {(self.keys.name(str(t)), int(p), int(o)) for t, p, o in rows}

    async def record(self, landed: Mapping[tuple[str, int], int]) -> None:
        """Write offsets of ranges that produced no raw rows (duplicates, dead letters)."""
        if not landed:
            return
        items = sorted(landed.items())
        data: list[list[Any]] = [
            [self.keys.key(t) for (t, _), _ in items],
            [p for (_, p), _ in items],
            [o for _, o in items],
        ]
        await self.ch.insert_columns(self.table, OFFSET_COLUMNS, data)


_ITEM_FIELDS = len(Event._fields)  # sink.batch.Item is sink.decode.Event


def event_columns(
    items: Sequence[Any], time_divisor: int, keys: StorageKeys | None = None
) -> list[Sequence[Any]]:
    """Columnar block for EVENT_COLUMNS from batch items (`sink.batch.Item`); `_topic` is
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
