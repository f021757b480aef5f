"""A ClickHouse cluster as sink sees it: its shards, each a list of replicas (the DDL that makes
tables replicated is `sink.stores.clickhouse.sql.Replication`).

The shards and replicas come from `system.clusters` on the node in `clickhouse.url` (the
servers' `remote_servers`), or from `clickhouse.nodes` where that table cannot be read. A
cluster whose nodes disagree about its shards is refused before anything is written: the
shard a partition lands on would then depend on which node was asked.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from sink.errors import ConfigError, DependencyError
from sink.stores.clickhouse.connection import ClickHouse
from sink.stores.clickhouse.sql import quote


@dataclass(frozen=True)
class Node:
    """One server of the cluster: its shard and replica numbers (from 1) and native address."""

    shard: int
    replica: int
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def name(self) -> str:
        """How logs, `/status` and `/readyz` name it: shard, replica and address."""
        return f"shard {self.shard} replica {self.replica} ({self.address})"


@dataclass(frozen=True)
class Topology:
    """The shards of one cluster, in shard order, each with its replicas in replica order."""

    cluster: str
    shards: tuple[tuple[Node, ...], ...]

    @property
    def nodes(self) -> list[Node]:
        return [node for shard in self.shards for node in shard]

    def describe(self) -> str:
        return f"{self.cluster}: " + "; ".join(
            f"shard {i + 1}: {', '.join(n.address for n in shard)}"
            for i, shard in enumerate(self.shards)
        )


def explicit(cluster: str, nodes: Sequence[Sequence[str]]) -> Topology:
    """The topology given in `clickhouse.nodes`: a list per shard of `host:port` replicas."""
    shards = []
    for s, replicas in enumerate(nodes, start=1):
        shard = []
        for r, address in enumerate(replicas, start=1):
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                raise ConfigError(f"clickhouse.nodes: {address!r} is not host:port")
            shard.append(Node(s, r, host, int(port)))
        if not shard:
            raise ConfigError(f"clickhouse.nodes: shard {s} has no replica")
        shards.append(tuple(shard))
    if not shards:
        raise ConfigError("clickhouse.nodes: no shard given")
    return Topology(cluster, tuple(shards))


async def read_topology(ch: ClickHouse, cluster: str) -> Topology:
    """The cluster as the connected node's `system.clusters` describes it."""
    rows = await ch.query(
        "SELECT shard_num, replica_num, host_address, port FROM system.clusters "
        f"WHERE cluster = {quote(cluster)} ORDER BY shard_num, replica_num"
    )
    if not rows:
        known = await ch.query("SELECT DISTINCT cluster FROM system.clusters ORDER BY cluster")
        raise ConfigError(
            f"clickhouse.cluster: the server knows no cluster {cluster!r} in its "
            f"remote_servers (it knows: {', '.join(str(r[0]) for r in known) or 'none'}); "
            "name one of those, or leave clickhouse.cluster unset for a single server"
        )
    shards: dict[int, list[Node]] = {}
    for shard, replica, host, port in rows:
        shards.setdefault(int(shard), []).append(
            Node(int(shard), int(replica), str(host), int(port))
        )
    return Topology(cluster, tuple(tuple(shards[s]) for s in sorted(shards)))


async def agreed_topology(
    first: ClickHouse, cluster: str, connect: Callable[[Node], Awaitable[ClickHouse]]
) -> Topology:
    """The topology read from `first`, checked against every other node's own view. A node
    that does not answer is skipped (it may be down); one that answers differently is an
    error."""
    topology = await read_topology(first, cluster)
    for node in topology.nodes:
        ch = await connect(node)
        try:
            theirs = await read_topology(ch, cluster)
        except DependencyError:
            continue
        except ConfigError:
            raise ConfigError(
                f"clickhouse.cluster: node {node.address} has no cluster {cluster!r}; every "
                "node of the cluster must define it alike in remote_servers"
            ) from None
        finally:
            await ch.close()
        if theirs != topology:
            raise ConfigError(
                f"clickhouse.cluster: the nodes disagree about {cluster!r}: "
                f"{first.database!r} via clickhouse.url says {topology.describe()}, node "
                f"{node.address} says {theirs.describe()}; make remote_servers the same on "
                "every node"
            )
    return topology
