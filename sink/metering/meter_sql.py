"""The SQL of a meter for the connected server: its table, its view, its backfill pieces and
the -Merge that reads it back."""

from __future__ import annotations

import re
from typing import NamedTuple

import orjson

from sink.metering.meters import NUMERIC, Meter, path
from sink.stores.clickhouse.sql import Replication, ServerFeatures, distributed_name, quote

_STATE = {
    "SUM": ("sum", "Float64"),
    "MIN": ("min", "Float64"),
    "MAX": ("max", "Float64"),
    "AVG": ("avg", "Float64"),
    "COUNT": ("count", None),
    "UNIQUE_COUNT": ("uniqExact", "String"),
    "LATEST": ("argMax", "Float64"),
}


# Without JSONExtract (ClickHouse < 20.1) a property is read with re2. In its syntax: a JSON
# string, a bare scalar (number, true, false, null) and a member whose value is either.
_STRING = r'"(?:[^"\\]|\\.)*"'
_BARE = r'[^",{}\[\]]+'
_SCALAR_MEMBER = f"{_STRING}:(?:{_STRING}|{_BARE})"


def json_key(name: str) -> str:
    """A property name as the worker's serialiser writes it between the quotes of a key."""
    return orjson.dumps(name).decode()[1:-1]


def member_pattern(name: str) -> str:
    """An re2 pattern whose group is the top-level member `"name":value` of a stored `data`
    text with the `,` or `}` that ends it, when the value is a scalar; no match otherwise.

    Depth one by construction: from the opening brace the prefix consumes whole scalar members
    only, so the match never starts inside an object, an array or a string, and a nested or
    quoted `"name":` is never read. The worker writes top-level scalars before any object or
    array (`decode.validate`), so every top-level scalar is reachable. The group keeps the
    character that ends the member because 18.16's `visitParamExtractRaw` crashes the server
    on a value that ends its input."""
    key = re.escape(f'"{json_key(name)}":')
    return rf"^\{{(?:{_SCALAR_MEMBER},)*({key}(?:{_STRING}|{_BARE})[,}}])"


class _Member(NamedTuple):
    """SQL that reads one property's member of `data` (`member_pattern`; '' when there is none).
    `defined` is the extraction under an alias, for an expression's first use; `alias` names it
    for the others. Expressions that each define it define one alias of one expression, which
    ClickHouse computes once."""

    defined: str
    alias: str
    key: str
    """The JSON key as an SQL literal: `visitParamExtract*(member, key)` reads the member."""
    start: int
    """Where the value begins in the member (bytes, from 1)."""

    def value(self, first: bool) -> str:
        """The value's JSON text, exactly as the worker wrote it ('' when there is none). Not
        `visitParamExtractRaw`: on 18.16 it returns '' for a string that ends in a backslash."""
        member = self.defined if first else self.alias
        return f"substring({member}, {self.start}, length({self.alias}) - {self.start})"


def _member(name: str) -> _Member:
    key = json_key(name)
    alias = "`member:" + key.replace("\\", "\\\\").replace("`", "\\`") + "`"
    defined = f"(extract(data, {quote(member_pattern(name))}) AS {alias})"
    return _Member(defined, alias, quote(key), len(f'"{key}":'.encode()) + 1)


def json_number(number: str) -> str:
    """SQL: the JSON text the worker's serialiser (orjson) writes for the Float64 `number`, as
    18.16 reads it from the stored text. Current servers write a number of `data` in their own
    notation (`JSONExtractRaw` gives `7` for `7.0`, `1.5e300` for `1.5e+300`), so the text is
    rebuilt from the shortest digits that read back as the number (what `toString` writes, in
    whichever notation): positional from 1e-5 up to 1e16, with `.0` when integral, else
    `d.ddde+n`. Lambdas over one-element arrays name the intermediate values."""
    # p: the magnitude split at its exponent; q: its mantissa split at the point; d: the
    # mantissa's digits; t: d without leading zeros; s: the significant digits; e: the
    # decimal exponent of the first of them.
    zeros = "repeat('0', toUInt32(greatest({}, 0)))".format
    positional = (
        f"if(e >= length(s) - 1, concat(s, {zeros('e + 1 - length(s)')}, '.0'), "
        "if(e >= 0, concat(substring(s, 1, e + 1), '.', substring(s, e + 2)), "
        f"concat('0.', {zeros('-e - 1')}, s)))"
    )
    scientific = (
        "concat(substring(s, 1, 1), if(length(s) > 1, concat('.', substring(s, 2)), ''), "
        "'e', if(e >= 0, '+', '-'), toString(abs(e)))"
    )
    text = f"if(s = '', '0.0', if(e >= -5 AND e < 16, {positional}, {scientific}))"
    exponent = (
        "toInt32OrZero(replaceOne(p[2], '+', '')) + toInt32(length(q[1])) - 1 "
        "- toInt32(length(d)) + toInt32(length(t))"
    )
    rebuilt = (
        f"arrayMap(p -> arrayMap(q -> arrayMap(d -> arrayMap(t -> arrayMap((s, e) -> {text}, "
        f"[replaceRegexpOne(t, '0+$', '')], [{exponent}])[1], "
        "[replaceRegexpOne(d, '^0+', '')])[1], [concat(q[1], q[2])])[1], "
        "[splitByChar('.', p[1])])[1], "
        f"[splitByChar('e', lower(toString(abs({number}))))])[1]"
    )
    return f"concat(if(startsWith(toString({number}), '-'), '-', ''), {rebuilt})"


_VIEW_CUTOFF = re.compile(r"stored_at >= toDateTime\((\d+)\)")


def view_cutoff(create_view: str) -> int | None:
    """The cutoff in a meter view's CREATE statement (as the server shows it): the view
    counts rows stored from then on (`MeterSQL.create_view`)."""
    found = _VIEW_CUTOFF.search(create_view)
    return int(found.group(1)) if found else None


class MeterSQL:
    """SQL of one meter for one server: the table, the view, the backfill and the merge."""

    def __init__(
        self,
        meter: Meter,
        features: ServerFeatures,
        database: str,
        events_table: str,
        replication: Replication | None = None,
    ) -> None:
        """With `replication` (a cluster), the meter's table is Replicated per shard and made
        ON CLUSTER with its view and a Distributed table over it (`table_all`); staging tables
        stay local to the server that backfills."""
        self.meter = meter
        self.features = features
        self.replication = replication
        self.db = database
        self.events = f"`{database}`.`{events_table}`"
        if not features.json_extract:
            for where in self._paths():
                if len(where) > 1:
                    raise ValueError(
                        f"meter {meter.slug}: nested property path {'.'.join(where)!r} needs "
                        "ClickHouse 20.1 or newer (JSONExtract); this server reads top-level "
                        "properties only"
                    )

    def _paths(self) -> list[tuple[str, ...]]:
        found = [path(p) for p in self.meter.group_by.values()]
        if self.meter.value_property:
            found.append(path(self.meter.value_property))
        return found

    @property
    def table(self) -> str:
        return f"`{self.db}`.`{self.meter.table}`"

    @property
    def view(self) -> str:
        return f"`{self.db}`.`{self.meter.view}`"

    @property
    def table_all(self) -> str:
        """Where the meter is read: the Distributed table on a cluster, else the table."""
        if self.replication is None:
            return self.table
        return f"`{self.db}`.`{distributed_name(self.meter.table)}`"

    @property
    def _on(self) -> str:
        return self.replication.on_cluster if self.replication is not None else ""

    def _args(self, where: tuple[str, ...]) -> str:
        return ", ".join(quote(p) for p in where)

    def _number(self, where: tuple[str, ...]) -> str:
        if self.features.json_extract:
            return f"JSONExtractFloat(data, {self._args(where)})"
        member = _member(where[0])
        return f"visitParamExtractFloat({member.defined}, {member.key})"

    def _raw(self, where: tuple[str, ...]) -> str:
        """The value's JSON text: a scalar as the worker wrote it (with JSONExtract a string
        keeps its quotes but takes the server's escapes, which still tells every string
        apart; an object or array is the server's text of it)."""
        if self.features.json_extract:
            args = self._args(where)
            return (
                f"if(JSONType(data, {args}) = 'Double', "
                f"{json_number(f'JSONExtractFloat(data, {args})')}, JSONExtractRaw(data, {args}))"
            )
        return _member(where[0]).value(first=True)

    def _group(self, where: tuple[str, ...]) -> str:
        if self.features.json_extract:
            args = self._args(where)
            return (
                f"if(JSONType(data, {args}) = 'String', JSONExtractString(data, {args}), "
                f"if(JSONType(data, {args}) = 'Null', '', {self._raw(where)}))"
            )
        member = _member(where[0])
        raw = member.value(first=False)
        return (
            f"if(substring({member.defined}, {member.start}, 1) = '\"', "
            f"visitParamExtractString({member.alias}, {member.key}), "
            f"if({raw} = 'null', '', {raw}))"
        )

    def _readable(self) -> str:
        """SQL twin of `MeterIndex.check`: rows stored before the meter existed were never
        checked for it, so the view and the backfill test the value themselves too. Without
        JSONExtract an object or array value reads as '' (`member_pattern`), that is missing."""
        if self.meter.aggregation == "COUNT":
            return "1"
        assert self.meter.value_property
        where = path(self.meter.value_property)
        numeric = self.meter.aggregation in NUMERIC
        if self.features.json_extract:
            kind = f"JSONType(data, {self._args(where)})"
            if numeric:
                return f"{kind} IN ('Int64', 'UInt64', 'Double')"
            return f"{kind} NOT IN ('Null', 'Object', 'Array')"
        raw = self._raw(where)
        if numeric:
            return f"match({raw}, '^-?[0-9]')"
        return f"{raw} NOT IN ('', 'null')"

    def _time_type(self) -> str:
        return "DateTime64(3, 'UTC')" if self.features.datetime64 else "DateTime('UTC')"

    def _time(self) -> str:
        """The event time in the type of the LATEST state: a raw table made on an older server
        keeps `time` in seconds (DateTime) after an upgrade."""
        return "toDateTime64(time, 3, 'UTC')" if self.features.datetime64 else "time"

    def _state_type(self) -> str:
        function, argument = _STATE[self.meter.aggregation]
        if self.meter.aggregation == "LATEST":
            return f"AggregateFunction(argMax, Float64, {self._time_type()})"
        if argument is None:
            return f"AggregateFunction({function})"
        return f"AggregateFunction({function}, {argument})"

    def _state(self) -> str:
        agg = self.meter.aggregation
        if agg == "COUNT":
            return "countState()"
        assert self.meter.value_property
        where = path(self.meter.value_property)
        if agg == "UNIQUE_COUNT":
            return f"uniqExactState({self._raw(where)})"
        if agg == "LATEST":
            return f"argMaxState({self._number(where)}, {self._time()})"
        return f"{_STATE[agg][0]}State({self._number(where)})"

    def merge(self) -> str:
        return f"{_STATE[self.meter.aggregation][0]}Merge(value)"

    @property
    def group_columns(self) -> list[str]:
        return [f"group_{name}" for name in self.meter.group_by]

    def create_table(self, table: str | None = None) -> str:
        """The meter's table (or a staging table of the same shape, for `table`). `_origin` is
        0 for rows the view writes and 1 for the backfill's, and it is part of the partition
        key, so the backfill can swap its own partitions without touching the view's rows."""
        groups = "".join(f"    `{c}` String,\n" for c in self.group_columns)
        order = ", ".join(["namespace", "subject", "window_start", *self.group_columns])
        engine, on = "AggregatingMergeTree()", ""
        if table is None and self.replication is not None:
            engine = self.replication.engine("AggregatingMergeTree", self.meter.table)
            on = self.replication.on_cluster
        return (
            f"CREATE TABLE IF NOT EXISTS {table or self.table}{on} (\n"
            f"    namespace String,\n    subject String,\n    window_start DateTime('UTC'),\n"
            f"{groups}    value {self._state_type()},\n    _origin UInt32\n"
            f") ENGINE = {engine}\n"
            f"PARTITION BY (toYYYYMM(window_start), _origin)\nORDER BY ({order})"
        )

    @property
    def columns(self) -> str:
        """The table's columns in order, for INSERT column lists."""
        groups = "".join(f"`{c}`, " for c in self.group_columns)
        return f"namespace, subject, window_start, {groups}value, _origin"

    def _select(self, where: str, origin: int) -> str:
        groups = "".join(
            f",\n    {self._group(path(p))} AS `group_{name}`"
            for name, p in self.meter.group_by.items()
        )
        keys = ", ".join(
            ["namespace", "subject", "window_start", *(f"`{c}`" for c in self.group_columns)]
        )
        return (
            f"SELECT namespace, subject, toDateTime(toStartOfMinute(time), 'UTC') AS window_start"
            f"{groups},\n    {self._state()} AS value, toUInt32({origin}) AS _origin\n"
            f"FROM {self.events}\n"
            f"WHERE type = {quote(self.meter.event_type)} "
            f"AND position(validation_error, {quote('[' + self.meter.slug + ']')}) = 0 "
            f"AND {self._readable()} AND {where}\nGROUP BY {keys}"
        )

    def create_view(self, cutoff: int) -> str:
        """The view counts rows stored from `cutoff` (epoch seconds) on, as `_origin` 0; the
        backfill counts the rows stored before it, so no row is counted twice or missed."""
        return (
            f"CREATE MATERIALIZED VIEW IF NOT EXISTS {self.view}{self._on} TO {self.table} AS\n"
            + self._select(f"stored_at >= toDateTime({cutoff})", 0)
        )

    def backfill_piece(
        self,
        target: str,
        cutoff: int,
        minutes: tuple[int, int],
        bucket: tuple[int, int],
        origin: int,
    ) -> str:
        """Aggregate into `target`, as `origin`, the rows stored before `cutoff` whose event
        time lies in `minutes` (first, end: epoch minutes) and whose id hashes into `bucket`
        (index, count)."""
        first, end = minutes
        where = (
            f"stored_at < toDateTime({cutoff}) AND time >= toDateTime({first * 60}) "
            f"AND time < toDateTime({end * 60})"
        )
        if bucket[1] > 1:
            where += f" AND cityHash64(id) % {bucket[1]} = {bucket[0]}"
        return f"INSERT INTO {target} ({self.columns})\n" + self._select(where, origin)

    def copy_month(self, target: str, source: str, month: int, origin: int) -> str:
        """Copy one month of `source` (a table of this meter's shape) into `target` as `origin`."""
        groups = "".join(f"`{c}`, " for c in self.group_columns)
        return (
            f"INSERT INTO {target} ({self.columns}) SELECT namespace, subject, window_start, "
            f"{groups}value, toUInt32({origin}) FROM {source} "
            f"WHERE toYYYYMM(window_start) = {month}"
        )

    def create_distributed(self) -> list[str]:
        """On a cluster, the Distributed table the meter is read through."""
        if self.replication is None:
            return []
        return [
            f"CREATE TABLE IF NOT EXISTS {self.table_all}{self._on} AS {self.table} "
            f"ENGINE = Distributed(`{self.replication.cluster}`, `{self.db}`, "
            f"`{self.meter.table}`)"
        ]

    def drop(self) -> list[str]:
        dropped = [self.view, self.table] + ([self.table_all] if self.replication else [])
        return [f"DROP TABLE IF EXISTS {name}{self._on}" for name in dropped]
