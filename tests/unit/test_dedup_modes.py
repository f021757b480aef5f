"""The dedup store's modes without a server: the configuration each needs, the replicas a
claim waits for, the connection options (TLS, ACL user), and the Redis Cluster routing (slots,
MOVED and ASK replies)."""

from __future__ import annotations

import hiredis
import pytest
from redis.crc import key_slot
from redis.exceptions import AskError, MovedError

from sink.config import DedupConfig, build
from sink.errors import ConfigError
from sink.stores.dedup_cluster import SLOTS, parse_slots, redirection, split_by_node
from sink.stores.keys import identity_key
from sink.stores.redis_connect import Replication, replication_of, url_options


def test_standalone_is_the_default_and_needs_nothing_more() -> None:
    cfg = build({}, {}).dedup
    assert cfg.mode == "standalone"
    assert cfg.sentinels == () and cfg.min_replicas_acked is None


@pytest.mark.parametrize(
    ("dedup", "message"),
    [
        ({"mode": "sentinel", "sentinel_master": "m"}, "needs dedup.sentinels"),
        ({"mode": "sentinel", "sentinels": ["h:26379"]}, "needs dedup.sentinel_master"),
        ({"sentinels": ["h:26379"], "sentinel_master": "m"}, "go with dedup.mode: sentinel"),
        ({"mode": "cluster", "sentinel_master": "m"}, "not cluster"),
        ({"mode": "sentinel", "sentinels": ["h"], "sentinel_master": "m"}, "host:port"),
        ({"mode": "cluster", "redis_url": "redis://h:7000/3"}, "only database 0"),
        ({"mode": "replicated"}, "dedup.mode"),
        ({"min_replicas_acked": -1}, "dedup.min_replicas_acked"),
        ({"redis_url": "http://:hunter2@h"}, "dedup.redis_url = <hidden>"),
    ],
)
def test_bad_mode_settings_are_refused_at_start(dedup: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        build({"dedup": dedup}, {})
    assert "hunter2" not in str(caught.value)


def test_sentinel_and_cluster_settings_from_the_environment() -> None:
    cfg = build(
        {},
        {
            "SINK__DEDUP__MODE": "sentinel",
            "SINK__DEDUP__SENTINELS": "[10.0.0.1:26379, 10.0.0.2:26379]",
            "SINK__DEDUP__SENTINEL_MASTER": "dedup",
        },
    ).dedup
    assert cfg.sentinels == ("10.0.0.1:26379", "10.0.0.2:26379")
    cluster = build({"dedup": {"mode": "cluster", "redis_url": "rediss://n1:7000"}}, {}).dedup
    assert cluster.mode == "cluster"


def test_claims_wait_for_a_replica_where_replicas_are_expected_or_seen() -> None:
    standalone = replication_of(DedupConfig())
    assert standalone.required() == 0  # today's behaviour: no WAIT
    standalone.seen = True  # the master was seen with a replica
    assert standalone.required() == 1
    for mode, extra in (
        ("sentinel", {"sentinels": ("h:1",), "sentinel_master": "m"}),
        ("cluster", {}),
    ):
        assert replication_of(DedupConfig(mode=mode, **extra)).required() == 1  # type: ignore[arg-type]
    assert replication_of(DedupConfig(mode="cluster", min_replicas_acked=0)).required() == 0
    assert Replication(2, 1.0, expect_replicas=False).required() == 2


def test_tls_and_the_acl_user_come_from_the_url_or_the_configuration() -> None:
    from redis.asyncio.connection import SSLConnection

    options = url_options(DedupConfig(redis_url="rediss://app:s3cret@h:6380/2"))  # type: ignore[arg-type]
    assert options["connection_class"] is SSLConnection
    assert (options["username"], options["password"], options["db"]) == ("app", "s3cret", 2)
    overridden = url_options(
        DedupConfig(redis_url="rediss://h:6380", username="sink", password="pw")  # type: ignore[arg-type]
    )
    assert (overridden["username"], overridden["password"]) == ("sink", "pw")


def test_a_claim_is_split_by_the_node_of_each_keys_slot_in_order() -> None:
    slots = ["a:1"] * 5000 + ["b:2"] * 6000 + ["c:3"] * (SLOTS - 11000)
    keys = [identity_key(b"p:", "ns", "src", str(i)) for i in range(300)]
    nodes = split_by_node(keys, slots)
    assert sorted(i for ats in nodes.values() for i in ats) == list(range(300))
    for node, ats in nodes.items():
        assert ats == sorted(ats)
        assert all(slots[key_slot(keys[i])] == node for i in ats)
    assert set(nodes) == {"a:1", "b:2", "c:3"}
    # Redis' CRC16 slot, hash tags included.
    assert key_slot(b"123456789") == 0x31C3 % SLOTS
    assert key_slot(b"{user1000}.following") == key_slot(b"{user1000}.followers")


def test_the_slot_map_from_cluster_slots() -> None:
    reply = [
        [0, 5460, [b"10.0.0.1", 7000, b"id1"], [b"10.0.0.4", 7000, b"id4"]],
        [5461, 16383, [b"", 7001, b"id2"]],
    ]
    slots = parse_slots(reply, "seed")
    assert slots[0] == slots[5460] == "10.0.0.1:7000"
    assert slots[5461] == slots[16383] == "seed:7001"
    assert "" in parse_slots(reply[:1], "seed")  # slots no master serves


def test_moved_and_ask_replies_name_where_to_send_again() -> None:
    reader = hiredis.Reader()
    reader.feed(b"-MOVED 3999 10.0.0.2:7001\r\n-ASK 12 :7002\r\n-ERR other\r\n$1\r\nx\r\n")
    moved, ask, other, value = (reader.gets() for _ in range(4))
    assert redirection(moved, "seed") == (3999, "10.0.0.2:7001", False)
    assert redirection(ask, "seed") == (12, "seed:7002", True)
    assert redirection(other, "seed") is None and redirection(value, "seed") is None
    # As redis-py's own parser gives them.
    assert redirection(MovedError("3999 10.0.0.2:7001"), "seed") == (3999, "10.0.0.2:7001", False)
    assert redirection(AskError("12 10.0.0.3:7002"), "seed") == (12, "10.0.0.3:7002", True)
