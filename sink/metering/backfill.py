"""Backfilling a new meter from the raw table: in bounded pieces, resumable, exactly once.

A meter's view counts the rows stored from its cutoff on; the backfill counts the rows stored
before it. Those rows no longer change, so every piece of the backfill has exactly one right
answer, and every step below may run twice, or in two processes at once, with the same result:

1. Plan. The rows of the meter's event type stored before the cutoff, counted per minute of
   event time, are cut into pieces of at most `piece_rows` rows: runs of whole minutes inside
   one month, and a minute with more rows than that split by a hash of the event id. The plan
   depends only on those rows and on `piece_rows` (recorded with the cutoff), so every process
   computes the same pieces.
2. Piece. A piece is aggregated into a staging table of this lease epoch's own, then swapped
   as one partition into the meter's collection table with REPLACE PARTITION, which is atomic
   and replaces whatever an earlier attempt left in that partition. Done pieces are recorded;
   an interrupted piece is done again from the start.
3. Month. Once every piece of a month is collected, the month's rows are copied into another
   staging table as `_origin` 1 and swapped into the meter table's partition (month, 1) the
   same way. The view writes `_origin` 0 only, so the swap replaces the backfill's own rows.
4. Done. The caller records the meter applied; the staging tables are dropped.

Memory is one piece's GROUP BY at a time (at most `piece_rows` rows in); the copies stream in
small blocks (`COPY_SETTINGS`).
"""

from __future__ import annotations

import itertools
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

import structlog

from sink.metering.ledger import Ledger, backfill_version, month_state, piece_state, plan_state
from sink.metering.meter_sql import MeterSQL
from sink.stores.clickhouse.connection import ClickHouse
from sink.stores.clickhouse.sql import quote

log = structlog.get_logger("sink.backfill")

COPY_SETTINGS = {"max_block_size": 8192, "min_insert_block_size_rows": 65536}
"""An INSERT ... SELECT gathers up to a million rows (256 MB) before writing a part by default;
a month's copy writes smaller parts instead, and its memory stays near that of one block."""

MAX_BUCKETS = 1 << 16
STAGING = re.compile(r"^_backfill(\d+m?)?_(meter_.+)$")
"""Staging tables: `_backfill_<meter table>` collects pieces; `_backfill<epoch>_...` and
`_backfill<epoch>m_...` are one epoch's piece and month staging (a slug cannot start with `_`,
so no meter's own table matches)."""


def month_of(minute: int) -> int:
    moment = datetime.fromtimestamp(minute * 60, UTC)
    return moment.year * 100 + moment.month


def _month_start(month: int) -> int:
    return int(datetime(month // 100, month % 100, 1, tzinfo=UTC).timestamp()) // 60


@dataclass(frozen=True)
class Piece:
    month: int
    """yyyymm (UTC) of every row in the piece."""
    first: int
    end: int
    """Event-time minutes [first, end), epoch minutes."""
    bucket: int
    buckets: int
    """Rows whose `cityHash64(id) % buckets == bucket`; 1 bucket takes every row."""
    rows: int

    @property
    def origin(self) -> int:
        """The piece's partition in the collection table: unique within its month."""
        return (self.first - _month_start(self.month)) * MAX_BUCKETS + self.bucket


def plan(histogram: Sequence[tuple[int, int]], piece_rows: int) -> list[Piece]:
    """Pieces of at most `piece_rows` rows from (epoch minute, rows) counts, ascending."""
    pieces: list[Piece] = []
    open_: list[int] = []  # month, first, end, rows of the piece being filled

    def close() -> None:
        if open_:
            pieces.append(Piece(open_[0], open_[1], open_[2], 0, 1, open_[3]))
            open_.clear()

    for minute, rows in histogram:
        month = month_of(minute)
        if rows > piece_rows:
            close()
            buckets = min(MAX_BUCKETS, math.ceil(rows / piece_rows))
            pieces.extend(
                Piece(month, minute, minute + 1, b, buckets, rows // buckets)
                for b in range(buckets)
            )
            continue
        if open_ and (open_[0] != month or open_[3] + rows > piece_rows):
            close()
        if open_:
            open_[2], open_[3] = minute + 1, open_[3] + rows
        else:
            open_.extend((month, minute, minute + 1, rows))
    close()
    return pieces


@dataclass
class Progress:
    """A backfill as a person follows it."""

    meter: str
    rows_total: int = 0
    rows_done: int = 0
    months_total: int = 0
    months_done: int = 0
    started: float = field(default_factory=time.monotonic)
    rows_at_start: int = 0

    def eta(self) -> float | None:
        """Seconds left at this run's rate so far."""
        done = self.rows_done - self.rows_at_start
        elapsed = time.monotonic() - self.started
        if done <= 0 or elapsed <= 0:
            return None
        return (self.rows_total - self.rows_done) / (done / elapsed)

    def as_dict(self) -> dict[str, object]:
        eta = self.eta()
        return {
            "rows_done": self.rows_done,
            "rows_total": self.rows_total,
            "months_done": self.months_done,
            "months_total": self.months_total,
            "eta_seconds": None if eta is None else round(eta, 1),
        }


def staging_tables(names: Sequence[str], meter_table: str) -> list[str]:
    """The staging tables of one meter among table names."""
    return [n for n in names if (m := STAGING.match(n)) and m.group(2) == meter_table]


class Backfill:
    """One meter's backfill, run by the holder of lease epoch `epoch`; `check` raises when
    the holder may not take its next step."""

    def __init__(
        self,
        ch: ClickHouse,
        ledger: Ledger,
        sql: MeterSQL,
        cutoff: int,
        piece_rows: int,
        epoch: int,
        check: Callable[[], None],
        report: Callable[[Progress], None] | None = None,
        shard: int | None = None,
    ) -> None:
        """On a cluster, `ch` is a replica of `shard` (from 0): the backfill counts that
        shard's rows, with records of its own; its staging tables stay on that replica."""
        self.ch = ch
        self.shard = shard
        self.ledger = ledger
        self.sql = sql
        self.cutoff = cutoff
        self.piece_rows = piece_rows
        self.check = check
        self.report = report or (lambda _progress: None)
        self.version = backfill_version(sql.meter.slug, cutoff, shard)
        self.checksum = sql.meter.checksum()
        table = sql.meter.table
        self.collected = ch.table(f"_backfill_{table}")
        self.piece_stage = ch.table(f"_backfill{epoch}_{table}")
        self.month_stage = ch.table(f"_backfill{epoch}m_{table}")
        name = sql.meter.slug if shard is None else f"{sql.meter.slug} (shard {shard + 1})"
        self.progress = Progress(name)

    async def run(self) -> None:
        for table in (self.collected, self.piece_stage, self.month_stage):
            await self.ch.execute(self.sql.create_table(table))
        done = await self.ledger.backfill(self.sql.meter.slug, self.cutoff, self.shard)
        pieces = plan(await self._histogram(), self.piece_rows)
        months = sorted({p.month for p in pieces})
        p = self.progress
        p.rows_total, p.months_total = sum(x.rows for x in pieces), len(months)
        if (done.rows_total, done.months_total) != (p.rows_total, p.months_total):
            await self.ledger.record(
                self.version, self.checksum, plan_state(p.rows_total, len(months))
            )
        p.months_done = len(done.months & set(months))
        p.rows_done = sum(
            x.rows for x in pieces if x.month in done.months or (x.month, x.origin) in done.pieces
        )
        p.rows_at_start = p.rows_done
        p.started = time.monotonic()
        self.report(p)
        for month, group in itertools.groupby(pieces, key=lambda x: x.month):
            if month in done.months:
                continue
            for piece in group:
                if (month, piece.origin) not in done.pieces:
                    await self._piece(piece)
                    p.rows_done += piece.rows
                    self.report(p)
            await self._month(month)
            p.months_done += 1
            self.report(p)

    async def _histogram(self) -> list[tuple[int, int]]:
        rows = await self.ch.query(
            "SELECT intDiv(toUInt32(toDateTime(time)), 60) AS minute, count() "
            f"FROM {self.sql.events} WHERE type = {quote(self.sql.meter.event_type)} "
            f"AND stored_at < toDateTime({self.cutoff}) GROUP BY minute ORDER BY minute"
        )
        return [(int(m), int(n)) for m, n in rows]

    async def _piece(self, piece: Piece) -> None:
        self.check()
        await self.ch.execute(f"TRUNCATE TABLE {self.piece_stage}")
        await self.ch.execute(
            self.sql.backfill_piece(
                self.piece_stage,
                self.cutoff,
                (piece.first, piece.end),
                (piece.bucket, piece.buckets),
                piece.origin,
            )
        )
        self.check()
        await self.ch.execute(
            f"ALTER TABLE {self.collected} REPLACE PARTITION ({piece.month}, {piece.origin}) "
            f"FROM {self.piece_stage}"
        )
        await self.ledger.record(
            self.version, self.checksum, piece_state(piece.month, piece.origin, piece.rows)
        )

    async def _month(self, month: int) -> None:
        self.check()
        await self.ch.execute(f"TRUNCATE TABLE {self.month_stage}")
        await self.ch.execute(
            self.sql.copy_month(self.month_stage, self.collected, month, 1), COPY_SETTINGS
        )
        self.check()
        await self.ch.execute(
            f"ALTER TABLE {self.sql.table} REPLACE PARTITION ({month}, 1) FROM {self.month_stage}"
        )
        await self.ledger.record(self.version, self.checksum, month_state(month))
        log.info("backfill month done", meter=self.sql.meter.slug, month=month)

    async def drop_staging(self) -> None:
        rows = await self.ch.query(
            f"SELECT name FROM system.tables WHERE database = {quote(self.ch.database)} "
            "AND startsWith(name, '_backfill')"
        )
        for name in staging_tables([str(n) for (n,) in rows], self.sql.meter.table):
            await self.ch.execute(f"DROP TABLE IF EXISTS {self.ch.table(name)}")
