"""One ClickHouse connection over the native protocol: timeouts, reconnects, and the
classification of failures into retriable (`ClickHouseUnavailable`) and refused rows
(`ClickHouseRejected`)."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

from asynch.errors import ClickHouseException, ColumnException, ServerException
from asynch.proto.connection import Connection as NativeConnection
from asynch.proto.utils.dsn import parse_dsn

from sink.errors import ClickHouseRejected, ClickHouseUnavailable, ConfigError
from sink.stores.clickhouse.native import InsertWithdrawn, insert_stepwise
from sink.stores.clickhouse.sql import ServerFeatures, parse_version

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


class Database(Protocol):
    """What reads and writes need of a connection: one server's (`ClickHouse`) or one
    shard's, through whichever replica answers (`sink.stores.clickhouse.shards.Shard`)."""

    database: str

    def table(self, name: str) -> str: ...

    async def query(self, sql: str) -> list[tuple[Any, ...]]: ...

    async def execute(self, sql: str, settings: Mapping[str, Any] | None = None) -> None: ...

    async def insert_columns(
        self,
        table: str,
        columns: Sequence[str],
        data: Sequence[Sequence[Any]] | None = None,
        settings: Mapping[str, Any] | None = None,
        *,
        prepare: Callable[[], Sequence[Sequence[Any]] | None] | None = None,
        query_id: str = "",
    ) -> int: ...


class ClickHouse:
    """One native connection with timeouts, error classification and reconnect on failure.

    A connection serves one query at a time; callers that run concurrently each own one.
    """

    def __init__(
        self,
        url: str,
        *,
        connect_timeout: float,
        query_timeout: float,
        compression: str = "none",
        address: tuple[str, int] | None = None,
    ) -> None:
        """`address` (host, port) replaces the URL's: another node of the same cluster, with
        the URL's user, password, database and options."""
        try:
            params = parse_dsn(url)
        except Exception as exc:  # the driver raises its own DSNError or ValueError
            raise ConfigError(f"clickhouse.url: {exc}") from None
        if address is not None:
            params["host"], params["port"] = address
        self.database: str = params.pop("database", "default")
        params.setdefault("connect_timeout", connect_timeout)
        # `_guard` bounds each query as a whole (query_timeout). The driver's own per-read
        # timeout would put every socket read and drain in a task of its own, each costing
        # turns of the event loop that the poll loop shares; a URL may still set one.
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
            insert_stepwise(conn, sql, prepare, dict(settings or {}), query_id)
        )
        return inserted

    async def features(self) -> ServerFeatures:
        rows = await self.query("SELECT version()")
        return ServerFeatures(parse_version(str(rows[0][0])))

    async def ping(self) -> None:
        await self.query("SELECT 1")

    async def close(self) -> None:
        await self._drop()
