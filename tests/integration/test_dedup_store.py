"""The Redis dedup store against a real Redis: claims, replays and conflicts in claims whose
replies take many reads, pending ranges, releases, error replies, timeouts and RESP3."""

from __future__ import annotations

import time

import redis.asyncio as redis_async

from sink import dedup
from sink.dedup import RedisDedup
from sink.errors import RedisUnavailable
from tests.conftest import Services


def _keys(prefix: bytes, n: int, tag: str) -> list[bytes]:
    return [dedup.identity_key(prefix, "ns", "src", f"{tag}-{i}") for i in range(n)]


async def test_claims_replays_and_conflicts_in_a_claim_of_many_reads(
    services: Services, uid: str
) -> None:
    store = RedisDedup(services.redis, ttl_seconds=600)
    prefix = f"t-{uid}:".encode()
    n = 10_003  # its replies come in many reads of the stream
    keys = _keys(prefix, n, "a")
    mine = [dedup.coordinates("orders", 0, i) for i in range(n)]
    pending = {dedup.pending_key(prefix, "orders", 0): b"0:10002:1:2"}
    try:
        assert await store.claim(keys, mine, pending) == mine  # all new
        assert await store.claim(keys, mine) == mine  # our own replay
        theirs = [dedup.coordinates("orders", 1, i) for i in range(n)]
        # Held elsewhere: each reply maps back to its own identity.
        assert await store.claim(keys, theirs) == mine
        # Identities 0 and 10,001 held by us; the rest of the call is new identities.
        mixed_keys = [keys[0], *_keys(prefix, 3, "b"), keys[10_001]]
        mixed = [theirs[0], *theirs[1:4], theirs[10_001]]
        holders = await store.claim(mixed_keys, mixed)
        assert holders == [mine[0], *theirs[1:4], mine[10_001]]
        assert await store.pending([*pending, prefix + b"~pending:none:0"]) == [
            b"0:10002:1:2",
            None,
        ]
        # Release frees only markers still holding the releasing coordinates.
        assert await store.release([keys[5], keys[6]], [mine[5], theirs[6]]) == 1
        again = await store.claim([keys[5], keys[6]], [theirs[5], theirs[6]])
        assert again == [theirs[5], mine[6]]
    finally:
        await store.close()


async def test_an_empty_claim_still_writes_the_pending_ranges(services: Services, uid: str) -> None:
    store = RedisDedup(services.redis, ttl_seconds=600)
    key = dedup.pending_key(f"t-{uid}:".encode(), "orders", 3)
    try:
        assert await store.claim([], [], {key: b"5:9:1:1"}) == []
        assert await store.pending([key]) == [b"5:9:1:1"]
    finally:
        await store.close()


async def test_a_release_loads_its_script_again_after_a_script_flush(
    services: Services, uid: str
) -> None:
    """Scripts are gone after a Redis restart without persistence of the script cache (or a
    SCRIPT FLUSH): the release loads its script again."""
    store = RedisDedup(services.redis, ttl_seconds=600)
    client = redis_async.Redis.from_url(services.redis)
    prefix = f"t-{uid}:".encode()
    keys = _keys(prefix, 3, "f")
    mine = [dedup.coordinates("orders", 2, i) for i in range(3)]
    try:
        assert await store.claim(keys, mine) == mine
        assert await store.release(keys[:1], mine[:1]) == 1
        await client.script_flush()
        assert await store.release(keys[1:], mine[1:]) == 2
        theirs = [dedup.coordinates("orders", 3, i) for i in range(3)]
        assert await store.claim(keys, theirs) == theirs
    finally:
        await store.close()
        await client.aclose()


async def test_markers_and_pending_ranges_expire_after_the_ttl(
    services: Services, uid: str
) -> None:
    store = RedisDedup(services.redis, ttl_seconds=600)
    client = redis_async.Redis.from_url(services.redis)
    prefix = f"t-{uid}:".encode()
    keys = _keys(prefix, 2, "t")
    pending = dedup.pending_key(prefix, "orders", 0)
    try:
        await store.claim(keys, [b"orders:0:1", b"orders:0:2"], {pending: b"1:2:1:1"})
        for key in [*keys, pending]:
            assert 590 <= await client.ttl(key) <= 600
        assert await client.get(keys[1]) == b"orders:0:2"
    finally:
        await store.close()
        await client.aclose()


async def test_one_marker_held_at_the_end_of_a_large_all_new_claim(
    services: Services, uid: str
) -> None:
    """The replies match the all-new answer for many reads, then differ at the last one."""
    store = RedisDedup(services.redis, ttl_seconds=600)
    prefix = f"t-{uid}:".encode()
    n = 30_000
    keys = _keys(prefix, n, "e")
    mine = [dedup.coordinates("orders", 0, i) for i in range(n)]
    theirs = [dedup.coordinates("orders-b", 11, 10**12 + i) for i in range(n)]
    try:
        assert await store.claim(keys[-1:], theirs[-1:]) == theirs[-1:]
        assert await store.claim(keys, mine) == [*mine[:-1], theirs[-1]]
    finally:
        await store.close()


async def test_a_claim_longer_than_the_socket_timeout_succeeds_while_redis_answers(
    services: Services, uid: str
) -> None:
    """The socket timeout bounds each wait for more replies, not the whole claim: Redis answers
    150,000 SETs over more than the 0.5 s allowed to any one wait."""
    store = RedisDedup(services.redis, ttl_seconds=600, socket_timeout=0.5)
    prefix = f"t-{uid}:".encode()
    n = 150_000
    keys = _keys(prefix, n, "l")
    mine = [dedup.coordinates("orders", 8, i) for i in range(n)]
    try:
        started = time.monotonic()
        assert await store.claim(keys, mine) == mine
        took = time.monotonic() - started
        assert await store.claim(keys[::1000], mine[1::1000]) == mine[::1000]
    finally:
        await store.close()
    print(f"claim of {n:,} identities: {took:.2f} s")


async def test_an_error_reply_fails_the_claim_and_the_next_claim_reads_its_own_replies(
    services: Services, uid: str
) -> None:
    """A key that holds no string makes Redis answer SET ... GET with an error: the claim
    raises, having read every reply of its commands, so the next claim on the same
    connection reads its own."""
    store = RedisDedup(services.redis, ttl_seconds=600)
    client = redis_async.Redis.from_url(services.redis)
    prefix = f"t-{uid}:".encode()
    keys = _keys(prefix, 4, "w")
    mine = [dedup.coordinates("orders", 4, i) for i in range(4)]
    try:
        await client.hset(keys[1], "f", "v")
        try:
            await store.claim(keys, mine)
        except RedisUnavailable as exc:
            assert "WRONGTYPE" in str(exc)
        else:
            raise AssertionError("a claim answered by an error must raise")
        # The other SETs ran: their identities are held by these coordinates now.
        theirs = [dedup.coordinates("orders", 5, i) for i in range(4)]
        others = [keys[0], keys[2], keys[3]]
        held = await store.claim(others, [theirs[0], theirs[2], theirs[3]])
        assert held == [mine[0], mine[2], mine[3]]
        fresh = _keys(prefix, 3, "x")
        assert await store.claim(fresh, theirs[:3]) == theirs[:3]
    finally:
        await store.close()
        await client.aclose()


async def test_claims_over_resp3_read_each_reply_with_the_client(
    services: Services, uid: str
) -> None:
    """A URL asking for RESP3 (whose stream may carry push messages) is served by redis-py's
    own reply parser, with the same answers."""
    resp3 = services.redis + ("&" if "?" in services.redis else "?") + "protocol=3"
    store = RedisDedup(resp3, ttl_seconds=600)
    prefix = f"t-{uid}:".encode()
    keys = _keys(prefix, 5, "r")
    mine = [dedup.coordinates("orders", 6, i) for i in range(5)]
    theirs = [dedup.coordinates("orders", 7, i) for i in range(5)]
    pending = {dedup.pending_key(prefix, "orders", 6): b"0:4:1:1"}
    try:
        assert await store.claim(keys[:3], mine[:3], pending) == mine[:3]
        assert await store.claim(keys, theirs) == [*mine[:3], *theirs[3:]]
        assert await store.pending(list(pending)) == [b"0:4:1:1"]
    finally:
        await store.close()
