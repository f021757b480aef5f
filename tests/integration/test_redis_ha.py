"""The dedup store on Redis Sentinel and Redis Cluster (`scripts/stack.sh up --redis-sentinel
--redis-cluster`): claims wait for a replica's acknowledgement, the worker follows a failover,
and a stream with duplicates lands exactly once while the master is killed with -9 (its
replicas frozen, so that it dies with claims no replica has), while a cluster master is killed
likewise and while slots migrate; duplicates of landed events re-sent after the failover land
nowhere.

Needs REDIS_SENTINELS and REDIS_SENTINEL_MASTER (`scripts/stack.sh env --redis-sentinel`) or
REDIS_CLUSTER_NODES (`env --redis-cluster`), and the local stack's control script.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis_async
from aiokafka import AIOKafkaProducer
from pydantic import SecretStr
from redis.crc import key_slot

from sink.config import DedupConfig
from sink.errors import RedisUnavailable
from sink.stores.clickhouse.connection import ClickHouse
from sink.stores.dedup import RedisDedup, open_store
from sink.stores.dedup_groups import GroupedDedup
from sink.stores.keys import coordinates, group_key, group_number, identity_key
from tests.conftest import STACK, Services
from tests.integration.workload import (
    REGEX,
    Workload,
    assert_exact,
    landed,
    topics_for,
    wait_landed,
)

Store = RedisDedup | GroupedDedup


def _stack(*args: str) -> None:
    done = subprocess.run(["bash", str(STACK), *args], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]


def _pid(service: str) -> int:
    done = subprocess.run(["bash", str(STACK), "pid", service], capture_output=True, text=True)
    return int(done.stdout.split()[0])


def _client(address: str) -> redis_async.Redis:
    host, port = address.rsplit(":", 1)
    return redis_async.Redis(host=host, port=int(port), socket_timeout=3)


def _needs_control(services: Services) -> None:
    if services.control is None:
        pytest.skip("needs the local stack's control script to kill and restart Redis")


# ---------------------------------------------------------------------------------------------
# sentinel


def _sentinel_env() -> tuple[list[str], str, list[str]]:
    sentinels, master = os.environ.get("REDIS_SENTINELS"), os.environ.get("REDIS_SENTINEL_MASTER")
    nodes = os.environ.get("REDIS_SENTINEL_NODES", "")
    if not sentinels or not master:
        pytest.skip('no Redis Sentinel: `eval "$(scripts/stack.sh env --redis-sentinel)"`')
    return sentinels.split(","), master, nodes.split(",")


def _sentinel_config(**more: Any) -> DedupConfig:
    sentinels, master, _ = _sentinel_env()
    return DedupConfig(
        mode="sentinel",
        sentinels=tuple(sentinels),
        sentinel_master=master,
        socket_timeout=2.0,
        **more,
    )


async def _master(sentinels: list[str], name: str) -> str:
    """host:port of the master the first answering sentinel names."""
    for address in sentinels:
        host, port = address.rsplit(":", 1)
        client = redis_async.Redis(host=host, port=int(port), socket_timeout=2)
        try:
            found = await client.execute_command("SENTINEL", "get-master-addr-by-name", name)
            return f"{found[0].decode()}:{found[1].decode()}"
        except Exception:
            continue
        finally:
            await client.aclose()
    raise AssertionError("no sentinel answered")


async def _until_master_moves(sentinels: list[str], name: str, old: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while (now := await _master(sentinels, name)) == old:
        assert time.monotonic() < deadline, f"no failover from {old} within {timeout} s"
        await asyncio.sleep(0.2)
    return now


def _node_name(address: str, nodes: list[str], prefix: str) -> str:
    return f"{prefix}-{nodes.index(address) + 1}"


def _keys(prefix: bytes, n: int, tag: str) -> list[bytes]:
    return [identity_key(prefix, "ns", "src", f"{tag}-{i}") for i in range(n)]


@pytest.fixture(params=["groups", "keys"])
async def sentinel_store(services: Services, request: Any) -> AsyncIterator[Store]:
    store = open_store(_sentinel_config(replica_ack_timeout=0.5, layout=request.param), 2.0)
    assert isinstance(store, RedisDedup | GroupedDedup)
    yield store
    await store.close()


async def test_a_claim_waits_for_a_replica_and_fails_without_one(
    services: Services, sentinel_store: Store, uid: str
) -> None:
    """Replicas frozen: the claim is not acknowledged and fails (nothing may be inserted on
    it); once they run again the same claim, retried, finds its own markers."""
    _needs_control(services)
    sentinels, name, nodes = _sentinel_env()
    keys, mine = _keys(uid.encode(), 50, "w"), [coordinates("t", 0, i) for i in range(50)]
    master = await _master(sentinels, name)
    replicas = [_pid(_node_name(a, nodes, "redis-ha")) for a in nodes if a != master]
    for pid in replicas:
        os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(RedisUnavailable, match="acknowledged by 0 of the 1 replicas"):
            await sentinel_store.claim(keys, mine)
    finally:
        for pid in replicas:
            os.kill(pid, signal.SIGCONT)
    assert await sentinel_store.claim(keys, mine) == mine
    assert sentinel_store.replication.required() == 1


async def test_a_demoted_master_is_left_for_the_new_one(
    services: Services, sentinel_store: Store, uid: str
) -> None:
    """A failover that leaves the old master running (now a replica): the store's connection
    to it fails once, and the next claim goes to the master the sentinels name now."""
    sentinels, name, _ = _sentinel_env()
    keys, mine = _keys(uid.encode(), 20, "d"), [coordinates("t", 1, i) for i in range(20)]
    assert await sentinel_store.claim(keys, mine) == mine
    old = await _master(sentinels, name)
    host, port = sentinels[0].rsplit(":", 1)
    admin = redis_async.Redis(host=host, port=int(port))
    await admin.execute_command("SENTINEL", "FAILOVER", name)
    await admin.aclose()
    await _until_master_moves(sentinels, name, old, 20)
    deadline = time.monotonic() + 20
    while True:
        try:
            # Acknowledged by a replica before the failover: found on the new master (the old
            # one, a replica now, refuses writes: a claim that succeeds reached a master).
            assert await sentinel_store.claim(keys, [b"x:0:%d" % i for i in range(20)]) == mine
            break
        except RedisUnavailable:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.3)


async def _send_again(work: Workload, producer: AIOKafkaProducer, seed: int) -> None:
    """Every valid record once more, half of them to another partition: all duplicates of
    events that landed already."""
    rng = random.Random(seed)
    again = [
        (t, p if rng.random() < 0.5 else rng.randrange(work.partitions), k, v)
        for t, p, k, v in work.records
        if k != b"bad"
    ]
    await work.send(producer, again, chunk=500)


async def _duplicates_landed(ch: ClickHouse) -> int:
    [(rows, identities)] = await ch.query(
        f"SELECT count(), uniqExact(namespace, source, id) FROM {ch.table('events')}"
    )
    return int(rows) - int(identities)


async def _stream_through(
    make_topics: Callable[..., Any],
    sink_config: Callable[..., Path],
    run_sink: Callable[..., Any],
    producer: AIOKafkaProducer,
    ch: ClickHouse,
    uid: str,
    seed: int,
    dedup: dict[str, Any],
    disrupt: Callable[[Workload], Any],
    retries: bool = True,
) -> None:
    """A stream with duplicates (same and other partitions and topics) lands while `disrupt`
    runs; then every event is sent again; the table is exact: 0 duplicates landed."""
    topics, namespaces = await topics_for(make_topics, uid, partitions=3)
    work = Workload(topics, namespaces, partitions=3, seed=seed)
    work.add(2500, duplicate_share=0.15, invalid_share=0.0)
    config = sink_config(
        kafka={"topics_regex": REGEX.format(uid=uid)},
        dedup={"socket_timeout": "2s", **dedup},
        batch={"max_rows": 300, "max_wait": "100ms", "max_in_flight": 3000},
        worker={"drain_timeout": "20s", "log_format": "json", "retry_max": "500ms"},
    )
    proc = run_sink(config)
    sender = asyncio.create_task(work.send(producer, chunk=150, pace=0.3))
    deadline = time.monotonic() + 60
    while not await _landed_any(ch):
        assert proc.running and time.monotonic() < deadline, proc.logs()[-3000:]
        await asyncio.sleep(0.2)
    await disrupt(work)
    await sender
    await wait_landed(ch, work.ends, timeout=90, alive=lambda: proc.running)
    await _send_again(work, producer, seed)
    await wait_landed(ch, work.ends, timeout=60, alive=lambda: proc.running)
    duplicates = await _duplicates_landed(ch)
    print(f"duplicates landed: {duplicates}")
    assert duplicates == 0
    await assert_exact(ch, work.expected)
    if retries:  # a failover pauses the claims for a moment
        assert "dependency failed, retrying" in proc.logs()
    assert proc.stop() == 0


async def _landed_any(ch: ClickHouse) -> bool:
    try:
        [(n,)] = await ch.query(f"SELECT count() FROM {ch.table('sink_offsets')}")
    except Exception:
        return False
    return int(n) > 0


async def test_the_master_killed_mid_stream_loses_and_doubles_nothing(
    services: Services,
    make_topics: Callable[..., Any],
    sink_config: Callable[..., Path],
    run_sink: Callable[..., Any],
    producer: AIOKafkaProducer,
    clickhouse_db: ClickHouse,
    uid: str,
) -> None:
    """The claims the master takes once its replicas are frozen never reach one: it dies
    with them (-9) and a replica is promoted. Nothing was inserted on them (with
    `min_replicas_acked: 0` rows land meanwhile, and events sent again after the failover land
    twice); their batches are claimed again on the new master and land once, and every event
    sent again afterwards is dropped."""
    _needs_control(services)
    sentinels, name, nodes = _sentinel_env()

    async def kill_the_master(work: Workload) -> None:
        old = await _master(sentinels, name)
        victim = _node_name(old, nodes, "redis-ha")
        replicas = [_pid(_node_name(a, nodes, "redis-ha")) for a in nodes if a != old]
        await _kill_with_replicas_frozen(old, victim, replicas, clickhouse_db, work, uid)
        try:
            new = await _until_master_moves(sentinels, name, old, 30)
            print(f"failover {old} -> {new}")
        finally:
            # Back as a replica of the new master (`up` waits until it is attached).
            await asyncio.to_thread(_stack, "up", victim)

    dedup = {
        "mode": "sentinel",
        "sentinels": sentinels,
        "sentinel_master": name,
        "replica_ack_timeout": "1s",
    }
    await _stream_through(
        make_topics, sink_config, run_sink, producer, clickhouse_db, uid, 71, dedup, kill_the_master
    )


async def _kill_with_replicas_frozen(
    master: str,
    victim: str,
    replicas: list[int],
    ch: ClickHouse,
    work: Workload,
    uid: str,
    tag: str = "",
) -> None:
    """Freeze the master's replicas (pids) and fill the sockets to them, so that what the
    master writes from then on stays in its own memory; check that nothing lands while no
    claim can be acknowledged; kill the master (service `victim`) with -9; let the replicas
    run again. `tag`: a hash tag of the master's slots (cluster)."""
    for pid in replicas:
        os.kill(pid, signal.SIGSTOP)
    try:
        client = _client(master)
        try:
            for i in range(96):
                await client.set(f"{{{tag}}}filler-{uid}-{i}", b"x" * (1 << 20), ex=120)
        finally:
            await client.aclose()
        await asyncio.sleep(1.5)  # longer than the acknowledgement timeout
        before = await landed(ch)
        await asyncio.sleep(2)
        assert await landed(ch) == before  # no insert on unacknowledged claims
        waiting = {tp: end - 1 for tp, end in work.ends.items() if before.get(tp, -1) < end - 1}
        assert waiting, "nothing was waiting to land while the replicas were frozen"
        _stack("kill", victim)
    finally:
        for pid in replicas:
            os.kill(pid, signal.SIGCONT)


# ---------------------------------------------------------------------------------------------
# cluster


def _cluster_nodes() -> list[str]:
    nodes = os.environ.get("REDIS_CLUSTER_NODES")
    if not nodes:
        pytest.skip('no Redis Cluster: `eval "$(scripts/stack.sh env --redis-cluster)"`')
    return nodes.split(",")


async def _masters(nodes: list[str]) -> dict[str, tuple[str, list[tuple[int, int]]]]:
    """Each master serving slots: its address -> (node id, slot ranges)."""
    for address in nodes:
        client = _client(address)
        try:
            text = (await client.execute_command("CLUSTER", "NODES")).decode()
        except Exception:
            continue
        finally:
            await client.aclose()
        masters = {}
        for line in text.splitlines():
            fields = line.split()
            if "master" in fields[2] and "fail" not in fields[2] and len(fields) > 8:
                ranges = [
                    tuple(map(int, (r.split("-") * 2)[:2])) for r in fields[8:] if "[" not in r
                ]
                masters[fields[1].split("@")[0]] = (fields[0], ranges)
        return masters  # type: ignore[return-value]
    raise AssertionError("no cluster node answered")


async def _replica_of(nodes: list[str], master_id: str) -> str:
    client = _client(nodes[0])
    try:
        text = (await client.execute_command("CLUSTER", "NODES")).decode()
    finally:
        await client.aclose()
    for line in text.splitlines():
        fields = line.split()
        if "slave" in fields[2] and fields[3] == master_id:
            return fields[1].split("@")[0]
    raise AssertionError(f"master {master_id} has no replica")


def _cluster_config(**more: Any) -> DedupConfig:
    return DedupConfig(
        mode="cluster",
        redis_url=SecretStr(f"redis://{_cluster_nodes()[0]}/0"),
        socket_timeout=2.0,
        **more,
    )


async def _migrate_slot(owner: redis_async.Redis, to: str, slot: int) -> None:
    """Every key of `slot` from `owner` to the node at `to` (MIGRATE, as resharding does)."""
    host, port = to.rsplit(":", 1)
    while keys := await owner.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000):
        await owner.execute_command("MIGRATE", host, port, "", 0, 5000, "KEYS", *keys)


@pytest.mark.parametrize("layout", ["groups", "keys"])
async def test_claims_follow_a_slot_migration_by_ask_and_moved(uid: str, layout: str) -> None:
    """A slot set MIGRATING/IMPORTING by hand: keys not yet on the old owner are claimed on the
    new one (ASK); once the slot is assigned to the new owner, everything goes there (MOVED),
    and every claim finds its holder. In the groups layout the slot is that of the identities'
    groups (each in a group of its own)."""
    nodes = _cluster_nodes()
    groups = 1 << 20
    prefix = uid.encode()
    config = _cluster_config(layout=layout, key_prefix=uid, groups=groups)
    store = open_store(config, 2.0)
    masters = await _masters(nodes)
    (source, (source_id, ranges)), (target, (target_id, _)) = list(masters.items())[:2]
    slot = ranges[0][0] + random.randrange(ranges[0][1] - ranges[0][0])
    keys: list[bytes] = []
    seen: set[int] = set()
    for i in itertools.count():
        key = identity_key(prefix, "ns", "src", f"m-{i}")
        number = group_number(key, groups)
        where = key if layout == "keys" else group_key(prefix, number)
        if key_slot(where) == slot and number not in seen:
            seen.add(number)
            keys.append(key)
            if len(keys) == 4:
                break
    mine = [coordinates("t", 0, i) for i in range(4)]
    theirs = [coordinates("t", 1, i) for i in range(4)]
    other = _keys(prefix, 200, "o")  # other slots: the rest of the claim goes on as usual
    mine_other = [coordinates("t", 2, i) for i in range(200)]
    src, dst = _client(source), _client(target)
    moved = False
    try:
        assert await store.claim(keys[:2] + other, mine[:2] + mine_other) == mine[:2] + mine_other
        await dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        await src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        # keys[0:2] still on the source: answered there; keys[2:4] are new: ASK to the target.
        pending = {prefix + b"~pending:t:0": b"1:2:3:4"}
        held = await store.claim(keys + other, theirs + mine_other, pending)
        assert held == mine[:2] + theirs[2:] + mine_other
        assert await dst.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 2
        moved = True
        await _migrate_slot(src, target, slot)
        for client in (src, dst):
            await client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        # The store still routes the slot to the source: MOVED, then the new map.
        assert await store.claim(keys, theirs) == mine[:2] + theirs[2:]
        assert await store.pending(list(pending)) == [b"1:2:3:4"]
        assert await store.release(keys[:1], mine[:1]) == 1
    finally:
        # The slot back to its owner, so the cluster keeps its layout for the other tests.
        if moved:
            await src.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", target_id)
            await dst.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", source_id)
            await _migrate_slot(dst, source, slot)
            for client in (src, dst):
                await client.execute_command("CLUSTER", "SETSLOT", slot, "NODE", source_id)
        else:
            for client in (src, dst):
                await client.execute_command("CLUSTER", "SETSLOT", slot, "STABLE")
        await src.aclose()
        await dst.aclose()
        await store.close()


async def test_a_cluster_master_killed_mid_stream_loses_and_doubles_nothing(
    services: Services,
    make_topics: Callable[..., Any],
    sink_config: Callable[..., Path],
    run_sink: Callable[..., Any],
    producer: AIOKafkaProducer,
    clickhouse_db: ClickHouse,
    uid: str,
) -> None:
    """As with Sentinel: one master's replica frozen, the master killed with -9, its replica
    promoted; the batches whose claims were lost with it had not been inserted."""
    _needs_control(services)
    nodes = _cluster_nodes()

    async def kill_a_master(work: Workload) -> None:
        masters = await _masters(nodes)
        old = sorted(masters)[-1]
        victim = _node_name(old, nodes, "redis-cluster")
        node_id, ranges = masters[old]
        replica = await _replica_of(nodes, node_id)
        tag = next(
            t
            for t in (f"{uid}-{i}" for i in itertools.count())
            if any(a <= key_slot(t.encode()) <= b for a, b in ranges)
        )
        await _kill_with_replicas_frozen(
            old, victim, [_pid(_node_name(replica, nodes, "redis-cluster"))],
            clickhouse_db, work, uid, tag,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 30
            while old in await _masters([a for a in nodes if a != old]):
                assert time.monotonic() < deadline, "no replica took over"
                await asyncio.sleep(0.2)
            print(f"failover {old} -> {replica}")
        finally:
            # Back as the new master's replica (`up` waits until the cluster has settled).
            await asyncio.to_thread(_stack, "up", victim)

    dedup = {"mode": "cluster", "redis_url": f"redis://{nodes[0]}/0", "replica_ack_timeout": "1s"}
    await _stream_through(
        make_topics, sink_config, run_sink, producer, clickhouse_db, uid, 72, dedup, kill_a_master
    )


async def test_slots_resharded_mid_stream_lose_and_double_nothing(
    make_topics: Callable[..., Any],
    sink_config: Callable[..., Path],
    run_sink: Callable[..., Any],
    producer: AIOKafkaProducer,
    clickhouse_db: ClickHouse,
    uid: str,
) -> None:
    nodes = _cluster_nodes()

    async def reshard(_: Workload) -> None:
        masters = await _masters(nodes)
        (_, (from_id, _)), (_, (to_id, _)) = list(masters.items())[:2]
        for source, target in ((from_id, to_id), (to_id, from_id)):  # there and back
            # Every node has learnt the slot moves before (redis-cli refuses otherwise).
            await _until_nodes_agree(nodes[0])
            done = await asyncio.create_subprocess_exec(
                "redis-cli", "--cluster", "reshard", nodes[0], "--cluster-from", source,
                "--cluster-to", target, "--cluster-slots", "300", "--cluster-yes",
                "--cluster-pipeline", "100",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            out, _ = await done.communicate()
            assert done.returncode == 0, out.decode()[-2000:]

    dedup = {"mode": "cluster", "redis_url": f"redis://{nodes[0]}/0"}
    before = await _redirections(nodes)
    await _stream_through(
        make_topics, sink_config, run_sink, producer, clickhouse_db, uid, 73, dedup, reshard,
        retries=False,
    )  # fmt: skip
    redirected = await _redirections(nodes) - before
    print(f"MOVED and ASK replies: {redirected}")
    assert redirected > 0  # the worker's claims met the migration


async def _until_nodes_agree(node: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while True:
        check = await asyncio.create_subprocess_exec(
            "redis-cli", "--cluster", "check", node,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await check.communicate()
        if check.returncode == 0:
            return
        assert time.monotonic() < deadline, out.decode()[-2000:]
        await asyncio.sleep(0.5)


async def _redirections(nodes: list[str]) -> int:
    """MOVED and ASK replies the cluster's nodes have sent (INFO errorstats)."""
    total = 0
    for address in nodes:
        client = _client(address)
        try:
            stats = await client.info("errorstats")
        finally:
            await client.aclose()
        total += sum(
            int(stats.get(f"errorstat_{kind}", {}).get("count", 0)) for kind in ("MOVED", "ASK")
        )
    return total
