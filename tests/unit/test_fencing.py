"""The fence before each insert: partitions still held in their epoch, no recent freeze."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from sink.pipeline.batch import Batch, Item
from sink.pipeline.decode import Event
from sink.pipeline.fencing import Abandoned, FreezeClock, Ownership
from sink.pipeline.offsets import Assignments
from tests.items import as_item

A = ("om_a_events", 0)
B = ("om_a_events", 1)


def item(tp: tuple[str, int], offset: int) -> Item:
    event = Event("ns", f"id-{tp}-{offset}", "t", "s", "subj", 0, "{}")
    return as_item(event, tp[0], tp[1], offset, 0)


def held(*tps: tuple[str, int]) -> tuple[Ownership, Assignments, Batch, list[Item]]:
    """Ownership of partitions assigned now, and a batch of two rows each read under them."""
    assignments = Assignments()
    assignments.assign(tps)
    batch = Batch()
    for tp in tps:
        batch.extend(tp, assignments.epochs[tp], 0, 1)
    items = [item(tp, offset) for tp in tps for offset in (0, 1)]
    ownership = Ownership(SimpleNamespace(), assignments, session_timeout=10, heartbeat_interval=3)
    return ownership, assignments, batch, items


async def test_fence_passes_every_row_of_partitions_still_held() -> None:
    ownership, _, batch, items = held(A, B)
    assert await ownership.fence(batch, items) == items
    assert not ownership.abandoned(batch)


async def test_fence_drops_the_rows_of_a_partition_that_moved_away() -> None:
    ownership, assignments, batch, items = held(A, B)
    assignments.revoke([B])
    assert [(i.topic, i.partition) for i in await ownership.fence(batch, items)] == [A, A]


async def test_fence_drops_the_rows_of_a_partition_assigned_again_since() -> None:
    ownership, assignments, batch, items = held(A, B)
    assignments.revoke([A])
    assignments.assign([A])  # held again, under a new epoch: the batch's rows are stale
    assert [(i.topic, i.partition) for i in await ownership.fence(batch, items)] == [B, B]


async def test_fence_abandons_a_batch_whose_partitions_all_moved_away() -> None:
    ownership, assignments, batch, items = held(A, B)
    assignments.revoke([A, B])
    assert ownership.abandoned(batch)
    with pytest.raises(Abandoned):
        await ownership.fence(batch, items)


async def test_fence_waits_out_the_settle_time_after_a_freeze() -> None:
    ownership, _, batch, items = held(A)
    ownership.settle = 0.5
    ownership.clock.last_tick -= 2 * ownership.clock.threshold  # the loop did not run
    started = time.monotonic()
    assert await ownership.fence(batch, items) == items
    assert time.monotonic() - started >= 0.5


def test_freeze_clock_sees_a_gap_longer_than_its_threshold() -> None:
    clock = FreezeClock(threshold=1.0)
    assert clock.check() == float("-inf")
    clock.last_tick -= 0.5
    assert clock.check() == float("-inf")  # shorter than the threshold: no freeze
    clock.last_tick -= 1.5
    seen = clock.check()
    assert seen > 0
    assert clock.check() == seen  # the last freeze is remembered


def test_no_freeze_since_a_moment_until_one_is_seen() -> None:
    ownership, *_ = held(A)
    fenced_at = time.monotonic()
    assert ownership.unfrozen_since(fenced_at)
    ownership.clock.last_tick -= 2 * ownership.clock.threshold
    assert not ownership.unfrozen_since(fenced_at)


@pytest.mark.parametrize(
    ("generation", "member_id", "lost"),
    [(5, "member-1", False), (-1, "member-1", True), (5, "", True)],
)
def test_membership_is_lost_when_the_coordinator_forgot_this_member(
    generation: int, member_id: str, lost: bool
) -> None:
    ownership, *_ = held(A)
    ownership.consumer = SimpleNamespace(
        _coordinator=SimpleNamespace(generation=generation, member_id=member_id)
    )
    assert ownership.membership_lost() is lost


def test_membership_counts_as_lost_within_the_settle_time_of_a_freeze() -> None:
    ownership, *_ = held(A)
    assert not ownership.membership_lost()
    ownership.clock.last_tick -= 2 * ownership.clock.threshold
    assert ownership.membership_lost()
