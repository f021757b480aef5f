"""Batches: the decoded records of one or more partitions' contiguous offset ranges.

A batch is the unit of dedup (one Redis call), of insert (one ClickHouse block) and of commit.
The accumulator fills the open batch; the worker seals it when a trigger fires.
"""

from __future__ import annotations

import itertools
import operator
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from sink.coordinates import Span, TopicPartition, coordinates_of
from sink.pipeline.decode import Event, Rejection
from sink.stores.keys import PendingRange

Item = Event
"""A batch's row: a valid event with its Kafka coordinates and record timestamp (one tuple
per row, made by the decoder)."""


class Reject(NamedTuple):
    """A record that goes to the dead-letter topic, with what it needs to be resent."""

    record: Any
    """The original consumer record (topic, partition, offset, key, value, headers)."""
    reason: Rejection


@dataclass
class Range:
    """The contiguous offsets a batch holds for one partition, under one ownership epoch."""

    first: int
    last: int
    epoch: int


@dataclass
class Batch:
    ranges: dict[TopicPartition, Range] = field(default_factory=dict)
    items: list[Item] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    nbytes: int = 0
    created: float = field(default_factory=time.monotonic)
    recovered: bool = False
    """Some rows were found already in ClickHouse (an insert whose outcome was unknown); the
    landed offsets must then be written for every partition, the view may not have run."""
    _bounds: tuple[list[Item], int, int, int] | None = None
    """(items, their number, lowest, highest event time in ms) when last taken."""
    grouping: Any = None
    """The items grouped by identity as they are added (a sink.stores.dedup.Grouping); a batch that
    loses partitions is a new Batch, grouped again when it is claimed."""

    @property
    def records(self) -> int:
        return len(self.items) + len(self.rejects)

    def __bool__(self) -> bool:
        return bool(self.ranges)

    def extend(self, tp: TopicPartition, epoch: int, first: int, last: int) -> None:
        span = self.ranges.get(tp)
        if span is None:
            self.ranges[tp] = Range(first, last, epoch)
        else:
            span.last = last

    def without(self, tps: Iterable[TopicPartition]) -> Batch:
        """The same batch less every record of the given partitions."""
        gone = set(tps) & self.ranges.keys()
        if not gone:
            return self
        kept = Batch(created=self.created, recovered=self.recovered)
        kept.ranges = {tp: r for tp, r in self.ranges.items() if tp not in gone}
        kept.items = [i for i in self.items if (i.topic, i.partition) not in gone]
        kept.rejects = [r for r in self.rejects if (r.record.topic, r.record.partition) not in gone]
        kept.nbytes = self.nbytes * kept.records // max(1, self.records)
        return kept

    def time_bounds(self) -> tuple[int, int]:
        """Lowest and highest event time (epoch ms) of the batch's rows (it has some)."""
        bounds, items = self._bounds, self.items
        if bounds is None or bounds[0] is not items or bounds[1] != len(items):
            times = list(map(TIME_MS_OF, items))
            bounds = self._bounds = (items, len(times), min(times), max(times))
        return bounds[2], bounds[3]

    def commit_offsets(self) -> dict[TopicPartition, int]:
        """Kafka offsets to commit once the batch landed: last + 1 per partition."""
        return {tp: r.last + 1 for tp, r in self.ranges.items()}

    def tail_offsets(self, landed_rows: Iterable[Item]) -> dict[TopicPartition, int]:
        """Partitions whose last offset produced no landed row; their landed offset must be
        written directly, or a restart would replay (and re-dead-letter) the tail. After a
        recovery, every partition's."""
        if self.recovered:
            return {tp: r.last for tp, r in self.ranges.items()}
        rows = list(landed_rows)
        # Offsets of a partition never exceed its last: it is a tail unless its last landed.
        # Only rows at some partition's last offset can say so: picked out at C level.
        lasts = {r.last for r in self.ranges.values()}
        at_a_last = itertools.compress(rows, map(lasts.__contains__, map(OFFSET_OF, rows)))
        landed = set(map(coordinates_of, at_a_last))
        return {tp: r.last for tp, r in self.ranges.items() if (tp[0], tp[1], r.last) not in landed}


# Fields by position, for passes over a whole batch at C level (`map`).
FIELD_OF = {name: operator.itemgetter(k) for k, name in enumerate(Item._fields)}
TOPIC_OF = FIELD_OF["topic"]
OFFSET_OF = FIELD_OF["offset"]
TIME_MS_OF = FIELD_OF["time_ms"]


def span(items: Iterable[Item]) -> tuple[dict[TopicPartition, Span], tuple[int, int]]:
    """Offset span per partition and event-time bounds (epoch seconds) of some rows."""
    ranges: dict[TopicPartition, Span] = {}
    low, high = 2**63, -1
    for item in items:
        tp = (item.topic, item.partition)
        first, last = ranges.get(tp, (item.offset, item.offset))
        ranges[tp] = Span(min(first, item.offset), max(last, item.offset))
        low, high = min(low, item.time_ms), max(high, item.time_ms)
    return ranges, (low // 1000, high // 1000)


def pending_ranges(batch: Batch, behind: Batch | None = None) -> dict[TopicPartition, PendingRange]:
    """What `batch` may insert, per partition, written down before the insert (see
    sink.stores.dedup.DedupStore). While the batch
    `behind` it is still landing, a partition both hold starts at that batch's first offset
    and the times cover both batches."""
    if not batch.items:
        return {}
    low, high = batch.time_bounds()
    if behind is not None and behind.items:
        behind_low, behind_high = behind.time_bounds()
        low, high = min(low, behind_low), max(high, behind_high)
    low, high = low // 1000, high // 1000
    earlier = behind.ranges if behind is not None else {}
    out = {}
    for tp, r in batch.ranges.items():
        first = min(r.first, earlier[tp].first) if tp in earlier else r.first
        out[tp] = PendingRange(first, r.last, low, high)
    return out


class Triggers(NamedTuple):
    max_rows: int
    max_bytes: int
    max_wait: float


def full(batch: Batch, triggers: Triggers) -> bool:
    return batch.records >= triggers.max_rows or batch.nbytes >= triggers.max_bytes


def due(batch: Batch, triggers: Triggers, now: float) -> bool:
    return bool(batch) and (full(batch, triggers) or now - batch.created >= triggers.max_wait)
