"""The shard rule, the topology given by hand, and flow control by lane: pure logic (the
cluster itself is exercised in tests/integration/test_cluster.py)."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import xxhash

from sink.config import build
from sink.coordinates import Coordinates, Span
from sink.errors import ConfigError
from sink.operations.metrics import Metrics
from sink.pipeline.batch import Batch
from sink.pipeline.flow import FlowControl
from sink.pipeline.offsets import Assignments
from sink.stores.clickhouse.cluster import Node, explicit
from sink.stores.clickhouse.landed import ShardedOffsets
from sink.stores.clickhouse.shards import ShardRule, shard_of_namespace, shard_of_partition
from sink.stores.clickhouse.sql import Replication


def test_a_partition_shard_is_the_documented_hash() -> None:
    for topic, partition in [("om_acme", 0), ("om_acme", 7), ("om_globex~0123456789ab", 3)]:
        digest = xxhash.xxh3_64_intdigest(f"{topic}:{partition}".encode())
        assert shard_of_partition(topic, partition, 3) == digest % 3
    assert shard_of_namespace("acme", 2) == xxhash.xxh3_64_intdigest(b"acme") % 2
    assert shard_of_partition("anything", 5, 1) == 0


def test_partitions_spread_over_the_shards() -> None:
    spread = Counter(shard_of_partition(f"om_{t}", p, 2) for t in range(20) for p in range(12))
    assert set(spread) == {0, 1}
    assert min(spread.values()) > 80  # of 240


def test_the_rule_uses_storage_keys_or_namespaces_and_forgets() -> None:
    keys = {"om_acme": "om_acme"}
    rule = ShardRule(4, "partition", lambda t: keys[t], lambda t: t.split("_")[1])
    first = rule(("om_acme", 1))
    assert first == shard_of_partition("om_acme", 1, 4)
    keys["om_acme"] = "om_acme~feedfacecafe"  # the topic was created again
    assert rule(("om_acme", 1)) == first  # remembered until forgotten
    rule.forget([("om_acme", 1)])
    assert rule(("om_acme", 1)) == shard_of_partition("om_acme~feedfacecafe", 1, 4)
    by_namespace = ShardRule(4, "namespace", lambda t: t, lambda t: t.split("_")[1])
    shards = {by_namespace((f"om_acme_{n}", p)) for n in range(3) for p in range(8)}
    assert shards == {shard_of_namespace("acme", 4)}


def test_a_topology_given_by_hand() -> None:
    topology = explicit("c", [["a:9000", "b:9001"], ["c:9002"]])
    assert topology.shards == (
        (Node(1, 1, "a", 9000), Node(1, 2, "b", 9001)),
        (Node(2, 1, "c", 9002),),
    )
    assert topology.describe() == "c: shard 1: a:9000, b:9001; shard 2: c:9002"
    for bad in ([["a"]], [[]], []):
        with pytest.raises(ConfigError):
            explicit("c", bad)


def test_replicated_engines_name_their_zookeeper_path() -> None:
    r = Replication("sink_cluster", "/clickhouse/sink/db/")
    assert r.on_cluster == " ON CLUSTER `sink_cluster`"
    assert (
        r.engine("ReplacingMergeTree", "sink_offsets", "landed_offset")
        == "ReplicatedReplacingMergeTree('/clickhouse/sink/db/{shard}/sink_offsets', "
        "'{replica}', landed_offset)"
    )
    assert r.engine("MergeTree", "schema_migrations", every_shard=True) == (
        "ReplicatedMergeTree('/clickhouse/sink/db/all/schema_migrations', '{replica}')"
    )


class _Consumer:
    def __init__(self, tps: list[tuple[str, int]]) -> None:
        self.held = tps
        self.paused: set[tuple[str, int]] = set()

    def assignment(self) -> list[Any]:
        from aiokafka import TopicPartition

        return [TopicPartition(t, p) for t, p in self.held]

    def pause(self, *tps: Any) -> None:
        self.paused |= {(tp.topic, tp.partition) for tp in tps}

    def resume(self, *tps: Any) -> None:
        self.paused -= {(tp.topic, tp.partition) for tp in tps}


def test_a_blocked_lane_pauses_its_own_partitions_only() -> None:
    tps = [("t", p) for p in range(4)]
    consumer = _Consumer(tps)
    assignments = Assignments()
    assignments.assign(tps)
    assignments.position(tps, {})
    blocked: list[tuple[str, Batch]] = []
    flow = FlowControl(build({}), consumer, assignments, blocked, Metrics(), lambda tp: tp[1] % 2)
    flow.apply((0, 0))
    assert consumer.paused == set()
    waiting = Batch()
    waiting.extend(("t", 1), 1, 0, 9)
    blocked.append(("clickhouse", waiting))
    flow.apply((0, 0))
    assert consumer.paused == {("t", 1), ("t", 3)}  # lane 1; lane 0 goes on
    blocked.clear()
    flow.apply((0, 0))
    assert consumer.paused == set()


def test_a_meter_on_a_cluster_is_replicated_per_shard_and_read_through_distributed() -> None:
    from sink.metering.meter_sql import MeterSQL
    from sink.metering.meters import Meter
    from sink.stores.clickhouse.sql import ServerFeatures

    meter = Meter.model_validate({"slug": "calls", "event_type": "call", "aggregation": "COUNT"})
    r = Replication("c", "/clickhouse/sink/db")
    sql = MeterSQL(meter, ServerFeatures((18, 16)), "db", "events", r)
    assert "ON CLUSTER `c`" in sql.create_table()
    assert "ReplicatedAggregatingMergeTree('/clickhouse/sink/db/{shard}/meter_calls'" in (
        sql.create_table()
    )
    staging = sql.create_table("`db`.`_backfill_meter_calls`")
    assert "ON CLUSTER" not in staging and "ENGINE = AggregatingMergeTree()" in staging
    assert "ON CLUSTER `c` TO `db`.`meter_calls`" in sql.create_view(1_700_000_000)
    assert sql.table_all == "`db`.`meter_calls_all`"
    assert sql.create_distributed() == [
        "CREATE TABLE IF NOT EXISTS `db`.`meter_calls_all` ON CLUSTER `c` AS `db`.`meter_calls` "
        "ENGINE = Distributed(`c`, `db`, `meter_calls`)"
    ]
    assert all(s.endswith(" ON CLUSTER `c`") for s in sql.drop())
    single = MeterSQL(meter, ServerFeatures((18, 16)), "db", "events")
    assert single.table_all == single.table and single.create_distributed() == []
    assert "ON CLUSTER" not in single.create_table() + single.create_view(1)


class _Ledger:
    """One shard's landed offsets and raw-table coordinates, in memory."""

    def __init__(self, landed: dict[tuple[str, int], int]) -> None:
        self._landed = landed
        self.asked: list[list[str]] = []

    async def landed(
        self, topics: list[str], partitions: list[tuple[str, int]] | None = None
    ) -> dict[tuple[str, int], int]:
        self.asked.append(topics)
        return {
            tp: o
            for tp, o in self._landed.items()
            if tp[0] in topics and (partitions is None or tp in partitions)
        }

    async def present(self, table: str, ranges: Any, bounds: Any) -> set[Coordinates]:
        return {Coordinates(t, p, o) for (t, p), (first, _) in ranges.items() for o in [first]}


async def test_landed_offsets_are_read_on_the_rule_shard_or_after_a_change_on_every_shard() -> None:
    # Partition 0 moved from shard 1 (earlier layout) to shard 2: its offsets are on both.
    shard_1 = _Ledger({("t", 0): 500, ("t", 1): 70})
    shard_2 = _Ledger({("t", 0): 40})
    rule = {("t", 0): 1, ("t", 1): 0}.__getitem__
    usual = ShardedOffsets([shard_1, shard_2], rule)  # type: ignore[list-item]
    assert await usual.landed([("t", 0), ("t", 1)]) == {("t", 0): 40, ("t", 1): 70}
    moved = ShardedOffsets([shard_1, shard_2], rule, everywhere=True)  # type: ignore[list-item]
    assert await moved.landed([("t", 0), ("t", 1)]) == {("t", 0): 500, ("t", 1): 70}
    found = await moved.present("events", {("t", 0): Span(501, 600)}, (0, 1))
    assert found == {Coordinates("t", 0, 501)}
    # One shard: nothing else to ask, whatever the ledger says.
    assert ShardedOffsets([shard_1], lambda tp: 0, everywhere=True).everywhere is False  # type: ignore[list-item]
