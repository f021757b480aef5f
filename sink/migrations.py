"""Versioned schema migrations, recorded in `schema_migrations`, and meter reconciliation.

- Each migration has a version and a checksum of its SQL (rendered for a canonical server,
  so the checksum names the code's intent, not the server it ran on). A changed checksum of
  an applied migration stops the run with a clear message.
- Concurrent runs are serialised by a lock table: CREATE TABLE without IF NOT EXISTS succeeds
  for one caller only.
- Meters are migrations too (`meter:<slug>`). Adding one creates its table and view and
  backfills the rows that landed before the view existed; the view counts rows stored from a
  cutoff on and the backfill those stored before it, so no row is counted twice.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import structlog

from sink.clickhouse import ClickHouse, Schema, ServerFeatures, quote
from sink.errors import ClickHouseUnavailable, DependencyError, MigrationError
from sink.meters import Meter, MeterSQL

log = structlog.get_logger("sink.migrations")

CANONICAL = ServerFeatures((18, 16))
LOCK_STALE_AFTER = 1800.0
"""A lock older than this (seconds) is taken to belong to a dead process."""
TABLE_EXISTS = 57


class LockHeld(DependencyError):
    """Another process is migrating; waiting is the remedy."""

    dependency = "clickhouse"


@dataclass(frozen=True)
class Migration:
    version: str
    statements: tuple[str, ...]
    checksum: str


class _Names:
    """Stand-in for a connection when rendering SQL for the checksum."""

    def __init__(self, database: str) -> None:
        self.database = database

    def table(self, name: str) -> str:
        return f"`{self.database}`.`{name}`"


def _checksum(statements: Sequence[str]) -> str:
    return hashlib.sha256("\n;\n".join(statements).encode()).hexdigest()[:16]


def core(
    ch: ClickHouse, features: ServerFeatures, events_table: str, offsets_table: str
) -> list[Migration]:
    """The raw table, the landed-offsets table and the view between them."""
    real = Schema(ch, features, events_table, offsets_table).statements()
    canonical = Schema(_Names("db"), CANONICAL, "events", "sink_offsets").statements()  # type: ignore[arg-type]
    return [
        Migration(f"0001_events:{events_table}", (real[1],), _checksum(canonical[1:2])),
        Migration(f"0002_offsets:{offsets_table}", tuple(real[2:4]), _checksum(canonical[2:4])),
        Migration(f"0003_topics:{offsets_table}", (real[4],), _checksum(canonical[4:5])),
    ]


def meter_checksum(meter: Meter) -> str:
    return meter.checksum()


@dataclass
class Plan:
    """What a run would do: statements per version, and meters to drop."""

    apply: list[tuple[str, list[str]]]
    dropped: list[str]
    kept_removed: list[str]


class Migrator:
    def __init__(
        self,
        ch: ClickHouse,
        features: ServerFeatures,
        events_table: str,
        offsets_table: str,
        meters: Sequence[Meter],
        cutoff_margin: float = 5.0,
        owner: str = "sink",
    ) -> None:
        self.ch = ch
        self.features = features
        self.events_table = events_table
        self.migrations = core(ch, features, events_table, offsets_table)
        self.meters = list(meters)
        self.cutoff_margin = cutoff_margin
        self.owner = owner
        self.table = ch.table("schema_migrations")
        self.lock = ch.table("schema_migrations_lock")

    def meter_sql(self, meter: Meter) -> MeterSQL:
        try:
            return MeterSQL(meter, self.features, self.ch.database, self.events_table)
        except ValueError as exc:
            raise MigrationError(str(exc)) from None

    async def _bootstrap(self) -> None:
        await self.ch.execute(f"CREATE DATABASE IF NOT EXISTS `{self.ch.database}`")
        await self.ch.execute(
            f"CREATE TABLE IF NOT EXISTS {self.table} (version String, checksum String, "
            "state String, applied_at DateTime('UTC') DEFAULT now(), seq UInt64) "
            "ENGINE = MergeTree() ORDER BY (version, seq)"
        )

    async def applied(self) -> dict[str, tuple[str, str]]:
        """version -> (checksum, state) of the latest record of each version."""
        rows = await self.ch.query(
            f"SELECT version, argMax(checksum, seq), argMax(state, seq) FROM {self.table} "
            "GROUP BY version"
        )
        return {str(v): (str(c), str(s)) for v, c, s in rows}

    async def _record(self, version: str, checksum: str, state: str) -> None:
        await self.ch.insert_columns(
            "schema_migrations",
            ("version", "checksum", "state", "seq"),
            [[version], [checksum], [state], [time.time_ns()]],
        )

    def _check(self, applied: dict[str, tuple[str, str]]) -> None:
        expected = {m.version: m.checksum for m in self.migrations}
        expected.update({f"meter:{m.slug}": m.checksum() for m in self.meters})
        for version, checksum in expected.items():
            record = applied.get(version)
            if record and record[1] == "applied" and record[0] != checksum:
                what = ("meter " + version[6:]) if version.startswith("meter:") else version
                hint = (
                    "meters cannot change once applied: give the changed meter a new slug, "
                    "or remove it with `sink migrate --drop-removed` first"
                    if version.startswith("meter:")
                    else "the migration was edited after it was applied; restore it"
                )
                raise MigrationError(
                    f"{what} was applied with checksum {record[0]} but is now {checksum}: {hint}"
                )

    async def plan(self, drop_removed: bool = False) -> Plan:
        """The statements a run would execute now (for --dry-run); creates nothing."""
        try:
            applied = await self.applied()
        except ClickHouseUnavailable:
            applied = {}  # nothing created yet
        self._check(applied)
        todo: list[tuple[str, list[str]]] = []
        for migration in self.migrations:
            if applied.get(migration.version, ("", ""))[1] != "applied":
                todo.append((migration.version, list(migration.statements)))
        for meter in self.meters:
            if applied.get(f"meter:{meter.slug}", ("", ""))[1] != "applied":
                sql = self.meter_sql(meter)
                todo.append(
                    (
                        f"meter:{meter.slug}",
                        [sql.create_table(), sql.create_view(0), sql.backfill(0)],
                    )
                )
        removed = self._removed(applied)
        return Plan(todo, removed if drop_removed else [], [] if drop_removed else removed)

    def _removed(self, applied: dict[str, tuple[str, str]]) -> list[str]:
        configured = {f"meter:{m.slug}" for m in self.meters}
        return sorted(
            v[6:]
            for v, (_, state) in applied.items()
            if v.startswith("meter:") and state == "applied" and v not in configured
        )

    async def run(self, drop_removed: bool = False) -> list[str]:
        """Apply what is missing; returns the versions applied or dropped."""
        await self._bootstrap()
        await self._acquire()
        try:
            applied = await self.applied()
            self._check(applied)
            done = []
            for migration in self.migrations:
                if applied.get(migration.version, ("", ""))[1] == "applied":
                    continue
                for sql in migration.statements:
                    await self.ch.execute(sql)
                await self._record(migration.version, migration.checksum, "applied")
                done.append(migration.version)
            new = [
                m for m in self.meters if applied.get(f"meter:{m.slug}", ("", ""))[1] != "applied"
            ]
            if new:
                await self._add_meters(new)
                done.extend(f"meter:{m.slug}" for m in new)
            for slug in self._removed(applied):
                if drop_removed:
                    await self._drop_meter(slug, applied[f"meter:{slug}"][0])
                    done.append(f"drop meter:{slug}")
                else:
                    log.info("meter removed from configuration, data kept", meter=slug)
            return done
        finally:
            await self._release()

    async def _add_meters(self, meters: Sequence[Meter]) -> None:
        """Create tables and views with one cutoff, wait once, then backfill each."""
        sqls = [self.meter_sql(m) for m in meters]
        for sql in sqls:
            await self.ch.execute(sql.create_table())
            # An interrupted run may have left a view (with an unknown cutoff) and part of a
            # backfill: start the meter over. Nothing writes to the table once its view is gone.
            await self.ch.execute(f"DROP TABLE IF EXISTS {sql.view}")
            await self.ch.execute(f"TRUNCATE TABLE {sql.table}")
        [(now,)] = await self.ch.query("SELECT toUInt32(now())")
        cutoff = int(now) + max(1, round(self.cutoff_margin))
        for sql in sqls:
            await self.ch.execute(sql.create_view(cutoff))
        await self._wait_past(cutoff, started_before=int(now))
        for meter, sql in zip(meters, sqls, strict=True):
            await self.ch.execute(sql.backfill(cutoff))
            await self._record(f"meter:{meter.slug}", meter.checksum(), "applied")
            log.info("meter added", meter=meter.slug, cutoff=cutoff)

    async def _wait_past(self, cutoff: int, started_before: int) -> None:
        """Until the server clock passed the cutoff, and no insert into the raw table that
        began before the view existed is still running (its rows would be in neither)."""
        while True:
            [(now,)] = await self.ch.query("SELECT toUInt32(now())")
            if int(now) > cutoff:
                break
            await asyncio.sleep(min(1.0, cutoff - int(now) + 0.1))
        events = f"`{self.ch.database}`.`{self.events_table}`"
        rows = await self.ch.query(
            "SELECT count() FROM system.processes WHERE query LIKE "
            f"{quote('INSERT INTO ' + events + '%')} AND elapsed > {int(now) - started_before}"
        )
        if rows and int(rows[0][0]):
            raise MigrationError(
                "an insert that began before the meter view was created is still running; "
                "run the migration again"
            )

    async def _drop_meter(self, slug: str, checksum: str) -> None:
        for sql in (
            f"DROP TABLE IF EXISTS {self.ch.table(f'meter_{slug}_mv')}",
            f"DROP TABLE IF EXISTS {self.ch.table(f'meter_{slug}')}",
        ):
            await self.ch.execute(sql)
        await self._record(f"meter:{slug}", checksum, "removed")
        log.info("meter dropped", meter=slug)

    async def _acquire(self, patience: float = 300.0) -> None:
        deadline = time.monotonic() + patience
        while True:
            try:
                await self.ch.execute(
                    f"CREATE TABLE {self.lock} (owner String, acquired_at DateTime('UTC') "
                    "DEFAULT now()) ENGINE = TinyLog"
                )
                await self.ch.insert_columns("schema_migrations_lock", ("owner",), [[self.owner]])
                return
            except ClickHouseUnavailable as exc:
                if f"server error {TABLE_EXISTS}" not in str(exc):
                    raise
            if await self._lock_is_stale():
                log.warning("breaking a stale migration lock")
                await self.ch.execute(f"DROP TABLE IF EXISTS {self.lock}")
                continue
            if time.monotonic() > deadline:
                raise LockHeld("another migration holds the lock (schema_migrations_lock)")
            await asyncio.sleep(0.5)

    async def _lock_is_stale(self) -> bool:
        """The lock's age is its table's creation time: a lock row may not be written yet."""
        try:
            rows = await self.ch.query(
                "SELECT toUInt32(now()) - toUInt32(metadata_modification_time) FROM system.tables "
                f"WHERE database = {quote(self.ch.database)} AND name = 'schema_migrations_lock'"
            )
        except ClickHouseUnavailable:
            return False
        return bool(rows) and int(rows[0][0]) > LOCK_STALE_AFTER

    async def _release(self) -> None:
        await self.ch.execute(f"DROP TABLE IF EXISTS {self.lock}")
