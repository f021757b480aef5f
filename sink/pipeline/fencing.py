"""Whether this worker may still insert what it holds.

The group moves partitions when members join, leave or go silent; a consumer learns of it only
when the group tells it. A process that was frozen (SIGSTOP, a VM pause, a long GC) cannot know
what happened meanwhile, so an insert is fenced twice: the batch's partitions are still held in
the epoch they were read in, and no freeze was seen within the last session timeout.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from sink.pipeline.batch import Batch, Item
from sink.pipeline.offsets import Assignments


class Abandoned(Exception):
    """The batch lost every partition it held while waiting; nothing of it may be inserted."""


class FreezeClock:
    """Notices when the whole process stopped running for half a session timeout: long enough
    that the group may have moved on.

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


class Ownership:
    """The fence in front of every insert, and the test a revoke needs: hand-over or loss."""

    def __init__(
        self,
        consumer: Any,
        assignments: Assignments,
        session_timeout: float,
        heartbeat_interval: float,
    ) -> None:
        self.consumer = consumer
        self.assignments = assignments
        self.clock = FreezeClock(threshold=max(1.0, session_timeout / 2))
        self.settle = session_timeout + heartbeat_interval
        """How long after a freeze the group may still revoke what it took meanwhile."""

    def membership_lost(self) -> bool:
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
        return time.monotonic() - self.clock.check() < self.settle

    def abandoned(self, batch: Batch) -> bool:
        """Every partition of the batch has moved away."""
        return len(self.assignments.lost(batch)) == len(batch.ranges)

    def unfrozen_since(self, moment: float) -> bool:
        """No freeze was seen since `moment` (a monotonic time)."""
        return self.clock.check() < moment

    async def fence(self, batch: Batch, items: list[Item]) -> list[Item]:
        """Rows of `items` this worker may still insert, checked right before the insert."""
        freeze = self.clock.check()
        while time.monotonic() - freeze < self.settle:
            # The process was frozen: give the group time to revoke before trusting epochs.
            await asyncio.sleep(0.2)
            freeze = self.clock.check()
        lost = set(self.assignments.lost(batch))
        if len(lost) == len(batch.ranges):
            raise Abandoned
        if not lost:
            return items
        return [i for i in items if (i.topic, i.partition) not in lost]
