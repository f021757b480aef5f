"""Flow control: when the poll loop fetches, and which partitions it fetches from.

- Room. While `batch.max_in_flight` records are held, the poll loop fetches nothing and waits
  for the flusher. The consumer keeps what it fetched ahead meanwhile (pausing would throw
  that away, to be fetched again).
- Pausing. Partitions are paused while a dependency a retry of their lane waits for is down
  (their shard's batches, see sink.pipeline.intake), while they are being positioned, and
  when a wait for room outlasts a quarter of `max_poll_interval` (the poll loop must keep
  polling to stay in the group). Otherwise nothing is paused.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from typing import Any

from aiokafka import TopicPartition as KafkaTP

from sink.config import Config
from sink.coordinates import TopicPartition
from sink.operations.metrics import Metrics
from sink.pipeline.batch import Batch
from sink.pipeline.offsets import Assignments


class FlowControl:
    def __init__(
        self,
        config: Config,
        consumer: Any,
        assignments: Assignments,
        blocked: list[tuple[str, Batch]],
        metrics: Metrics,
        shard_of: Callable[[TopicPartition], int] = lambda _tp: 0,
    ) -> None:
        self.max_in_flight = config.batch.max_in_flight
        self.patience = config.kafka.max_poll_interval / 4
        self.consumer = consumer
        self.assignments = assignments
        self.blocked = blocked
        """Dependencies retries are waiting for, with their batches (`Retry.blocked`)."""
        self.shard_of = shard_of
        """The lane of each partition: a blocked batch pauses the partitions of its lane."""
        self.metrics = metrics
        self.paused: set[TopicPartition] = set()
        self.room = asyncio.Event()
        """Set when the flusher has landed (or dropped) a batch: held rows went down."""
        self._full_since: float | None = None
        """Since when max_in_flight rows have been held (None while there is room)."""

    def _measure(self, in_flight: tuple[int, int]) -> int:
        rows, nbytes = in_flight
        self.metrics.in_flight_rows.set(rows)
        self.metrics.in_flight_bytes.set(nbytes)
        return rows

    async def wait_for_room(
        self, in_flight: tuple[int, int], stopping: bool, seal: Callable[[], None]
    ) -> bool:
        """While max_in_flight rows are held, wait (up to half a second) for the flusher;
        True if it waited. `seal` seals the open batch first, so the flusher has it."""
        if self._measure(in_flight) < self.max_in_flight or stopping:
            self._full_since = None
            return False
        now = time.monotonic()
        if self._full_since is None:
            self._full_since = now
        if self._waited_too_long(now):
            return False
        seal()
        self.room.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.room.wait(), 0.5)
        return True

    def _waited_too_long(self, now: float) -> bool:
        since = self._full_since
        return since is not None and now - since > self.patience

    def apply(self, in_flight: tuple[int, int]) -> None:
        """Pause and resume partitions as the rules above say; once per fetch."""
        rows = self._measure(in_flight)
        full = rows >= self.max_in_flight and self._waited_too_long(time.monotonic())
        if not (full or self.blocked or self.assignments.pending or self.paused):
            # The usual case, once per fetch: nothing is paused and nothing should be.
            self.metrics.paused.set(0)
            return
        # Only partitions aiokafka still holds: a deleted topic leaves its assignment before
        # the rebalance listener tells the worker, and pausing it then would raise.
        held = set(self.assignments.epochs) & {
            (t.topic, t.partition) for t in self.consumer.assignment()
        }
        if full:
            want = held
        else:
            # A lane whose batch waits for a dependency holds up its own partitions only.
            shard_of = self.shard_of
            lanes = {shard_of(tp) for _, batch in self.blocked for tp in batch.ranges}
            want = set(self.assignments.pending) & held
            if lanes:
                want |= {tp for tp in held if shard_of(tp) in lanes}
        to_pause, to_resume = want - self.paused, (self.paused & held) - want
        if to_pause:
            self.consumer.pause(*(KafkaTP(t, p) for t, p in to_pause))
        if to_resume:
            self.consumer.resume(*(KafkaTP(t, p) for t, p in to_resume))
        self.paused = want
        self.metrics.paused.set(len(want))

    def hold(self, tps: Iterable[TopicPartition]) -> None:
        """Pause partitions until they are positioned (newly assigned, or started over)."""
        tps = list(tps)
        if tps:
            self.consumer.pause(*(KafkaTP(t, p) for t, p in tps))
        self.paused.update(tps)

    def forget(self, tps: Iterable[TopicPartition]) -> None:
        """Partitions no longer held: nothing of them is paused, and there is room again."""
        self.paused -= set(tps)
        self.room.set()
