"""sink on a real replicated, sharded ClickHouse cluster (2 shards x 2 replicas with ZooKeeper:
`scripts/stack.sh up --cluster`): every partition's rows and landed offsets on one shard, by
the documented rule, exact per shard and through the Distributed table, under kill -9 of the
worker and a replica killed mid-stream.

Needs CLICKHOUSE_CLUSTER and CLICKHOUSE_NODES (`scripts/stack.sh env --cluster`); the node
kill needs the local stack's control script.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiokafka import AIOKafkaProducer

from sink.coordinates import Coordinates, Span
from sink.stores.clickhouse.cluster import Node
from sink.stores.clickhouse.connection import ClickHouse
from sink.stores.clickhouse.landed import OffsetStore
from sink.stores.clickhouse.schema import EVENT_COLUMNS
from sink.stores.clickhouse.shards import Shard, shard_of_partition
from tests.conftest import STACK, Services
from tests.integration.test_observability import get_json
from tests.integration.test_worker import free_port
from tests.integration.workload import REGEX, Workload, topics_for

pytestmark = pytest.mark.cluster


@dataclass
class Cluster:
    name: str
    database: str
    shards: list[list[str]]
    """host:port of each replica, per shard."""
    base: str
    """clickhouse://user:@host:port of the first node, without a database."""

    def url(self) -> str:
        return f"{self.base}/{self.database}"

    def connect(self, address: str, database: str | None = None) -> ClickHouse:
        host, port = address.rsplit(":", 1)
        return ClickHouse(
            f"{self.base}/{database or self.database}",
            connect_timeout=5,
            query_timeout=120,
            address=(host, int(port)),
        )


def _nodes() -> tuple[str, list[list[str]]]:
    name, nodes = os.environ.get("CLICKHOUSE_CLUSTER"), os.environ.get("CLICKHOUSE_NODES")
    if not name or not nodes:
        pytest.skip('no ClickHouse cluster: `eval "$(scripts/stack.sh env --cluster)"`')
    addresses = nodes.split(",")
    half = len(addresses) // 2
    return name, [addresses[:half], addresses[half:]]


@pytest.fixture
async def cluster(uid: str) -> AsyncIterator[Cluster]:
    name, shards = _nodes()
    c = Cluster(name, f"c_{uid}", shards, f"clickhouse://default:@{shards[0][0]}")
    root = c.connect(shards[0][0], "default")
    await root.execute(f"CREATE DATABASE IF NOT EXISTS {c.database} ON CLUSTER {name}")
    yield c
    await root.execute(f"DROP DATABASE IF EXISTS {c.database} ON CLUSTER {name}")
    await root.close()


async def _one(c: Cluster, address: str, sql: str) -> list[tuple[Any, ...]]:
    ch = c.connect(address)
    try:
        return await ch.query(sql)
    finally:
        await ch.close()


async def landed_on_shards(c: Cluster) -> list[dict[tuple[str, int], int]]:
    """Each shard's landed offsets, read on its first replica that answers."""
    out = []
    for replicas in c.shards:
        for address in replicas:
            try:
                rows = await _one(
                    c,
                    address,
                    f"SELECT topic, kafka_partition, max(landed_offset) FROM "
                    f"{c.database}.sink_offsets GROUP BY topic, kafka_partition",
                )
                break
            except Exception:
                rows = None
        out.append({(t, p): o for t, p, o in rows or []})
    return out


async def wait_cluster_landed(
    c: Cluster, ends: dict[tuple[str, int], int], timeout: float, alive: Callable[[], bool]
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        merged: dict[tuple[str, int], int] = {}
        for shard in await landed_on_shards(c):
            for tp, offset in shard.items():
                merged[tp] = max(merged.get(tp, -1), offset)
        missing = {tp: e - 1 for tp, e in ends.items() if merged.get(tp, -1) < e - 1}
        if not missing:
            return
        assert alive(), f"worker exited; not landed: {missing}"
        assert time.monotonic() < deadline, f"not landed in {timeout}s: {missing} ({merged})"
        await asyncio.sleep(0.5)


async def assert_cluster_exact(c: Cluster, work: Workload) -> None:
    """Every shard exact on each of its replicas, its partitions those the shard rule gives
    it and nobody else's, its landed offsets at their ends; through the Distributed table
    every expected identity once."""
    landed = await landed_on_shards(c)
    for index, replicas in enumerate(c.shards):
        counts = []
        for address in replicas:
            await _one(c, address, f"SYSTEM SYNC REPLICA {c.database}.events")
            [(rows, identities, offsets)] = await _one(
                c,
                address,
                f"SELECT count(), uniqExact(namespace, source, id), "
                f"uniqExact(_topic, _partition, _offset) FROM {c.database}.events",
            )
            assert rows == identities == offsets, (address, rows, identities, offsets)
            counts.append(rows)
        assert len(set(counts)) == 1, f"replicas of shard {index + 1} differ: {counts}"
        partitions = await _one(
            c, replicas[0], f"SELECT DISTINCT _topic, _partition FROM {c.database}.events"
        )
        for topic, partition in partitions:
            assert shard_of_partition(topic, partition, len(c.shards)) == index, (
                f"{topic}/{partition} landed on shard {index + 1} against the shard rule"
            )
        for (topic, partition), offset in landed[index].items():
            assert shard_of_partition(topic, partition, len(c.shards)) == index
            assert offset == work.ends[(topic, partition)] - 1
    identities = {
        (n, s, i)
        for n, s, i in await _one(
            c, c.shards[0][0], f"SELECT namespace, source, id FROM {c.database}.events_all"
        )
    }
    [(rows,)] = await _one(c, c.shards[0][0], f"SELECT count() FROM {c.database}.events_all")
    assert identities == work.expected
    assert rows == len(work.expected)


def _cluster_config(
    sink_config: Callable[..., Path], c: Cluster, uid: str, port: int = 0, **clickhouse: Any
) -> Path:
    return sink_config(
        kafka={"topics_regex": REGEX.format(uid=uid)},
        clickhouse={"url": c.url(), "cluster": c.name, **clickhouse},
        batch={"max_rows": 1000, "max_wait": "200ms", "max_in_flight": 4000},
        http={"port": port},
        worker={"drain_timeout": "20s", "log_format": "json", "retry_max": "1s"},
    )


async def _landing(proc: Any, c: Cluster, deadline: float) -> None:
    while time.monotonic() < deadline:
        assert proc.running, proc.logs()[-3000:]
        if any(await landed_on_shards(c)):
            return
        await asyncio.sleep(0.2)
    raise AssertionError("nothing landed")


@dataclass
class Stream:
    """A workload being sent while one worker lands it on the cluster."""

    work: Workload
    proc: Any
    sender: asyncio.Task[None]

    async def finish(self, c: Cluster) -> None:
        """The rest is sent, everything lands, and the cluster is exact."""
        await self.sender
        await wait_cluster_landed(c, self.work.ends, 180, lambda: self.proc.running)
        await assert_cluster_exact(c, self.work)


async def _stream(
    c: Cluster,
    make_topics: Callable[..., Any],
    sink_config: Callable[..., Path],
    run_sink: Callable[..., Any],
    producer: AIOKafkaProducer,
    uid: str,
    seed: int,
    events: int,
    port: int = 0,
    **clickhouse: Any,
) -> Stream:
    """Topics, a workload with duplicates sent at a steady pace, and a worker landing it
    (its HTTP endpoints on `port`)."""
    topics, namespaces = await topics_for(make_topics, uid, partitions=4)
    work = Workload(topics, namespaces, partitions=4, seed=seed)
    work.add(events, duplicate_share=0.05)
    proc = run_sink(_cluster_config(sink_config, c, uid, port, **clickhouse))
    sender = asyncio.create_task(work.send(producer, chunk=200, pace=0.3))
    await _landing(proc, c, time.monotonic() + 90)
    return Stream(work, proc, sender)


async def test_two_workers_killed_with_9_land_exactly_per_shard(
    cluster: Cluster,
    make_topics: Callable[..., Any],
    sink_config: Callable[..., Path],
    run_sink: Callable[..., Any],
    producer: AIOKafkaProducer,
    uid: str,
) -> None:
    topics, namespaces = await topics_for(make_topics, uid, partitions=4)
    work = Workload(topics, namespaces, partitions=4, seed=31)
    work.add(8000, duplicate_share=0.08, invalid_share=0.01)
    config = _cluster_config(sink_config, cluster, uid)
    # Two workers start at once: both migrate ON CLUSTER, one takes the lease.
    first, second = run_sink(config, name="a"), run_sink(config, name="b")
    sender = asyncio.create_task(work.send(producer, chunk=200, pace=0.25))
    await _landing(first, cluster, time.monotonic() + 90)
    for victim in ("a", "b", "a"):
        await asyncio.sleep(1.5)
        proc = first if victim == "a" else second
        proc.kill()
        await asyncio.sleep(0.5)
        restarted = run_sink(config, name=victim)
        first, second = (restarted, second) if victim == "a" else (first, restarted)
    await sender
    await wait_cluster_landed(cluster, work.ends, 180, lambda: first.running or second.running)
    await assert_cluster_exact(cluster, work)
    assert first.stop() == 0 and second.stop() == 0


def _pid(service: str) -> int:
    done = subprocess.run(["bash", str(STACK), "pid", service], capture_output=True, text=True)
    return int(done.stdout.split()[0])


def _stack(*args: str) -> None:
    done = subprocess.run(["bash", str(STACK), *args], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]


async def test_a_replica_killed_mid_stream_loses_and_doubles_nothing(
    services: Services,
    cluster: Cluster,
    make_topics: Callable[..., Any],
    sink_config: Callable[..., Path],
    run_sink: Callable[..., Any],
    producer: AIOKafkaProducer,
    uid: str,
) -> None:
    if services.control is None:
        pytest.skip("needs the local stack's control script to kill a node")
    # Quorum 2: while a replica of a shard is down, that shard's partitions wait.
    stream = await _stream(
        cluster,
        make_topics,
        sink_config,
        run_sink,
        producer,
        uid,
        32,
        6000,
        insert_quorum_timeout="5s",
    )
    proc = stream.proc
    _stack("kill", "clickhouse-1-2")
    try:
        await asyncio.sleep(1)
        before = await landed_on_shards(cluster)
        await asyncio.sleep(4)
        during = await landed_on_shards(cluster)
        assert proc.running
    finally:
        _stack("up", "clickhouse-1-2")
    # Shard 1 could not reach its quorum meanwhile; shard 2 went on landing.
    assert "dependency failed, retrying" in proc.logs()
    assert sum(during[1].values()) > sum(before[1].values()), (before, during)
    await stream.finish(cluster)
    assert proc.stop() == 0


async def test_a_check_after_an_unknown_outcome_sees_what_another_replica_took(
    cluster: Cluster, sink_config: Callable[..., Path], uid: str
) -> None:
    """The rows an insert left on one replica are found through the other replica before
    anything is inserted again (`Shard.sync` then the coordinates' lookup)."""
    from sink.app import migrate
    from sink.config import load

    await migrate(load(_cluster_config(sink_config, cluster, uid), {}))
    shard = cluster.shards[0]
    first = cluster.connect(shard[0])
    topic = f"t_{uid}"
    rows = [
        ("ns", f"e{i}", "t", "s", "", 1_700_000_000, "{}", 1_700_000_000, "", topic, 0, i)
        for i in range(50)
    ]
    # Replica 2 stops fetching, so the rows exist on replica 1 only until it syncs.
    second = cluster.connect(shard[1])
    await second.execute(f"SYSTEM STOP FETCHES {cluster.database}.events")
    await first.insert_columns(
        "events", EVENT_COLUMNS, [list(col) for col in zip(*rows, strict=True)]
    )
    [(before,)] = await second.query(f"SELECT count() FROM {cluster.database}.events")
    assert before == 0
    await second.execute(f"SYSTEM START FETCHES {cluster.database}.events")

    host, port = shard[1].rsplit(":", 1)
    replica_two = Shard(0, [Node(1, 2, host, int(port))], partial(_at, cluster), replicated=True)
    store = OffsetStore(replica_two, "sink_offsets")
    found = await store.present("events", {(topic, 0): Span(0, 99)}, (1_699_999_999, 1_700_000_001))
    assert found == {Coordinates(topic, 0, i) for i in range(50)}
    for ch in (first, second):
        await ch.close()
    await replica_two.close()


def _at(c: Cluster, node: Node) -> ClickHouse:
    return c.connect(node.address)


async def test_rows_of_a_quorum_insert_not_yet_decided_do_not_count_as_landed(
    services: Services, cluster: Cluster, sink_config: Callable[..., Path], uid: str
) -> None:
    """An insert whose quorum wait timed out (code 319) leaves its part on the replica that
    took it, pending. If that replica dies before another fetched the part, the quorum fails
    and the part is dropped when the replica comes back: its rows never landed. So a lookup
    of what landed waits while the quorum is pending, instead of counting the rows."""
    if services.control is None:
        pytest.skip("needs the local stack's control script to kill a node")
    from sink.app import migrate
    from sink.config import load
    from sink.errors import ClickHouseUnavailable
    from sink.stores.clickhouse.quorum import Undecided

    await migrate(load(_cluster_config(sink_config, cluster, uid), {}))
    first_address, second_address = cluster.shards[0]
    first, second = cluster.connect(first_address), cluster.connect(second_address)
    topic = f"t_{uid}"
    rows = [
        ("ns", f"e{i}", "t", "s", "", 1_700_000_000, "{}", 1_700_000_000, "", topic, 0, i)
        for i in range(50)
    ]
    columns = [list(col) for col in zip(*rows, strict=True)]
    host, port = first_address.rsplit(":", 1)
    replica_one = Shard(0, [Node(1, 1, host, int(port))], partial(_at, cluster), replicated=True)
    store = OffsetStore(replica_one, "sink_offsets")
    span, bounds = {(topic, 0): Span(0, 49)}, (1_699_999_999, 1_700_000_001)
    # Replica 2 fetches nothing, so the quorum of 2 cannot be reached in the second given.
    await second.execute("SYSTEM STOP FETCHES")
    try:
        with pytest.raises(ClickHouseUnavailable, match="319"):
            await first.insert_columns(
                "events",
                EVENT_COLUMNS,
                columns,
                {"insert_quorum": 2, "insert_quorum_timeout": 1000},
            )
        [(shown,)] = await first.query(f"SELECT count() FROM {cluster.database}.events")
        assert shown == 50  # replica 1 shows the rows ...
        with pytest.raises(Undecided, match="quorum"):
            await store.present("events", span, bounds)  # ... but they do not count yet
        # The insert stopped at the raw table's quorum wait: its views never ran.
        assert await store.landed([topic]) == {}
        await replica_one.close()
        # Replica 1 dies before the part was fetched: once its ZooKeeper session expired,
        # replica 2 finds nobody to fetch it from and the quorum fails.
        _stack("kill", "clickhouse-1-1")
        try:
            await second.execute("SYSTEM START FETCHES")
            zookeeper_path = await _zookeeper_path(cluster, second_address, "events")
            deadline = time.monotonic() + 60
            while not await second.query(
                "SELECT name FROM system.zookeeper "
                f"WHERE path = '{zookeeper_path}/quorum/failed_parts'"
            ):
                assert time.monotonic() < deadline, "the quorum never failed"
                await asyncio.sleep(0.5)
        finally:
            _stack("up", "clickhouse-1-1")
    finally:
        await second.execute("SYSTEM START FETCHES")
    # Back up, replica 1 dropped the part: the rows it showed are gone, and the lookup that
    # declined to count them now says so.
    [(shown,)] = await _one(
        cluster, first_address, f"SELECT count() FROM {cluster.database}.events"
    )
    assert shown == 0
    assert await store.present("events", span, bounds) == set()
    assert await store.landed([topic]) == {}
    for ch in (first, second):
        await ch.close()
    await replica_one.close()


async def _zookeeper_path(c: Cluster, address: str, table: str) -> str:
    [(path,)] = await _one(
        c,
        address,
        "SELECT zookeeper_path FROM system.replicas "
        f"WHERE database = '{c.database}' AND table = '{table}'",
    )
    return str(path)


async def test_a_cluster_unknown_to_the_servers_is_refused_before_anything_is_written(
    cluster: Cluster, sink_config: Callable[..., Path], run_sink: Callable[..., Any], uid: str
) -> None:
    proc = run_sink(sink_config(clickhouse={"url": cluster.url(), "cluster": "no_such_cluster"}))
    await asyncio.to_thread(proc.proc.wait, 60)  # refused at start: the process exits
    assert not proc.running and proc.proc.returncode != 0
    assert "knows no cluster 'no_such_cluster'" in proc.logs()
    assert "sink_cluster" in proc.logs()
    tables = await _one(
        cluster,
        cluster.shards[0][0],
        f"SELECT name FROM system.tables WHERE database = '{cluster.database}'",
    )
    assert tables == []


async def test_single_server_tables_on_a_cluster_are_refused(
    cluster: Cluster, sink_config: Callable[..., Path], run_sink: Callable[..., Any], uid: str
) -> None:
    # A raw table made for one server, on the first node only.
    await _one(
        cluster,
        cluster.shards[0][0],
        f"CREATE TABLE {cluster.database}.events (x UInt8) ENGINE = MergeTree() ORDER BY x",
    )
    proc = run_sink(_cluster_config(sink_config, cluster, uid))
    await asyncio.to_thread(proc.proc.wait, 60)  # refused at start: the process exits
    assert not proc.running
    assert "without replication: events (MergeTree)" in proc.logs()
    tables = await _one(
        cluster,
        cluster.shards[0][0],
        f"SELECT name FROM system.tables WHERE database = '{cluster.database}'",
    )
    assert [t for (t,) in tables] == ["events"]


async def test_a_whole_shard_down_pauses_its_partitions_only(
    services: Services,
    cluster: Cluster,
    make_topics: Callable[..., Any],
    sink_config: Callable[..., Path],
    run_sink: Callable[..., Any],
    producer: AIOKafkaProducer,
    uid: str,
) -> None:
    if services.control is None:
        pytest.skip("needs the local stack's control script to kill nodes")
    port = free_port()
    stream = await _stream(
        cluster, make_topics, sink_config, run_sink, producer, uid, 33, 6000, port
    )
    proc = stream.proc
    _stack("kill", "clickhouse-2-1", "clickhouse-2-2")
    try:
        await asyncio.sleep(1)
        before = await landed_on_shards(cluster)
        await asyncio.sleep(4)
        during = await landed_on_shards(cluster)
        assert proc.running
        # What an operator sees meanwhile: the failing shard and replicas, by name.
        _, ready = get_json(port, "/readyz")
        _, status = get_json(port, "/status")
    finally:
        _stack("up", "clickhouse-2-1", "clickhouse-2-2")
    assert sum(during[0].values()) > sum(before[0].values()), (before, during)
    assert "shard 2 replica" in proc.logs()  # the failure names the shard and replica
    failing = ready["clickhouse_failing"]
    assert failing and all(f.startswith("shard 2 replica ") for f in failing), failing
    first, second = status["clickhouse_shards"]
    assert [r["up"] for r in first["replicas"]] == [True, True], first
    assert not all(r["up"] for r in second["replicas"]), second
    assert {r["address"] for r in second["replicas"]} == set(cluster.shards[1])
    await stream.finish(cluster)
    assert proc.stop() == 0


async def test_a_zookeeper_restart_loses_and_doubles_nothing(
    services: Services,
    cluster: Cluster,
    make_topics: Callable[..., Any],
    sink_config: Callable[..., Path],
    run_sink: Callable[..., Any],
    producer: AIOKafkaProducer,
    uid: str,
) -> None:
    if services.control is None:
        pytest.skip("needs the local stack's control script to kill ZooKeeper")
    stream = await _stream(cluster, make_topics, sink_config, run_sink, producer, uid, 34, 5000)
    proc = stream.proc
    _stack("kill", "zookeeper")
    try:
        await asyncio.sleep(3)
        assert proc.running
    finally:
        _stack("up", "zookeeper")  # waits until replicated tables are writable again
    await stream.finish(cluster)
    assert "dependency failed, retrying" in proc.logs()
    assert proc.stop() == 0


async def test_a_replica_frozen_past_the_quorum_timeout_loses_and_doubles_nothing(
    services: Services,
    cluster: Cluster,
    make_topics: Callable[..., Any],
    sink_config: Callable[..., Path],
    run_sink: Callable[..., Any],
    producer: AIOKafkaProducer,
    uid: str,
) -> None:
    """A quorum insert whose second replica is frozen fails after the quorum timeout with an
    unknown outcome while the first replica has the rows: the retry must find them."""
    if services.control is None:
        pytest.skip("needs the local stack's control script to find the node")
    pid = _pid("clickhouse-1-2")
    stream = await _stream(
        cluster,
        make_topics,
        sink_config,
        run_sink,
        producer,
        uid,
        35,
        5000,
        insert_quorum_timeout="3s",
    )
    proc = stream.proc
    os.kill(pid, signal.SIGSTOP)
    try:
        await asyncio.sleep(7)
        assert proc.running
    finally:
        os.kill(pid, signal.SIGCONT)
    await stream.finish(cluster)
    assert "dependency failed, retrying" in proc.logs()
    assert proc.stop() == 0


async def _topic_on_both_shards(make_topics: Callable[..., Any], uid: str) -> str:
    """A topic with enough partitions that both shards hold some (the rule hashes its name)."""
    topic = f"om_acme_{uid}"
    partitions = next(
        n for n in range(4, 64) if {shard_of_partition(topic, p, 2) for p in range(n)} == {0, 1}
    )
    await make_topics(topic, partitions=partitions)
    return topic


async def _trickle(producer: AIOKafkaProducer, events: list[Any], chunk: int) -> dict[Any, int]:
    """`events` sent `chunk` at a time, 0.3 s apart; the last offset of each partition."""
    from tests.integration.test_meters import send

    last: dict[Any, int] = {}
    for i in range(0, len(events), chunk):
        last.update(await send(producer, events[i : i + chunk]))
        await asyncio.sleep(0.3)
    return last


async def _assert_meter_exact(
    c: Cluster, spec: dict[str, Any], events: list[Any], group: str
) -> None:
    """The meter's usage per minute, read through the Distributed meter tables, equals the
    Python computation over `events`."""
    from sink.metering import usage
    from sink.metering.meters import Meter
    from tests.integration.test_meters import expected, observed

    meter = Meter.model_validate(spec)
    ch = c.connect(c.shards[0][0])
    try:
        rows = await usage.query(
            ch, meter, namespace="acme", window="MINUTE", group_by=[group], cluster=c.name
        )
    finally:
        await ch.close()
    assert observed(rows, [group]) == expected(events, meter, "acme", "MINUTE", "UTC", [group])


async def test_meters_on_the_cluster_equal_a_python_computation(
    cluster: Cluster,
    make_topics: Callable[..., Any],
    sink_config: Callable[..., Path],
    run_sink: Callable[..., Any],
    producer: AIOKafkaProducer,
    uid: str,
) -> None:
    """A meter from the start, and one added while events flow: its backfill counts each
    shard's earlier rows once; both read through the Distributed meter tables."""
    from tests.integration.test_meters import METERS, generate, send

    topic = await _topic_on_both_shards(make_topics, uid)
    first = generate(topic, 1500, seed=5)
    ends = await send(producer, first)

    def config(name: str, meters: list[dict[str, Any]]) -> Path:
        return sink_config(
            name=name,
            meters=meters,
            clickhouse={"url": cluster.url(), "cluster": cluster.name},
            batch={"max_rows": 200, "max_wait": "100ms"},
        )

    worker = run_sink(config("before", METERS[:1]))
    await wait_cluster_landed(cluster, ends, 120, lambda: worker.running)
    later = generate(topic, 1500, seed=5, start=1500)

    # Sent over ~9 s: spans the migration, before and after the cutoff.
    sender = asyncio.create_task(_trickle(producer, later, 50))
    migrate = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sink",
        "migrate",
        "-c",
        str(config("after", METERS[:2])),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await migrate.communicate()
    assert migrate.returncode == 0, err.decode()[-3000:]
    assert "applied meter:tokens" in out.decode()
    ends.update(await sender)
    await wait_cluster_landed(cluster, ends, 120, lambda: worker.running)
    assert worker.stop() == 0

    await _assert_meter_exact(cluster, METERS[0], first + later, "route")
    await _assert_meter_exact(cluster, METERS[1], first + later, "model")
    ch = cluster.connect(cluster.shards[0][0])
    try:
        # Each shard backfilled its own rows, on its own records.
        plans = await ch.query(
            f"SELECT version, state FROM {cluster.database}.schema_migrations "
            "WHERE startsWith(version, 'backfill:tokens:') AND startsWith(state, 'plan ')"
        )
        assert sorted({str(v).rsplit(":", 1)[1] for v, _ in plans}) == ["shard1", "shard2"]
        assert all(not str(s).startswith("plan rows=0 ") for _, s in plans), plans
    finally:
        await ch.close()


async def test_meters_stay_exact_when_a_replica_is_killed_during_inserts(
    services: Services,
    cluster: Cluster,
    make_topics: Callable[..., Any],
    sink_config: Callable[..., Path],
    run_sink: Callable[..., Any],
    producer: AIOKafkaProducer,
    uid: str,
) -> None:
    """With the default (long) quorum wait, an insert that a replica's death holds up waits
    for the replica instead of failing with 319 before the views ran: the meters count every
    event once."""
    if services.control is None:
        pytest.skip("needs the local stack's control script to kill a node")
    from tests.integration.test_meters import METERS, generate

    topic = await _topic_on_both_shards(make_topics, uid)
    events = generate(topic, 3000, seed=9)
    worker = run_sink(
        sink_config(
            meters=METERS[:1],
            clickhouse={"url": cluster.url(), "cluster": cluster.name},
            batch={"max_rows": 200, "max_wait": "100ms"},
            worker={"retry_max": "1s"},
        )
    )

    sender = asyncio.create_task(_trickle(producer, events, 100))
    await _landing(worker, cluster, time.monotonic() + 90)
    _stack("kill", "clickhouse-1-2")
    try:
        await asyncio.sleep(5)
    finally:
        _stack("up", "clickhouse-1-2")
    ends = await sender
    await wait_cluster_landed(cluster, ends, 180, lambda: worker.running)
    assert worker.stop() == 0
    # No insert ended with an unknown outcome whose rows were kept (their views in doubt).
    assert "rows of a failed insert had landed" not in worker.logs()

    await _assert_meter_exact(cluster, METERS[0], events, "route")


async def test_a_change_in_the_number_of_shards_neither_replays_nor_skips(
    cluster: Cluster,
    make_topics: Callable[..., Any],
    sink_config: Callable[..., Path],
    run_sink: Callable[..., Any],
    producer: AIOKafkaProducer,
    uid: str,
) -> None:
    """A worker lands on the first shard alone (the cluster given by hand with one shard) and
    is killed with -9; the next one lands on both shards, so some partitions move to the
    second shard with their landed offsets still on the first. Positioning reads every shard
    (the ledger records both layouts): the moved partitions continue after what landed."""
    topics, namespaces = await topics_for(make_topics, uid, partitions=4)
    work = Workload(topics, namespaces, partitions=4, seed=36)
    work.add(5000, duplicate_share=0.05)
    one = run_sink(_cluster_config(sink_config, cluster, uid, nodes=cluster.shards[:1]))
    sender = asyncio.create_task(work.send(producer, chunk=200, pace=0.3))
    await _landing(one, cluster, time.monotonic() + 90)
    await asyncio.sleep(2)
    one.kill()
    two = run_sink(_cluster_config(sink_config, cluster, uid, nodes=cluster.shards), name="two")
    await sender
    await wait_cluster_landed(cluster, work.ends, 180, lambda: two.running)
    assert "positioning reads every shard" in two.logs()
    for replicas in cluster.shards:
        await _one(cluster, replicas[0], f"SYSTEM SYNC REPLICA {cluster.database}.events")
    [(rows, identities, offsets)] = await _one(
        cluster,
        cluster.shards[0][0],
        f"SELECT count(), uniqExact(namespace, source, id), "
        f"uniqExact(_topic, _partition, _offset) FROM {cluster.database}.events_all",
    )
    assert rows == identities == offsets == len(work.expected), (rows, identities, offsets)
    moved = {(t, p) for t, p in work.ends if shard_of_partition(t, p, len(cluster.shards)) == 1}
    assert moved, "no partition moved to the second shard"
    second = await _one(
        cluster,
        cluster.shards[1][0],
        f"SELECT DISTINCT _topic, _partition FROM {cluster.database}.events",
    )
    assert {(t, p) for t, p in second} <= moved
    assert two.stop() == 0


async def test_a_shard_down_during_a_rebalance_holds_only_its_own_partitions(
    services: Services,
    cluster: Cluster,
    make_topics: Callable[..., Any],
    sink_config: Callable[..., Path],
    run_sink: Callable[..., Any],
    producer: AIOKafkaProducer,
    uid: str,
) -> None:
    """While the second shard is down a second worker joins: every partition is assigned
    anew, and those of the first shard are positioned and land while the second shard's
    wait (positioning goes shard by shard)."""
    if services.control is None:
        pytest.skip("needs the local stack's control script to kill nodes")
    stream = await _stream(cluster, make_topics, sink_config, run_sink, producer, uid, 37, 6000)
    _stack("kill", "clickhouse-2-1", "clickhouse-2-2")
    try:
        # Migrations are done; the newcomer would otherwise wait for the DDL of every node.
        late = _cluster_config(sink_config, cluster, uid)
        config = yaml.safe_load(late.read_text())
        config["worker"]["migrate_on_start"] = False
        late.write_text(yaml.safe_dump(config))
        second = run_sink(late, name="late")
        deadline = time.monotonic() + 60
        while "positioned from landed offsets" not in second.logs():
            assert second.running and time.monotonic() < deadline, second.logs()[-3000:]
            await asyncio.sleep(0.5)
        before = await landed_on_shards(cluster)
        await asyncio.sleep(4)
        during = await landed_on_shards(cluster)
    finally:
        _stack("up", "clickhouse-2-1", "clickhouse-2-2")
    assert sum(during[0].values()) > sum(before[0].values()), (before, during)
    assert "cannot read landed offsets, retrying" in stream.proc.logs() + second.logs()
    await stream.finish(cluster)
    assert stream.proc.stop() == 0 and second.stop() == 0
