"""Pure SQL helpers: version parsing, feature gating, quoting, the columnar event block."""

from __future__ import annotations

import asyncio

import pytest

from sink.pipeline.batch import Item
from sink.pipeline.decode import Event
from sink.stores.clickhouse.connection import ClickHouse
from sink.stores.clickhouse.landed import OFFSET_COLUMNS
from sink.stores.clickhouse.native import string_column
from sink.stores.clickhouse.schema import EVENT_COLUMNS, Schema, event_columns
from sink.stores.clickhouse.sql import ServerFeatures, parse_version, quote
from tests.items import as_item

OLD = ServerFeatures((18, 16, 1))
NEW = ServerFeatures((23, 8, 2))


class StandIn:
    """What Schema.statements() needs of a ClickHouse connection."""

    database = "metering"

    def table(self, name: str) -> str:
        return f"`{self.database}`.`{name}`"


def statements(features: ServerFeatures) -> list[str]:
    schema = Schema(StandIn(), features, "events", "sink_offsets")  # type: ignore[arg-type]
    return schema.statements()


# --- versions -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "version"),
    [
        ("18.16.1", (18, 16, 1)),
        ("23.8.2.7", (23, 8, 2)),
        ("24.3.1.2672", (24, 3, 1)),
        ("25.1", (25, 1)),
        ("21.8.15.7-lts", (21, 8, 15)),
        ("", (0,)),
        ("unknown", (0,)),
    ],
)
def test_parse_version(text: str, version: tuple[int, ...]) -> None:
    assert parse_version(text) == version


@pytest.mark.parametrize(
    ("version", "datetime64", "low_cardinality", "json_extract"),
    [
        ((18, 16, 1), False, False, False),
        ((19, 17, 6), False, False, False),
        ((20, 1), True, True, True),
        ((23, 8, 2), True, True, True),
        ((0,), False, False, False),
    ],
)
def test_server_features(
    version: tuple[int, ...], datetime64: bool, low_cardinality: bool, json_extract: bool
) -> None:
    features = ServerFeatures(version)
    assert features.datetime64 is datetime64
    assert features.low_cardinality is low_cardinality
    assert features.json_extract is json_extract


def test_version_string_to_features() -> None:
    assert not ServerFeatures(parse_version("18.16.1")).datetime64
    assert ServerFeatures(parse_version("23.8.2.7")).json_extract


# --- schema statements ----------------------------------------------------------------------


def test_old_server_gets_only_old_types() -> None:
    sql = "\n".join(statements(OLD))
    assert "DateTime64" not in sql
    assert "LowCardinality" not in sql
    assert "JSONExtract" not in sql
    assert "time DateTime('UTC')" in sql
    assert "ingested_at DateTime('UTC')" in sql
    assert "namespace String" in sql


def test_new_server_gets_new_types() -> None:
    sql = "\n".join(statements(NEW))
    assert "time DateTime64(3, 'UTC')" in sql
    assert "ingested_at DateTime64(3, 'UTC')" in sql
    assert "namespace LowCardinality(String)" in sql
    assert "type LowCardinality(String)" in sql
    assert "_topic LowCardinality(String)" in sql


@pytest.mark.parametrize("features", [OLD, NEW], ids=["18.16", "23.8"])
def test_statements_are_idempotent_and_use_the_database(features: ServerFeatures) -> None:
    sql = statements(features)
    assert sql[0] == "CREATE DATABASE IF NOT EXISTS `metering`"
    assert all("IF NOT EXISTS" in s for s in sql)
    assert "CREATE TABLE IF NOT EXISTS `metering`.`events`" in sql[1]
    assert "CREATE TABLE IF NOT EXISTS `metering`.`sink_offsets`" in sql[2]
    assert "`metering`.`events_to_sink_offsets` TO `metering`.`sink_offsets`" in sql[3]
    assert "FROM `metering`.`events`" in sql[3]


@pytest.mark.parametrize("features", [OLD, NEW], ids=["18.16", "23.8"])
def test_events_table_has_every_inserted_column(features: ServerFeatures) -> None:
    create = statements(features)[1]
    declared = {line.split()[0] for line in create.splitlines()[1:] if line.startswith("    ")}
    assert set(EVENT_COLUMNS) <= declared
    offsets = statements(features)[2]
    assert all(f"    {column} " in offsets for column in OFFSET_COLUMNS)


# --- quoting --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "literal"),
    [
        ("om_acme_events", "'om_acme_events'"),
        ("", "''"),
        ("it's", r"'it\'s'"),
        ("back\\slash", r"'back\\slash'"),
        ("\\'", r"'\\\''"),
        ("x'); DROP TABLE events; --", r"'x\'); DROP TABLE events; --'"),
    ],
)
def test_quote(value: str, literal: str) -> None:
    assert quote(value) == literal


@pytest.mark.parametrize("value", ["a'b", "a\\", "\\", "'", "\\'\\'", "x\\'); --"])
def test_quoted_literal_never_ends_early(value: str) -> None:
    """Reading the literal back like ClickHouse does gives the value and ends at the end."""
    literal = quote(value)
    assert literal[0] == literal[-1] == "'"
    out, i = [], 1
    while literal[i] != "'":
        if literal[i] == "\\":
            i += 1
        out.append(literal[i])
        i += 1
    assert i == len(literal) - 1
    assert "".join(out) == value


# --- event columns --------------------------------------------------------------------------


def item(n: int, time_ms: int, timestamp_ms: int) -> Item:
    data = f'{{"n":{n}}}'
    event = Event(f"ns{n}", f"id{n}", f"type{n}", f"src{n}", f"subj{n}", time_ms, data)
    return as_item(event, f"topic{n}", n, 100 + n, timestamp_ms)


def test_event_columns_order_and_values_with_millisecond_time() -> None:
    items = [item(1, 1_700_000_000_123, 1_700_000_001_456), item(2, 0, 5)]
    columns = event_columns(items, time_divisor=1)
    assert len(columns) == len(EVENT_COLUMNS) == 12
    by_name = {name: list(c) for name, c in zip(EVENT_COLUMNS, columns, strict=True)}
    assert by_name == {
        "namespace": ["ns1", "ns2"],
        "id": ["id1", "id2"],
        "type": ["type1", "type2"],
        "source": ["src1", "src2"],
        "subject": ["subj1", "subj2"],
        "time": [1_700_000_000_123, 0],
        "data": ['{"n":1}', '{"n":2}'],
        "ingested_at": [1_700_000_001_456, 5],
        "validation_error": ["", ""],
        "_topic": ["topic1", "topic2"],
        "_partition": [1, 2],
        "_offset": [101, 102],
    }


def test_event_columns_in_seconds_for_old_servers() -> None:
    columns = event_columns([item(1, 1_700_000_000_999, 1_700_000_001_001)], 1000)
    by_name = {name: list(c) for name, c in zip(EVENT_COLUMNS, columns, strict=True)}
    assert by_name["time"] == [1_700_000_000]
    assert by_name["ingested_at"] == [1_700_000_001]


def test_negative_record_timestamp_becomes_zero() -> None:
    columns = event_columns([item(1, 1000, -1)], 1)
    assert list(dict(zip(EVENT_COLUMNS, columns, strict=True))["ingested_at"]) == [0]


def test_event_columns_of_no_items() -> None:
    assert [list(column) for column in event_columns([], 1)] == [[] for _ in EVENT_COLUMNS]


# --- String columns -------------------------------------------------------------------------


def driver_strings(values: list[str]) -> bytes:
    """The driver's own encoding of a String column, for reference."""
    import asyncio

    from asynch.proto.streams.buffered import BufferedWriter

    writer = BufferedWriter(max_buffer_size=1 << 40)
    asyncio.run(writer.write_strings(values))
    return bytes(writer.buffer)


@pytest.mark.parametrize(
    "values",
    [
        [],
        [""],
        ["acme"] * 10,
        ["a", "", "bb", "", "ccc"],
        ["x" * 127, "y" * 128, "z" * 16_383, "w" * 16_384, "v" * 300_000],
        ["日本語", "€", "😀" * 40, "ascii", "\x00\x01"],
        [f"id-{i}" for i in range(1_000)],
        ["repeat", "repeat", "other", "repeat"] * 50 + ["é" * 200] * 3,
        [f"{i}-" + "a" * n for i, n in enumerate([0, 1, 125, 126, 127, 500, 16_380, 16_381])],
        [f'{{"n":{i}}}' for i in range(100)] + ['{"s":"é"}'] + [f"{i}" for i in range(100)],
        [f"{i}\x7f\x00" for i in range(100)],
    ],
    ids=[
        "empty",
        "one-empty",
        "repeating",
        "short",
        "long",
        "utf8",
        "unique",
        "mixed",
        "unique-ascii-one-and-two-byte-lengths",
        "unique-one-non-ascii",
        "unique-control-chars",
    ],
)
def test_string_column_is_the_native_encoding(values: list[str]) -> None:
    assert string_column(values) == driver_strings(values)


def test_string_column_refuses_what_utf8_cannot_hold() -> None:
    with pytest.raises(UnicodeEncodeError):
        string_column(["ok", "\ud800", "ok"])


@pytest.mark.parametrize(
    ("url", "timeout"),
    [
        ("clickhouse://default:@localhost:9000/metering", None),
        ("clickhouse://default:@localhost:9000/metering?send_receive_timeout=7", 7.0),
    ],
)
def test_driver_reads_and_writes_without_a_timeout_of_their_own(
    url: str, timeout: float | None
) -> None:
    """Each query is bounded as a whole (query_timeout); the driver adds none per read or
    write unless the URL asks for one. (Building the driver's connection does not connect.)"""
    ch = ClickHouse(url, connect_timeout=5, query_timeout=60)
    conn = asyncio.run(ch._connection())
    assert conn.send_receive_timeout == timeout
    assert conn.connect_timeout == 5
