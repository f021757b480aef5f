"""The Redis dedup store against a real Redis: claims, replays, conflicts across chunk
boundaries, pending ranges and releases."""

from __future__ import annotations

import redis.asyncio as redis_async

from sink import dedup
from sink.dedup import RedisDedup
from tests.conftest import Services


def _keys(prefix: bytes, n: int, tag: str) -> list[bytes]:
    return [dedup.identity_key(prefix, "ns", "src", f"{tag}-{i}") for i in range(n)]


async def test_claims_replays_and_conflicts_across_chunks(services: Services, uid: str) -> None:
    store = RedisDedup(services.redis, ttl_seconds=600)
    prefix = f"t-{uid}:".encode()
    n = 10_003  # crosses the 10,000-identity chunk
    keys = _keys(prefix, n, "a")
    mine = [dedup.coordinates("orders", 0, i) for i in range(n)]
    pending = {dedup.pending_key(prefix, "orders", 0): b"0:10002:1:2"}
    try:
        assert await store.claim(keys, mine, pending) == mine  # all new
        assert await store.claim(keys, mine) == mine  # our own replay
        theirs = [dedup.coordinates("orders", 1, i) for i in range(n)]
        # Held elsewhere, in both chunks: each reply maps back to its own chunk's identities.
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


async def test_a_claim_loads_its_script_again_after_a_script_flush(
    services: Services, uid: str
) -> None:
    """Scripts are gone after a Redis restart without persistence of the script cache (or a
    SCRIPT FLUSH): the pipelined claim loads its script again."""
    store = RedisDedup(services.redis, ttl_seconds=600)
    client = redis_async.Redis.from_url(services.redis)
    prefix = f"t-{uid}:".encode()
    keys = _keys(prefix, 3, "f")
    mine = [dedup.coordinates("orders", 2, i) for i in range(3)]
    try:
        assert await store.claim(keys, mine) == mine
        await client.script_flush()
        theirs = [dedup.coordinates("orders", 3, i) for i in range(3)]
        assert await store.claim(keys, theirs) == mine
    finally:
        await store.close()
        await client.aclose()
