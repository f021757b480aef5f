"""Assembles a worker from configuration: clients, schema, HTTP endpoints; runs it to the end."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog
from aiokafka import ConsumerRebalanceListener
from aiokafka.errors import KafkaError

from sink.config import Config
from sink.errors import DependencyError, KafkaUnavailable, SinkError
from sink.metering.backfill import Progress
from sink.metering.ledger import Ledger, layout_version
from sink.metering.migrations import Migrator, Plan
from sink.operations.health import HealthServer, Starting
from sink.operations.metrics import Metrics
from sink.pipeline.consumer import DeadLetters, ensure_topic, make_consumer, make_producer, security
from sink.pipeline.retry import Backoff
from sink.pipeline.worker import Worker
from sink.stores.clickhouse.cluster import (
    Node,
    Topology,
    agreed_topology,
    explicit,
)
from sink.stores.clickhouse.connection import ClickHouse
from sink.stores.clickhouse.schema import time_divisor
from sink.stores.clickhouse.shards import Shard
from sink.stores.clickhouse.sql import Replication, ServerFeatures
from sink.stores.dedup import open_store
from sink.stores.dedup_groups import GroupedDedup, sweep_forever

T = TypeVar("T")
log = structlog.get_logger("sink.app")


def clickhouse(config: Config, node: Node | None = None) -> ClickHouse:
    """A connection to the server in `clickhouse.url`, or to `node` of its cluster."""
    c = config.clickhouse
    return ClickHouse(
        c.url.get_secret_value(),
        connect_timeout=c.connect_timeout,
        query_timeout=c.query_timeout,
        compression=c.compression,
        address=(node.host, node.port) if node is not None else None,
    )


async def topology(config: Config) -> Topology:
    """The shards and replicas the worker lands into: the cluster's, checked on every node
    that answers, or the one server of `clickhouse.url` as one shard of one replica."""
    c = config.clickhouse
    if c.cluster is None:
        ch = clickhouse(config)
        params = ch._params  # the URL's host and port
        await ch.close()
        return Topology("", ((Node(1, 1, str(params["host"]), int(params["port"])),),))
    if c.nodes is not None:
        return explicit(c.cluster, c.nodes)
    ch = clickhouse(config)
    try:

        async def connect(node: Node) -> ClickHouse:
            return clickhouse(config, node)

        return await agreed_topology(ch, c.cluster, connect)
    finally:
        await ch.close()


def shards(config: Config, found: Topology) -> list[Shard]:
    """A connection per shard, each going to a replica of it that answers."""
    cluster = config.clickhouse.cluster is not None
    if not cluster:
        return [Shard(0, found.shards[0], lambda _node: clickhouse(config), replicated=False)]
    return [
        Shard(i, replicas, lambda node: clickhouse(config, node), replicated=True)
        for i, replicas in enumerate(found.shards)
    ]


async def shard_layouts(config: Config, found: Topology) -> set[str]:
    """Every shard rule (number of shards, `clickhouse.shard_by`) workers have landed with on
    this cluster, this one included (recorded in the ledger on the node of `clickhouse.url`,
    replicated to every node). After a change, a partition's earlier rows and landed offsets
    may be on another shard than the rule now gives it."""
    ch = clickhouse(config)
    try:
        return await Ledger(ch).layouts(
            layout_version(len(found.shards), config.clickhouse.shard_by)
        )
    finally:
        await ch.close()


def insert_quorum(config: Config, found: Topology) -> int:
    """`clickhouse.insert_quorum`, or 2 when every shard has 2 or more replicas."""
    if config.clickhouse.insert_quorum is not None:
        return config.clickhouse.insert_quorum
    if config.clickhouse.cluster is None:
        return 0
    return 2 if min(len(s) for s in found.shards) >= 2 else 0


def replication(config: Config, database: str) -> Replication | None:
    """How tables are made on `clickhouse.cluster`; None on a single server."""
    c = config.clickhouse
    if c.cluster is None:
        return None
    return Replication(c.cluster, c.zookeeper_path.replace("{database}", database))


def migrator(config: Config, ch: ClickHouse, features: ServerFeatures) -> Migrator:
    """Migrations run on the server of `clickhouse.url`; on a cluster they are made ON
    CLUSTER from there, and the migration lease lives there (so every worker's url names the
    same node)."""
    m = config.migrations
    return Migrator(
        ch,
        features,
        config.clickhouse.events_table,
        config.clickhouse.offsets_table,
        config.meters,
        connect=lambda: clickhouse(config),
        owner=config.worker.id,
        lease_timeout=m.lease_timeout,
        piece_rows=m.backfill_piece_rows,
        replication=replication(config, ch.database),
        connect_node=lambda node: clickhouse(config, node),
    )


async def migrate(
    config: Config,
    drop_removed: bool = False,
    report: Callable[[Progress], None] | None = None,
) -> list[str]:
    """Bring the ClickHouse schema and meters up to date, backfills included; create the
    dead-letter topic."""
    ch = clickhouse(config)
    try:
        m = migrator(config, ch, await ch.features())
        if report is not None:
            m.report = report
        done = await m.run(drop_removed)
    finally:
        await ch.close()
    await _dead_letter_topic(config)
    return done or []


async def prepare(config: Config) -> None:
    """What a worker needs before it consumes: the raw and offset tables, the dead-letter
    topic. Meters are backfilled beside the work (`MeterKeeper`)."""
    ch = clickhouse(config)
    try:
        features = await ch.features()
        await migrator(config, ch, features).run(core_only=True)
        # New meters' views before the first row, when no other migrator is busy (a running
        # backfill is not waited for: the worker's `MeterKeeper` comes back to them).
        await migrator(config, ch, features).run(wait=False, backfill=False)
    finally:
        await ch.close()
    await _dead_letter_topic(config)


async def _dead_letter_topic(config: Config) -> None:
    if config.dlq.create:
        try:
            await ensure_topic(
                config, config.dlq_topic, config.dlq.partitions, config.dlq.replication_factor
            )
        except KafkaError as exc:
            raise KafkaUnavailable(f"cannot create dead-letter topic: {exc}") from exc


class MeterKeeper:
    """Makes configured meters live and backfills them while the worker runs: every
    `check_interval` it takes the migration lease if no live process holds it and does what
    is missing, so a backfill whose migrator died is resumed by a running worker."""

    def __init__(self, config: Config, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics
        self.backfills: dict[str, Progress] = {}
        self.complete = False

    def _report(self, progress: Progress) -> None:
        self.backfills[progress.meter] = progress
        self.metrics.backfill_done.labels(progress.meter).set(progress.rows_done)
        self.metrics.backfill_total.labels(progress.meter).set(progress.rows_total)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set() and not self.complete:
            ch = clickhouse(self.config)
            try:
                m = migrator(self.config, ch, await ch.features())
                m.report = self._report
                self.complete = await m.run(wait=False) is not None
            except SinkError as exc:
                log.warning("meters not brought up to date, retrying", error=str(exc)[:300])
            finally:
                await ch.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.config.migrations.check_interval)

    def status(self) -> dict[str, Any]:
        return {
            "complete": self.complete,
            "backfills": {slug: p.as_dict() for slug, p in self.backfills.items()},
        }


class _Status:
    """The worker's status with the meters' migration state beside it."""

    def __init__(self, worker: Worker, keeper: MeterKeeper | None) -> None:
        self.worker = worker
        self.keeper = keeper

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        return self.worker.readiness()

    def status(self) -> dict[str, Any]:
        status = self.worker.status()
        if self.keeper is not None:
            status["meters"] = self.keeper.status()
        return status


async def plan(config: Config, drop_removed: bool = False) -> Plan:
    """What `migrate` would run now, without running it."""
    ch = clickhouse(config)
    try:
        return await migrator(config, ch, await ch.features()).plan(drop_removed)
    finally:
        await ch.close()


class _Stopped(Exception):
    """Asked to stop while waiting for a dependency at start-up."""


async def _until_up(
    what: str, op: Callable[[], Awaitable[T]], stop: asyncio.Event, config: Config
) -> T:
    """Start-up waits for a dependency instead of crash-looping."""
    backoff = Backoff(config.worker.retry_initial, config.worker.retry_max)
    while not stop.is_set():
        try:
            return await op()
        except (DependencyError, KafkaError, OSError) as exc:
            log.warning("waiting for dependency", dependency=what, error=str(exc)[:300])
        await backoff.wait(stop)
    raise _Stopped


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, worker: Worker) -> None:
        self.worker = worker

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.worker.on_partitions_revoked(list(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self.worker.on_partitions_assigned(list(assigned))


async def run(config: Config, stop: asyncio.Event | None = None) -> None:
    stop = stop or asyncio.Event()
    try:
        await _run(config, stop)
    except _Stopped:
        log.info("stopped before start-up completed")


async def _run(config: Config, stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    structlog.contextvars.bind_contextvars(worker=config.worker.id)
    log.info("starting", group=config.kafka.group_id)

    metrics = Metrics()
    http = HealthServer(Starting(), metrics.registry, config.http.host, config.http.port)
    if config.http.enabled:
        await http.start()  # live while waiting for dependencies, ready only once running
        log.info("http listening", port=http.port)
    try:
        await _serve(config, stop, metrics, http)
    finally:
        await http.stop()


async def _serve(config: Config, stop: asyncio.Event, metrics: Metrics, http: HealthServer) -> None:
    found = await _until_up("clickhouse", lambda: topology(config), stop, config)
    readers, inserters = shards(config, found), shards(config, found)
    reader = readers[0]
    features: ServerFeatures = await _until_up("clickhouse", reader.features, stop, config)
    if config.clickhouse.cluster is not None:
        log.info("clickhouse cluster", topology=found.describe())
    log.info("clickhouse", version=".".join(map(str, features.version)))
    keeper = None
    if config.worker.migrate_on_start:
        await _until_up("clickhouse", lambda: prepare(config), stop, config)
        keeper = MeterKeeper(config, metrics)
    divisor = await _until_up(
        "clickhouse", lambda: time_divisor(reader, config.clickhouse.events_table), stop, config
    )

    moved = False
    if config.clickhouse.cluster is not None:
        layouts = await _until_up("clickhouse", lambda: shard_layouts(config, found), stop, config)
        moved = len(layouts) > 1
        if moved:
            log.warning(
                "the cluster has had another shard rule: positioning reads every shard",
                shards=len(found.shards),
                layouts=sorted(layouts),
            )

    store = None
    if config.dedup.enabled:
        store = open_store(config.dedup, config.dedup.socket_timeout)
    producer = make_producer(config)
    consumer = make_consumer(config)
    worker = Worker(
        config,
        consumer=consumer,
        dead_letters=DeadLetters(producer, config.dlq_topic),
        store=store,
        inserters=inserters,
        readers=readers,
        time_divisor=divisor,
        metrics=metrics,
        insert_quorum=insert_quorum(config, found),
        moved_shards=moved,
    )
    http.target = _Status(worker, keeper)
    try:
        await _until_up("kafka", producer.start, stop, config)
        await _until_up("kafka", consumer.start, stop, config)
        listener = _Listener(worker)
        _tune_gc()
        collector = asyncio.create_task(_collect_garbage(), name="gc")
        meters = asyncio.create_task(keeper.run(stop), name="meters") if keeper else None
        sweeper = None
        if isinstance(store, GroupedDedup):
            sweep = sweep_forever(store, config.dedup.sweep_every, config.dedup.groups, log)
            sweeper = asyncio.create_task(sweep, name="dedup-sweep")
        try:
            if config.kafka.topics:
                consumer.subscribe(topics=list(config.kafka.topics), listener=listener)
            else:
                consumer.subscribe(pattern=config.kafka.topics_regex, listener=listener)
            await worker.run(stop)
        finally:
            collector.cancel()
            if sweeper is not None:
                sweeper.cancel()
            if meters is not None:
                meters.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await meters
            gc.enable()
    finally:
        # Leaving the group can meet a rebalance (whose revoke may wait up to the drain
        # timeout); past that the process exits anyway and the group expires the member.
        try:
            await asyncio.wait_for(
                consumer.stop(), config.worker.drain_timeout + config.kafka.session_timeout
            )
        except TimeoutError:
            log.warning("consumer did not leave the group in time; exiting without it")
        except Exception as exc:  # shutting down: report and go on
            log.warning("consumer stop failed", error=str(exc)[:300])
        with contextlib.suppress(Exception):
            await producer.stop()
        if store is not None:
            with contextlib.suppress(Exception):
                await store.close()
        for shard in (*readers, *inserters):
            await shard.close()
        log.info("stopped")


_GC_INTERVAL = 15.0
"""Seconds between runs of the cyclic garbage collector (see _tune_gc)."""


def _tune_gc() -> None:
    """Batches in flight keep some 10^5 small tracked objects alive (rows, events); a cyclic
    collector run on allocation counts walks them again and again (about a tenth of the
    worker's CPU). The hot path makes no reference cycles, so the collector runs on a clock
    instead (`_collect_garbage`), which still frees what cycles the libraries make, and what
    start-up made is left out of it."""
    gc.collect()
    gc.freeze()
    gc.disable()


async def _collect_garbage(interval: float = _GC_INTERVAL) -> None:
    while True:
        await asyncio.sleep(interval)
        gc.collect()


async def check(config: Config) -> tuple[dict[str, str | None], list[str]]:
    """Reach every dependency once: the error text per dependency, None where it answered;
    and the migration lease and unfinished backfills, as lines."""
    results: dict[str, str | None] = {}
    migrations: list[str] = []
    ch = clickhouse(config)
    try:
        features = await ch.features()
        results["clickhouse"] = None
        log.info("clickhouse ok", version=".".join(map(str, features.version)))
        migrations = await migrator(config, ch, features).describe()
    except DependencyError as exc:
        results["clickhouse"] = str(exc)
    finally:
        await ch.close()
    if config.dedup.enabled:
        store = open_store(config.dedup, 3.0)
        try:
            await store.ping()
            results["redis"] = None
        except DependencyError as exc:
            results["redis"] = str(exc)
        finally:
            await store.close()
    results["kafka"] = await _check_kafka(config)
    return results, migrations


async def _check_kafka(config: Config) -> str | None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(
        bootstrap_servers=config.kafka.bootstrap_servers,
        request_timeout_ms=10_000,
        **security(config.kafka),
    )
    try:
        await asyncio.wait_for(admin.start(), 15)
        await asyncio.wait_for(admin.list_topics(), 15)
        return None
    except (KafkaError, OSError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(Exception):
            await admin.close()
