"""The landed-offset ledger in ClickHouse, the source of truth for what landed: the offsets
table (written by the raw table's view for inserted rows, and directly for ranges that gave no
row) and the coordinates already in the raw table.

On a cluster each partition's ledger is on its shard (sink.stores.clickhouse.shards):
`ShardedOffsets` asks the shard of each partition. Before it looks for the coordinates of an
insert whose outcome is unknown, the replica asked first fetches every part its shard has
committed (`Shard.sync`): an insert another replica took is then seen, not inserted twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from sink.coordinates import Coordinates, Span, TopicPartition
from sink.stores.clickhouse.connection import Database
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

    async def landed(self, topics: Sequence[str]) -> dict[TopicPartition, int]:
        if not topics:
            return {}
        names = ", ".join(quote(self.keys.key(t)) for t in sorted(set(topics)))
        rows = await self.ch.query(
            f"SELECT topic, kafka_partition, max(landed_offset) FROM {self.ch.table(self.table)} "
            f"WHERE topic IN ({names}) GROUP BY topic, kafka_partition"
        )
        return {(self.keys.name(str(t)), int(p)): int(o) for t, p, o in rows}

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
        if isinstance(self.ch, Shard):
            await self.ch.sync(events_table)
        rows = await self.ch.query(
            f"SELECT _topic, _partition, _offset FROM {self.ch.table(events_table)} "
            f"WHERE time >= toDateTime({int(low)}) AND time < toDateTime({int(high) + 1}) "
            f"AND ({which})"
        )
        return {Coordinates(self.keys.name(str(t)), int(p), int(o)) for t, p, o in rows}

    async def record(self, landed: Mapping[TopicPartition, int]) -> None:
        """Write offsets of ranges that produced no raw rows (duplicates, dead letters)."""
        if not landed:
            return
        items = sorted(landed.items())
        data: list[list[Any]] = [
            [self.keys.key(t) for (t, _), _ in items],
            [p for (_, p), _ in items],
            [o for _, o in items],
        ]
        await self.ch.insert_columns(self.table, OFFSET_COLUMNS, data)


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
            landed = await self.stores[shard].landed(sorted({t for t, _ in group}))
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

    async def record(self, landed: Mapping[TopicPartition, int]) -> None:
        # One shard after another (each store has one connection): a retry after a failure
        # writes again what was written, which the ledger's max() makes harmless.
        for shard, group in self._by_shard(landed).items():
            await self.stores[shard].record({tp: landed[tp] for tp in group})
