"""Versioned schema migrations and meters, recorded in `schema_migrations` (`sink.metering.ledger`).

- Each migration has a version and a checksum of its SQL (rendered for a canonical server,
  so the checksum names the code's intent, not the server it ran on). A changed checksum of
  an applied migration stops the run with a clear message.
- One migrator at a time holds the lease (`sink.metering.lease`); one that dies is taken over within
  seconds. A schema that is already complete is never waited for.
- Meters are migrations too (`meter:<slug>`), in two stages. *Live*: the meter's table and
  view exist, and the view counts every row stored from the meter's cutoff on; ingestion goes
  on as usual. *Applied*: the rows stored before the cutoff are backfilled
  (`sink.metering.backfill`), in bounded, resumable pieces, so no row is counted twice or
  missed.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from sink.errors import ClickHouseUnavailable, MigrationError
from sink.metering.backfill import Backfill, Progress, staging_tables
from sink.metering.lease import Lease
from sink.metering.ledger import APPLIED, LIVE, REMOVED, Ledger, Live, meter_version
from sink.metering.meter_sql import MeterSQL, view_cutoff
from sink.metering.meters import Meter
from sink.stores.clickhouse.cluster import Node, read_topology
from sink.stores.clickhouse.connection import ClickHouse
from sink.stores.clickhouse.schema import Schema, topics_table
from sink.stores.clickhouse.sql import Replication, ServerFeatures, distributed_name, quote

log = structlog.get_logger("sink.migrations")

CANONICAL = ServerFeatures((18, 16))


@dataclass(frozen=True)
class Migration:
    version: str
    statements: tuple[str, ...]
    checksum: str
    tables: tuple[str, ...] = ()
    """The tables it makes."""


class _Names:
    """Stand-in for a connection when rendering SQL for the checksum."""

    def __init__(self, database: str) -> None:
        self.database = database

    def table(self, name: str) -> str:
        return f"`{self.database}`.`{name}`"


def _checksum(statements: Sequence[str]) -> str:
    return hashlib.sha256("\n;\n".join(statements).encode()).hexdigest()[:16]


def core(
    ch: ClickHouse,
    features: ServerFeatures,
    events_table: str,
    offsets_table: str,
    replication: Replication | None = None,
) -> list[Migration]:
    """The raw table, the landed-offsets table and the view between them; on a cluster the
    raw table's Distributed table too. The checksums are those of the single-server SQL, so a
    version means the same tables wherever it was applied."""
    real = Schema(ch, features, events_table, offsets_table, replication).statements()
    canonical = Schema(_Names("db"), CANONICAL, "events", "sink_offsets").statements()  # type: ignore[arg-type]
    return [
        Migration(f"0001_events:{events_table}", (real[1], *real[5:]), _checksum(canonical[1:2])),
        Migration(
            f"0002_offsets:{offsets_table}",
            tuple(real[2:4]),
            _checksum(canonical[2:4]),
            (offsets_table,),
        ),
        Migration(
            f"0003_topics:{offsets_table}",
            (real[4],),
            _checksum(canonical[4:5]),
            (topics_table(offsets_table),),
        ),
    ]


@dataclass
class Plan:
    """What a run would do: statements per version, and meters to drop."""

    apply: list[tuple[str, list[str]]]
    dropped: list[str]
    kept_removed: list[str]


class Migrator:
    """Brings one database's schema and meters to what the configuration declares.

    `connect` opens a further connection to the same database (the lease renews on its own).
    """

    def __init__(
        self,
        ch: ClickHouse,
        features: ServerFeatures,
        events_table: str,
        offsets_table: str,
        meters: Sequence[Meter],
        *,
        connect: Callable[[], ClickHouse],
        owner: str = "sink",
        lease_timeout: float = 10.0,
        piece_rows: int = 1_000_000,
        cutoff_margin: float = 5.0,
        replication: Replication | None = None,
        connect_node: Callable[[Node], ClickHouse] | None = None,
    ) -> None:
        """On a cluster (`replication`), `connect_node` opens a connection to one node."""
        self.ch = ch
        self.connect_node = connect_node or (lambda _node: connect())
        self.features = features
        self.events_table = events_table
        self.replication = replication
        self.migrations = core(ch, features, events_table, offsets_table, replication)
        self.meters = list(meters)
        self.piece_rows = piece_rows
        self.cutoff_margin = cutoff_margin
        self.ledger = Ledger(ch, replication)
        self.lease = Lease(ch, connect, owner, lease_timeout)
        self.backfills: dict[str, Progress] = {}
        """Backfills this process runs or ran, by meter slug."""
        self.report: Callable[[Progress], None] = lambda _progress: None

    def meter_sql(self, meter: Meter) -> MeterSQL:
        try:
            return MeterSQL(
                meter, self.features, self.ch.database, self.events_table, self.replication
            )
        except ValueError as exc:
            raise MigrationError(str(exc)) from None

    async def applied(self) -> dict[str, tuple[str, str]]:
        """version -> (checksum, state) of the latest record of each version."""
        return await self.ledger.latest()

    def _check(self, applied: dict[str, tuple[str, str]]) -> None:
        expected = {m.version: m.checksum for m in self.migrations}
        expected.update({meter_version(m.slug): m.checksum() for m in self.meters})
        for version, checksum in expected.items():
            record = applied.get(version)
            made = record is not None and (record[1] == APPLIED or record[1].startswith(LIVE))
            if record and made and record[0] != checksum:
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

    @staticmethod
    def _state(applied: dict[str, tuple[str, str]], version: str) -> str:
        return applied.get(version, ("", ""))[1]

    def _pending_core(self, applied: dict[str, tuple[str, str]]) -> list[Migration]:
        return [m for m in self.migrations if self._state(applied, m.version) != APPLIED]

    def _pending_meters(self, applied: dict[str, tuple[str, str]]) -> list[Meter]:
        return [m for m in self.meters if self._state(applied, meter_version(m.slug)) != APPLIED]

    def _removed(self, applied: dict[str, tuple[str, str]]) -> list[str]:
        configured = {meter_version(m.slug) for m in self.meters}
        return sorted(
            v[6:]
            for v, (_, state) in applied.items()
            if v.startswith("meter:") and state != REMOVED and v not in configured
        )

    async def plan(self, drop_removed: bool = False) -> Plan:
        """The statements a run would execute now (for --dry-run); creates nothing."""
        try:
            applied = await self.applied()
        except ClickHouseUnavailable:
            applied = {}  # nothing created yet
        self._check(applied)
        todo = [(m.version, list(m.statements)) for m in self._pending_core(applied)]
        for meter in self._pending_meters(applied):
            sql = self.meter_sql(meter)
            piece = sql.backfill_piece(f"_backfill<epoch>_{meter.table}", 0, (0, 0), (0, 1), 0)
            todo.append(
                (meter_version(meter.slug), [sql.create_table(), sql.create_view(0), piece])
            )
        removed = self._removed(applied)
        return Plan(todo, removed if drop_removed else [], [] if drop_removed else removed)

    async def run(
        self,
        drop_removed: bool = False,
        *,
        wait: bool = True,
        core_only: bool = False,
        backfill: bool = True,
    ) -> list[str] | None:
        """Apply what is missing; returns the versions applied or dropped, or None when
        another live process holds the lease and `wait` is False.

        `core_only`: the raw and offset tables only, which a worker needs before it consumes.
        Without `backfill`, meters are made live (their views count from their cutoff on,
        which has passed on return) and their backfills are left for a later run."""
        if self.replication is not None:
            await self._refuse_unreplicated()
        await self.ledger.bootstrap()
        applied = await self.applied()
        self._check(applied)
        if self._complete(applied, drop_removed, core_only, backfill):
            return []  # nothing to do: no lease needed
        if not await self.lease.acquire(wait):
            return None
        try:
            applied = await self.applied()  # again, now that no one else migrates
            self._check(applied)
            done = await self._apply_core(applied)
            if core_only:
                return done
            pending = self._pending_meters(applied)
            lives = [await self._make_live(meter) for meter in pending]
            if not backfill:
                if lives:
                    await self._wait_past(max(live.cutoff for live in lives))
                return done
            for meter, live in zip(pending, lives, strict=True):
                await self._backfill(meter, live)
                done.append(meter_version(meter.slug))
            for slug in self._removed(applied):
                if drop_removed:
                    await self._drop_meter(slug, applied[meter_version(slug)][0])
                    done.append(f"drop meter:{slug}")
                else:
                    log.info("meter removed from configuration, data kept", meter=slug)
            return done
        finally:
            await self.lease.release()

    async def _refuse_unreplicated(self) -> None:
        """On a cluster, tables sink keeps must be Replicated: a table made on one server
        earlier would take one replica's rows only, and the cluster would disagree."""
        ours = [
            self.events_table,
            *(t for m in self.migrations for t in m.tables),
            "schema_migrations",
        ]
        rows = await self.ch.query(
            f"SELECT name, engine FROM system.tables WHERE database = {quote(self.ch.database)} "
            f"AND name IN ({', '.join(quote(t) for t in sorted(set(ours)))}) "
            "AND NOT startsWith(engine, 'Replicated') AND engine NOT IN "
            "('MaterializedView', 'Distributed')"
        )
        if rows:
            found = ", ".join(f"{name} ({engine})" for name, engine in rows)
            raise MigrationError(
                f"clickhouse.cluster is set but these tables exist on {self.ch.database!r} "
                f"without replication: {found}; they were made for a single server. Copy "
                "their rows into a cluster's tables (or drop them) before starting on the "
                "cluster; nothing was changed"
            )

    def _complete(
        self,
        applied: dict[str, tuple[str, str]],
        drop_removed: bool,
        core_only: bool,
        backfill: bool,
    ) -> bool:
        if self._pending_core(applied):
            return False
        if core_only:
            return True
        if not backfill:
            return all(
                self._state(applied, meter_version(m.slug)).startswith(LIVE)
                for m in self._pending_meters(applied)
            )
        return not self._pending_meters(applied) and not (drop_removed and self._removed(applied))

    async def _apply_core(self, applied: dict[str, tuple[str, str]]) -> list[str]:
        done = []
        for migration in self._pending_core(applied):
            for sql in migration.statements:
                self.lease.check()
                await self.ch.execute(sql)
            await self.ledger.record(migration.version, migration.checksum, APPLIED)
            done.append(migration.version)
        return done

    async def _make_live(self, meter: Meter) -> Live:
        """The meter's table and a view made before its cutoff, recorded live.

        The view's own SQL holds its cutoff: the view that exists is what counts the rows
        stored from its cutoff on, so the backfill takes its cutoff from there. A view made
        after its own cutoff (its maker froze in between) missed the rows stored in between,
        and a table without `_origin` comes from an earlier version: either is dropped and
        made again with a new cutoff, and the backfill counts every row before that."""
        sql = self.meter_sql(meter)
        while (cutoff := await self._view_cutoff(sql)) is None:
            self.lease.check()
            for statement in sql.drop():
                await self.ch.execute(statement)
            [(now,)] = await self.ch.query("SELECT toUInt32(now())")
            await self.ch.execute(sql.create_table())
            await self.ch.execute(sql.create_view(int(now) + max(1, round(self.cutoff_margin))))
        for statement in sql.create_distributed():
            await self.ch.execute(statement)
        live = await self.ledger.live(meter.slug, cutoff)
        if live is None:
            version = meter_version(meter.slug)
            await self.ledger.record(
                version, meter.checksum(), Live(cutoff, self.piece_rows).encode()
            )
            # The first record of this cutoff wins: another process may have written one too.
            live = await self.ledger.live(meter.slug, cutoff)
            assert live is not None
            log.info("meter live", meter=meter.slug, cutoff=cutoff)
        return live

    async def _view_cutoff(self, sql: MeterSQL) -> int | None:
        """The cutoff of the meter's view, if the view was made before it and its table is of
        this version (has `_origin`); else None."""
        db = quote(self.ch.database)
        made_at = (
            "SELECT toUInt32(metadata_modification_time) FROM system.tables "
            f"WHERE database = {db} AND name = {quote(sql.meter.view)}"
        )
        origin = (
            f"SELECT name FROM system.columns WHERE database = {db} "
            f"AND table = {quote(sql.meter.table)} AND name = '_origin'"
        )
        if not await self.ch.query(made_at) or not await self.ch.query(origin):
            return None
        [(text,)] = await self.ch.query(f"SHOW CREATE TABLE {sql.view}")
        cutoff = view_cutoff(str(text))
        if cutoff is None:
            return None
        # On a cluster the view fires on the node an insert reaches: every node must have
        # made it before the cutoff (ON CLUSTER runs on each node in its own time).
        for rows in await self._on_every_node([made_at, origin]):
            made, has_origin = rows
            if not made or not has_origin or int(made[0][0]) >= cutoff:
                return None
        return cutoff

    async def _on_every_node(self, queries: Sequence[str]) -> list[list[list[tuple[Any, ...]]]]:
        """The answers of each query on every node of the cluster (here alone on one
        server). A node that does not answer raises: a meter's exactness cannot be judged
        without it."""
        if self.replication is None:
            return [[await self.ch.query(q) for q in queries]]
        out = []
        for node in await self._nodes():
            ch = self.connect_node(node)
            try:
                out.append([await ch.query(q) for q in queries])
            finally:
                await ch.close()
        return out

    async def _nodes(self) -> list[Node]:
        assert self.replication is not None
        return (await read_topology(self.ch, self.replication.cluster)).nodes

    async def _backfill(self, meter: Meter, live: Live) -> None:
        """Count the rows stored before the cutoff: on one server, or on each shard of a
        cluster from its first replica (always the same one, which keeps the backfill's
        collection table), once that replica holds every part its shard committed."""
        sql = self.meter_sql(meter)
        await self._wait_past(live.cutoff)
        targets: list[tuple[int | None, ClickHouse]] = [(None, self.ch)]
        if self.replication is not None:
            topology = await read_topology(self.ch, self.replication.cluster)
            targets = [(i, self.connect_node(shard[0])) for i, shard in enumerate(topology.shards)]
        jobs = []
        try:
            for shard, ch in targets:
                if shard is not None:
                    await ch.execute(
                        f"SYSTEM SYNC REPLICA {ch.table(self.events_table)}",
                        {"receive_timeout": 300},
                    )
                job = Backfill(
                    ch,
                    self.ledger,
                    sql,
                    live.cutoff,
                    live.piece_rows,
                    self.lease.epoch,
                    self.lease.check,
                    self.report,
                    shard,
                )
                jobs.append(job)
                self.backfills[job.progress.meter] = job.progress
                await job.run()
            self.lease.check()
            await self.ledger.record(meter_version(meter.slug), meter.checksum(), APPLIED)
            for job in jobs:
                await job.drop_staging()
        finally:
            for shard, ch in targets:
                if shard is not None:
                    await ch.close()
        rows = sum(job.progress.rows_total for job in jobs)
        log.info("meter applied", meter=meter.slug, rows=rows)

    async def _wait_past(self, cutoff: int) -> None:
        """Until the server clock passed the cutoff, and no insert into the raw table that
        began before the view existed is still running (its rows would be in neither)."""
        while True:
            [(now,)] = await self.ch.query("SELECT toUInt32(now())")
            if int(now) > cutoff:
                break
            await asyncio.sleep(min(1.0, cutoff - int(now) + 0.1))
        events = f"`{self.ch.database}`.`{self.events_table}`"
        margin = max(1, round(self.cutoff_margin))
        older = (
            "SELECT count() FROM system.processes WHERE query LIKE "
            f"{quote('INSERT INTO ' + events + '%')} AND elapsed > {{age}}"
        )
        running = await self._inserts_running(older.format(age=int(now) - cutoff + margin))
        if int(running):
            # Its rows are visible to the backfill once it ends; were its block to arrive
            # after the cutoff, they would be in neither (the view was not there when it began).
            log.warning("an insert that began before the meter view existed is still running")
            while int(running):
                await asyncio.sleep(0.5)
                [(now,)] = await self.ch.query("SELECT toUInt32(now())")
                running = await self._inserts_running(older.format(age=int(now) - cutoff + margin))

    async def _inserts_running(self, count: str) -> int:
        """Inserts running that began before the view existed, on every node."""
        return sum(int(rows[0][0][0]) for rows in await self._on_every_node([count]))

    async def _drop_meter(self, slug: str, checksum: str) -> None:
        meter_table = f"meter_{slug}"
        names = await self.ch.query(
            f"SELECT name FROM system.tables WHERE database = {quote(self.ch.database)}"
        )
        doomed = [f"{meter_table}_mv", meter_table]
        if self.replication is None:
            doomed += staging_tables([str(n) for (n,) in names], meter_table)
        else:
            doomed.append(distributed_name(meter_table))
        on = self.replication.on_cluster if self.replication is not None else ""
        for name in doomed:
            self.lease.check()
            await self.ch.execute(f"DROP TABLE IF EXISTS {self.ch.table(name)}{on}")
        if self.replication is not None:
            # Staging tables live on the replica of each shard that backfilled.
            topology = await read_topology(self.ch, self.replication.cluster)
            for shard in topology.shards:
                ch = self.connect_node(shard[0])
                try:
                    names = await ch.query(
                        f"SELECT name FROM system.tables WHERE database = {quote(ch.database)}"
                    )
                    for name in staging_tables([str(n) for (n,) in names], meter_table):
                        await ch.execute(f"DROP TABLE IF EXISTS {ch.table(name)}")
                finally:
                    await ch.close()
        await self.ledger.record(meter_version(slug), checksum, REMOVED)
        log.info("meter dropped", meter=slug)

    async def describe(self) -> list[str]:
        """The lease and every unfinished backfill, for `sink check`."""
        lines = []
        holder = await self.lease.holder()
        lines.append(
            "migration lease: "
            + ("never taken" if holder is None else holder.describe(self.lease.timeout))
        )
        try:
            applied = await self.applied()
        except ClickHouseUnavailable:
            applied = {}  # nothing migrated yet
        for version, (_, state) in sorted(applied.items()):
            live = Live.parse(state)
            if live is None:
                continue
            slug = version.split(":", 1)[1]
            shards: list[int | None] = [None]
            if self.replication is not None:
                topology = await read_topology(self.ch, self.replication.cluster)
                shards = list(range(len(topology.shards)))
            for shard in shards:
                records = await self.ledger.backfill(slug, live.cutoff, shard)
                where = "" if shard is None else f" on shard {shard + 1}"
                lines.append(
                    f"backfill of meter {slug}{where}: {records.rows_done:,} of "
                    f"{records.rows_total:,} rows, {len(records.months)} of "
                    f"{records.months_total} months"
                    + ("" if records.rows_total else " (not planned yet)")
                )
        return lines
