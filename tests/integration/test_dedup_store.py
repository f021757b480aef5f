"""The Redis dedup store against a real Redis: claims, replays and conflicts in claims whose
replies take many reads, pending ranges, releases, error replies, timeouts, RESP3 and an ACL
user."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis_async
from pydantic import SecretStr

from sink.config import DedupConfig
from sink.errors import RedisUnavailable
from sink.stores.dedup import RedisDedup, open_store
from sink.stores.keys import coordinates, identity_key, pending_key
from tests.conftest import Services


@pytest.fixture
def prefix(uid: str) -> bytes:
    return f"t-{uid}:".encode()


@pytest.fixture
async def store(services: Services) -> AsyncIterator[RedisDedup]:
    store = RedisDedup(services.redis, ttl_seconds=600)
    yield store
    await store.close()


@pytest.fixture
async def client(services: Services) -> AsyncIterator[redis_async.Redis]:
    client = redis_async.Redis.from_url(services.redis)
    yield client
    await client.aclose()


def _keys(prefix: bytes, n: int, tag: str) -> list[bytes]:
    return [identity_key(prefix, "ns", "src", f"{tag}-{i}") for i in range(n)]


def _coords(topic: str, partition: int, n: int, first: int = 0) -> list[bytes]:
    return [coordinates(topic, partition, first + i) for i in range(n)]


async def test_claims_replays_and_conflicts_in_a_claim_of_many_reads(
    store: RedisDedup, prefix: bytes
) -> None:
    n = 10_003  # more than one write of identities; its replies come in many reads
    keys = _keys(prefix, n, "a")
    mine = _coords("orders", 0, n)
    pending = {pending_key(prefix, "orders", 0): b"0:10002:1:2"}
    assert await store.claim(keys, mine, pending) == mine  # all new
    assert await store.claim(keys, mine) == mine  # our own replay
    theirs = _coords("orders", 1, n)
    # Held elsewhere: each reply maps back to its own identity.
    assert await store.claim(keys, theirs) == mine
    # Identities 0 and 10,001 held by us; the rest of the call is new identities.
    mixed_keys = [keys[0], *_keys(prefix, 3, "b"), keys[10_001]]
    mixed = [theirs[0], *theirs[1:4], theirs[10_001]]
    holders = await store.claim(mixed_keys, mixed)
    assert holders == [mine[0], *theirs[1:4], mine[10_001]]
    assert await store.pending([*pending, prefix + b"~pending:none:0"]) == [b"0:10002:1:2", None]
    # Release frees only markers still holding the releasing coordinates.
    assert await store.release([keys[5], keys[6]], [mine[5], theirs[6]]) == 1
    again = await store.claim([keys[5], keys[6]], [theirs[5], theirs[6]])
    assert again == [theirs[5], mine[6]]


async def test_an_empty_claim_still_writes_the_pending_ranges(
    store: RedisDedup, prefix: bytes
) -> None:
    key = pending_key(prefix, "orders", 3)
    assert await store.claim([], [], {key: b"5:9:1:1"}) == []
    assert await store.pending([key]) == [b"5:9:1:1"]


async def test_a_release_loads_its_script_again_after_a_script_flush(
    store: RedisDedup, client: redis_async.Redis, prefix: bytes
) -> None:
    """Scripts are gone after a Redis restart without persistence of the script cache (or a
    SCRIPT FLUSH): the release loads its script again."""
    keys = _keys(prefix, 3, "f")
    mine = _coords("orders", 2, 3)
    assert await store.claim(keys, mine) == mine
    assert await store.release(keys[:1], mine[:1]) == 1
    await client.script_flush()
    assert await store.release(keys[1:], mine[1:]) == 2
    theirs = _coords("orders", 3, 3)
    assert await store.claim(keys, theirs) == theirs


async def test_markers_and_pending_ranges_expire_after_the_ttl(
    store: RedisDedup, client: redis_async.Redis, prefix: bytes
) -> None:
    keys = _keys(prefix, 2, "t")
    pending = pending_key(prefix, "orders", 0)
    await store.claim(keys, [b"orders:0:1", b"orders:0:2"], {pending: b"1:2:1:1"})
    for key in [*keys, pending]:
        assert 590 <= await client.ttl(key) <= 600
    assert await client.get(keys[1]) == b"orders:0:2"


async def test_one_marker_held_at_the_end_of_a_large_all_new_claim(
    store: RedisDedup, prefix: bytes
) -> None:
    """The replies match the all-new answer for many reads, then differ at the last one."""
    n = 30_000
    keys = _keys(prefix, n, "e")
    mine = _coords("orders", 0, n)
    theirs = _coords("orders-b", 11, n, first=10**12)
    assert await store.claim(keys[-1:], theirs[-1:]) == theirs[-1:]
    assert await store.claim(keys, mine) == [*mine[:-1], theirs[-1]]


async def test_a_claim_longer_than_the_socket_timeout_succeeds_while_redis_answers(
    services: Services, prefix: bytes
) -> None:
    """The socket timeout bounds each wait for more replies, not the whole claim: Redis answers
    150,000 SETs over more than the 0.5 s allowed to any one wait."""
    store = RedisDedup(services.redis, ttl_seconds=600, socket_timeout=0.5)
    n = 150_000
    keys = _keys(prefix, n, "l")
    mine = _coords("orders", 8, n)
    try:
        started = time.monotonic()
        assert await store.claim(keys, mine) == mine
        took = time.monotonic() - started
        assert await store.claim(keys[::1000], mine[1::1000]) == mine[::1000]
    finally:
        await store.close()
    print(f"claim of {n:,} identities: {took:.2f} s")


async def test_an_error_reply_fails_the_claim_and_the_next_claim_reads_its_own_replies(
    store: RedisDedup, client: redis_async.Redis, prefix: bytes
) -> None:
    """A key that holds no string makes Redis answer SET ... GET with an error: the claim
    raises, having read every reply of its commands, so the next claim on the same
    connection reads its own."""
    keys = _keys(prefix, 4, "w")
    mine = _coords("orders", 4, 4)
    await client.hset(keys[1], "f", "v")
    with pytest.raises(RedisUnavailable, match="WRONGTYPE"):
        await store.claim(keys, mine)
    # The other SETs ran: their identities are held by these coordinates now.
    theirs = _coords("orders", 5, 4)
    held = await store.claim([keys[0], keys[2], keys[3]], [theirs[0], theirs[2], theirs[3]])
    assert held == [mine[0], mine[2], mine[3]]
    fresh = _keys(prefix, 3, "x")
    assert await store.claim(fresh, theirs[:3]) == theirs[:3]


async def test_claims_over_resp3_read_each_reply_with_the_client(
    services: Services, prefix: bytes
) -> None:
    """A URL asking for RESP3 (whose stream may carry push messages) is served by redis-py's
    own reply parser, with the same answers."""
    resp3 = services.redis + ("&" if "?" in services.redis else "?") + "protocol=3"
    store = RedisDedup(resp3, ttl_seconds=600)
    keys = _keys(prefix, 5, "r")
    mine = _coords("orders", 6, 5)
    theirs = _coords("orders", 7, 5)
    pending = {pending_key(prefix, "orders", 6): b"0:4:1:1"}
    try:
        assert await store.claim(keys[:3], mine[:3], pending) == mine[:3]
        assert await store.claim(keys, theirs) == [*mine[:3], *theirs[3:]]
        assert await store.pending(list(pending)) == [b"0:4:1:1"]
    finally:
        await store.close()


async def test_an_acl_user_with_only_the_commands_the_store_needs(
    services: Services, client: redis_async.Redis, prefix: bytes, uid: str
) -> None:
    """The user and password from the configuration (over the URL's); no +role: a standalone
    server then works as before, its replicas unknown."""
    user, password = f"dedup_{uid}", f"pw-{uid}"
    allowed = ["+set", "+get", "+mget", "+del", "+eval", "+evalsha", "+script", "+ping"]
    await client.execute_command(
        "ACL", "SETUSER", user, "on", f">{password}", f"~{prefix.decode()}*", *allowed
    )
    config = DedupConfig(
        redis_url=SecretStr(services.redis), username=user, password=SecretStr(password)
    )
    store = open_store(config, 2.0)
    keys, mine = _keys(prefix, 3, "u"), _coords("orders", 9, 3)
    pending = {pending_key(prefix, "orders", 9): b"0:2:1:1"}
    try:
        assert await store.claim(keys, mine, pending) == mine
        assert await store.pending(list(pending)) == [b"0:2:1:1"]
        assert await store.release(keys[:1], mine[:1]) == 1
    finally:
        await store.close()
        await client.execute_command("ACL", "DELUSER", user)
