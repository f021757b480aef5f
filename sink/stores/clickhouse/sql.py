"""ClickHouse SQL text and server features: what a statement may use on the connected server.

No driver here: configuration and meter definitions use it without a database connection.
The schema works on ClickHouse 18.16 and on current servers; newer features are used only
where the server version has them (`ServerFeatures`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class ServerFeatures:
    """What the connected server supports, derived from its version."""

    version: tuple[int, ...]

    @property
    def datetime64(self) -> bool:
        return self.version >= (20, 1)

    @property
    def low_cardinality(self) -> bool:
        return self.version >= (20, 1)

    @property
    def json_extract(self) -> bool:
        return self.version >= (20, 1)


def parse_version(text: str) -> tuple[int, ...]:
    parts = re.findall(r"\d+", text)[:3]
    return tuple(int(p) for p in parts) or (0,)


def quote(value: str) -> str:
    """A ClickHouse string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass(frozen=True)
class Replication:
    """How tables are made on a cluster: `ON CLUSTER`, Replicated* engines whose ZooKeeper
    path is `<zookeeper_path>/<shard>/<table>`, and the replica named by the `{replica}` macro.
    Tables that must hold the same rows on every shard (the migration ledger) use the path
    `<zookeeper_path>/all/<table>`."""

    cluster: str
    zookeeper_path: str

    @property
    def on_cluster(self) -> str:
        return f" ON CLUSTER `{self.cluster}`"

    def engine(self, engine: str, table: str, *args: str, every_shard: bool = False) -> str:
        """`engine` (e.g. "ReplacingMergeTree") made Replicated, with its own arguments."""
        shard = "all" if every_shard else "{shard}"
        path = f"{self.zookeeper_path.rstrip('/')}/{shard}/{table}"
        return f"Replicated{engine}({', '.join([quote(path), quote('{replica}'), *args])})"

    def distributed(self, database: str, table: str) -> str:
        """A Distributed table `<table>_all` over a shard-local table, for reads."""
        return (
            f"CREATE TABLE IF NOT EXISTS `{database}`.`{distributed_name(table)}`"
            f"{self.on_cluster} AS `{database}`.`{table}` "
            f"ENGINE = Distributed(`{self.cluster}`, `{database}`, `{table}`)"
        )


def distributed_name(table: str) -> str:
    """The Distributed table over a shard-local table: reads go through it."""
    return f"{table}_all"
