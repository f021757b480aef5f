"""Partition ownership and offset bookkeeping (pure state, no I/O).

Each assignment of a partition opens a new ownership epoch. Records carry the epoch under
which they were fetched; a batch may only be inserted for partitions still held under the same
epoch. A newly assigned partition stays paused until its landed offset has been read from
ClickHouse and the consumer has been moved to `landed + 1`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from sink.coordinates import TopicPartition
from sink.pipeline.batch import Batch


@dataclass
class Assignments:
    epochs: dict[TopicPartition, int] = field(default_factory=dict)
    pending: set[TopicPartition] = field(default_factory=set)
    """Assigned, but not yet positioned at their landed offset."""
    landed: dict[TopicPartition, int] = field(default_factory=dict)
    """Last offset known to have landed in ClickHouse, per held partition."""
    revoking: dict[TopicPartition, float] = field(default_factory=dict)
    """Partitions being revoked, with the monotonic time after which they may not be
    inserted any more (the group gives their next owner the go after its rebalance timeout)."""
    _counter: int = 0

    def assign(self, tps: Iterable[TopicPartition]) -> None:
        for tp in tps:
            self._counter += 1
            self.epochs[tp] = self._counter
            self.pending.add(tp)

    def begin_revoke(self, tps: Iterable[TopicPartition], deadline: float) -> None:
        for tp in tps:
            self.revoking[tp] = deadline

    def revoke(self, tps: Iterable[TopicPartition]) -> None:
        for tp in tps:
            self.epochs.pop(tp, None)
            self.pending.discard(tp)
            self.landed.pop(tp, None)
            self.revoking.pop(tp, None)

    def owns(self, tp: TopicPartition, epoch: int) -> bool:
        if self.epochs.get(tp) != epoch:
            return False
        deadline = self.revoking.get(tp)
        return deadline is None or time.monotonic() < deadline

    def lost(self, batch: Batch) -> list[TopicPartition]:
        """Partitions of the batch that are no longer held under the batch's epoch."""
        return [tp for tp, span in batch.ranges.items() if not self.owns(tp, span.epoch)]

    def position(
        self, tps: Iterable[TopicPartition], landed: Mapping[TopicPartition, int]
    ) -> dict[TopicPartition, int]:
        """Resolve pending partitions: the offsets to seek to (landed + 1). Partitions that
        ClickHouse knows nothing of keep Kafka's committed offset (or the reset policy)."""
        seeks = {}
        for tp in tps:
            if tp not in self.pending:
                continue
            self.pending.discard(tp)
            if tp in landed:
                self.landed[tp] = landed[tp]
                seeks[tp] = landed[tp] + 1
        return seeks

    def advance(self, offsets: Mapping[TopicPartition, int]) -> None:
        """Record landed offsets (last offset of each landed range)."""
        for tp, offset in offsets.items():
            if tp in self.epochs and offset > self.landed.get(tp, -1):
                self.landed[tp] = offset
