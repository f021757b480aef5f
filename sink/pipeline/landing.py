"""The steps that land a batch's rows: the dedup claim, and the insert into ClickHouse.

`sink.pipeline.worker` puts them in the commit order. Both retry their dependency until it
answers (or the batch's partitions all move away), and both are safe to run again for the
same records: a claim finds a record's own marker, an insert after a failure first looks for
what landed.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any

from sink.coordinates import Coordinates, TopicPartition, coordinates_of
from sink.errors import ClickHouseRejected, DependencyError, RedisUnavailable
from sink.pipeline import decode as decoding
from sink.pipeline.batch import Batch, Item, Reject, pending_ranges, span
from sink.pipeline.consumer import DeadLetters, RebuiltRecord
from sink.pipeline.context import Context
from sink.pipeline.fencing import Ownership
from sink.pipeline.retry import Retry
from sink.stores import dedup
from sink.stores.clickhouse.landed import ShardedOffsets
from sink.stores.clickhouse.native import InsertWithdrawn
from sink.stores.clickhouse.schema import EVENT_COLUMNS, event_columns
from sink.stores.clickhouse.shards import Shard


def describe(batch: Batch) -> list[str]:
    """The batch's ranges, for logs."""
    return [f"{t}/{p}:{r.first}-{r.last}" for (t, p), r in sorted(batch.ranges.items())]


class Landing:
    def __init__(
        self,
        ctx: Context,
        *,
        inserters: Sequence[Shard],
        offsets: ShardedOffsets,
        insert_quorum: int = 0,
        dead_letters: DeadLetters,
        ownership: Ownership,
        retry: Retry,
        time_divisor: int,
    ) -> None:
        config = ctx.config
        self.config, self.store, self.keys = config, ctx.store, ctx.keys
        self.topics = ctx.topics
        self.metrics, self.vitals, self.log = ctx.metrics, ctx.vitals, ctx.log
        self.inserters = list(inserters)
        """One per shard; each used by that shard's flusher only."""
        self.offsets = offsets
        self.dead_letters = dead_letters
        self.ownership = ownership
        self.retry = retry
        self.time_divisor = time_divisor
        # The server gives up on an INSERT whose client stopped sending for this long, so a
        # frozen worker's half-sent insert ends well before the group can hand its partitions
        # to another worker. Servers 20.x+ read the client's send_timeout as their receive
        # timeout, 18.x reads receive_timeout: both are set.
        stall = max(1, int(config.kafka.session_timeout / 2))
        self.insert_settings: dict[str, Any] = {
            "receive_timeout": stall,
            "send_timeout": stall,
            **config.clickhouse.insert_settings,
        }
        if insert_quorum > 1:
            # Acknowledged only once `insert_quorum` replicas hold the block: an acknowledged
            # batch survives the loss of the replica that took it.
            self.insert_settings.setdefault("insert_quorum", insert_quorum)
            self.insert_settings.setdefault(
                "insert_quorum_timeout", int(config.clickhouse.insert_quorum_timeout * 1000)
            )
        self.already_landed: set[Coordinates] = set()
        """Coordinates found in ClickHouse after an interrupted insert of a previous owner."""

    def forget(self, tps: Sequence[TopicPartition]) -> None:
        gone = set(tps)
        self.already_landed = {c for c in self.already_landed if c[:2] not in gone}

    # ---------------------------------------------------------------- dedup

    async def claim(self, batch: Batch, behind: Batch | None = None) -> list[Item]:
        """The rows of `batch` to keep: each identity's holder (see sink.stores.dedup). `behind` is
        the batch still landing ahead of this one, whose pending ranges the claim keeps."""
        if self.store is None or not batch.items:
            return batch.items
        grouping = batch.grouping
        if grouping is not None and grouping.added == len(batch.items):
            grouped = grouping.grouped
        else:  # grouped here if the batch changed after it was grouped
            grouped = dedup.group(batch.items, self.keys)
        pending = {
            self.keys.pending(t, p): pending.encode()
            for (t, p), pending in pending_ranges(batch, behind).items()
        }
        store = self.store
        t0 = time.monotonic()
        try:
            holders = await self.retry(
                lambda: store.claim(grouped.keys, grouped.coords, pending),
                batch,
                give_up=self.config.dedup.on_error == "allow-duplicates",
            )
        except RedisUnavailable:
            self.metrics.dedup_bypassed.inc(len(grouped.keys))
            self.log.warning("dedup bypassed: redis unavailable", events=len(grouped.keys))
            return list(grouped.firsts)
        self.metrics.dedup_seconds.observe(time.monotonic() - t0)
        self.vitals.ok("redis")
        return dedup.keep(grouped, holders, self.keys)

    # ---------------------------------------------------------------- insert

    def split_already_landed(
        self, batch: Batch, items: list[Item]
    ) -> tuple[list[Item], list[Item]]:
        """Rows found in ClickHouse after a previous owner's interrupted insert land as is."""
        found = self.already_landed
        if not found:
            return items, []
        fresh: list[Item] = []
        already: list[Item] = []
        for item in items:
            (already if coordinates_of(item) in found else fresh).append(item)
        if already:
            found.difference_update(map(coordinates_of, already))
            batch.recovered = True
            self.log.warning(
                "rows of an interrupted insert not inserted again",
                rows=len(already),
                ranges=describe(batch),
            )
        return fresh, already

    async def insert(
        self, batch: Batch, items: list[Item], shard: int = 0
    ) -> tuple[list[Item], list[Item]]:
        """Insert rows in one block into `shard`; on a data error, bisect to isolate the rows
        ClickHouse refuses and dead-letter them. Halves are inserted in order, so a partition's
        landed offset never jumps over rows that have not landed. Returns (landed, refused)."""
        if not items:
            return [], []
        try:
            await self._insert_block(batch, items, self.inserters[shard])
            return items, []
        except ClickHouseRejected as exc:
            if len(items) == 1:
                await self._dead_letter_rows(batch, items, str(exc))
                return [], items
        mid = len(items) // 2
        left_ok, left_bad = await self.insert(batch, items[:mid], shard)
        right_ok, right_bad = await self.insert(batch, items[mid:], shard)
        return left_ok + right_ok, left_bad + right_bad

    async def _insert_block(self, batch: Batch, items: list[Item], inserter: Shard) -> None:
        unknown = False  # did an attempt fail after the block may have reached the server?
        ownership = self.ownership

        async def attempt() -> None:
            nonlocal unknown
            while True:
                rows = await ownership.fence(batch, items)
                if unknown:
                    rows = await self._not_yet_landed(batch, rows)
                if not rows:
                    return
                fenced_at = time.monotonic()

                def prepare(
                    rows: list[Item] = rows, fenced_at: float = fenced_at
                ) -> list[Sequence[Any]] | None:
                    # The server answered the query; the rows go out now or never. A freeze
                    # or a revoke during that round trip sends the attempt back to the fence.
                    nonlocal unknown
                    if not ownership.unfrozen_since(fenced_at):
                        return None
                    lost = set(ownership.assignments.lost(batch))
                    if lost:
                        rows = [i for i in rows if (i.topic, i.partition) not in lost]
                    if not rows:
                        return None
                    unknown = True
                    return event_columns(rows, self.time_divisor, self.topics)

                t0 = time.monotonic()
                try:
                    await inserter.insert_columns(
                        self.config.clickhouse.events_table,
                        EVENT_COLUMNS,
                        settings=self.insert_settings,
                        prepare=prepare,
                    )
                except InsertWithdrawn:
                    self.log.warning("insert withdrawn before its rows were sent: re-fencing")
                    continue
                self.metrics.insert_seconds.observe(time.monotonic() - t0)
                self.vitals.ok("clickhouse")
                return

        await self.retry(attempt, batch)

    async def _not_yet_landed(self, batch: Batch, rows: list[Item]) -> list[Item]:
        """After a failed insert the server may still have written the rows (the connection
        broke after the write, or a view failed after the raw part was written): look."""
        ranges, bounds = span(rows)
        present = await self.offsets.present(self.config.clickhouse.events_table, ranges, bounds)
        if not present:
            return rows
        batch.recovered = True
        # The raw rows are there; whether every view (the meters) saw them is not known: a
        # server that failed after the raw part (code 319: a quorum wait) ran no view after it.
        self.metrics.views_in_doubt.inc(len(present))
        self.log.warning(
            "rows of a failed insert had landed, not inserted again",
            rows=len(present),
            ranges=describe(batch),
            views="may have missed these rows",
        )
        return [r for r in rows if coordinates_of(r) not in present]

    async def _dead_letter_rows(self, batch: Batch, items: list[Item], why: str) -> None:
        """Rows ClickHouse refused: rebuild the event, dead-letter it, release its marker."""
        reason = decoding.Rejection(decoding.REJECTED_BY_CLICKHOUSE, why[:500])
        rejects = [Reject(RebuiltRecord(i), reason) for i in items]
        await self.retry(lambda: self.dead_letters.send(rejects), batch)
        self.metrics.dead_letters.labels(decoding.REJECTED_BY_CLICKHOUSE).inc(len(items))
        if self.store is not None:
            store = self.store
            markers = [self.keys.identity(i.namespace, i.source, i.id) for i in items]
            coords = [self.keys.marker(coordinates_of(i)) for i in items]
            with contextlib.suppress(DependencyError):
                await store.release(markers, coords)
