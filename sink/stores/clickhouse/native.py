"""The native protocol's INSERT, step by step, and the String column encoder.

The driver's INSERT path is taken apart here so a caller can decide at the last moment,
after the server answered with the table's structure, whether rows may still be sent
(`ClickHouse.insert_columns(prepare=...)`), and so String columns are framed in C-level
passes rather than one driver call per value.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from asynch.proto import constants as native
from asynch.proto.block import BlockInfo, ColumnOrientedBlock
from asynch.proto.columns import write_column
from asynch.proto.context import ExecuteContext
from asynch.proto.protocol import ClientPacket


class InsertWithdrawn(Exception):
    """`insert_columns(prepare=...)` was told not to send the rows: nothing was written."""


async def insert_stepwise(
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
