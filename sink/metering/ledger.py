"""`schema_migrations`: the record of what the schema holds, and the one home of its formats.

Rows are only ever added; the newest row of a version (by `seq`) is its state:

- `0001_events:<table>` and the other core migrations: `applied`.
- `meter:<slug>`: `live cutoff=<epoch s> piece_rows=<n>` (its table and view exist, the
  backfill is still to do), then `applied`; `removed` once dropped.
- `layout:shards=<n> by=<shard_by>` (on a cluster): `applied` once a worker started with that
  shard rule; more than one such version means partitions may have moved between shards.
- `backfill:<slug>:<cutoff>` (on a cluster `...:shard<n>`, one per shard): `plan rows=<n>
  months=<n>`, `piece <yyyymm> <origin> <rows>`, `month <yyyymm>` (progress, see
  `sink.metering.backfill`).

A meter's backfill records carry its cutoff, so a meter removed and added again starts a
backfill of its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from sink.stores.clickhouse.connection import ClickHouse
from sink.stores.clickhouse.sql import Replication, quote

APPLIED = "applied"
REMOVED = "removed"
LIVE = "live"


@dataclass(frozen=True)
class Live:
    """A meter whose table and view exist: the view counts rows stored from `cutoff` on."""

    cutoff: int
    piece_rows: int

    def encode(self) -> str:
        return f"{LIVE} cutoff={self.cutoff} piece_rows={self.piece_rows}"

    @staticmethod
    def parse(state: str) -> Live | None:
        if not state.startswith(LIVE + " "):
            return None
        fields = dict(part.split("=", 1) for part in state.split()[1:])
        return Live(int(fields["cutoff"]), int(fields["piece_rows"]))


@dataclass
class BackfillRecords:
    """What a meter's backfill has recorded: its plan's size, done pieces and months."""

    rows_total: int = 0
    months_total: int = 0
    pieces: dict[tuple[int, int], int] = field(default_factory=dict)
    """(month, origin) -> rows."""
    months: set[int] = field(default_factory=set)

    @property
    def rows_done(self) -> int:
        return sum(self.pieces.values())

    @staticmethod
    def parse(states: list[str]) -> BackfillRecords:
        out = BackfillRecords()
        for state in states:
            kind, *args = state.split()
            if kind == "plan":
                fields = dict(a.split("=", 1) for a in args)
                out.rows_total, out.months_total = int(fields["rows"]), int(fields["months"])
            elif kind == "piece":
                month, origin, rows = map(int, args)
                out.pieces[(month, origin)] = rows
            elif kind == "month":
                out.months.add(int(args[0]))
        return out


def plan_state(rows: int, months: int) -> str:
    return f"plan rows={rows} months={months}"


def piece_state(month: int, origin: int, rows: int) -> str:
    return f"piece {month} {origin} {rows}"


def month_state(month: int) -> str:
    return f"month {month}"


def meter_version(slug: str) -> str:
    return f"meter:{slug}"


def backfill_version(slug: str, cutoff: int, shard: int | None = None) -> str:
    """A backfill's records; on a cluster each shard's backfill has its own
    (`backfill:<slug>:<cutoff>:shard<n>`, n from 1)."""
    base = f"backfill:{slug}:{cutoff}"
    return base if shard is None else f"{base}:shard{shard + 1}"


def layout_version(shards: int, by: str) -> str:
    """The shard rule a worker lands with: the number of shards and `clickhouse.shard_by`."""
    return f"layout:shards={shards} by={by}"


class Ledger:
    """`schema_migrations`; on a cluster made ON CLUSTER and replicated to every node alike."""

    def __init__(self, ch: ClickHouse, replication: Replication | None = None) -> None:
        self.ch = ch
        self.table = ch.table("schema_migrations")
        self.replication = replication

    async def bootstrap(self) -> None:
        on, engine = "", "MergeTree()"
        if self.replication is not None:
            on = self.replication.on_cluster
            engine = self.replication.engine("MergeTree", "schema_migrations", every_shard=True)
        await self.ch.execute(f"CREATE DATABASE IF NOT EXISTS `{self.ch.database}`{on}")
        await self.ch.execute(
            f"CREATE TABLE IF NOT EXISTS {self.table}{on} (version String, checksum String, "
            "state String, applied_at DateTime('UTC') DEFAULT now(), seq UInt64) "
            f"ENGINE = {engine} ORDER BY (version, seq)"
        )

    async def latest(self) -> dict[str, tuple[str, str]]:
        """version -> (checksum, state) of the newest record of each schema version (backfill
        progress left out)."""
        rows = await self.ch.query(
            f"SELECT version, argMax(checksum, seq), argMax(state, seq) FROM {self.table} "
            "WHERE NOT startsWith(version, 'backfill:') GROUP BY version"
        )
        return {str(v): (str(c), str(s)) for v, c, s in rows}

    async def states(self, version: str) -> list[str]:
        """Every state of `version` since it was last removed, oldest first."""
        rows = await self.ch.query(
            f"SELECT state FROM {self.table} WHERE version = {quote(version)} AND seq > "
            f"(SELECT max(seq) FROM {self.table} WHERE version = {quote(version)} "
            f"AND state = {quote(REMOVED)}) ORDER BY seq"
        )
        return [str(s) for (s,) in rows]

    async def live(self, slug: str, cutoff: int) -> Live | None:
        """The meter's first `live` record of this cutoff since it was last removed: the one
        every process uses, however many wrote one."""
        for state in await self.states(meter_version(slug)):
            found = Live.parse(state)
            if found is not None and found.cutoff == cutoff:
                return found
        return None

    async def backfill(self, slug: str, cutoff: int, shard: int | None = None) -> BackfillRecords:
        return BackfillRecords.parse(await self.states(backfill_version(slug, cutoff, shard)))

    async def layouts(self, current: str) -> set[str]:
        """Every shard rule (`layout_version`) workers have started with, `current` recorded
        first."""
        rows = await self.ch.query(
            f"SELECT DISTINCT version FROM {self.table} WHERE startsWith(version, 'layout:')"
        )
        seen = {str(v) for (v,) in rows}
        if current not in seen:
            await self.record(current, "", APPLIED)
            seen.add(current)
        return seen

    async def record(self, version: str, checksum: str, state: str) -> None:
        await self.ch.insert_columns(
            "schema_migrations",
            ("version", "checksum", "state", "seq"),
            [[version], [checksum], [state], [time.time_ns()]],
        )
