"""Where each partition's consumption starts, and when it must start again.

A newly assigned partition is positioned from ClickHouse, not from Kafka's committed offset:
at its landed offset + 1. Before that, its topic's storage key is settled (a topic deleted
and created again is a new incarnation, see sink.pipeline.topics), and a previous owner's
interrupted insert is looked for. While records flow, each fetch must continue where the
last one ended; a fetch that goes back means the log was replaced under us.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from aiokafka import TopicPartition as KafkaTP

from sink.coordinates import Coordinates, Span, TopicPartition
from sink.pipeline.context import Context
from sink.pipeline.offsets import Assignments
from sink.pipeline.topics import topic_ids
from sink.stores.clickhouse.landed import ShardedOffsets
from sink.stores.keys import PendingRange


def names(tps: Sequence[TopicPartition] | set[TopicPartition]) -> list[str]:
    """Partitions as `topic/partition`, for logs."""
    return [f"{t}/{p}" for t, p in sorted(tps)]


class Positioning:
    def __init__(
        self,
        ctx: Context,
        *,
        consumer: Any,
        assignments: Assignments,
        offsets: ShardedOffsets,
        start_over: Callable[[Sequence[TopicPartition]], None],
    ) -> None:
        config = ctx.config
        self.config, self.store, self.topics, self.keys = config, ctx.store, ctx.topics, ctx.keys
        self.metrics, self.log = ctx.metrics, ctx.log
        self.consumer = consumer
        self.assignments = assignments
        self.offsets = offsets
        self.start_over = start_over
        """Treats held partitions as newly assigned: what is held of them is dropped."""
        self._next_fetch: dict[TopicPartition, int] = {}
        """Offset each partition's next record should have: a smaller one means the log
        was reset under us (a topic deleted and created again)."""
        self._reset_to: dict[TopicPartition, int] = {}
        """Partitions the consumer reset to a lower offset, with that offset."""
        self._from_start: set[TopicPartition] = set()
        """Partitions of a new topic incarnation: with nothing landed, read from the start."""
        self._topic_ids_missing_logged = False

    def follows(self, tp: TopicPartition, first: int, last: int) -> bool:
        """Whether fetched offsets `first`..`last` continue where the partition's last fetch
        ended. If they go back, the topic's partitions start over and False is returned."""
        expected = self._next_fetch.get(tp)
        if expected is not None and first < expected:
            self._went_back(tp, expected, first)
            return False
        self._next_fetch[tp] = last + 1
        return True

    def forget(self, tps: Sequence[TopicPartition]) -> None:
        for tp in tps:
            self._next_fetch.pop(tp, None)

    def _went_back(self, tp: TopicPartition, expected: int, got: int) -> None:
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
        self.start_over([t for t in self.assignments.epochs if t[0] == tp[0]])

    async def position(self, tps: Sequence[TopicPartition]) -> set[Coordinates]:
        """Seek pending partitions to their landed offset + 1. Returns the coordinates of rows
        a previous owner's interrupted insert left in ClickHouse. Raises DependencyError when
        ClickHouse or Redis cannot answer (the partitions stay pending)."""
        changed = await self._resolve_topics(tps)
        landed = await self.offsets.landed(tps)
        present = await self._find_interrupted(tps, landed)
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
            partitions=names(tps),
            landed={f"{t}/{p}": o for (t, p), o in landed.items() if (t, p) in tps},
        )
        return present

    async def _resolve_topics(self, tps: Sequence[TopicPartition]) -> dict[str, str]:
        """Settle the storage keys of the topics being positioned (see sink.pipeline.topics). If a
        topic turns out to be a new incarnation, its other held partitions start over too."""
        topics = sorted({t for t, _ in tps})
        ids = await topic_ids(self.consumer._client, topics)  # aiokafka's client
        if ids is None:
            ids = {}
            if not self._topic_ids_missing_logged:
                self._topic_ids_missing_logged = True
                self.log.warning(
                    "broker has no topic ids (Kafka < 2.8): a topic deleted and created "
                    "again under the same name is taken for the old one"
                )
        changed = await self.topics.resolve(ids, topics)
        if not changed:
            return changed
        self.log.warning(
            "topic recreated: stored under a new key from now on",
            topics={name: {"key": key, "id": ids.get(name)} for name, key in changed.items()},
        )
        pending = set(tps)
        others = [tp for tp in self.assignments.epochs if tp[0] in changed and tp not in pending]
        if others:
            self.start_over(others)
        self._from_start.update(tp for tp in tps if tp[0] in changed)
        self._from_start.update(others)
        return changed

    async def _find_interrupted(
        self, tps: Sequence[TopicPartition], landed: dict[TopicPartition, int]
    ) -> set[Coordinates]:
        """A previous owner may have died while its insert was written in part (rows in the
        raw table, landed offset not moved). Its pending range says where to look."""
        if self.store is None:
            return set()
        where = [self.keys.pending(t, p) for t, p in tps]
        ranges: dict[TopicPartition, Span] = {}
        low, high = 2**63, -1
        for tp, value in zip(tps, await self.store.pending(where), strict=True):
            if not value:
                continue
            first, last, tmin, tmax = PendingRange.parse(value)
            start = max(first, landed.get(tp, -1) + 1)
            if last >= start:
                ranges[tp] = Span(start, last)
                low, high = min(low, tmin), max(high, tmax)
        if not ranges:
            return set()
        present = await self.offsets.present(
            self.config.clickhouse.events_table, ranges, (low, high)
        )
        if present:
            self.log.warning(
                "found rows of an interrupted insert",
                rows=len(present),
                partitions=names(list(ranges)),
            )
        return present
