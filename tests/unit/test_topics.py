"""Storage keys of topic incarnations (pure logic; the broker and ClickHouse parts are
exercised by the fault suite's recreated-topic tests)."""

from __future__ import annotations

from sink.pipeline.topics import TopicKeys, storage_key

OLD = "5713f51b4e534876a85217d1a35bf92f"
NEW = "c1bce8d9b0ab46e6b88801518cfe7735"


def test_the_first_incarnation_keeps_the_plain_name() -> None:
    assert storage_key("orders", OLD, {}) == "orders"


def test_a_known_incarnation_keeps_its_key() -> None:
    assert storage_key("orders", OLD, {OLD: "orders"}) == "orders"
    assert storage_key("orders", NEW, {OLD: "orders", NEW: "orders~c1bce8d9b0ab"}) == (
        "orders~c1bce8d9b0ab"
    )


def test_a_later_incarnation_gets_its_id_prefix() -> None:
    assert storage_key("orders", NEW, {OLD: "orders"}) == "orders~c1bce8d9b0ab"


async def test_keys_translate_both_ways_and_report_changes() -> None:
    keys = TopicKeys(None, "sink_offsets_topics")
    assert keys.key("orders") == "orders"  # nothing resolved yet: plain names
    assert await keys.resolve({"orders": OLD}, ["orders", "billing"]) == {}
    assert keys.key("billing") == "billing"  # no id (old broker): plain name
