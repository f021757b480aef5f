"""The replay-safe dedup rule (DESIGN.md section 3), on the in-memory store.

Keep the record whose coordinates hold its identity's marker: absent -> claimed and kept;
own coordinates -> a replay after a crash, kept; other coordinates -> a duplicate, dropped.
"""

from __future__ import annotations

from collections.abc import Sequence

import hiredis
import pytest

from sink.errors import RedisUnavailable
from sink.pipeline.batch import Item
from sink.pipeline.decode import Event
from sink.stores import dedup
from sink.stores.dedup import Grouping, MemoryDedup, group, keep
from sink.stores.keys import DedupKeys, compact_coordinates, coordinates, identity_key
from tests.items import as_item

PREFIX = b"sink:dedup:"
KEYS = DedupKeys(PREFIX)


def item(
    id_: str = "e1",
    *,
    namespace: str = "acme",
    source: str = "api",
    topic: str = "om_acme_events",
    partition: int = 0,
    offset: int = 0,
    subject: str = "s",
) -> Item:
    event = Event(namespace, id_, "t", source, subject, 1_700_000_000_000, "{}")
    return as_item(event, topic, partition, offset, 1_700_000_000_000)


async def run(store: MemoryDedup, items: Sequence[Item]) -> list[Item]:
    """One batch through the rule: group, one claim call, keep."""
    grouped = group(items, KEYS)
    holders = await store.claim(grouped.keys, grouped.coords)
    return keep(grouped, holders, KEYS)


@pytest.fixture
def store() -> MemoryDedup:
    return MemoryDedup()


# --- the rule -------------------------------------------------------------------------------


async def test_new_identities_are_kept(store: MemoryDedup) -> None:
    batch = [item("a", offset=0), item("b", offset=1), item("c", offset=2)]
    assert await run(store, batch) == batch
    assert len(store.markers) == 3


async def test_marker_holds_the_claiming_coordinates(store: MemoryDedup) -> None:
    await run(store, [item("a", topic="t", partition=3, offset=17)])
    key = identity_key(PREFIX, "acme", "api", "a")
    assert store.markers == {key: compact_coordinates("t", 3, 17)}


async def test_own_replay_is_kept(store: MemoryDedup) -> None:
    batch = [item("a", offset=10), item("b", offset=11)]
    assert await run(store, batch) == batch
    # crash before the insert: the same records come back with the same coordinates
    assert await run(store, batch) == batch
    assert await run(store, list(batch)) == batch


async def test_replay_of_a_partial_batch_is_kept(store: MemoryDedup) -> None:
    batch = [item("a", offset=10), item("b", offset=11), item("c", offset=12)]
    await run(store, batch)
    assert await run(store, batch[1:]) == batch[1:]


@pytest.mark.parametrize(
    "elsewhere",
    [
        {"offset": 99},
        {"partition": 1},
        {"topic": "om_other_events"},
        {"topic": "om_other_events", "partition": 1, "offset": 99},
    ],
    ids=["other-offset", "other-partition", "other-topic", "other-everything"],
)
async def test_same_identity_at_other_coordinates_is_dropped(
    store: MemoryDedup, elsewhere: dict[str, object]
) -> None:
    original = item("a", offset=5)
    assert await run(store, [original]) == [original]
    duplicate = item("a", **elsewhere)  # type: ignore[arg-type]
    assert await run(store, [duplicate]) == []
    # and the original still counts as its own replay afterwards
    assert await run(store, [original]) == [original]


async def test_duplicate_with_other_payload_is_still_a_duplicate(store: MemoryDedup) -> None:
    await run(store, [item("a", offset=1, subject="x")])
    assert await run(store, [item("a", offset=2, subject="y")]) == []


async def test_identity_is_namespace_source_and_id(store: MemoryDedup) -> None:
    first = item("a", namespace="n1", source="s1", offset=0)
    other_source = item("a", namespace="n1", source="s2", offset=1)
    other_namespace = item("a", namespace="n2", source="s1", offset=2)
    other_id = item("b", namespace="n1", source="s1", offset=3)
    batch = [first, other_source, other_namespace, other_id]
    assert await run(store, batch) == batch
    assert len(store.markers) == 4


async def test_only_new_records_survive_a_mixed_batch(store: MemoryDedup) -> None:
    await run(store, [item("old", offset=0)])
    batch = [item("new1", offset=1), item("old", offset=2), item("new2", offset=3)]
    assert await run(store, batch) == [batch[0], batch[2]]


# --- repeats inside one batch ---------------------------------------------------------------


def test_group_claims_only_the_first_occurrence() -> None:
    a1, b, a2, a3 = (
        item("a", offset=1),
        item("b", offset=2),
        item("a", partition=1, offset=3),
        item("a", topic="x", offset=4),
    )
    grouped = group([a1, b, a2, a3], KEYS)
    assert grouped.keys == [
        identity_key(PREFIX, "acme", "api", "a"),
        identity_key(PREFIX, "acme", "api", "b"),
    ]
    assert grouped.coords == [
        compact_coordinates(a1.topic, 0, 1),
        compact_coordinates(b.topic, 0, 2),
    ]
    assert grouped.firsts == [a1, b]
    assert grouped.repeats == {0: [a2, a3]}


def test_grouping_in_steps_is_grouping_at_once() -> None:
    batch = [
        item("a", offset=1),
        item("b", offset=2),
        item("a", partition=1, offset=3),
        item("c", offset=4),
        item("b", topic="x", offset=5),
        item("a", offset=6),
    ]
    once = group(batch, KEYS)
    for cut in range(len(batch) + 1):
        steps = Grouping(KEYS)
        steps.add(batch[:cut])
        steps.add(batch[cut:])
        assert steps.grouped == once, cut
        assert steps.added == len(batch)
    assert once.repeats == {0: [batch[2], batch[5]], 1: [batch[4]]}


def test_coordinates_follow_each_item_across_partitions_and_topics() -> None:
    # Items come in runs of one partition; the coordinates' head changes with every run.
    batch = [
        item("a", offset=7),
        item("b", partition=1, offset=7),
        item("c", partition=1, offset=8),
        item("d", topic="x", partition=1, offset=9),
        item("e", offset=10),
    ]
    grouping = Grouping(DedupKeys(PREFIX, topic_key=lambda topic: f"k{topic}"))
    for one in batch:
        grouping.add([one])
    assert grouping.grouped.coords == [
        compact_coordinates(f"k{i.topic}", i.partition, i.offset) for i in batch
    ]
    assert grouping.grouped == group(batch, DedupKeys(PREFIX, lambda topic: f"k{topic}"))


async def test_in_batch_repeats_keep_only_the_first(store: MemoryDedup) -> None:
    a1, a2, b = item("a", offset=1), item("a", offset=2), item("b", offset=3)
    assert await run(store, [a1, a2, b]) == [a1, b]
    assert set(store.markers.values()) == {
        compact_coordinates("om_acme_events", 0, 1),
        compact_coordinates("om_acme_events", 0, 3),
    }
    # the whole batch replayed: the same first occurrence is kept again
    assert await run(store, [a1, a2, b]) == [a1, b]


async def test_replay_with_changed_order_keeps_the_marker_holder(store: MemoryDedup) -> None:
    a_p0 = item("a", partition=0, offset=5)
    a_p1 = item("a", partition=1, offset=7)
    # batch 1 saw A@p0 first: A@p0 claimed the identity and was kept
    assert await run(store, [a_p0, a_p1]) == [a_p0]
    # crash before the insert; the replay fetches p1 before p0
    grouped = group([a_p1, a_p0], KEYS)
    assert grouped.coords == [compact_coordinates(a_p1.topic, 1, 7)]
    holders = await store.claim(grouped.keys, grouped.coords)
    assert holders == [compact_coordinates(a_p0.topic, 0, 5)]
    assert keep(grouped, holders, KEYS) == [a_p0]


async def test_changed_order_without_the_holder_drops_all(store: MemoryDedup) -> None:
    await run(store, [item("a", partition=9, offset=1)])
    assert await run(store, [item("a", partition=1, offset=7), item("a", offset=5)]) == []


def test_keep_follows_batch_order_of_identity() -> None:
    x, y, z = item("x", offset=1), item("y", offset=2), item("z", offset=3)
    grouped = group([x, y, z], KEYS)
    assert keep(grouped, grouped.coords, KEYS) == [x, y, z]
    assert keep(grouped, [grouped.coords[0], b"elsewhere", grouped.coords[2]], KEYS) == [x, z]


def test_keep_needs_one_holder_per_key() -> None:
    grouped = group([item("x"), item("y", offset=1)], KEYS)
    with pytest.raises(ValueError):
        keep(grouped, [grouped.coords[0]], KEYS)


def test_empty_batch() -> None:
    grouped = group([], KEYS)
    assert grouped == ([], [], [], {})
    assert keep(grouped, [], KEYS) == []


# --- release --------------------------------------------------------------------------------


async def test_release_deletes_only_markers_held_by_the_given_coordinates(
    store: MemoryDedup,
) -> None:
    a, b = item("a", offset=1), item("b", offset=2)
    await run(store, [a, b])
    key_a, key_b = (identity_key(PREFIX, "acme", "api", i) for i in ("a", "b"))
    mine, other = compact_coordinates("om_acme_events", 0, 1), compact_coordinates("other", 0, 2)
    released = await store.release([key_a, key_b], [mine, other])
    assert released == 1
    assert key_a not in store.markers
    assert store.markers[key_b] == compact_coordinates("om_acme_events", 0, 2)


async def test_release_of_absent_marker_is_a_no_op(store: MemoryDedup) -> None:
    assert await store.release([b"nope"], [b"t:0:1"]) == 0
    assert store.markers == {}


async def test_released_identity_can_be_claimed_by_a_corrected_resend(
    store: MemoryDedup,
) -> None:
    bad = item("a", offset=1)
    await run(store, [bad])
    grouped = group([bad], KEYS)
    assert await store.release(grouped.keys, grouped.coords) == 1
    resend = item("a", topic="om_acme_events", partition=2, offset=50)
    assert await run(store, [resend]) == [resend]
    # the dead-lettered original, replayed, is now the duplicate
    assert await run(store, [bad]) == []


# --- keys -----------------------------------------------------------------------------------


def test_identity_key_is_prefix_plus_16_bytes() -> None:
    key = identity_key(PREFIX, "acme", "api", "e1")
    assert key.startswith(PREFIX)
    assert len(key) == len(PREFIX) + 16
    assert identity_key(b"", "acme", "api", "e1") == key[len(PREFIX) :]


def test_identity_key_is_deterministic() -> None:
    assert identity_key(PREFIX, "n", "s", "i") == identity_key(PREFIX, "n", "s", "i")


@pytest.mark.parametrize(
    ("left", "right"),
    [
        (("a", "bc", "d"), ("ab", "c", "d")),
        (("a", "b", "cd"), ("a", "bc", "d")),
        (("ab", "", "c"), ("a", "b", "c")),
        (("", "ab", "c"), ("a", "b", "c")),
        (("1:a", "b", "c"), ("1", "a", "bc")),
        (("a", "1:b", "c"), ("a1:", "b", "c")),
        (("n", "s", "i"), ("n", "s", "I")),
        (("é", "s", "i"), ("e", "s", "i")),
    ],
)
def test_identity_key_differs_when_fields_shift(
    left: tuple[str, str, str], right: tuple[str, str, str]
) -> None:
    assert identity_key(PREFIX, *left) != identity_key(PREFIX, *right)


def test_identity_key_handles_surrogates() -> None:
    assert identity_key(PREFIX, "\ud800", "s", "i") != identity_key(PREFIX, "\udc00", "s", "i")


def test_coordinates_text() -> None:
    assert coordinates("om_acme_events", 3, 1234) == b"om_acme_events:3:1234"


def test_claim_commands_frame_the_pending_ranges_then_one_set_nx_get_per_identity() -> None:
    reader = hiredis.Reader()
    keys = [b"k:" + bytes([i]) * 16 for i in (0, 10, 13, 36)]  # bytes that look like framing
    coords = [b"orders:0:7", b"orders:12:1000000", b"o:1:1", b"x" * 300]
    reader.feed(dedup.claim_commands(keys, coords, b"7200", {b"k:~pending:orders:0": b"7:9:1:2"}))
    commands = list(iter(reader.gets, False))
    assert commands == [
        [b"SET", b"k:~pending:orders:0", b"7:9:1:2", b"EX", b"7200"],
        *([b"SET", k, c, b"NX", b"GET", b"EX", b"7200"] for k, c in zip(keys, coords, strict=True)),
    ]
    assert dedup.claim_commands([], [], b"60") == b""


def test_claim_commands_refuse_keys_of_several_widths_and_unpaired_coordinates() -> None:
    with pytest.raises(ValueError, match="one width"):
        dedup.claim_commands([b"a", b"bb"], [b"x:0:1", b"x:0:2"], b"60")
    with pytest.raises(ValueError, match="2 identity keys for 1"):
        dedup.claim_commands([b"a", b"b"], [b"x:0:1"], b"60")


def test_holders_from_replies_keep_own_coordinates_where_no_marker_was() -> None:
    coords = [b"t:0:1", b"t:0:2", b"t:0:3"]
    assert dedup._holders(coords, [b"OK", None, b"u:1:9", None], 1) == [
        b"t:0:1",
        b"u:1:9",
        b"t:0:3",
    ]
    with pytest.raises(RedisUnavailable, match="WRONGTYPE"):
        dedup._holders(coords, [None, hiredis.ReplyError("WRONGTYPE x"), None], 0)
    with pytest.raises(RedisUnavailable, match="pending range"):
        dedup._holders(coords, [hiredis.ReplyError("OOM"), None, None, None], 1)
    with pytest.raises(RedisUnavailable, match="2 replies for 3"):
        dedup._holders(coords, [None, None], 0)
