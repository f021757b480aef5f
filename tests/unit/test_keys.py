"""The dedup store's key and value formats: one record's place encoded the same way wherever a
marker is written or compared, and topics always under their storage key."""

from __future__ import annotations

from sink.coordinates import Coordinates, coordinates_of
from sink.pipeline.decode import Event
from sink.stores.dedup import Grouping, keep
from sink.stores.keys import DedupKeys, PendingRange, identity_key

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
    assert keys.marker(Coordinates("recreated", 2, 7)) == b"recreated~0123456789ab:2:7"
    assert keys.marker(Coordinates("plain", 2, 7)) == b"plain:2:7"
    assert keys.head("recreated", 2) == "recreated~0123456789ab:2:"
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
    assert keep(grouping.grouped, [b"recreated:0:8"], keys) == []


def test_a_pending_range_round_trips() -> None:
    pending = PendingRange(10, 20, 1_700_000_000, 1_700_000_060)
    assert PendingRange.parse(pending.encode()) == pending
