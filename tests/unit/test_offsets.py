"""Partition ownership epochs and landed-offset bookkeeping."""

from __future__ import annotations

from sink.pipeline.batch import Batch
from sink.pipeline.offsets import Assignments

A = ("om_a_events", 0)
B = ("om_a_events", 1)
C = ("om_c_events", 0)


def batch_for(assignments: Assignments, *tps: tuple[str, int]) -> Batch:
    """A batch fetched now, under the current epochs."""
    batch = Batch()
    for tp in tps:
        batch.extend(tp, assignments.epochs[tp], 0, 9)
    return batch


# --- assign / revoke / owns -----------------------------------------------------------------


def test_assign_opens_an_epoch_per_partition_and_leaves_it_pending() -> None:
    assignments = Assignments()
    assignments.assign([A, B])
    assert set(assignments.epochs) == {A, B}
    assert assignments.epochs[A] != assignments.epochs[B]
    assert assignments.pending == {A, B}
    assert assignments.owns(A, assignments.epochs[A])


def test_reassignment_opens_a_new_epoch() -> None:
    assignments = Assignments()
    assignments.assign([A])
    old = assignments.epochs[A]
    assignments.revoke([A])
    assignments.assign([A])
    assert assignments.epochs[A] != old
    assert not assignments.owns(A, old)
    assert assignments.owns(A, assignments.epochs[A])


def test_assign_without_revoke_also_opens_a_new_epoch() -> None:
    assignments = Assignments()
    assignments.assign([A])
    old = assignments.epochs[A]
    assignments.assign([A])
    assert not assignments.owns(A, old)


def test_epochs_are_never_reused() -> None:
    assignments = Assignments()
    seen = set()
    for _ in range(5):
        assignments.assign([A, B])
        seen.update(assignments.epochs.values())
        assignments.revoke([A, B])
    assert len(seen) == 10


def test_revoke_forgets_the_partition() -> None:
    assignments = Assignments()
    assignments.assign([A, B])
    assignments.position([A, B], {A: 10, B: 20})
    epoch = assignments.epochs[A]
    assignments.revoke([A])
    assert A not in assignments.epochs
    assert A not in assignments.landed
    assert A not in assignments.pending
    assert not assignments.owns(A, epoch)
    assert assignments.landed == {B: 20}


def test_revoke_of_a_pending_partition_clears_pending() -> None:
    assignments = Assignments()
    assignments.assign([A, B])
    assignments.revoke([A])
    assert assignments.pending == {B}


def test_revoke_of_unknown_partition_is_harmless() -> None:
    assignments = Assignments()
    assignments.assign([A])
    assignments.revoke([C])
    assert set(assignments.epochs) == {A}


def test_nothing_is_owned_before_assignment() -> None:
    assert not Assignments().owns(A, 0)
    assert not Assignments().owns(A, 1)


# --- lost -----------------------------------------------------------------------------------


def test_batch_of_held_partitions_is_not_lost() -> None:
    assignments = Assignments()
    assignments.assign([A, B])
    assert assignments.lost(batch_for(assignments, A, B)) == []


def test_revoked_partition_is_lost() -> None:
    assignments = Assignments()
    assignments.assign([A, B])
    batch = batch_for(assignments, A, B)
    assignments.revoke([B])
    assert assignments.lost(batch) == [B]


def test_reassigned_partition_is_lost_for_an_old_batch() -> None:
    assignments = Assignments()
    assignments.assign([A, B])
    old = batch_for(assignments, A, B)
    assignments.revoke([A])
    assignments.assign([A])
    assert assignments.lost(old) == [A]
    assert assignments.lost(batch_for(assignments, A, B)) == []


def test_everything_lost_after_full_revoke() -> None:
    assignments = Assignments()
    assignments.assign([A, B, C])
    batch = batch_for(assignments, A, B, C)
    assignments.revoke([A, B, C])
    assert sorted(assignments.lost(batch)) == sorted([A, B, C])


# --- position -------------------------------------------------------------------------------


def test_position_seeks_to_landed_plus_one() -> None:
    assignments = Assignments()
    assignments.assign([A, B])
    seeks = assignments.position([A, B], {A: 41, B: 0})
    assert seeks == {A: 42, B: 1}
    assert assignments.landed == {A: 41, B: 0}
    assert assignments.pending == set()


def test_partition_unknown_to_clickhouse_gets_no_seek_but_leaves_pending() -> None:
    assignments = Assignments()
    assignments.assign([A, B])
    seeks = assignments.position([A, B], {A: 5})
    assert seeks == {A: 6}
    assert B not in assignments.landed
    assert assignments.pending == set()


def test_position_only_resolves_pending_partitions() -> None:
    assignments = Assignments()
    assignments.assign([A])
    assignments.position([A], {A: 5})
    # already positioned, or never assigned: no second seek
    assert assignments.position([A, C], {A: 1, C: 1}) == {}
    assert assignments.landed == {A: 5}


def test_position_of_a_subset_leaves_the_rest_pending() -> None:
    assignments = Assignments()
    assignments.assign([A, B])
    assert assignments.position([A], {A: 3, B: 4}) == {A: 4}
    assert assignments.pending == {B}


# --- advance --------------------------------------------------------------------------------


def test_advance_moves_landed_forward() -> None:
    assignments = Assignments()
    assignments.assign([A])
    assignments.position([A], {A: 10})
    assignments.advance({A: 20})
    assert assignments.landed == {A: 20}


def test_advance_never_moves_back() -> None:
    assignments = Assignments()
    assignments.assign([A])
    assignments.position([A], {A: 10})
    assignments.advance({A: 5})
    assignments.advance({A: 10})
    assert assignments.landed == {A: 10}


def test_advance_starts_a_partition_unknown_to_clickhouse() -> None:
    assignments = Assignments()
    assignments.assign([A])
    assignments.position([A], {})
    assignments.advance({A: 0})
    assert assignments.landed == {A: 0}


def test_advance_ignores_partitions_not_held() -> None:
    assignments = Assignments()
    assignments.assign([A, B])
    assignments.revoke([B])
    assignments.advance({A: 3, B: 7, C: 9})
    assert assignments.landed == {A: 3}
