"""The poll side: fetched records become open batches, which are sealed when a trigger fires.

The poll loop never waits on ClickHouse or Redis, so the consumer stays in its group: when it
fetches, and from which partitions, is sink.pipeline.flow's; where a partition starts is
sink.pipeline.positioning's. Records go to the lane of their partition's shard (one lane on
a single server, see sink.stores.clickhouse.shards); each lane's sealed batches wait in order
for that lane's flusher (sink.pipeline.worker), which lands them one at a time. A shard that
does not answer holds up its own lane only.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from aiokafka.errors import KafkaError

from sink.coordinates import Coordinates, TopicPartition
from sink.errors import DependencyError
from sink.metering.meters import MeterIndex
from sink.pipeline import binary
from sink.pipeline import decode as decoding
from sink.pipeline.batch import Batch, Reject, Triggers, due
from sink.pipeline.consumer import Namespaces, full_record
from sink.pipeline.context import Context
from sink.pipeline.flow import FlowControl
from sink.pipeline.offsets import Assignments
from sink.pipeline.positioning import Positioning
from sink.pipeline.retry import Backoff
from sink.stores import dedup

FETCH_RECORDS = 100
"""Records the poll loop takes from aiokafka at a time. The poll loop yields to the flusher
after each take, so one take's decoding is the longest any await of the flusher (a claim's
replies, each step of an insert) waits for it; the size is measured in docs/performance.md."""


class Lane:
    """What the worker holds for one shard: the open batch, the sealed batches in order, and
    the batch the lane's flusher is landing (`landing`, set by the flusher)."""

    def __init__(self, shard: int) -> None:
        self.shard = shard
        self.open = Batch()
        self.sealed: deque[Batch] = deque()
        self.landing: Batch | None = None
        self.sealed_one = asyncio.Event()
        """Set when a batch is sealed: wakes the flusher."""
        self.idle = asyncio.Event()
        """Set while the flusher waits for a batch."""
        self.idle.set()

    def seal(self) -> None:
        if self.open:
            self.sealed.append(self.open)
            self.open = Batch()
            self.sealed_one.set()

    def held(self) -> list[Batch]:
        batches = [self.open, *self.sealed]
        if self.landing is not None:
            batches.append(self.landing)
        return batches

    def forget(self, tps: Sequence[TopicPartition]) -> None:
        self.open = self.open.without(tps)
        self.sealed = deque(b for b in (b.without(tps) for b in self.sealed) if b)


class Intake:
    """What the worker holds, lane by lane, and the poll loop that fills it."""

    def __init__(
        self,
        ctx: Context,
        *,
        consumer: Any,
        assignments: Assignments,
        positioning: Positioning,
        flow: FlowControl,
        found_landed: Callable[[set[Coordinates]], None],
        shard_of: Callable[[TopicPartition], int],
        shards: int,
    ) -> None:
        config = ctx.config
        self.config, self.metrics, self.vitals, self.log = config, ctx.metrics, ctx.vitals, ctx.log
        self.consumer = consumer
        self.assignments = assignments
        self.positioning = positioning
        self.flow = flow
        self.found_landed = found_landed
        """Takes the coordinates of rows a previous owner's interrupted insert landed."""
        self.dedup_keys = ctx.keys if ctx.store is not None else None
        self.triggers = Triggers(
            config.batch.max_rows, config.batch.max_bytes, config.batch.max_wait
        )
        self.namespaces = Namespaces(config.kafka.topics_regex, config.events.namespace_header)
        self.meter_check = MeterIndex(config.meters).check if config.meters else None
        self.shard_of = shard_of
        self.lanes = [Lane(shard) for shard in range(shards)]
        self.stopping = False
        self._consumed: dict[str, Any] = {}
        """The records-consumed counter of each topic seen."""

    async def run(self) -> None:
        """Poll until `stopping`: position new partitions, wait for room, fetch, decode, seal."""
        retry = self.config.worker
        kafka_backoff = Backoff(retry.retry_initial, retry.retry_max)
        # Positioning that failed is tried again after a backoff, without holding up the
        # fetches of the partitions already positioned.
        position_backoff = Backoff(retry.retry_initial, retry.retry_max)
        position_after = 0.0
        while not self.stopping:
            if self.assignments.pending and time.monotonic() >= position_after:
                if await self._position_pending():
                    position_backoff.reset()
                else:
                    position_after = time.monotonic() + position_backoff.next()
            if await self.flow.wait_for_room(self.in_flight(), self.stopping, self.maybe_seal):
                continue
            try:
                fetched = await self.consumer.getmany(
                    timeout_ms=100, max_records=min(FETCH_RECORDS, self.triggers.max_rows)
                )
                kafka_backoff.reset()
                self.vitals.ok("kafka")
            except KafkaError as exc:
                self.vitals.failed("kafka", exc)
                await kafka_backoff.wait()
                continue
            for ktp, records in fetched.items():
                tp = (ktp.topic, ktp.partition)
                epoch = self.assignments.epochs.get(tp)
                if not records or epoch is None or tp in self.assignments.pending:
                    continue
                if self.positioning.follows(tp, records[0].offset, records[-1].offset):
                    self.add(tp, epoch, records)
            self.maybe_seal()
            self.flow.apply(self.in_flight())
            # getmany does not yield while aiokafka holds fetched records: let heartbeats
            # and the flusher run between polls.
            await asyncio.sleep(0)

    def add(self, tp: TopicPartition, epoch: int, records: Sequence[Any]) -> None:
        """Decode fetched records of one partition into its lane's open batch."""
        batch, topic, partition = self.lanes[self.shard_of(tp)].open, tp[0], tp[1]
        max_bytes = self.config.events.max_event_bytes
        check = self.meter_check
        namespace = self.namespaces.of_topic(topic)
        by_header = self.config.events.namespace_header is not None
        items, rejects = batch.items, batch.rejects
        add, decode, event_type = items.append, decoding.decode, decoding.Event
        binary_mode, decode_binary = binary.binary_mode, binary.decode_binary
        nbytes = 0
        for record in records:
            value = record.value
            nbytes += len(value) if value else 0
            if by_header:
                namespace = self.namespaces.of_record(topic, record.headers)
            # The decoder makes the batch's row (an Item): the event with its coordinates.
            # Structured mode unless the record's headers say binary (most records have none).
            offset, stamp, headers = record.offset, record.timestamp, record.headers
            if headers and binary_mode(headers):
                result = decode_binary(
                    headers, value, namespace, max_bytes, check, topic, partition, offset, stamp
                )
            else:
                result = decode(value, namespace, max_bytes, check, topic, partition, offset, stamp)
            if type(result) is event_type:
                add(result)
            else:
                rejects.append(Reject(full_record(topic, partition, record), result))  # type: ignore[arg-type]
        batch.nbytes += nbytes
        batch.extend(tp, epoch, records[0].offset, records[-1].offset)
        if self.dedup_keys is not None:
            # Grouped for dedup as they come, so the claim of a sealed batch waits for nothing.
            # (A batch rebuilt without some partitions has no grouping: it starts from its
            # first item.)
            grouping = batch.grouping
            if grouping is None:
                grouping = batch.grouping = dedup.Grouping(self.dedup_keys)
            grouping.add(items[grouping.added :])
        consumed = self._consumed.get(topic)
        if consumed is None:  # labels() takes a lock and builds a key: once per topic
            consumed = self._consumed[topic] = self.metrics.consumed.labels(topic)
        consumed.inc(len(records))

    def maybe_seal(self) -> None:
        now = time.monotonic()
        for lane in self.lanes:
            if due(lane.open, self.triggers, now):
                lane.seal()

    def seal(self) -> None:
        """Seal every lane's open batch."""
        for lane in self.lanes:
            lane.seal()

    def held(self) -> list[Batch]:
        """Every batch held, open, sealed or landing."""
        return [batch for lane in self.lanes for batch in lane.held()]

    def drained(self) -> bool:
        """Nothing sealed waits and nothing is landing."""
        return all(not lane.sealed and lane.landing is None for lane in self.lanes)

    def in_flight(self) -> tuple[int, int]:
        """Records and bytes held."""
        batches = self.held()
        return sum(b.records for b in batches), sum(b.nbytes for b in batches)

    def forget(self, tps: Sequence[TopicPartition]) -> None:
        """Drop every record held of these partitions, except in the batches being landed
        (their inserts are fenced)."""
        for lane in self.lanes:
            lane.forget(tps)

    async def _position_pending(self) -> bool:
        """Position newly assigned partitions, shard by shard: a shard that does not answer
        leaves its partitions pending, not the others'. False if any did not answer."""
        # A partition whose older batch is still being inserted waits: reading its landed
        # offset now would miss that batch.
        busy = {tp for lane in self.lanes if lane.landing is not None for tp in lane.landing.ranges}
        tps = [tp for tp in self.assignments.pending if tp not in busy]
        if not tps:
            return True
        groups: dict[int, list[TopicPartition]] = {}
        if self.positioning.offsets.everywhere:  # every partition's ledger is on every shard
            groups[0] = tps
        else:
            for tp in tps:
                groups.setdefault(self.shard_of(tp), []).append(tp)
        answered = True
        for shard, group in sorted(groups.items()):
            try:
                self.found_landed(await self.positioning.position(group))
            except DependencyError as exc:
                answered = False
                self.vitals.failed(exc.dependency, exc)
                self.log.warning(
                    "cannot read landed offsets, retrying",
                    dependency=exc.dependency,
                    shard=shard + 1,
                    partitions=len(group),
                    error=str(exc)[:300],
                )
        if answered:
            self.vitals.ok("clickhouse")
        return answered
