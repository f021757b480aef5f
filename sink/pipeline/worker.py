"""The worker: the poll side fills batches, the flusher lands each one and commits, exactly once.

The poll loop and the flushers share what the worker holds (sink.pipeline.intake.Intake).
The poll loop (the intake) fetches records, decodes them into the open batch of their
partition's shard and seals it when a trigger fires; it never blocks on ClickHouse or Redis,
so the consumer stays in its group. Each shard's flusher lands that shard's sealed batches
one at a time, in order: `Worker._land` is the whole commit order, step by
numbered step, with the guarantee each step gives. The steps' work is in
sink.pipeline.landing, the fence in front of each insert in sink.pipeline.fencing, where a
partition starts in sink.pipeline.positioning. This module also answers the rebalance
listener's calls, measures lag and reports `/status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any, cast

import structlog
from aiokafka import TopicPartition as KafkaTP
from aiokafka.errors import KafkaError

from sink.config import Config
from sink.coordinates import TopicPartition
from sink.operations.metrics import Metrics
from sink.operations.vitals import Vitals
from sink.pipeline.batch import Batch, Item
from sink.pipeline.consumer import DeadLetters, Namespaces
from sink.pipeline.context import Context
from sink.pipeline.fencing import Abandoned, Ownership
from sink.pipeline.flow import FlowControl
from sink.pipeline.intake import Intake, Lane
from sink.pipeline.landing import Landing, describe
from sink.pipeline.offsets import Assignments
from sink.pipeline.positioning import Positioning, names
from sink.pipeline.retry import Retry
from sink.pipeline.topics import TopicKeys
from sink.stores import dedup
from sink.stores.clickhouse.landed import OffsetStore, ShardedOffsets
from sink.stores.clickhouse.schema import topics_table
from sink.stores.clickhouse.shards import Shard, ShardRule
from sink.stores.keys import DedupKeys

log = structlog.get_logger("sink.worker")


class Worker:
    def __init__(
        self,
        config: Config,
        *,
        consumer: Any,
        dead_letters: DeadLetters,
        store: dedup.DedupStore | None,
        inserters: Sequence[Shard],
        readers: Sequence[Shard],
        time_divisor: int,
        metrics: Metrics,
        insert_quorum: int = 0,
        moved_shards: bool = False,
    ) -> None:
        """`inserters` and `readers`: one connection to each shard for the flushers, one
        for positioning (a single server is one shard). `moved_shards`: the cluster has had
        another number of shards, so positioning reads every shard (`ShardedOffsets`)."""
        self.config = config
        self.consumer = consumer
        self.store = store
        self.shards = list(zip(inserters, readers, strict=True))
        c = config.clickhouse
        # The topic incarnations are the same on every shard: read from the first.
        self.topics = TopicKeys(readers[0], topics_table(c.offsets_table))
        self.metrics = metrics
        self.assignments = Assignments()
        self.log = log
        self.vitals = Vitals(metrics)
        self.ownership = Ownership(
            consumer,
            self.assignments,
            config.kafka.session_timeout,
            config.kafka.heartbeat_interval,
        )
        self.retry = Retry(
            config.worker.retry_initial,
            config.worker.retry_max,
            abandoned=self.ownership.abandoned,
            vitals=self.vitals,
            metrics=metrics,
            log=log,
        )
        keys = DedupKeys(config.dedup.prefix, self.topics.key)
        ctx = Context(config, self.topics, store, keys, metrics, self.vitals, log)
        namespaces = Namespaces(config.kafka.topics_regex, None)  # by topic: shard_by namespace
        self.shard_of = ShardRule(len(inserters), c.shard_by, self.topics.key, namespaces.of_topic)

        def ledger(shards: Sequence[Shard], everywhere: bool = False) -> ShardedOffsets:
            stores = [OffsetStore(s, c.offsets_table, self.topics) for s in shards]
            return ShardedOffsets(stores, self.shard_of, everywhere)

        self.landing = Landing(
            ctx,
            inserters=inserters,
            offsets=ledger(inserters),
            insert_quorum=insert_quorum,
            dead_letters=dead_letters,
            ownership=self.ownership,
            retry=self.retry,
            time_divisor=time_divisor,
        )
        self.positioning = Positioning(
            ctx,
            consumer=consumer,
            assignments=self.assignments,
            offsets=ledger(readers, everywhere=moved_shards),
            start_over=self._start_over,
        )
        self.flow = FlowControl(
            config, consumer, self.assignments, self.retry.blocked, metrics, self.shard_of
        )
        self.intake = Intake(
            ctx,
            consumer=consumer,
            assignments=self.assignments,
            positioning=self.positioning,
            flow=self.flow,
            found_landed=lambda found: self.landing.already_landed.update(found),
            shard_of=self.shard_of,
            shards=len(inserters),
        )
        self._ahead: dict[int, tuple[Batch, asyncio.Task[list[Item] | None]]] = {}
        """Per lane, the next batch and its claim, made while the current one lands."""

    # ---------------------------------------------------------------- rebalance listener

    async def on_partitions_assigned(self, assigned: Sequence[KafkaTP]) -> None:
        tps = [(tp.topic, tp.partition) for tp in assigned]
        self.assignments.assign(tps)
        self.flow.hold(tps)
        self.metrics.rebalances.inc()
        self.metrics.assigned.set(len(self.assignments.epochs))
        self.log.info("partitions assigned", partitions=names(tps))

    async def on_partitions_revoked(self, revoked: Sequence[KafkaTP]) -> None:
        tps = [(tp.topic, tp.partition) for tp in revoked]
        if not tps:
            return
        if self.ownership.membership_lost():
            # The group already gave these partitions to others (this member's session
            # expired, typically while the process was frozen): landing what we hold now
            # would land it a second time. Drop it; the new owners replay from ClickHouse.
            self.assignments.revoke(tps)
            self._forget(tps)
            for topic, partition in tps:
                self.metrics.forget_partition(topic, partition)
            self.metrics.assigned.set(len(self.assignments.epochs))
            self.log.warning(
                "partitions lost: the group expired this member, nothing held is inserted",
                partitions=names(tps),
            )
            return
        # Land what we hold before the partitions move, so the next owner starts after it;
        # past the drain timeout nothing more of them is inserted (the group's rebalance
        # timeout, a little longer, is what the next owner waits for).
        budget = self.config.worker.drain_timeout
        self.assignments.begin_revoke(tps, time.monotonic() + budget)
        self.intake.seal()
        try:
            await asyncio.wait_for(self._drained(), budget)
        except TimeoutError:
            self.log.warning(
                "revoke: could not land in time, next owner replays", partitions=names(tps)
            )
        self.assignments.revoke(tps)
        self._forget(tps)
        for topic, partition in tps:
            self.metrics.forget_partition(topic, partition)
        self.metrics.assigned.set(len(self.assignments.epochs))
        self.log.info("partitions revoked", partitions=names(tps))

    # ---------------------------------------------------------------- lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        tasks = [
            asyncio.create_task(self.intake.run(), name="poll"),
            *(
                asyncio.create_task(self._flush_loop(lane), name=f"flush-{lane.shard + 1}")
                for lane in self.intake.lanes
            ),
            asyncio.create_task(self.ownership.clock.run(), name="clock"),
            asyncio.create_task(self._lag_loop(), name="lag"),
        ]
        stopped = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([stopped, *tasks], return_when=asyncio.FIRST_COMPLETED)
        failed = [t for t in done if t is not stopped and t.exception() is not None]
        for task in failed:
            self.log.error("task failed", task=task.get_name(), error=repr(task.exception()))
        await self._drain(tasks[0])
        # Cancel until every task has ended: on Python 3.11 a cancel that meets an inner
        # wait_for finishing at the same moment can be lost, and the task would run on.
        left: set[asyncio.Task[Any]] = {stopped, *tasks}
        while left:
            for task in left:
                task.cancel()
            _, left = await asyncio.wait(left, timeout=1)
        if failed:
            # Exit non-zero: the supervisor (or Kubernetes) starts a fresh process, which
            # resumes from the landed offsets.
            raise RuntimeError(f"worker task {failed[0].get_name()} failed") from failed[
                0
            ].exception()

    async def _drain(self, poll: asyncio.Task[None]) -> None:
        """Stop fetching, land what is held, within the drain timeout."""
        self.intake.stopping = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(poll, 5)
        self.intake.seal()
        try:
            await asyncio.wait_for(self._drained(), self.config.worker.drain_timeout)
            self.log.info("drained")
        except TimeoutError:
            self.log.warning("drain timeout: unlanded records will be replayed by the next owner")

    async def _drained(self) -> None:
        while not self.intake.drained():
            for lane in self.intake.lanes:
                if lane.sealed or lane.landing is not None:
                    lane.idle.clear()
                    lane.sealed_one.set()
                    await lane.idle.wait()

    # ---------------------------------------------------------------- partitions held

    def _start_over(self, tps: Sequence[TopicPartition]) -> None:
        """Treat held partitions as newly assigned: what is held of them is dropped (a new
        epoch), they are paused and positioned again from ClickHouse."""
        self._forget(tps)
        self.assignments.assign(tps)
        self.flow.hold(tps)

    def _forget(self, tps: Sequence[TopicPartition]) -> None:
        """Drop everything held for partitions we no longer own."""
        self.intake.forget(tps)
        self.shard_of.forget(tps)
        self.flow.forget(tps)
        self.vitals.forget(tps)
        self.positioning.forget(tps)
        self.landing.forget(tps)

    # ---------------------------------------------------------------- flush side

    async def _flush_loop(self, lane: Lane) -> None:
        """A lane's batches land one at a time, in the order they were sealed (`_land`)."""
        try:
            while True:
                if not lane.sealed:
                    lane.idle.set()
                    lane.sealed_one.clear()
                    await lane.sealed_one.wait()
                    continue
                batch = lane.landing = lane.sealed.popleft()
                try:
                    await self._land(batch, lane, time.monotonic())
                except Abandoned:
                    self.metrics.batches_dropped.inc()
                    self.log.info("batch dropped: partitions moved", ranges=describe(batch))
                finally:
                    lane.landing = None
                    self.flow.room.set()
        finally:
            ahead = self._ahead.pop(lane.shard, None)
            if ahead is not None:
                ahead[1].cancel()

    async def _land(self, batch: Batch, lane: Lane, started: float) -> None:
        """The commit order, exactly once. Each step retries its dependency until it answers;
        a batch whose partitions all moved away is abandoned (`Abandoned`), and the next owner
        replays it from the offsets ClickHouse has."""
        landing = self.landing
        # 1. Claim each identity in Redis: its marker names the record that holds it, and the
        #    records kept are the holders, so a replay after a crash keeps its own records and
        #    drops only real duplicates. The batch's offset ranges are written down with the
        #    claim (pending), so a new owner finds an insert this worker did not finish.
        kept = await self._claimed(batch, lane)
        # 2. Dead letters: invalid records go to the dead-letter topic before their offsets
        #    can be committed (at least once).
        await self.retry(lambda: landing.dead_letters.send(batch.rejects), batch)
        # 3. Rows that an earlier insert of these records landed (its outcome was unknown) are
        #    not inserted again.
        kept, already = landing.split_already_landed(batch, kept)
        # 4. Fence and insert: one columnar block into the lane's shard (a replica of it that
        #    answers; with insert_quorum, acknowledged once that many replicas hold it), sent
        #    only while this worker still owns every partition in the epoch its records were
        #    read in (`sink.pipeline.fencing`, checked at the last moment of the insert). Rows
        #    ClickHouse refuses are bisected out and dead-lettered. The raw table's view moves
        #    the landed offsets, on the same shard, in the same INSERT.
        landed, poisoned = await landing.insert(batch, kept, lane.shard)
        landed += already
        batch = batch.without(self.assignments.lost(batch))
        # 5. Landed offsets of ranges that gave no row (duplicates, dead letters) are written
        #    directly: a restart starts after them.
        tail = batch.tail_offsets(landed)
        await self.retry(lambda: landing.offsets.record(tail, landing.insert_settings), batch)
        self.assignments.advance({tp: r.last for tp, r in batch.ranges.items()})
        # 6. Kafka offsets (last + 1) are committed: only the fallback position, ClickHouse's
        #    landed offsets are the truth.
        await self._commit(batch)
        summary = self.vitals.landed(batch, landed, poisoned, time.monotonic() - started)
        self.log.info("batch landed", ranges=describe(batch), **summary)

    async def _claimed(self, batch: Batch, lane: Lane) -> list[Item]:
        """Step 1 for `batch`: the claim made ahead for it while the batch before it was being
        inserted, or a claim now; then the claim of the next sealed batch starts ahead, so
        Redis and ClickHouse work at once. (Claiming is idempotent: a record finds its own
        coordinates on a second claim.)"""
        kept = None
        ahead = self._ahead.pop(lane.shard, None)
        if ahead is not None:
            early, claim = ahead
            if early is batch:
                kept = await claim
            else:  # the batch changed (partitions revoked): claim what is left
                claim.cancel()
        if kept is None:
            kept = await self.landing.claim(batch)
        if lane.sealed:
            following = lane.sealed[0]
            claim = asyncio.create_task(self._claim_ahead(following, batch))
            self._ahead[lane.shard] = (following, claim)
        return kept

    async def _claim_ahead(self, batch: Batch, behind: Batch) -> list[Item] | None:
        """The claim of `batch` while `behind` is still landing; None if it must be made again."""
        try:
            return await self.landing.claim(batch, behind)
        except Abandoned:
            return None

    async def _commit(self, batch: Batch) -> None:
        offsets = {KafkaTP(t, p): o for (t, p), o in batch.commit_offsets().items()}
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except (KafkaError, AssertionError, ValueError) as exc:
            # ClickHouse holds the truth; a missed commit only moves the fallback offset.
            self.log.warning("kafka commit failed", error=str(exc))

    # ---------------------------------------------------------------- observation

    async def _lag_loop(self) -> None:
        while True:
            await asyncio.sleep(2)
            await self._measure_lag()

    async def _measure_lag(self) -> None:
        held = {tp for b in self.intake.held() for tp in b.ranges}
        for tp in list(self.assignments.epochs):
            ktp = KafkaTP(*tp)
            high = highwater(self.consumer, ktp)
            if high is None or tp in self.assignments.pending:
                continue
            done = self.assignments.landed.get(tp, -1) + 1
            if tp not in held:
                # Nothing of it in memory: every offset below the position has landed or
                # carries no record (transaction markers, aborted records), which never land.
                with contextlib.suppress(Exception):
                    done = max(done, await asyncio.wait_for(self.consumer.position(ktp), 1))
            if tp not in self.assignments.epochs:
                continue
            self.vitals.measured_lag(tp, max(0, high - done))
        self.vitals.lag_measured()

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        http = self.config.http
        ready, checks = self.vitals.readiness(http.ready_dependency_grace, http.ready_stall_after)
        failing = self.failing_replicas()
        if failing:  # which shard and replica, whether or not another replica took over
            checks["clickhouse_failing"] = failing
        return ready, checks

    def failing_replicas(self) -> list[str]:
        """'shard 2 replica 1 (host:port): error' for each ClickHouse replica whose last call
        failed."""
        out = []
        for inserter, reader in self.shards:
            report = inserter.report(reader)
            for replica in report["replicas"]:
                if not replica["up"]:
                    out.append(
                        f"shard {report['shard']} replica {replica['replica']} "
                        f"({replica['address']}): {replica['error']}"
                    )
        return out

    def status(self) -> dict[str, Any]:
        rows, nbytes = self.intake.in_flight()
        partitions = [
            {
                "topic": t,
                "partition": p,
                "epoch": epoch,
                "landed_offset": self.assignments.landed.get((t, p)),
                "lag": self.vitals.lag.get((t, p)),
                "paused": (t, p) in self.flow.paused,
                "positioning": (t, p) in self.assignments.pending,
            }
            for (t, p), epoch in sorted(self.assignments.epochs.items())
        ]
        return {
            "worker": self.config.worker.id,
            "state": "stopping" if self.intake.stopping else "running",
            "partitions": partitions,
            "in_flight": {"rows": rows, "bytes": nbytes},
            "last_flush": self.vitals.last_flush,
            "dependencies": self.vitals.dependency_report(),
            "clickhouse_shards": [inserter.report(reader) for inserter, reader in self.shards],
            "recent_errors": list(self.vitals.errors),
        }


def highwater(consumer: Any, tp: KafkaTP) -> int | None:
    """The partition's high watermark as of the last fetch; None if not known yet, or if
    the consumer no longer holds the partition (revoked, or its topic deleted, before the
    rebalance listener has told the worker)."""
    try:
        return cast(int | None, consumer.highwater(tp))
    except AssertionError:  # aiokafka: "Partition is not assigned"
        return None
