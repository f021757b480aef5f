"""The worker: poll, decode, batch; then land each batch and commit, exactly once.

Two tasks share the state. The poll loop fetches records, decodes them into the open batch,
seals batches when a trigger fires and pauses partitions when memory or a dependency says so;
it never blocks on ClickHouse or Redis, so the consumer stays in its group. The flusher lands
sealed batches one at a time, in order; `Worker._land` is the whole commit order.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar, cast

import orjson
import structlog
from aiokafka import TopicPartition as KafkaTP
from aiokafka.errors import KafkaError

from sink import decode as decoding
from sink import dedup
from sink.batch import (
    Batch,
    Item,
    Reject,
    TopicPartition,
    Triggers,
    due,
    pending_ranges,
    span,
)
from sink.clickhouse import (
    EVENT_COLUMNS,
    ClickHouse,
    InsertWithdrawn,
    OffsetStore,
    event_columns,
    topics_table,
)
from sink.config import Config
from sink.consumer import DeadLetters, Namespaces, full_record
from sink.errors import ClickHouseRejected, DependencyError, RedisUnavailable
from sink.meters import MeterIndex
from sink.metrics import Metrics
from sink.offsets import Assignments
from sink.topics import TopicKeys, topic_ids
from sink.vitals import Vitals

T = TypeVar("T")
log = structlog.get_logger("sink.worker")

FETCH_RECORDS = 100
"""Records the poll loop takes from aiokafka at a time. The loop yields after each take, and
every await of the flusher (a claim's replies, each step of an insert) waits for the take in
progress: 500 at a time, about 8 ms of decoding, made a 25,000-row insert take turns of the
event loop long enough to hold the poll loop back."""


class Abandoned(Exception):
    """The batch lost every partition it held while waiting; nothing of it may be inserted."""


class FreezeClock:
    """Notices when the whole process stopped running (SIGSTOP, a VM pause, a long GC) for
    half a session timeout: long enough that the group may have moved on.

    After such a freeze the group may have moved our partitions elsewhere without the
    consumer knowing yet; inserts wait one session timeout so a revoke can arrive first.
    """

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.last_tick = time.monotonic()
        self.last_freeze = float("-inf")

    async def run(self) -> None:
        while True:
            await asyncio.sleep(min(0.1, self.threshold / 4))
            self.check()

    def check(self) -> float:
        """Time of the last freeze seen (now, if one is under way)."""
        now = time.monotonic()
        if now - self.last_tick > self.threshold:
            self.last_freeze = now
        self.last_tick = now
        return self.last_freeze


class Worker:
    def __init__(
        self,
        config: Config,
        *,
        consumer: Any,
        dead_letters: DeadLetters,
        store: dedup.DedupStore | None,
        inserter: ClickHouse,
        reader: ClickHouse,
        time_divisor: int,
        metrics: Metrics,
    ) -> None:
        self.config = config
        self.consumer = consumer
        self.dead_letters = dead_letters
        self.store = store
        self.inserter = inserter
        self.topics = TopicKeys(reader, topics_table(config.clickhouse.offsets_table))
        self.offsets = OffsetStore(reader, config.clickhouse.offsets_table, self.topics)
        self.landing_offsets = OffsetStore(inserter, config.clickhouse.offsets_table, self.topics)
        self.time_divisor = time_divisor
        # The server gives up on an INSERT whose client stopped sending for this long, so a
        # frozen worker's half-sent insert ends well before the group can hand its partitions
        # to another worker. Servers 20.x+ read the client's send_timeout as their receive
        # timeout, 18.x reads receive_timeout: both are set.
        stall = max(1, int(config.kafka.session_timeout / 2))
        self.insert_settings: dict[str, Any] = {
            "receive_timeout": stall,
            "send_timeout": stall,
            **config.clickhouse.insert_settings,
        }
        self.metrics = metrics
        self.triggers = Triggers(
            config.batch.max_rows, config.batch.max_bytes, config.batch.max_wait
        )
        self.namespaces = Namespaces(config.kafka.topics_regex, config.events.namespace_header)
        self.meter_check = MeterIndex(config.meters).check if config.meters else None
        self.key_prefix = config.dedup.key_prefix.encode()
        self.assignments = Assignments()
        self.clock = FreezeClock(threshold=max(1.0, config.kafka.session_timeout / 2))
        self.log = log

        self._open = Batch()
        self._sealed: deque[Batch] = deque()
        self._flushing: Batch | None = None
        self._wake_flusher = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._room = asyncio.Event()
        """Set when the flusher has landed (or dropped) a batch: held rows went down."""
        self._full_since: float | None = None
        """Since when max_in_flight rows have been held (None while there is room)."""
        self._paused: set[TopicPartition] = set()
        self._blocked: list[str] = []
        """Dependencies that retry loops are waiting for (one entry per waiting loop)."""
        self._stopping = False
        self.vitals = Vitals(metrics)
        self._already_landed: set[tuple[str, int, int]] = set()
        """Coordinates found in ClickHouse after an interrupted insert of a previous owner."""
        self._next_fetch: dict[TopicPartition, int] = {}
        """Offset each partition's next record should have: a smaller one means the log
        was reset under us (a topic deleted and created again)."""
        self._topic_ids_missing_logged = False
        self._reset_to: dict[TopicPartition, int] = {}
        """Partitions the consumer reset to a lower offset, with that offset."""
        self._from_start: set[TopicPartition] = set()
        """Partitions of a new topic incarnation: with nothing landed, read from the start."""

    # ---------------------------------------------------------------- rebalance listener

    async def on_partitions_assigned(self, assigned: Sequence[KafkaTP]) -> None:
        tps = [(tp.topic, tp.partition) for tp in assigned]
        self.assignments.assign(tps)
        if assigned:
            self.consumer.pause(*assigned)
        self._paused.update(tps)
        self.metrics.rebalances.inc()
        self.metrics.assigned.set(len(self.assignments.epochs))
        self.log.info("partitions assigned", partitions=_names(tps))

    async def on_partitions_revoked(self, revoked: Sequence[KafkaTP]) -> None:
        tps = [(tp.topic, tp.partition) for tp in revoked]
        if not tps:
            return
        if self._membership_lost():
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
                partitions=_names(tps),
            )
            return
        # Land what we hold before the partitions move, so the next owner starts after it;
        # past the drain timeout nothing more of them is inserted (the group's rebalance
        # timeout, a little longer, is what the next owner waits for).
        budget = self.config.worker.drain_timeout
        self.assignments.begin_revoke(tps, time.monotonic() + budget)
        self._seal()
        try:
            await asyncio.wait_for(self._drained(), budget)
        except TimeoutError:
            self.log.warning(
                "revoke: could not land in time, next owner replays", partitions=_names(tps)
            )
        self.assignments.revoke(tps)
        self._forget(tps)
        for topic, partition in tps:
            self.metrics.forget_partition(topic, partition)
        self.metrics.assigned.set(len(self.assignments.epochs))
        self.log.info("partitions revoked", partitions=_names(tps))

    def _membership_lost(self) -> bool:
        """Whether the group has dropped this member (a revoke then is a loss, not a hand-over):
        aiokafka resets the generation and member id when the coordinator no longer knows us.
        A freeze within the last session timeout counts as well: the group may have moved on
        before the consumer could tell."""
        coordinator = getattr(self.consumer, "_coordinator", None)
        if coordinator is not None and (
            getattr(coordinator, "generation", None) == -1
            or getattr(coordinator, "member_id", None) == ""
        ):
            return True
        settle = self.config.kafka.session_timeout + self.config.kafka.heartbeat_interval
        return time.monotonic() - self.clock.check() < settle

    # ---------------------------------------------------------------- lifecycle

    async def run(self, stop: asyncio.Event) -> None:
        tasks = [
            asyncio.create_task(self._poll_loop(), name="poll"),
            asyncio.create_task(self._flush_loop(), name="flush"),
            asyncio.create_task(self.clock.run(), name="clock"),
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
        self._stopping = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(poll, 5)
        self._seal()
        try:
            await asyncio.wait_for(self._drained(), self.config.worker.drain_timeout)
            self.log.info("drained")
        except TimeoutError:
            self.log.warning("drain timeout: unlanded records will be replayed by the next owner")

    async def _drained(self) -> None:
        while self._sealed or self._flushing is not None:
            self._idle.clear()
            self._wake_flusher.set()
            await self._idle.wait()

    # ---------------------------------------------------------------- poll side

    async def _poll_loop(self) -> None:
        delay = self.config.worker.retry_initial
        while not self._stopping:
            if self.assignments.pending:
                await self._position_pending()
            if await self._wait_for_room():
                continue
            try:
                fetched = await self.consumer.getmany(
                    timeout_ms=100, max_records=min(FETCH_RECORDS, self.triggers.max_rows)
                )
                delay = self.config.worker.retry_initial
                self.vitals.ok("kafka")
            except KafkaError as exc:
                self.vitals.failed("kafka", exc)
                await asyncio.sleep(_jitter(delay))
                delay = min(delay * 2, self.config.worker.retry_max)
                continue
            for ktp, records in fetched.items():
                tp = (ktp.topic, ktp.partition)
                epoch = self.assignments.epochs.get(tp)
                if not records or epoch is None or tp in self.assignments.pending:
                    continue
                expected = self._next_fetch.get(tp)
                if expected is not None and records[0].offset < expected:
                    self._log_went_back(tp, expected, records[0].offset)
                    continue
                self._next_fetch[tp] = records[-1].offset + 1
                self._add(tp, epoch, records)
            self._maybe_seal()
            self._backpressure()
            # getmany does not yield while aiokafka holds fetched records: let heartbeats
            # and the flusher run between polls.
            await asyncio.sleep(0)

    def _log_went_back(self, tp: TopicPartition, expected: int, got: int) -> None:
        """The consumer reset a partition to an offset below what it had reached: the log
        was replaced (a topic deleted and created again while held). Start the topic's
        partitions over; positioning finds the new incarnation."""
        self.log.warning(
            "partition offsets went back: positioning the topic again",
            partition=f"{tp[0]}/{tp[1]}",
            expected=expected,
            got=got,
        )
        self._reset_to[tp] = got
        self._start_over([t for t in self.assignments.epochs if t[0] == tp[0]])

    def _add(self, tp: TopicPartition, epoch: int, records: Sequence[Any]) -> None:
        batch, topic, partition = self._open, tp[0], tp[1]
        max_bytes = self.config.events.max_event_bytes
        check = self.meter_check
        namespace = self.namespaces.of_topic(topic)
        by_header = self.config.events.namespace_header is not None
        items, rejects = batch.items, batch.rejects
        add, decode, event_type = items.append, decoding.decode, decoding.Event
        nbytes = 0
        for record in records:
            value = record.value
            nbytes += len(value) if value else 0
            if by_header:
                namespace = self.namespaces.of_record(topic, record.headers)
            # The decoder makes the batch's row (an Item): the event with its coordinates.
            offset, stamp = record.offset, record.timestamp
            result = decode(value, namespace, max_bytes, check, topic, partition, offset, stamp)
            if type(result) is event_type:
                add(result)
            else:
                rejects.append(Reject(full_record(topic, partition, record), result))  # type: ignore[arg-type]
        batch.nbytes += nbytes
        batch.extend(tp, epoch, records[0].offset, records[-1].offset)
        if self.store is not None:
            # Grouped for dedup as they come, so the claim of a sealed batch waits for nothing.
            # (A batch rebuilt without some partitions has no grouping: it starts from its
            # first item.)
            grouping = batch.grouping
            if grouping is None:
                grouping = batch.grouping = dedup.Grouping(self.key_prefix, self.topics.key)
            grouping.add(items[grouping.added :])
        self.metrics.consumed.labels(topic).inc(len(records))

    def _maybe_seal(self) -> None:
        if due(self._open, self.triggers, time.monotonic()):
            self._seal()

    def _seal(self) -> None:
        if self._open:
            self._open.sealed = time.monotonic()
            self._sealed.append(self._open)
            self._open = Batch()
            self._wake_flusher.set()

    def _in_flight(self) -> tuple[int, int]:
        batches = [self._open, *self._sealed]
        if self._flushing is not None:
            batches.append(self._flushing)
        return sum(b.records for b in batches), sum(b.nbytes for b in batches)

    async def _wait_for_room(self) -> bool:
        """While max_in_flight rows are held, fetch nothing and wait for the flusher; True if
        it waited. The consumer keeps what it has fetched ahead meanwhile (pausing would throw
        that away, to be fetched again). A wait longer than a quarter of max_poll_interval
        gives way to pausing, so the poll loop keeps polling."""
        rows, nbytes = self._in_flight()
        self.metrics.in_flight_rows.set(rows)
        self.metrics.in_flight_bytes.set(nbytes)
        if rows < self.config.batch.max_in_flight or self._stopping:
            self._full_since = None
            return False
        now = time.monotonic()
        if self._full_since is None:
            self._full_since = now
        if self._waited_too_long(now):
            return False
        self._maybe_seal()
        self._room.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._room.wait(), 0.5)
        return True

    def _waited_too_long(self, now: float) -> bool:
        since = self._full_since
        return since is not None and now - since > self.config.kafka.max_poll_interval / 4

    def _backpressure(self) -> None:
        rows, nbytes = self._in_flight()
        self.metrics.in_flight_rows.set(rows)
        self.metrics.in_flight_bytes.set(nbytes)
        full = rows >= self.config.batch.max_in_flight and self._waited_too_long(time.monotonic())
        hold = full or bool(self._blocked)
        # Only partitions aiokafka still holds: a deleted topic leaves its assignment before
        # the rebalance listener tells the worker, and pausing it then would raise.
        held = set(self.assignments.epochs) & {
            (t.topic, t.partition) for t in self.consumer.assignment()
        }
        want = held if hold else set(self.assignments.pending) & held
        to_pause, to_resume = want - self._paused, (self._paused & held) - want
        if to_pause:
            self.consumer.pause(*(KafkaTP(t, p) for t, p in to_pause))
        if to_resume:
            self.consumer.resume(*(KafkaTP(t, p) for t, p in to_resume))
        self._paused = want
        self.metrics.paused.set(len(want))

    async def _position_pending(self) -> None:
        # A partition whose older batch is still being inserted waits: reading its landed
        # offset now would miss that batch.
        busy = set(self._flushing.ranges) if self._flushing is not None else set()
        tps = [tp for tp in self.assignments.pending if tp not in busy]
        if not tps:
            return
        try:
            changed = await self._resolve_topics(tps)
            landed = await self.offsets.landed([t for t, _ in tps])
            self.vitals.ok("clickhouse")
        except DependencyError as exc:
            self.vitals.failed("clickhouse", exc)
            self.log.warning("cannot read landed offsets, retrying", error=str(exc)[:300])
            await asyncio.sleep(_jitter(self.config.worker.retry_initial))
            return
        try:
            await self._find_interrupted(tps, landed)
        except DependencyError as exc:
            self.vitals.failed(exc.dependency, exc)
            self.log.warning(
                "cannot check pending ranges, retrying",
                dependency=exc.dependency,
                error=str(exc)[:300],
            )
            await asyncio.sleep(_jitter(self.config.worker.retry_initial))
            return
        for tp in tps:
            self._next_fetch.pop(tp, None)
            reset = self._reset_to.pop(tp, None)
            if reset is not None and tp[0] not in changed:
                # Same topic (or no topic ids to tell): the log lost what we had landed,
                # or was replaced unseen. Going back to the landed offset would only be reset
                # again: continue where the broker put us.
                self.log.error(
                    "partition log is behind its landed offset: continuing at the log's offset",
                    partition=f"{tp[0]}/{tp[1]}",
                    landed=landed.get(tp),
                    offset=reset,
                )
                landed.pop(tp, None)
                self.consumer.seek(KafkaTP(*tp), reset)
                self._next_fetch[tp] = reset
        seeks = self.assignments.position(tps, landed)
        for (topic, partition), offset in seeks.items():
            self.consumer.seek(KafkaTP(topic, partition), offset)
            self._next_fetch[(topic, partition)] = offset
            self.metrics.landed_offset.labels(topic, str(partition)).set(offset - 1)
        fresh = [tp for tp in tps if tp in self._from_start and tp not in seeks]
        self._from_start.difference_update(tps)
        if fresh:
            await self.consumer.seek_to_beginning(*(KafkaTP(*tp) for tp in fresh))
        self.log.info(
            "positioned from landed offsets",
            partitions=_names(tps),
            landed={f"{t}/{p}": o for (t, p), o in landed.items() if (t, p) in tps},
        )

    async def _resolve_topics(self, tps: Sequence[TopicPartition]) -> dict[str, str]:
        """Settle the storage keys of the topics being positioned (see sink.topics). If a
        topic turns out to be a new incarnation, its other held partitions start over too."""
        names = sorted({t for t, _ in tps})
        ids = await topic_ids(self.consumer._client, names)  # aiokafka's client
        if ids is None:
            ids = {}
            if not self._topic_ids_missing_logged:
                self._topic_ids_missing_logged = True
                self.log.warning(
                    "broker has no topic ids (Kafka < 2.8): a topic deleted and created "
                    "again under the same name is taken for the old one"
                )
        changed = await self.topics.resolve(ids, names)
        if not changed:
            return changed
        self.log.warning(
            "topic recreated: stored under a new key from now on",
            topics={name: {"key": key, "id": ids.get(name)} for name, key in changed.items()},
        )
        pending = set(tps)
        others = [tp for tp in self.assignments.epochs if tp[0] in changed and tp not in pending]
        if others:
            self._start_over(others)
        self._from_start.update(tp for tp in tps if tp[0] in changed)
        self._from_start.update(others)
        return changed

    def _start_over(self, tps: Sequence[TopicPartition]) -> None:
        """Treat held partitions as newly assigned: what is held of them is dropped (a new
        epoch), they are paused and positioned again from ClickHouse."""
        self._forget(tps)
        self.assignments.assign(tps)
        self.consumer.pause(*(KafkaTP(t, p) for t, p in tps))
        self._paused.update(tps)

    async def _find_interrupted(
        self, tps: Sequence[TopicPartition], landed: dict[TopicPartition, int]
    ) -> None:
        """A previous owner may have died while its insert was written in part (rows in the
        raw table, landed offset not moved). Its pending range says where to look."""
        if self.store is None:
            return
        keys = [dedup.pending_key(self.key_prefix, self.topics.key(t), p) for t, p in tps]
        ranges: dict[TopicPartition, tuple[int, int]] = {}
        low, high = 2**63, -1
        for tp, value in zip(tps, await self.store.pending(keys), strict=True):
            if not value:
                continue
            first, last, tmin, tmax = (int(x) for x in value.split(b":"))
            start = max(first, landed.get(tp, -1) + 1)
            if last >= start:
                ranges[tp] = (start, last)
                low, high = min(low, tmin), max(high, tmax)
        if not ranges:
            return
        present = await self.offsets.present(
            self.config.clickhouse.events_table, ranges, (low, high)
        )
        if present:
            self.log.warning(
                "found rows of an interrupted insert",
                rows=len(present),
                partitions=_names(list(ranges)),
            )
        self._already_landed |= present

    def _forget(self, tps: Sequence[TopicPartition]) -> None:
        """Drop everything held for partitions we no longer own."""
        self._open = self._open.without(tps)
        self._sealed = deque(b.without(tps) for b in self._sealed)
        self._sealed = deque(b for b in self._sealed if b)
        self._paused -= set(tps)
        self._room.set()
        self.vitals.forget(tps)
        for tp in tps:
            self._next_fetch.pop(tp, None)
        gone = set(tps)
        self._already_landed = {c for c in self._already_landed if (c[0], c[1]) not in gone}

    # ---------------------------------------------------------------- flush side

    async def _flush_loop(self) -> None:
        """Batches land one at a time, in order; the dedup claim of the next sealed batch
        runs while the current one is inserted, so Redis and ClickHouse work at once."""
        ahead: tuple[Batch, asyncio.Task[list[Item] | None]] | None = None
        try:
            while True:
                if not self._sealed:
                    self._idle.set()
                    self._wake_flusher.clear()
                    await self._wake_flusher.wait()
                    continue
                batch = self._sealed.popleft()
                self._flushing = batch
                started = time.monotonic()
                try:
                    kept = None
                    if ahead is not None:
                        early, claim = ahead
                        ahead = None
                        if early is batch:
                            kept = await claim
                        else:  # the batch changed (partitions revoked): claim what is left
                            claim.cancel()
                    if kept is None:
                        kept = await self._deduplicate(batch)
                    if self._sealed:
                        following = self._sealed[0]
                        ahead = (following, asyncio.create_task(self._claim(following, batch)))
                    await self._land(batch, kept, started)
                except Abandoned:
                    self.metrics.batches_dropped.inc()
                    self.log.info("batch dropped: partitions moved", ranges=_ranges(batch))
                finally:
                    self._flushing = None
                    self._room.set()
        finally:
            if ahead is not None:
                ahead[1].cancel()

    async def _claim(self, batch: Batch, behind: Batch) -> list[Item] | None:
        """Dedup of `batch` while `behind` is still landing; None if it must be done again.
        (Claiming is idempotent: a record finds its own coordinates on a second claim.)"""
        try:
            return await self._deduplicate(batch, behind)
        except Abandoned:
            return None

    async def _land(self, batch: Batch, kept: list[Item], started: float) -> None:
        """The commit order: dedup (done by the caller) -> dead letters -> fence -> insert ->
        landed offsets -> Kafka commit. Each step retries its dependency until it answers; a
        batch whose partitions all moved away is abandoned (the next owner replays it)."""
        await self._retry(lambda: self.dead_letters.send(batch.rejects), batch)
        kept, already = self._split_already_landed(batch, kept)
        landed, poisoned = await self._insert(batch, kept)
        landed += already
        batch = batch.without(self.assignments.lost(batch))
        tail = batch.tail_offsets(landed)
        await self._retry(lambda: self.landing_offsets.record(tail), batch)
        self.assignments.advance({tp: r.last for tp, r in batch.ranges.items()})
        await self._commit(batch)
        summary = self.vitals.landed(batch, landed, poisoned, time.monotonic() - started)
        self.log.info("batch landed", ranges=_ranges(batch), **summary)

    def _split_already_landed(
        self, batch: Batch, items: list[Item]
    ) -> tuple[list[Item], list[Item]]:
        """Rows found in ClickHouse after a previous owner's interrupted insert land as is."""
        found = self._already_landed
        if not found:
            return items, []
        fresh: list[Item] = []
        already: list[Item] = []
        for item in items:
            coords = (item.topic, item.partition, item.offset)
            (already if coords in found else fresh).append(item)
        if already:
            found.difference_update((i.topic, i.partition, i.offset) for i in already)
            batch.recovered = True
            self.log.warning(
                "rows of an interrupted insert not inserted again",
                rows=len(already),
                ranges=_ranges(batch),
            )
        return fresh, already

    def _pending_ranges(self, batch: Batch, behind: Batch | None) -> dict[bytes, bytes]:
        return {
            dedup.pending_key(self.key_prefix, self.topics.key(t), p): value.encode()
            for (t, p), value in pending_ranges(batch, behind).items()
        }

    async def _deduplicate(self, batch: Batch, behind: Batch | None = None) -> list[Item]:
        if self.store is None or not batch.items:
            return batch.items
        grouping = batch.grouping
        if grouping is not None and grouping.added == len(batch.items):
            grouped = grouping.grouped
        else:  # grouped here if the batch changed after it was grouped
            grouped = dedup.group(batch.items, self.key_prefix, self.topics.key)
        pending = self._pending_ranges(batch, behind)
        store = self.store
        t0 = time.monotonic()
        try:
            holders = await self._retry(
                lambda: store.claim(grouped.keys, grouped.coords, pending),
                batch,
                give_up=self.config.dedup.on_error == "allow-duplicates",
            )
        except RedisUnavailable:
            self.metrics.dedup_bypassed.inc(len(grouped.keys))
            self.log.warning("dedup bypassed: redis unavailable", events=len(grouped.keys))
            return list(grouped.firsts)
        self.metrics.dedup_seconds.observe(time.monotonic() - t0)
        self.vitals.ok("redis")
        return dedup.keep(grouped, holders, self.topics.key)

    async def _insert(self, batch: Batch, items: list[Item]) -> tuple[list[Item], list[Item]]:
        """Insert rows in one block; on a data error, bisect to isolate the rows ClickHouse
        refuses and dead-letter them. Halves are inserted in order, so a partition's landed
        offset never jumps over rows that have not landed."""
        if not items:
            return [], []
        try:
            await self._insert_block(batch, items)
            return items, []
        except ClickHouseRejected as exc:
            if len(items) == 1:
                await self._dead_letter_rows(batch, items, str(exc))
                return [], items
        mid = len(items) // 2
        left_ok, left_bad = await self._insert(batch, items[:mid])
        right_ok, right_bad = await self._insert(batch, items[mid:])
        return left_ok + right_ok, left_bad + right_bad

    async def _insert_block(self, batch: Batch, items: list[Item]) -> None:
        unknown = False  # did an attempt fail after the block may have reached the server?

        async def attempt() -> None:
            nonlocal unknown
            while True:
                rows = await self._fence(batch, items)
                if unknown:
                    rows = await self._not_yet_landed(batch, rows)
                if not rows:
                    return
                fenced_at = time.monotonic()

                def prepare(
                    rows: list[Item] = rows, fenced_at: float = fenced_at
                ) -> list[Sequence[Any]] | None:
                    # The server answered the query; the rows go out now or never. A freeze
                    # or a revoke during that round trip sends the attempt back to the fence.
                    nonlocal unknown
                    if self.clock.check() >= fenced_at:
                        return None
                    lost = set(self.assignments.lost(batch))
                    if lost:
                        rows = [i for i in rows if (i.topic, i.partition) not in lost]
                    if not rows:
                        return None
                    unknown = True
                    return event_columns(rows, self.time_divisor, self.topics)

                t0 = time.monotonic()
                try:
                    await self.inserter.insert_columns(
                        self.config.clickhouse.events_table,
                        EVENT_COLUMNS,
                        settings=self.insert_settings,
                        prepare=prepare,
                    )
                except InsertWithdrawn:
                    self.log.warning("insert withdrawn before its rows were sent: re-fencing")
                    continue
                self.metrics.insert_seconds.observe(time.monotonic() - t0)
                self.vitals.ok("clickhouse")
                return

        await self._retry(attempt, batch)

    async def _not_yet_landed(self, batch: Batch, rows: list[Item]) -> list[Item]:
        """After a failed insert the server may still have written the rows (the connection
        broke after the write, or a view failed after the raw part was written): look."""
        ranges, bounds = span(rows)
        present = await self.landing_offsets.present(
            self.config.clickhouse.events_table, ranges, bounds
        )
        if not present:
            return rows
        batch.recovered = True
        self.log.warning(
            "rows of a failed insert had landed, not inserted again",
            rows=len(present),
            ranges=_ranges(batch),
        )
        return [r for r in rows if (r.topic, r.partition, r.offset) not in present]

    async def _fence(self, batch: Batch, items: list[Item]) -> list[Item]:
        """Rows of `items` this worker may still insert, checked right before the insert."""
        freeze = self.clock.check()
        settle = self.config.kafka.session_timeout + self.config.kafka.heartbeat_interval
        while time.monotonic() - freeze < settle:
            # The process was frozen: give the group time to revoke before trusting epochs.
            await asyncio.sleep(0.2)
            freeze = self.clock.check()
        lost = set(self.assignments.lost(batch))
        if len(lost) == len(batch.ranges):
            raise Abandoned
        if not lost:
            return items
        return [i for i in items if (i.topic, i.partition) not in lost]

    async def _dead_letter_rows(self, batch: Batch, items: list[Item], why: str) -> None:
        """Rows ClickHouse refused: rebuild the event, dead-letter it, release its marker."""
        rejects = [
            Reject(_Rebuilt(i), decoding.Rejection(decoding.REJECTED_BY_CLICKHOUSE, why[:500]))
            for i in items
        ]
        await self._retry(lambda: self.dead_letters.send(rejects), batch)
        self.metrics.dead_letters.labels(decoding.REJECTED_BY_CLICKHOUSE).inc(len(items))
        if self.store is not None:
            store = self.store
            keys = [dedup.identity_key(self.key_prefix, i.namespace, i.source, i.id) for i in items]
            coords = [
                dedup.coordinates(self.topics.key(i.topic), i.partition, i.offset) for i in items
            ]
            with contextlib.suppress(DependencyError):
                await store.release(keys, coords)

    async def _commit(self, batch: Batch) -> None:
        offsets = {KafkaTP(t, p): o for (t, p), o in batch.commit_offsets().items()}
        if not offsets:
            return
        try:
            await self.consumer.commit(offsets)
        except (KafkaError, AssertionError, ValueError) as exc:
            # ClickHouse holds the truth; a missed commit only moves the fallback offset.
            self.log.warning("kafka commit failed", error=str(exc))

    async def _retry(
        self, op: Callable[[], Awaitable[T]], batch: Batch, give_up: bool = False
    ) -> T:
        delay = self.config.worker.retry_initial
        attempt = 0
        failed = ""
        blocked: str | None = None  # entered in self._blocked while this loop waits
        try:
            while True:
                try:
                    result = await op()
                except DependencyError as exc:
                    attempt += 1
                    failed = exc.dependency
                    self.vitals.failed(exc.dependency, exc)
                    self.metrics.retries.labels(exc.dependency, type(exc).__name__).inc()
                    if give_up:
                        raise
                    if blocked is None:
                        blocked = exc.dependency
                        self._blocked.append(blocked)
                    await self._back_off(exc, attempt, delay)
                    delay = min(delay * 2, self.config.worker.retry_max)
                    if len(self.assignments.lost(batch)) == len(batch.ranges):
                        raise Abandoned from exc
                    continue
                if attempt:
                    self.vitals.ok(failed)
                    self.log.info("dependency recovered", dependency=failed, attempts=attempt)
                return result
        finally:
            if blocked is not None:
                self._blocked.remove(blocked)

    async def _back_off(self, exc: DependencyError, attempt: int, delay: float) -> None:
        if attempt & (attempt - 1) == 0:  # 1, 2, 4, 8 ...: no log flood
            self.log.warning(
                "dependency failed, retrying",
                dependency=exc.dependency,
                attempt=attempt,
                error=str(exc)[:300],
            )
        await asyncio.sleep(_jitter(delay))

    # ---------------------------------------------------------------- observation

    async def _lag_loop(self) -> None:
        while True:
            await asyncio.sleep(2)
            await self._measure_lag()

    async def _measure_lag(self) -> None:
        held = {tp for b in (self._open, *self._sealed, self._flushing) if b for tp in b.ranges}
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
        return self.vitals.readiness(http.ready_dependency_grace, http.ready_stall_after)

    def status(self) -> dict[str, Any]:
        rows, nbytes = self._in_flight()
        partitions = [
            {
                "topic": t,
                "partition": p,
                "epoch": epoch,
                "landed_offset": self.assignments.landed.get((t, p)),
                "lag": self.vitals.lag.get((t, p)),
                "paused": (t, p) in self._paused,
                "positioning": (t, p) in self.assignments.pending,
            }
            for (t, p), epoch in sorted(self.assignments.epochs.items())
        ]
        return {
            "worker": self.config.worker.id,
            "state": "stopping" if self._stopping else "running",
            "partitions": partitions,
            "in_flight": {"rows": rows, "bytes": nbytes},
            "last_flush": self.vitals.last_flush,
            "dependencies": self.vitals.dependency_report(),
            "recent_errors": list(self.vitals.errors),
        }


class _Rebuilt:
    """Stands in for a consumer record when a decoded event must be dead-lettered after it
    was decoded: the value is the event rebuilt as CloudEvents JSON."""

    def __init__(self, item: Item) -> None:
        e = item
        self.topic, self.partition, self.offset = item.topic, item.partition, item.offset
        self.key = e.subject.encode()
        self.headers: list[tuple[str, bytes]] = [("sink.rebuilt", b"1")]
        self.value = orjson.dumps(
            {
                "specversion": "1.0",
                "id": e.id,
                "source": e.source,
                "type": e.type,
                "subject": e.subject,
                "time": _rfc3339(e.time_ms),
                "data": orjson.Fragment(e.data),
            }
        )


def highwater(consumer: Any, tp: KafkaTP) -> int | None:
    """The partition's high watermark as of the last fetch; None if not known yet, or if
    the consumer no longer holds the partition (revoked, or its topic deleted, before the
    rebalance listener has told the worker)."""
    try:
        return cast(int | None, consumer.highwater(tp))
    except AssertionError:  # aiokafka: "Partition is not assigned"
        return None


def _rfc3339(ms: int) -> str:
    seconds, millis = divmod(ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def _jitter(delay: float) -> float:
    return delay * (0.5 + random.random())


def _names(tps: Sequence[TopicPartition] | set[TopicPartition]) -> list[str]:
    return [f"{t}/{p}" for t, p in sorted(tps)]


def _ranges(batch: Batch) -> list[str]:
    return [f"{t}/{p}:{r.first}-{r.last}" for (t, p), r in sorted(batch.ranges.items())]
