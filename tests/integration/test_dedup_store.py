"""The Redis dedup store against a real Redis: claims, replays and conflicts in claims whose
replies take many reads, pending ranges, releases, error replies, timeouts, RESP3 and an ACL
user."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as redis_async
from pydantic import SecretStr

from sink.config import DedupConfig
from sink.errors import RedisUnavailable
from sink.pipeline.decode import Event
from sink.stores.dedup import Grouping, RedisDedup, keep, open_store
from sink.stores.dedup_groups import DROP, GroupedDedup
from sink.stores.keys import (
    DedupKeys,
    compact_coordinates,
    coordinates,
    group_key,
    groups_since_key,
    identity_key,
    pending_key,
)
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
    # The groups layout's commands, and those its scripts call.
    allowed += ["+hsetnx", "+hget", "+hgetall", "+hset", "+hdel", "+hlen", "+hincrby", "+expire"]
    await client.execute_command(
        "ACL", "SETUSER", user, "on", f">{password}", f"~{prefix.decode()}*", *allowed
    )
    config = DedupConfig(
        redis_url=SecretStr(services.redis),
        username=user,
        password=SecretStr(password),
        key_prefix=prefix.decode(),
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


# ---------------------------------------------------------------------------------------------
# groups layout


def _grouped(services: Services, prefix: bytes, **more: Any) -> GroupedDedup:
    config = DedupConfig(
        redis_url=SecretStr(services.redis), key_prefix=prefix.decode(), layout="groups", **more
    )
    store = open_store(config, 2.0)
    assert isinstance(store, GroupedDedup)
    return store


def _compact(topic: str, partition: int, n: int, first: int = 0) -> list[bytes]:
    return [compact_coordinates(topic, partition, first + i) for i in range(n)]


def _event(event_id: str, topic: str, partition: int, offset: int) -> Event:
    return Event("ns", event_id, "t", "src", "", 0, "{}", "", topic, partition, offset, 0)


async def _group_keys(client: redis_async.Redis, prefix: bytes, groups: int) -> list[bytes]:
    """The groups that exist (no SCAN: the shared Redis holds other tests' keys)."""
    return [
        group_key(prefix, n) for n in range(groups) if await client.exists(group_key(prefix, n))
    ]


async def test_groups_claims_replays_duplicates_and_pending_ranges(
    services: Services, client: redis_async.Redis, prefix: bytes
) -> None:
    store = _grouped(services, prefix, groups=64)
    n = 10_003  # more than one write; 64 groups of some 156 fields: also the hash encoding
    keys = _keys(prefix, n, "g")
    mine, theirs = _compact("orders", 0, n), _compact("orders", 1, n)
    pending = {pending_key(prefix, "orders", 0): b"0:10002:1:2"}
    try:
        assert await store.claim(keys, mine, pending) == mine  # all new
        assert await store.claim(keys, mine) == mine  # our own replay recognises its claims
        assert await store.claim(keys, theirs) == mine  # a duplicate from another partition
        fresh = _keys(prefix, 3, "h")
        both = [keys[0], *fresh, keys[n - 1]]
        held = await store.claim(both, theirs[:5])
        assert held == [mine[0], *theirs[1:4], mine[n - 1]]
        assert await store.pending(list(pending)) == [b"0:10002:1:2"]
        groups = await _group_keys(client, prefix, 64)
        assert 0 < len(groups) <= 64
        assert sum([await client.hlen(g) for g in groups]) == n + 3
    finally:
        await store.close()


async def test_groups_keep_the_listpack_encoding_when_sized_for_the_identities(
    services: Services, client: redis_async.Redis, prefix: bytes
) -> None:
    store = _grouped(services, prefix, groups=100)
    try:
        await store.claim(_keys(prefix, 3_200, "s"), _compact("orders", 0, 3_200))
        groups = await _group_keys(client, prefix, 100)
        encodings = {await client.object("encoding", g) for g in groups}
        assert encodings == {b"listpack"}
    finally:
        await store.close()


async def test_groups_release_deletes_only_fields_held_by_the_releasing_record(
    services: Services, prefix: bytes
) -> None:
    store = _grouped(services, prefix, groups=8)
    keys = _keys(prefix, 4, "r")
    mine, theirs = _compact("orders", 2, 4), _compact("orders", 3, 4)
    try:
        assert await store.claim(keys, mine) == mine
        assert await store.release(keys[:2], theirs[:2]) == 0
        assert await store.release(keys[:2], mine[:2]) == 2
        assert await store.release(keys[:1], mine[:1]) == 0
        # A corrected resend claims the released identities anew; the others stay held.
        assert await store.claim(keys, theirs) == [*theirs[:2], *mine[2:]]
    finally:
        await store.close()


async def test_groups_forget_an_identity_at_the_ttl_and_the_sweep_frees_it(
    services: Services, client: redis_async.Redis, prefix: bytes
) -> None:
    """A decision honours the TTL (the field's claim time, in whole seconds, read back: an
    identity is forgotten between 1 and 2 s after the TTL, never before); the sweep then deletes
    what expired, and what it leaves keeps its groups alive for ttl + 2 x sweep_every."""
    store = _grouped(services, prefix, groups=4, ttl=2, sweep_every=2)
    keys = _keys(prefix, 40, "x")
    early, late = keys[:20], keys[20:]
    mine, theirs = _compact("orders", 4, 40), _compact("orders", 5, 40)
    try:
        assert await store.claim(early, mine[:20]) == mine[:20]
        assert await store.claim(early, theirs[:20]) == mine[:20]  # within the TTL: duplicates
        await asyncio.sleep(3.1)
        # The early ones were claimed more than 3 s ago: forgotten, claimed by the newcomers.
        assert await store.claim(keys, theirs) == theirs
        assert await store.claim(late, mine[20:]) == theirs[20:]
        swept = await store.sweep(4)
        assert (swept.groups, swept.dropped) == (4, 0)
        for group in await _group_keys(client, prefix, 4):
            assert 0 < await client.ttl(group) <= 2 + 2 * 2
        await asyncio.sleep(3.1)
        swept = await store.sweep(4)
        assert (swept.groups, swept.dropped) == (4, 40)
        assert await _group_keys(client, prefix, 4) == []
        assert (await store.sweep(4)).groups == 0  # the next round is not due for 2 s
    finally:
        await store.close()


async def test_groups_sweep_leaves_a_field_claimed_again_since_it_read_it(
    services: Services, client: redis_async.Redis, prefix: bytes
) -> None:
    """A field the sweep read as expired and a claim took over since is not dropped: the
    group's version moved."""
    store = _grouped(services, prefix, groups=1, ttl=1)
    keys = _keys(prefix, 2, "v")
    mine, theirs = _compact("orders", 6, 2), _compact("orders", 7, 2)
    try:
        assert await store.claim(keys, mine) == mine
        await asyncio.sleep(2.1)  # more than the TTL in whole seconds
        group = group_key(prefix, 0)
        fields = await client.hgetall(group)
        read = [f for f in fields if f != b"~v"]
        assert await store.claim(keys[:1], theirs[:1]) == theirs[:1]  # taken over
        stale = await client.evalsha(DROP.sha, 1, group, b"", b"60", *read)  # type: ignore[misc]
        assert stale == -1
        assert await store.claim(keys, theirs) == [theirs[0], theirs[1]]
    finally:
        await store.close()


async def test_groups_read_old_layout_markers_for_a_ttl_after_the_upgrade(
    services: Services, client: redis_async.Redis, prefix: bytes
) -> None:
    """With legacy_reads, an identity the keys layout holds is answered by its marker (text
    coordinates, as written before they were binary): a replay of the record that claimed it is
    kept, a duplicate dropped; the window ends one TTL after the layout's first claim."""
    keys = _keys(prefix, 3, "o")
    await client.set(keys[0], b"orders:0:7", ex=600)
    await client.set(keys[1], compact_coordinates("orders", 0, 8), ex=600)
    store = _grouped(services, prefix, groups=4, legacy_reads=True)
    dedup_keys = DedupKeys(prefix)
    try:
        held = await store.claim(keys, _compact("orders", 9, 3))
        assert held[0] == b"orders:0:7"
        assert held[1:] == [
            compact_coordinates("orders", 0, 8),
            compact_coordinates("orders", 9, 2),
        ]
        rows = [_event("o-0", "orders", 0, 7), _event("o-0", "orders", 9, 0)]
        grouping = Grouping(dedup_keys)
        grouping.add(rows[:1])
        assert keep(grouping.grouped, held[:1], dedup_keys) == rows[:1]  # own claim
        grouping = Grouping(dedup_keys)
        grouping.add(rows[1:])
        assert keep(grouping.grouped, held[:1], dedup_keys) == []  # a duplicate
        since = int(await client.get(groups_since_key(prefix)))
        assert abs(since - time.time()) < 5
        await client.set(groups_since_key(prefix), str(since - 10**7))
        later = _grouped(services, prefix, groups=4, legacy_reads=True)
        try:
            # The window is over: the old marker is no longer read.
            assert await later.claim(keys[:1], _compact("orders", 9, 1)) == _compact("orders", 9, 1)
        finally:
            await later.close()
    finally:
        await store.close()
