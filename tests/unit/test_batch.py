"""Batches: offset ranges per partition, what to commit, what to write directly, triggers."""

from __future__ import annotations

from collections.abc import Collection
from types import SimpleNamespace

import pytest

from sink.pipeline.batch import Batch, Item, Range, Reject, Triggers, due, full, pending_ranges
from sink.pipeline.decode import Event, Rejection
from sink.stores.keys import PendingRange
from tests.items import as_item

A = ("om_a_events", 0)
B = ("om_a_events", 1)
C = ("om_c_events", 0)


def item(tp: tuple[str, int], offset: int) -> Item:
    event = Event("ns", f"id-{tp}-{offset}", "t", "s", "subj", 0, "{}")
    return as_item(event, tp[0], tp[1], offset, 0)


def reject(tp: tuple[str, int], offset: int) -> Reject:
    record = SimpleNamespace(topic=tp[0], partition=tp[1], offset=offset, key=None, value=b"x")
    return Reject(record, Rejection("invalid_json", "bad"))


def batch_of(
    spans: dict[tuple[str, int], tuple[int, int]], epoch: int = 1, rejects: Collection[int] = ()
) -> Batch:
    """A batch with one record per offset; offsets in `rejects` are dead letters."""
    batch = Batch()
    for tp, (first, last) in spans.items():
        batch.extend(tp, epoch, first, last)
        for offset in range(first, last + 1):
            if offset in rejects:
                batch.rejects.append(reject(tp, offset))
            else:
                batch.items.append(item(tp, offset))
            batch.nbytes += 100
    return batch


# --- extend ---------------------------------------------------------------------------------


def test_empty_batch_is_false() -> None:
    batch = Batch()
    assert not batch
    assert batch.records == 0
    assert batch.commit_offsets() == {}


def test_extend_opens_a_range_with_its_epoch() -> None:
    batch = Batch()
    batch.extend(A, 7, 10, 19)
    assert batch
    assert batch.ranges == {A: Range(10, 19, 7)}


def test_extend_grows_the_range_and_keeps_its_start() -> None:
    batch = Batch()
    batch.extend(A, 1, 10, 19)
    batch.extend(A, 1, 20, 25)
    batch.extend(B, 1, 0, 0)
    assert batch.ranges == {A: Range(10, 25, 1), B: Range(0, 0, 1)}


def test_records_counts_items_and_rejects() -> None:
    batch = batch_of({A: (0, 9)}, rejects={3, 4})
    assert len(batch.items) == 8
    assert len(batch.rejects) == 2
    assert batch.records == 10


# --- commit offsets -------------------------------------------------------------------------


def test_commit_offsets_are_last_plus_one() -> None:
    batch = batch_of({A: (10, 19), B: (0, 4), C: (100, 100)})
    assert batch.commit_offsets() == {A: 20, B: 5, C: 101}


# --- without --------------------------------------------------------------------------------


def test_without_drops_every_record_of_the_partitions() -> None:
    batch = batch_of({A: (0, 4), B: (0, 4), C: (0, 4)}, rejects={2})
    kept = batch.without([B, C])
    assert set(kept.ranges) == {A}
    assert {(i.topic, i.partition) for i in kept.items} == {A}
    assert {(r.record.topic, r.record.partition) for r in kept.rejects} == {A}
    assert kept.records == 5
    assert kept.commit_offsets() == {A: 5}


def test_without_scales_bytes_and_keeps_age() -> None:
    batch = batch_of({A: (0, 4), B: (0, 14)})
    kept = batch.without([B])
    assert kept.nbytes == 500
    assert kept.created == batch.created


def test_without_leaves_the_original_untouched() -> None:
    batch = batch_of({A: (0, 4), B: (0, 4)})
    batch.without([A])
    assert set(batch.ranges) == {A, B}
    assert batch.records == 10


def test_without_unknown_partitions_is_the_same_batch() -> None:
    batch = batch_of({A: (0, 4)})
    assert batch.without([B]) is batch
    assert batch.without([]) is batch


def test_without_every_partition_is_empty() -> None:
    kept = batch_of({A: (0, 4), B: (0, 1)}).without([A, B])
    assert not kept
    assert kept.records == 0
    assert kept.nbytes == 0
    assert kept.commit_offsets() == {}


# --- tail offsets ---------------------------------------------------------------------------


def test_no_tail_when_every_partition_ends_with_a_landed_row() -> None:
    batch = batch_of({A: (0, 9), B: (5, 6)})
    assert batch.tail_offsets(batch.items) == {}


def test_all_duplicate_partition_is_a_tail() -> None:
    batch = batch_of({A: (0, 9), B: (5, 6)})
    landed = [i for i in batch.items if (i.topic, i.partition) == A]
    assert batch.tail_offsets(landed) == {B: 6}


def test_duplicate_tail_after_landed_rows() -> None:
    batch = batch_of({A: (0, 9)})
    landed = [i for i in batch.items if i.offset <= 6]  # 7..9 were duplicates
    assert batch.tail_offsets(landed) == {A: 9}


def test_dead_letter_tail() -> None:
    batch = batch_of({A: (0, 9), B: (0, 3)}, rejects={8, 9})
    assert batch.tail_offsets(batch.items) == {A: 9}


def test_dead_letter_in_the_middle_is_not_a_tail() -> None:
    batch = batch_of({A: (0, 9)}, rejects={4, 5})
    assert batch.tail_offsets(batch.items) == {}


def test_nothing_landed_makes_every_partition_a_tail() -> None:
    batch = batch_of({A: (0, 9), B: (3, 3), C: (7, 8)})
    assert batch.tail_offsets([]) == {A: 9, B: 3, C: 8}


def test_a_landed_row_of_another_partition_at_the_same_offset_is_no_end() -> None:
    # A's last offset (9) was a duplicate; B landed a row at offset 9 too, and its own last.
    batch = batch_of({A: (0, 9), B: (0, 12), C: (9, 9)})
    landed = [
        i for i in batch.items if not (i.partition == A[1] and i.topic == A[0] and i.offset == 9)
    ]
    assert batch.tail_offsets(landed) == {A: 9}
    assert batch.tail_offsets([i for i in landed if i.topic != C[0]]) == {A: 9, C: 9}


def test_tail_offsets_ignore_landed_row_order() -> None:
    batch = batch_of({A: (0, 9)})
    assert batch.tail_offsets(list(reversed(batch.items))) == {}


# --- triggers -------------------------------------------------------------------------------

TRIGGERS = Triggers(max_rows=10, max_bytes=1000, max_wait=1.0)


def sized(records: int, nbytes: int, created: float = 0.0) -> Batch:
    batch = Batch(created=created)
    batch.extend(A, 1, 0, max(0, records - 1))
    batch.items = [item(A, o) for o in range(records)]
    batch.nbytes = nbytes
    return batch


@pytest.mark.parametrize(
    ("records", "nbytes", "expected"),
    [(9, 999, False), (10, 0, True), (11, 0, True), (1, 1000, True), (1, 5000, True)],
)
def test_full_on_rows_or_bytes(records: int, nbytes: int, expected: bool) -> None:
    assert full(sized(records, nbytes), TRIGGERS) is expected


def test_rejects_count_towards_full() -> None:
    batch = sized(5, 0)
    batch.rejects = [reject(A, 100 + o) for o in range(5)]
    assert full(batch, TRIGGERS)


@pytest.mark.parametrize(
    ("age", "expected"), [(0.0, False), (0.999, False), (1.0, True), (30.0, True)]
)
def test_due_on_age(age: float, expected: bool) -> None:
    batch = sized(1, 10, created=100.0)
    assert due(batch, TRIGGERS, now=100.0 + age) is expected


def test_due_when_full_even_if_young() -> None:
    assert due(sized(10, 0, created=100.0), TRIGGERS, now=100.0)
    assert due(sized(1, 1000, created=100.0), TRIGGERS, now=100.0)


def test_empty_batch_is_never_due() -> None:
    assert not due(Batch(created=0.0), TRIGGERS, now=1e9)


# --- pending ranges -------------------------------------------------------------------------


def timed(spans: dict[tuple[str, int], tuple[int, int]], seconds: int) -> Batch:
    """A batch whose events happen at `seconds` + offset."""
    batch = batch_of(spans)
    batch.items = [i._replace(time_ms=(seconds + i.offset) * 1000 + 999) for i in batch.items]
    return batch


def test_pending_ranges_of_a_batch_alone() -> None:
    batch = timed({A: (10, 19), C: (3, 4)}, 1_000)
    ranges = pending_ranges(batch)
    assert ranges == {A: PendingRange(10, 19, 1003, 1019), C: PendingRange(3, 4, 1003, 1019)}
    assert ranges[A].encode() == b"10:19:1003:1019"
    assert PendingRange.parse(ranges[A].encode()) == ranges[A]


def test_pending_ranges_reach_back_over_the_batch_still_landing() -> None:
    landing = timed({A: (0, 9), C: (0, 4)}, 500)
    batch = timed({A: (10, 19), B: (7, 8)}, 1_000)
    # A shared partition starts where the landing batch starts; the times cover both batches;
    # a partition only the landing batch holds keeps the range that batch wrote itself.
    assert pending_ranges(batch, landing) == {
        A: PendingRange(0, 19, 500, 1019),
        B: PendingRange(7, 8, 500, 1019),
    }


def test_pending_ranges_of_a_batch_of_dead_letters_only() -> None:
    batch = batch_of({A: (0, 1)}, rejects={0, 1})
    assert pending_ranges(batch) == {}


def test_time_bounds_follow_the_items() -> None:
    batch = timed({A: (0, 4)}, 1_000)
    assert batch.time_bounds() == (1_000_999, 1_004_999)
    batch.items.append(item(B, 0)._replace(time_ms=5))
    assert batch.time_bounds() == (5, 1_004_999)
    batch.items = [i._replace(time_ms=7) for i in batch.items]
    assert batch.time_bounds() == (7, 7)
