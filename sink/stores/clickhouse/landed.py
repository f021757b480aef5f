"""The landed-offset ledger in ClickHouse, the source of truth for what landed: the offsets
table (written by the raw table's view for inserted rows, and directly for ranges that gave no
row) and the coordinates already in the raw table.

On a cluster each partition's ledger is on its shard (sink.stores.clickhouse.shards):
`ShardedOffsets` asks the shard of each partition. Before it looks for the coordinates of an
insert whose outcome is unknown, the replica asked first fetches every part its shard has
committed (`Shard.sync`): an insert another replica took is then seen, not inserted twice.

On replicated tables both lookups (the landed offsets, and the coordinates already in the raw
table) count only rows of parts that are there to stay (`sink.stores.clickhouse.quorum`): a
replica also shows the part of an insert whose quorum is still pending or has failed, and a
failed part is detached later. Counted as landed, its rows would be skipped and then lost.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from sink.coordinates import Coordinates, Span, TopicPartition
from sink.stores.clickhouse.connection import Database
from sink.stores.clickhouse.quorum import Undecided, lasting_parts
from sink.stores.clickhouse.shards import Shard
from sink.stores.clickhouse.sql import quote

OFFSET_COLUMNS = ("topic", "kafka_partition", "landed_offset")


class StorageKeys(Protocol):
    """Kafka topic name <-> the name rows and offsets are stored under (`sink.pipeline.topics`)."""

    def key(self, name: str) -> str: ...

    def name(self, key: str) -> str: ...


class PlainNames:
    """Every topic stored under its own name."""

    def key(self, name: str) -> str:
        return name

    def name(self, key: str) -> str:
        return key


class OffsetStore:
    """Reads and writes landed offsets in ClickHouse, the source of truth for what landed.
    Takes and returns Kafka topic names; stores under their storage keys."""

    def __init__(self, ch: Database, offsets_table: str, keys: StorageKeys | None = None) -> None:
        self.ch = ch
        self.table = offsets_table
        self.keys = keys or PlainNames()
        self.replicated = ch if isinstance(ch, Shard) and ch.replicated else None
        """The shard, when its tables are replicated: reads then count only lasting parts."""

    async def _lasting(
        self, shard: Shard, table: str, node: object, rows: list[tuple[Any, ...]]
    ) -> list[tuple[Any, ...]]:
        """`rows` (their last column `_part`) of the parts there to stay. The rows were read on
        `node`, the replica whose parts are then checked: it must still be the one asked."""
        lasting = await lasting_parts(shard, table, {str(r[-1]) for r in rows})
        if shard.node != node:
            raise Undecided(f"{table}: the replica changed while its parts were checked")
        return [r for r in rows if str(r[-1]) in lasting]

    async def landed(
        self, topics: Sequence[str], partitions: Iterable[TopicPartition] | None = None
    ) -> dict[TopicPartition, int]:
        """The landed offset of each partition of `topics` (only of `partitions`, if given)."""
        if not topics:
            return {}
        names = ", ".join(quote(self.keys.key(t)) for t in sorted(set(topics)))
        table = self.ch.table(self.table)
        shard = self.replicated
        if shard is not None:  # every part another replica took, quorum-acknowledged included
            await shard.sync(self.table)
        node = shard.node if shard is not None else None
        by = "topic, kafka_partition, _part" if shard is not None else "topic, kafka_partition"
        rows = await self.ch.query(
            f"SELECT {by}, max(landed_offset) FROM {table} WHERE topic IN ({names}) GROUP BY {by}"
        )
        wanted = None if partitions is None else set(partitions)
        rows = [
            (self.keys.name(str(r[0])), int(r[1]), *r[2:])
            for r in rows
            if wanted is None or (self.keys.name(str(r[0])), int(r[1])) in wanted
        ]
        if shard is not None:  # (topic, partition, part, offset): the part goes last
            rows = [(t, p, o, part) for t, p, part, o in rows]
            rows = await self._lasting(shard, self.table, node, rows)
        out: dict[TopicPartition, int] = {}
        for t, p, o, *_ in rows:
            out[(t, p)] = max(out.get((t, p), -1), int(o))
        return out

    async def present(
        self,
        events_table: str,
        ranges: Mapping[TopicPartition, Span],
        time_bounds: tuple[int, int],
    ) -> set[Coordinates]:
        """Coordinates within `ranges` that are already in the raw table. Bounded by the
        rows' event time (epoch seconds) so only the months concerned are read."""
        if not ranges:
            return set()
        key = self.keys.key
        which = " OR ".join(
            f"(_topic = {quote(key(t))} AND _partition = {p} "
            f"AND _offset BETWEEN {first} AND {last})"
            for (t, p), (first, last) in sorted(ranges.items())
        )
        low, high = time_bounds
        shard = self.replicated
        if shard is not None:
            await shard.sync(events_table)
        node = shard.node if shard is not None else None
        rows = await self.ch.query(
            f"SELECT _topic, _partition, _offset{', _part' if shard is not None else ''} "
            f"FROM {self.ch.table(events_table)} "
            f"WHERE time >= toDateTime({int(low)}) AND time < toDateTime({int(high) + 1}) "
            f"AND ({which})"
        )
        if shard is not None:
            rows = await self._lasting(shard, events_table, node, rows)
        return {Coordinates(self.keys.name(str(r[0])), int(r[1]), int(r[2])) for r in rows}

    async def record(
        self, landed: Mapping[TopicPartition, int], settings: Mapping[str, Any] | None = None
    ) -> None:
        """Write offsets of ranges that produced no raw rows (duplicates, dead letters), with
        the inserts' `settings` (their quorum)."""
        if not landed:
            return
        items = sorted(landed.items())
        data: list[list[Any]] = [
            [self.keys.key(t) for (t, _), _ in items],
            [p for (_, p), _ in items],
            [o for _, o in items],
        ]
        await self.ch.insert_columns(self.table, OFFSET_COLUMNS, data, settings)


class ShardedOffsets:
    """The landed-offset ledger of every shard: each partition's written on the shard
    `shard_of` gives it, and read there. Takes and returns what `OffsetStore` does.

    With `everywhere` (the cluster has had another number of shards, so a partition's earlier
    rows and offsets may be on another shard), reads ask every shard: a partition's landed
    offset is the highest any shard holds, and an interrupted insert is looked for on every
    shard. A partition that moved then neither replays nor skips; positioning then needs every
    shard to answer."""

    def __init__(
        self,
        stores: Sequence[OffsetStore],
        shard_of: Callable[[TopicPartition], int],
        everywhere: bool = False,
    ) -> None:
        self.stores = list(stores)
        self.shard_of = shard_of
        self.everywhere = everywhere and len(self.stores) > 1

    def _to_read(self, tps: Iterable[TopicPartition]) -> dict[int, list[TopicPartition]]:
        """The shards to ask about `tps`, with the partitions each is asked about."""
        if self.everywhere:
            every = list(tps)
            return dict.fromkeys(range(len(self.stores)), every)
        return self._by_shard(tps)

    def _by_shard(self, tps: Iterable[TopicPartition]) -> dict[int, list[TopicPartition]]:
        """`tps` by the shard the rule gives each."""
        groups: dict[int, list[TopicPartition]] = {}
        for tp in tps:
            groups.setdefault(self.shard_of(tp), []).append(tp)
        return groups

    async def landed(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, int]:
        """The landed offset of each of `tps` that has one."""
        out: dict[TopicPartition, int] = {}
        for shard, group in self._to_read(tps).items():
            landed = await self.stores[shard].landed(sorted({t for t, _ in group}), group)
            for tp in group:
                if tp in landed and landed[tp] > out.get(tp, -1):
                    out[tp] = landed[tp]
        return out

    async def present(
        self,
        events_table: str,
        ranges: Mapping[TopicPartition, Span],
        time_bounds: tuple[int, int],
    ) -> set[Coordinates]:
        found: set[Coordinates] = set()
        for shard, group in self._to_read(ranges).items():
            mine = {tp: ranges[tp] for tp in group}
            found |= await self.stores[shard].present(events_table, mine, time_bounds)
        return found

    async def record(
        self, landed: Mapping[TopicPartition, int], settings: Mapping[str, Any] | None = None
    ) -> None:
        # One shard after another (each store has one connection): a retry after a failure
        # writes again what was written, which the ledger's max() makes harmless.
        for shard, group in self._by_shard(landed).items():
            await self.stores[shard].record({tp: landed[tp] for tp in group}, settings)
