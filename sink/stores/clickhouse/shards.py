"""Where a batch lands: the shards of a cluster, each reached through one healthy replica, and
the rule that puts each Kafka partition on one shard.

The shard rule keeps a partition's rows and its landed offsets on the same shard, so each
shard is a complete ledger of the partitions it holds: where a partition starts, and what an
interrupted insert left, are read from that one shard.

- `shard_by: partition` (default): shard = xxh3_64 of `<topic storage key>:<partition>`
  modulo the number of shards.
- `shard_by: namespace`: shard = xxh3_64 of the topic's namespace modulo the number of
  shards: all of a customer's topics land on one shard.

The rule depends on the number of shards: adding shards moves partitions (as does changing
`shard_by`). Every rule a worker started with is recorded in the ledger
(`sink.app.shard_layouts`); once there is more than one, positioning reads a partition's
landed offset from every shard and starts after the highest, so a moved partition neither
replays nor skips (`sink.stores.clickhouse.landed.ShardedOffsets`).

One server without a cluster is one shard of one replica: the same code lands it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar

import xxhash

from sink.errors import ClickHouseUnavailable
from sink.stores.clickhouse.cluster import Node
from sink.stores.clickhouse.connection import ClickHouse
from sink.stores.clickhouse.sql import ServerFeatures

T = TypeVar("T")


class Failing(NamedTuple):
    """A replica whose last call failed: since when (wall clock) and the last error."""

    since: float
    error: str


class Shard:
    """One shard's replicas behind one connection's interface. Every call goes to the current
    replica; a replica that fails (ClickHouse unavailable) makes the next call go to the next
    replica. The caller retries: a retried step lands on a healthy replica.

    On a replicated shard, `sync()` waits until the current replica holds every part the
    shard has committed, so a read after it sees every insert that any replica took, the
    ones whose outcome was unknown included.
    """

    def __init__(
        self,
        index: int,
        nodes: Sequence[Node],
        connect: Callable[[Node], ClickHouse],
        *,
        replicated: bool,
        sync_timeout: float = 30.0,
    ) -> None:
        if not nodes:
            raise ValueError("a shard needs a replica")
        self.index = index
        self.nodes = list(nodes)
        self.replicated = replicated
        self.sync_timeout = sync_timeout
        self._connect = connect
        self.current = 0
        self._conns: dict[int, ClickHouse] = {0: connect(self.nodes[0])}
        self.database = self._conns[0].database
        self.failing: dict[str, Failing] = {}
        """Replicas (by `Node.name`) whose last call failed; a success removes the entry."""

    @property
    def node(self) -> Node:
        """The replica the next call goes to."""
        return self.nodes[self.current]

    @property
    def name(self) -> str:
        return f"shard {self.index + 1}"

    def _connection(self) -> ClickHouse:
        ch = self._conns.get(self.current)
        if ch is None:
            ch = self._conns[self.current] = self._connect(self.node)
        return ch

    def table(self, name: str) -> str:
        return f"`{self.database}`.`{name}`"

    async def _call(self, op: Callable[[ClickHouse], Awaitable[T]]) -> T:
        node = self.node
        try:
            result = await op(self._connection())
        except ClickHouseUnavailable as exc:
            earlier = self.failing.get(node.name)
            since = earlier.since if earlier else time.time()
            self.failing[node.name] = Failing(since, str(exc)[:300])
            if len(self.nodes) > 1:
                self.current = (self.current + 1) % len(self.nodes)
            raise ClickHouseUnavailable(f"{node.name}: {exc}") from exc
        if self.failing:
            self.failing.pop(node.name, None)
        return result

    async def query(self, sql: str) -> list[tuple[Any, ...]]:
        return await self._call(lambda ch: ch.query(sql))

    async def execute(self, sql: str, settings: Mapping[str, Any] | None = None) -> None:
        await self._call(lambda ch: ch.execute(sql, settings))

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
        return await self._call(
            lambda ch: ch.insert_columns(
                table, columns, data, settings, prepare=prepare, query_id=query_id
            )
        )

    async def features(self) -> ServerFeatures:
        return await self._call(lambda ch: ch.features())

    async def ping(self) -> None:
        await self._call(lambda ch: ch.ping())

    async def sync(self, table: str) -> None:
        """Wait until the current replica has fetched every part of `table` the shard
        committed (no-op on one server)."""
        if not self.replicated:
            return
        await self.execute(
            f"SYSTEM SYNC REPLICA {self.table(table)}",
            {"receive_timeout": int(self.sync_timeout)},
        )

    def report(self, *others: Shard) -> dict[str, Any]:
        """For `/status`: the replica in use and each replica's state, from this connection
        and `others` to the same shard (the most recent failure of each replica wins)."""
        failing = dict(self.failing)
        for other in others:
            for name, failure in other.failing.items():
                if name not in failing or failure.since > failing[name].since:
                    failing[name] = failure
        replicas = []
        for node in self.nodes:
            entry: dict[str, Any] = {"replica": node.replica, "address": node.address}
            last = failing.get(node.name)
            entry["up"] = last is None
            if last is not None:
                entry["failing_since"] = last.since
                entry["error"] = last.error
            replicas.append(entry)
        return {"shard": self.index + 1, "in_use": self.node.address, "replicas": replicas}

    async def close(self) -> None:
        conns, self._conns = self._conns, {}
        await asyncio.gather(*(ch.close() for ch in conns.values()), return_exceptions=True)


def shard_of_partition(topic_key: str, partition: int, shards: int) -> int:
    """`shard_by: partition`: the shard of one Kafka partition (from 0)."""
    if shards == 1:
        return 0
    return xxhash.xxh3_64_intdigest(f"{topic_key}:{partition}".encode()) % shards


def shard_of_namespace(namespace: str, shards: int) -> int:
    """`shard_by: namespace`: the shard of every topic of one namespace (from 0)."""
    if shards == 1:
        return 0
    return xxhash.xxh3_64_intdigest(namespace.encode()) % shards


class ShardRule:
    """The shard of each Kafka partition (from 0), by `clickhouse.shard_by`; remembered per
    partition until `forget` (a topic created again gets another storage key)."""

    def __init__(
        self,
        shards: int,
        by: str,
        topic_key: Callable[[str], str],
        namespace_of: Callable[[str], str],
    ) -> None:
        self.shards = shards
        self.by = by
        self.topic_key = topic_key
        self.namespace_of = namespace_of
        self._known: dict[tuple[str, int], int] = {}

    def __call__(self, tp: tuple[str, int]) -> int:
        shard = self._known.get(tp)
        if shard is None:
            topic, partition = tp
            if self.by == "namespace":
                shard = shard_of_namespace(self.namespace_of(topic), self.shards)
            else:
                shard = shard_of_partition(self.topic_key(topic), partition, self.shards)
            self._known[tp] = shard
        return shard

    def forget(self, tps: Sequence[tuple[str, int]]) -> None:
        for tp in tps:
            self._known.pop(tp, None)
