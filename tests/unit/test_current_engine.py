"""The SQL sink emits for current ClickHouse servers, run by a current engine: chDB embeds one
in-process (no server, no native protocol, the same SQL).

The real migrations make the tables and meters (a first half of the events landed before the
meters existed and is backfilled, the second half is counted by the views), rows go in as the
worker builds them (`decode`, then `event_columns`: `data` as compact JSON text, times as
integers in the column's unit), and every usage query equals the same aggregation computed in
Python: every aggregation, window and time zone, nested property paths, and events a meter
cannot read. The server-only parts are left out because an embedded engine has no cluster:
`ON CLUSTER`, Replicated engines (ZooKeeper) and Distributed tables; the 18.16 cluster tests
cover those.
"""

from __future__ import annotations

import math
import random
import re
import struct
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast
from zoneinfo import ZoneInfo

import orjson
import pytest

from sink.errors import ClickHouseUnavailable
from sink.metering import usage
from sink.metering.meter_sql import json_number
from sink.metering.meters import Meter, MeterIndex, group_value, lookup, path
from sink.metering.migrations import Migrator
from sink.pipeline.decode import Event, decode
from sink.stores.clickhouse.connection import ClickHouse
from sink.stores.clickhouse.schema import EVENT_COLUMNS, event_columns, time_divisor
from sink.stores.clickhouse.sql import ServerFeatures, parse_version, quote

chdb_session = pytest.importorskip("chdb.session")

_CODE = re.compile(r"Code: (\d+)")


class Engine:
    """What the migrations, the usage queries and the worker's insert path use of a
    `ClickHouse` connection, answered by a chDB session on one database."""

    def __init__(self, session: Any, database: str) -> None:
        self.session = session
        self.database = database

    def table(self, name: str) -> str:
        return f"`{self.database}`.`{name}`"

    def run(self, sql: str, fmt: str = "JSONCompact") -> bytes:
        try:
            return bytes(self.session.query(sql, fmt).bytes())
        except RuntimeError as exc:  # chDB's error carries the server's code and message
            found = _CODE.search(str(exc))
            code = found.group(1) if found else "?"
            raise ClickHouseUnavailable(f"server error {code}: {exc}") from exc

    async def query(self, sql: str) -> list[tuple[Any, ...]]:
        out = self.run(sql)
        return [tuple(row) for row in orjson.loads(out)["data"]] if out.strip() else []

    async def execute(self, sql: str, settings: Mapping[str, Any] | None = None) -> None:
        if settings:
            sql += " SETTINGS " + ", ".join(f"{k} = {v!r}" for k, v in settings.items())
        self.run(sql)

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
        """One INSERT of one columnar block. Time columns take integers as the native protocol
        sends them: DateTime64(3) milliseconds, DateTime seconds."""
        block = prepare() if prepare is not None else data
        assert block is not None
        types = dict(
            await self.query(
                "SELECT name, type FROM system.columns WHERE database = "
                f"{quote(self.database)} AND table = {quote(table)}"
            )
        )
        structure, select = [], []
        for name in columns:
            kind = str(types[name])
            if kind.startswith("DateTime64(3"):
                structure.append(f"`{name}` Int64")
                select.append(f"fromUnixTimestamp64Milli(`{name}`, 'UTC')")
            elif kind.startswith("DateTime"):
                structure.append(f"`{name}` UInt32")
                select.append(f"toDateTime(`{name}`, 'UTC')")
            else:
                structure.append(f"`{name}` {kind}")
                select.append(f"`{name}`")
        rows = "\n".join(orjson.dumps(list(row)).decode() for row in zip(*block, strict=True))
        await self.execute(
            f"INSERT INTO {self.table(table)} ({', '.join(columns)}) SELECT {', '.join(select)} "
            f"FROM format(JSONCompactEachRow, {quote(', '.join(structure))}, {quote(rows)})",
            settings,
        )
        return len(block[0]) if block else 0

    async def features(self) -> ServerFeatures:
        [(version,)] = await self.query("SELECT version()")
        return ServerFeatures(parse_version(str(version)))

    async def close(self) -> None:
        pass

    def as_clickhouse(self) -> ClickHouse:
        """This engine where a `ClickHouse` is asked for: it has every method those use."""
        return cast(ClickHouse, self)


# --- events -------------------------------------------------------------------------------

BASE = datetime(2026, 1, 31, 21, 0, tzinfo=UTC)  # minutes, hours, days and a month end
DST = datetime(2026, 3, 28, 23, 0, tzinfo=UTC)  # and the night Europe moves its clocks
NAMESPACES = ("acme", "beta")
TOPIC = "om_events"
NESTED = 999_999
"""A number under a name a meter reads, at a depth it does not read: were it read, it would
show in the results."""
# Group values: strings that need escaping, and numbers whose JSON text a server may write
# differently from the worker's serialiser.
GROUPS: list[Any] = [
    "small",
    "large",
    'q"uote',
    "back\\",
    "日本",
    "tab\t",
    "ctl\x01",
    7,
    7.0,
    -0.0,
    0.1,
    1e-6,
    2.5e-5,
    1e16,
    1.5e300,
    2**63 + 1,
    True,
    None,
    {"tokens": NESTED, "model": "nested"},
    ["nested", 1],
]
# Values of UNIQUE_COUNT: the same number written as an integer and as a float is two values
# of the stored text.
USERS: list[Any] = ["u1", "u2", "u3", 'u"4', 1, 1.0, 1e16, 2.5, -0.0, 0.0, True, 12345678901]
ROUTES: list[Any] = ["/a", "/b", 3, None]

METERS: list[dict[str, Any]] = [
    {
        "slug": "calls",
        "event_type": "call",
        "aggregation": "COUNT",
        "group_by": {"route": "request.route"},
    },
    {
        "slug": "tokens",
        "event_type": "tokens",
        "aggregation": "SUM",
        "value_property": "usage.tokens",
        "group_by": {"model": "model", "region": "meta.where.region"},
    },
    {
        "slug": "low",
        "event_type": "tokens",
        "aggregation": "MIN",
        "value_property": "usage.tokens",
        "group_by": {"model": "model"},
    },
    {"slug": "high", "event_type": "tokens", "aggregation": "MAX", "value_property": "tokens"},
    {
        "slug": "mean",
        "event_type": "tokens",
        "aggregation": "AVG",
        "value_property": "usage.tokens",
        "group_by": {"model": "model"},
    },
    {
        "slug": "users",
        "event_type": "call",
        "aggregation": "UNIQUE_COUNT",
        "value_property": "user.id",
        "group_by": {"route": "request.route"},
    },
    {
        "slug": "gauge",
        "event_type": "level",
        "aggregation": "LATEST",
        "value_property": "level.v",
        "group_by": {"tier": "tier"},
    },
]


def data_of(kind: str, rng: random.Random) -> dict[str, Any]:
    """Event data in the producer's member order: nested properties, decoys of the metered
    names at other depths and inside strings, and values a meter cannot read."""
    n = rng.randrange(1, 500)
    if kind == "call":
        data: dict[str, Any] = {"route": "decoy", "id": NESTED}
        if rng.random() < 0.9:
            data["request"] = {"route": rng.choice(ROUTES), "user": {"id": "decoy"}}
        if rng.random() < 0.9:
            data["user"] = {"id": rng.choice([*USERS, [1], {"id": 1}, None])}
        return data
    if kind == "tokens":
        tokens = rng.choice(
            [n, n, n, n / 4, -n, 2**64 - 1, "lots", None, [n], {"tokens": NESTED}, True]
        )
        data = {"note": f'x","usage":{{"tokens":{NESTED}}},"y":"', "model": rng.choice(GROUPS)}
        if rng.random() < 0.95:
            data["usage"] = {"tokens": tokens, "model": "nested"}
        if rng.random() < 0.8:
            data["tokens"] = rng.choice([n, n * 2, "lots"])
        if rng.random() < 0.9:
            data["meta"] = {"where": {"region": rng.choice(["eu", "us", 3.0, None, {"x": 1}])}}
        return data
    level = rng.choice([n / 4, n, "high", None, False])
    return {"tier": rng.choice(["gold", "free", 2]), "level": {"v": level, "w": NESTED}}


def generate(count: int, seed: int, start: int = 0) -> list[dict[str, Any]]:
    """Events at distinct seconds (LATEST is then unambiguous), around a month end and a
    daylight saving change, in two namespaces."""
    rng = random.Random(seed)
    events = []
    for i in range(start, start + count):
        kind = rng.choice(["call", "tokens", "level"])
        base = BASE if i % 2 else DST
        events.append(
            {
                "specversion": "1.0",
                "id": f"e{seed}-{i}",
                "source": "engine-test",
                "type": kind,
                "subject": rng.choice(["s1", "s2", "s3"]),
                "time": (base + timedelta(seconds=7 * i)).isoformat().replace("+00:00", "Z"),
                "data": data_of(kind, rng),
                "_ns": NAMESPACES[i % 3 == 0],
            }
        )
    return events


def as_items(events: list[dict[str, Any]], meters: Sequence[Meter], first: int) -> list[Event]:
    """Batch items as the worker's decoder makes them, with the meters it knows."""
    check = MeterIndex(meters).check
    items = []
    for offset, e in enumerate(events, start=first):
        body = orjson.dumps({k: v for k, v in e.items() if k != "_ns"})
        item = decode(body, e["_ns"], 1 << 20, check, TOPIC, offset % 2, offset, 1_780_000_000_000)
        assert isinstance(item, Event), item
        items.append(item)
    return items


async def land(db: Engine, items: list[Event], rows: int = 300) -> None:
    """The worker's inserts: one columnar block per batch."""
    divisor = await time_divisor(db, "events")
    for i in range(0, len(items), rows):
        block = event_columns(items[i : i + rows], divisor)
        await db.insert_columns("events", EVENT_COLUMNS, block)


# --- the Python computation ------------------------------------------------------------------


def window_start(at: datetime, window: str) -> datetime:
    return {
        "MINUTE": at.replace(second=0, microsecond=0),
        "HOUR": at.replace(minute=0, second=0, microsecond=0),
        "DAY": at.replace(hour=0, minute=0, second=0, microsecond=0),
        "MONTH": at.replace(day=1, hour=0, minute=0, second=0, microsecond=0),
    }[window]


def expected(
    events: list[dict[str, Any]],
    meter: Meter,
    window: str | None,
    tz: str,
    group_by: Sequence[str],
    merged: bool = False,
    made_by: ServerFeatures | None = None,
) -> dict[tuple[Any, ...], float]:
    """The meter's usage from the events as the worker's check reads them: per window start
    (epoch seconds; None for the whole period), namespace and group. A meter made by a server
    without JSONExtract (`made_by`) reads an object or array group value as missing."""
    flat = made_by is not None and not made_by.json_extract
    readable = MeterIndex([meter]).check
    zone = ZoneInfo(tz)
    cells: dict[tuple[Any, ...], list[tuple[datetime, Any]]] = defaultdict(list)
    for e in events:
        if e["type"] != meter.event_type or readable(e["type"], e["data"]):
            continue
        at = datetime.fromisoformat(e["time"]).astimezone(zone)
        key: list[Any] = [None if window is None else int(window_start(at, window).timestamp())]
        key.append(usage.ALL_NAMESPACES if merged else e["_ns"])
        for g in group_by:
            if g == "subject":
                key.append(e["subject"])
            else:
                found = lookup(e["data"], path(meter.group_by[g]))
                key.append("" if flat and isinstance(found, dict | list) else group_value(found))
        value = lookup(e["data"], path(meter.value_property)) if meter.value_property else None
        cells[tuple(key)].append((at, value))
    return {key: aggregate(meter.aggregation, values) for key, values in cells.items()}


def aggregate(aggregation: str, values: list[tuple[datetime, Any]]) -> float:
    numbers = [v for _, v in values]
    if aggregation == "COUNT":
        return len(values)
    if aggregation == "SUM":
        return sum(numbers)
    if aggregation == "MIN":
        return min(numbers)
    if aggregation == "MAX":
        return max(numbers)
    if aggregation == "AVG":
        return sum(numbers) / len(numbers)
    if aggregation == "UNIQUE_COUNT":
        return len({orjson.dumps(v) for v in numbers})
    return float(max(values, key=lambda p: p[0])[1])  # LATEST


def observed(
    rows: list[usage.UsageRow], group_by: Sequence[str], whole: bool = False
) -> dict[tuple[Any, ...], float]:
    out = {}
    for r in rows:
        key: list[Any] = [None if whole else int(r.window_start.timestamp()), r.namespace]
        key += [r.subject if g == "subject" else r.groups[g] for g in group_by]
        out[tuple(key)] = r.value
    return out


def assert_same(got: dict[Any, float], want: dict[Any, float], case: Any) -> None:
    assert want, case
    assert got.keys() == want.keys(), (case, sorted(set(got) ^ set(want), key=str)[:5])
    for key, value in want.items():
        assert math.isclose(got[key], value, rel_tol=1e-12), (case, key, got[key], value)


# --- the engine, migrated and landed ---------------------------------------------------------


@dataclass(frozen=True)
class Landed:
    """A database the real migrations made, and the events landed in it."""

    db: Engine
    features: ServerFeatures
    events: list[dict[str, Any]]


def migrator(db: Engine, features: ServerFeatures, meters: Sequence[Meter]) -> Migrator:
    return Migrator(
        db.as_clickhouse(),
        features,
        "events",
        "sink_offsets",
        meters,
        connect=db.as_clickhouse,
        owner="engine-test",
        # chDB answers synchronously, so the lease's renewals wait for the migration's own
        # statements: a lease that outlasts the migration keeps a slow machine from losing it.
        lease_timeout=600,
        piece_rows=100,  # several pieces per month, and split minutes (see `burst`)
        cutoff_margin=1,
    )


def burst(count: int) -> list[dict[str, Any]]:
    """More events in one minute than a backfill piece holds: the minute is split by id."""
    rng = random.Random(5)
    at = BASE + timedelta(minutes=5, seconds=0.25)
    return [
        {
            "specversion": "1.0",
            "id": f"burst-{i}",
            "source": "engine-test",
            "type": "tokens",
            "subject": "s1",
            "time": (at + timedelta(milliseconds=401 * i)).isoformat().replace("+00:00", "Z"),
            "data": data_of("tokens", rng),
            "_ns": "acme",
        }
        for i in range(count)
    ]


async def migrate_and_land(db: Engine, features: ServerFeatures) -> list[dict[str, Any]]:
    """Half the events land before the meters exist (by a worker that knows none: nothing
    checked them) and are backfilled; the rest land afterwards and go through the views."""
    meters = [Meter.model_validate(m) for m in METERS]
    events = generate(1200, seed=1)
    before, after = events[::2] + burst(120), events[1::2]
    assert await migrator(db, features, []).run() is not None
    await land(db, as_items(before, [], 0))
    done = await migrator(db, features, meters).run()
    assert done == [f"meter:{m.slug}" for m in meters]
    await land(db, as_items(after, meters, len(before)))
    return before + after


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    sess = chdb_session.Session(str(tmp_path_factory.mktemp("chdb") / "db"))
    sess.query("SET output_format_json_quote_64bit_integers = 0")
    yield sess
    sess.close()


@pytest.fixture(scope="module")
async def current(session: Any) -> Landed:
    db = Engine(session, "sink")
    features = await db.features()
    assert features.json_extract and features.datetime64 and features.low_cardinality
    return Landed(db, features, await migrate_and_land(db, features))


# --- tests -------------------------------------------------------------------------------------

WINDOWS: tuple[usage.Window, ...] = ("MINUTE", "HOUR", "DAY", "MONTH")
ZONES = ("UTC", "Asia/Kathmandu", "Europe/Paris")


async def test_the_engine_is_a_current_server(current: Landed) -> None:
    assert current.features.version >= (24, 8)
    [(kind,)] = await current.db.query(
        "SELECT type FROM system.columns WHERE database = 'sink' AND table = 'events' "
        "AND name = 'time'"
    )
    assert kind == "DateTime64(3, 'UTC')"


async def test_every_aggregation_matches_python_for_every_window_zone_and_grouping(
    current: Landed,
) -> None:
    for spec in METERS:
        meter = Meter.model_validate(spec)
        groupings = [[], ["subject", *meter.group_by]]
        if meter.group_by:
            groupings.append([*meter.group_by])
        for window in WINDOWS:
            for tz in ZONES if window != "MINUTE" else ZONES[:1]:  # every offset is in minutes
                for group_by in groupings:
                    rows = await usage.query(
                        current.db.as_clickhouse(),
                        meter,
                        window=window,
                        tz=tz,
                        group_by=group_by,
                        features=current.features,
                    )
                    want = expected(current.events, meter, window, tz, group_by)
                    assert_same(observed(rows, group_by), want, (meter.slug, window, tz, group_by))


async def test_whole_periods_merged_namespaces_filters_and_subjects_match_python(
    current: Landed,
) -> None:
    meter = Meter.model_validate(METERS[1])
    start, end = BASE + timedelta(minutes=30), DST + timedelta(hours=2)
    inside = [e for e in current.events if start <= datetime.fromisoformat(e["time"]) < end]
    for merged in (False, True):
        for group_by in ([], ["model"], ["subject", "region"]):
            rows = await usage.query(
                current.db.as_clickhouse(),
                meter,
                start=start,
                end=end,
                window=None,
                group_by=group_by,
                merge_namespaces=merged,
                features=current.features,
            )
            want = expected(inside, meter, None, "UTC", group_by, merged)
            assert_same(observed(rows, group_by, whole=True), want, (merged, group_by))
            assert {(r.window_start, r.window_end) for r in rows} == {(start, end)}
    rows = await usage.query(
        current.db.as_clickhouse(),
        meter,
        namespace="acme",
        subjects=["s1", "s2"],
        window="DAY",
        tz="Europe/Paris",
        group_by=["model"],
        filters={"region": "eu"},
        features=current.features,
    )
    chosen = [
        e
        for e in current.events
        if e["_ns"] == "acme"
        and e["subject"] in ("s1", "s2")
        and lookup(e["data"], ("meta", "where", "region")) == "eu"
    ]
    assert_same(
        observed(rows, ["model"]),
        expected(chosen, meter, "DAY", "Europe/Paris", ["model"]),
        "filtered",
    )


async def test_the_offsets_view_holds_each_partitions_last_landed_offset(current: Landed) -> None:
    rows = await current.db.query(
        "SELECT topic, kafka_partition, max(landed_offset) "
        f"FROM {current.db.table('sink_offsets')} GROUP BY topic, kafka_partition "
        "ORDER BY kafka_partition"
    )
    landed = len(current.events)  # offsets 0, 1, ... alternate between partitions 0 and 1
    assert rows == [(TOPIC, p, max(range(p, landed, 2))) for p in (0, 1)]
    assert await time_divisor(current.db, "events") == 1


def test_numbers_read_back_as_the_worker_wrote_them(session: Any) -> None:
    """`json_number` against orjson for doubles of every magnitude, and bit patterns."""
    rng = random.Random(7)
    values = [0.0, -0.0, 7.0, 0.1, 1e-5, 1e-6, 1e15, 1e16, 2.0**53, 5e-324, 1.7976931348623157e308]
    while len(values) < 2000:
        draw = rng.random()
        if draw < 0.4:
            value = struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0]
        elif draw < 0.7:
            value = rng.uniform(-1, 1) * 10.0 ** rng.randint(-12, 20)
        else:
            value = float(rng.randint(-(10**6), 10**6)) * 10.0 ** rng.randint(-8, 18)
        if math.isfinite(value):
            values.append(value)
    texts = ", ".join(quote(orjson.dumps({"k": v}).decode()) for v in values)
    number = json_number("JSONExtractFloat(text, 'k')")
    out = session.query(f"SELECT arrayMap(text -> {number}, [{texts}])", "JSONCompact").bytes()
    [[got]] = orjson.loads(out)["data"]
    assert got == [orjson.dumps(v).decode() for v in values]


# --- a database made on 18.16, on a current server --------------------------------------------

OLD = ServerFeatures((18, 16, 1))
TOP_LEVEL: list[dict[str, Any]] = [
    {
        "slug": "top_tokens",
        "event_type": "tokens",
        "aggregation": "SUM",
        "value_property": "tokens",
        "group_by": {"model": "model"},
    },
    {"slug": "top_calls", "event_type": "call", "aggregation": "COUNT", "group_by": {"id": "id"}},
    {"slug": "top_tier", "event_type": "level", "aggregation": "LATEST", "value_property": "tier"},
]
UPGRADE_ADDS = [m for m in METERS if m["slug"] in ("tokens", "users", "gauge")]
"""Meters added after the upgrade; LATEST's state holds the time in the current type."""


@pytest.fixture(scope="module")
async def upgraded(session: Any) -> Landed:
    """Tables and meters made by 18.16's SQL (DateTime in seconds, regular expressions for
    properties) and half the events landed; then the server is current: more meters are added
    by its SQL (and backfilled from rows in seconds), and the rest of the events land through
    both kinds of view."""
    db = Engine(session, "upgraded")
    features = await db.features()
    first = [Meter.model_validate(m) for m in TOP_LEVEL]
    added = [Meter.model_validate(m) for m in UPGRADE_ADDS]
    every = first + added
    events = generate(400, seed=2)
    assert await migrator(db, OLD, first).run() == [
        "0001_events:events",
        "0002_offsets:sink_offsets",
        "0003_topics:sink_offsets",
        *(f"meter:{m.slug}" for m in first),
    ]
    await land(db, as_items(events[:200], first, 0))
    assert await migrator(db, features, every).run() == [f"meter:{m.slug}" for m in added]
    await land(db, as_items(events[200:], every, 200))
    return Landed(db, features, events)


async def test_a_database_made_on_18_16_counts_alike_on_a_current_server(upgraded: Landed) -> None:
    assert await time_divisor(upgraded.db, "events") == 1000
    for spec in TOP_LEVEL + UPGRADE_ADDS:
        meter = Meter.model_validate(spec)
        made_by = OLD if spec in TOP_LEVEL else upgraded.features
        for window, tz in (("MINUTE", "UTC"), ("HOUR", "Asia/Kathmandu"), ("MONTH", "UTC")):
            group_by = ["subject", *meter.group_by]
            rows = await usage.query(
                upgraded.db.as_clickhouse(),
                meter,
                window=window,
                tz=tz,
                group_by=group_by,
                features=upgraded.features,
            )
            want = expected(upgraded.events, meter, window, tz, group_by, made_by=made_by)
            assert_same(observed(rows, group_by), want, (meter.slug, window, tz))
