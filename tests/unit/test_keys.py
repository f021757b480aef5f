"""The dedup store's key and value formats: one record's place encoded the same way wherever a
marker is written or compared, and topics always under their storage key."""

from __future__ import annotations

from sink.coordinates import Coordinates, coordinates_of
from sink.pipeline.decode import Event
from sink.stores.dedup import Grouping, group, keep
from sink.stores.keys import (
    DedupKeys,
    PendingRange,
    claimed_at,
    compact_coordinates,
    coordinates_head,
    from_text,
    group_key,
    group_number,
    group_value,
    identity_key,
)

PREFIX = b"t:"


def storage_key(topic: str) -> str:
    return f"{topic}~0123456789ab" if topic == "recreated" else topic


def event(topic: str, partition: int, offset: int, event_id: str = "e") -> Event:
    return Event("ns", event_id, "t", "src", "", 0, "{}", "", topic, partition, offset, 0)


def test_a_rows_coordinates_are_its_topic_partition_and_offset() -> None:
    row = event("orders", 3, 41)
    assert coordinates_of(row) == Coordinates("orders", 3, 41)
    assert coordinates_of(row) == ("orders", 3, 41)  # compares with plain tuples in sets
    assert ("orders", 3, 41) in {coordinates_of(row)}


def test_markers_and_pending_keys_name_topics_by_storage_key() -> None:
    keys = DedupKeys(PREFIX, storage_key)
    recreated = keys.marker(Coordinates("recreated", 2, 7))
    assert recreated == compact_coordinates("recreated~0123456789ab", 2, 7)
    assert recreated != keys.marker(Coordinates("plain", 2, 7))
    assert keys.marker(Coordinates("plain", 2, 7)) == compact_coordinates("plain", 2, 7)
    assert keys.head("recreated", 2) == recreated[:8]
    assert keys.pending("recreated", 2) == b"t:~pending:recreated~0123456789ab:2"
    assert keys.identity("ns", "src", "e") == identity_key(PREFIX, "ns", "src", "e")


def test_the_grouping_writes_the_markers_the_keys_make() -> None:
    """The claim's hot path builds coordinates inline: they must equal `DedupKeys.marker`."""
    keys = DedupKeys(PREFIX, storage_key)
    rows = [event("recreated", 0, 5, "a"), event("plain", 1, 9, "b"), event("recreated", 0, 6, "c")]
    grouping = Grouping(keys)
    grouping.add(rows)
    assert grouping.grouped.coords == [keys.marker(coordinates_of(r)) for r in rows]
    assert grouping.grouped.keys == [keys.identity(r.namespace, r.source, r.id) for r in rows]


def test_a_repeat_holding_the_marker_is_recognised_by_its_coordinates() -> None:
    keys = DedupKeys(PREFIX, storage_key)
    first, repeat = event("recreated", 0, 5, "a"), event("recreated", 0, 8, "a")
    grouping = Grouping(keys)
    grouping.add([first, repeat])
    assert keep(grouping.grouped, [keys.marker(coordinates_of(repeat))], keys) == [repeat]
    # The same holder under the plain topic name is another record: nothing is kept.
    assert keep(grouping.grouped, [compact_coordinates("recreated", 0, 8)], keys) == []
    # A holder written as text before coordinates were binary (a replay across the upgrade).
    assert keep(grouping.grouped, [b"recreated~0123456789ab:0:8"], keys) == [repeat]
    assert keep(grouping.grouped, [b"recreated:0:8"], keys) == []


def test_coordinates_are_16_bytes_a_partitions_hash_and_the_offset() -> None:
    coords = compact_coordinates("orders~01", 3, 2**40 + 5)
    assert len(coords) == 16
    assert coords[:8] == coordinates_head("orders~01", 3)
    assert coords[8:] == (2**40 + 5).to_bytes(8, "big")
    assert coordinates_head("orders~01", 3) != coordinates_head("orders~01", 4)
    assert coordinates_head("orders~0", 13) != coordinates_head("orders~01", 3)


def test_a_holder_written_as_text_reads_as_its_binary_coordinates() -> None:
    assert from_text(b"orders~01:3:17") == compact_coordinates("orders~01", 3, 17)
    assert from_text(b"a:b:c:4:5") == compact_coordinates("a:b:c", 4, 5)
    assert from_text(compact_coordinates("orders", 3, 17)) is None
    assert from_text(b"no-coordinates") is None
    assert from_text(b"x:1:\xff") is None
    assert from_text(b"\xff:\xfe:1") is None


def test_a_first_record_held_as_text_is_kept_in_a_batch_without_repeats() -> None:
    keys = DedupKeys(PREFIX, storage_key)
    row = event("plain", 4, 11, "z")
    grouped = group([row], keys)
    assert keep(grouped, [b"plain:4:11"], keys) == [row]
    assert keep(grouped, [b"plain:4:12"], keys) == []


def test_identities_fall_in_groups_by_their_digest() -> None:
    key = identity_key(PREFIX, "ns", "src", "e")
    digest = key[len(PREFIX) :]
    assert group_number(key, 1000) == int.from_bytes(digest[:8], "big") % 1000
    assert group_key(PREFIX, 5) == PREFIX + b"~g" + (5).to_bytes(4, "big")
    value = group_value(1_700_000_000, compact_coordinates("t", 0, 1))
    assert claimed_at(value) == 1_700_000_000
    assert value[4:] == compact_coordinates("t", 0, 1)


def test_a_pending_range_round_trips() -> None:
    pending = PendingRange(10, 20, 1_700_000_000, 1_700_000_060)
    assert PendingRange.parse(pending.encode()) == pending
