"""The dedup store's groups layout (`dedup.layout: groups`): identities as fields of small hashes.

An identity is a field of one of `dedup.groups` hashes (sink.stores.keys): the group from the
first 8 bytes of its digest, the field the last 8, the value its claim time (epoch seconds) and
the holder's coordinates. Hashes of up to 128 short fields stay in Redis' compact listpack
encoding: some 40 bytes an identity where a key of its own takes some 200.

A claim is one `HSETNX group field value` per identity, pipelined like the keys layout's SETs.
Only the identities that were already there (duplicates and replays) are read back with `HGET`
in a second round trip. A field claimed more than `dedup.ttl` ago is forgotten when it is read:
it is taken over by a small script, atomically, unless something else took it first. So the
TTL holds for every decision, and memory is reclaimed by the sweep: the workers share a cursor
over the groups (SWEEP_ROUND), each sweeping its next few groups now and then, dropping the
fields older than the TTL (DROP) and keeping each group's key alive for
`ttl + 2 x sweep_every`, so that groups no worker sweeps any more vanish on their own.

Where old-layout markers may remain (`dedup.legacy_reads`), every identity is first looked up
under its old key, until one TTL after this layout first claimed under the prefix.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import redis.asyncio as redis_async
from redis.asyncio.sentinel import Sentinel

from sink.config import DedupConfig
from sink.errors import RedisUnavailable
from sink.stores.dedup import BULK_HEADS, CHUNK, REDIS_FAILURES, read_replies
from sink.stores.keys import (
    CLAIM_TIME_SIZE,
    FIELD_SIZE,
    claimed_at,
    group_key,
    groups_since_key,
    sweep_key,
)
from sink.stores.redis_connect import Replication

_ONE = b":1\r\n"
_OK = b"+OK\r\n"
_NIL = b"$-1\r\n"
_ANY = b""
"""No reply is foreseen: each one is parsed."""
VERSION = b"~v"
"""The field of a group's version (identities' fields are FIELD_SIZE bytes)."""


class Script:
    """A Lua script called by its SHA1 (`EVALSHA`), loaded by `EVAL` where a server lacks it
    (a restart, a failover, another node of a cluster)."""

    def __init__(self, body: str) -> None:
        self.body = body.encode()
        self.sha = hashlib.sha1(self.body).hexdigest().encode()

    async def run(
        self, link: Link, keys: Sequence[bytes], args: Sequence[Sequence[bytes]], writes: bool
    ) -> list[Any]:
        """Each call's reply: the script on one key with its arguments."""
        calls = [
            command(b"EVALSHA", self.sha, b"1", key, *more)
            for key, more in zip(keys, args, strict=True)
        ]
        replies = await link.send(keys, calls, [_ANY] * len(calls), writes) or []
        missing = [
            at
            for at, reply in enumerate(replies)
            if isinstance(reply, Exception) and str(reply).startswith("NOSCRIPT")
        ]
        if missing:
            loads = [command(b"EVAL", self.body, b"1", keys[at], *args[at]) for at in missing]
            again = await link.send(
                [keys[at] for at in missing], loads, [_ANY] * len(loads), writes
            )
            for at, reply in zip(missing, again or [], strict=True):
                replies[at] = reply
        return replies


# A group's fields are deleted or rewritten only by these scripts, and each such change counts
# up the group's version (field VERSION), so the sweep deletes what it read as expired only
# while the group's version is still the one it read: no field it read can have been claimed
# again since. (A claim of an absent field only adds one: nothing the sweep read changes.)

# Takes a field over for a claim: where it is absent, or still holds the value the claim found
# expired. Answers the value the field holds afterwards.
TAKE_OVER = Script("""
local held = redis.call('HGET', KEYS[1], ARGV[1])
if held == false or held == ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
  redis.call('HINCRBY', KEYS[1], '~v', 1)
  return ARGV[3]
end
return held
""")

# Deletes a field only while it holds the releasing record's coordinates.
RELEASE = Script(f"""
local held = redis.call('HGET', KEYS[1], ARGV[1])
if held and string.sub(held, {CLAIM_TIME_SIZE + 1}) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  if redis.call('HLEN', KEYS[1]) > 0 then redis.call('HINCRBY', KEYS[1], '~v', 1) end
  return 1
end
return 0
""")

# Drops fields of a group (ARGV[3...]) while its version is still ARGV[1] (else answers -1: the
# next round sees it again); keeps a group that has fields left for ARGV[2] seconds more.
DROP = Script("""
local version = redis.call('HGET', KEYS[1], '~v')
if (version or '') ~= ARGV[1] then return -1 end
local dropped = 0
for i = 3, #ARGV, 1000 do
  dropped = dropped + redis.call('HDEL', KEYS[1], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
if dropped == #ARGV - 2 and redis.call('HLEN', KEYS[1]) == (version and 1 or 0) then
  redis.call('DEL', KEYS[1])
  return dropped
end
if dropped > 0 then redis.call('HINCRBY', KEYS[1], '~v', 1) end
redis.call('EXPIRE', KEYS[1], ARGV[2])
return dropped
""")

# The next groups to sweep, from the cursor the workers share: -1 while the round that last
# ended started less than a sweep period ago.
SWEEP_ROUND = Script("""
local groups, step = tonumber(ARGV[1]), tonumber(ARGV[2])
local now, every = tonumber(ARGV[3]), tonumber(ARGV[4])
local next = tonumber(redis.call('HGET', KEYS[1], 'next') or groups)
local started = tonumber(redis.call('HGET', KEYS[1], 'started') or 0)
if next >= groups then
  if now < started + every then return -1 end
  next, started = 0, now
end
redis.call('HSET', KEYS[1], 'next', next + step, 'started', started)
return next
""")


def command(*args: bytes) -> bytes:
    """One command in RESP."""
    heads = BULK_HEADS
    return b"*%d" % len(args) + b"".join(heads[len(a)] + a for a in args) + b"\r\n"


def hsetnx_commands(
    groups: Sequence[bytes], fields: Sequence[bytes], values: Sequence[bytes]
) -> list[bytes]:
    """One `HSETNX group field value` per identity. Group keys share one width and fields are
    FIELD_SIZE bytes; values of one width (coordinates are fixed-width) are framed by one
    C-level join, then cut into the commands."""
    if not groups:
        return []
    if len(set(map(len, values))) > 1:
        return [command(b"HSETNX", g, f, v) for g, f, v in zip(groups, fields, values, strict=True)]
    heads = BULK_HEADS
    head = b"*4\r\n$6\r\nHSETNX" + heads[len(groups[0])]
    parts: list[bytes] = [head, b"", heads[FIELD_SIZE], b"", heads[len(values[0])], b"", b"\r\n"]
    parts *= len(groups)
    parts[1::7] = groups
    parts[3::7] = fields
    parts[5::7] = values
    joined = b"".join(parts)
    size = len(joined) // len(groups)
    return [joined[i : i + size] for i in range(0, len(joined), size)]


class Link(Protocol):
    """Where a claim's commands go: one connection (standalone, sentinel), or one to each
    master of a Redis Cluster, where each command goes to the master of its route key's slot.
    A link holds its connections for the whole claim, so that `wait` covers all its writes."""

    async def send(
        self,
        routes: Sequence[bytes],
        commands: Sequence[bytes],
        expect: Sequence[bytes],
        writes: bool,
    ) -> list[Any] | None:
        """Each command's reply, in order (an error reply as its exception); None when each
        was the one foreseen (`expect`: per command, a reply in RESP or _ANY)."""
        ...

    async def wait(self) -> None:
        """Returns once the replicas the store needs have every write sent (`WAIT`)."""
        ...


async def send_on(
    conn: Any, commands: Sequence[bytes], expect: Sequence[bytes], stall_s: float
) -> list[Any] | None:
    """Commands on one connection, CHUNK to a write: each reply, or None if each was the one
    foreseen (`expect`, per command: a reply in RESP, or _ANY)."""
    answers: list[Any] = []
    foreseen = True
    for start in range(0, len(commands), CHUNK):
        part, wanted = commands[start : start + CHUNK], expect[start : start + CHUNK]
        all_new = _ANY if _ANY in wanted else b"".join(wanted)
        await conn.send_packed_command(b"".join(part))
        replies = await read_replies(conn, len(part), all_new, stall_s)
        if replies is None:
            answers += map(parsed, wanted)
        else:
            foreseen = False
            answers += replies
    return None if foreseen else answers


def parsed(reply: bytes) -> Any:
    """A foreseen reply as the parser gives it."""
    return _FORESEEN[reply]


_FORESEEN: dict[bytes, Any] = {_ONE: 1, _OK: b"OK", _NIL: None}


async def wait_on(conn: Any, replication: Replication, stall_s: float, where: str = "") -> None:
    wanted = replication.required()
    if not wanted:
        return
    await conn.send_command("WAIT", wanted, int(replication.timeout * 1000))
    acked = int(await conn.read_response(timeout=replication.timeout + stall_s))
    if acked < wanted:
        raise RedisUnavailable(
            f"dedup claim{where} acknowledged by {acked} of the {wanted} replicas it needs "
            f"within {replication.timeout:g} s: retried before anything is inserted"
        )


class OneConnection:
    """A link over one pooled connection (standalone and sentinel mode)."""

    def __init__(self, conn: Any, replication: Replication, stall_s: float) -> None:
        self._conn, self._replication, self._stall_s = conn, replication, stall_s
        self._wrote = False

    async def send(
        self,
        routes: Sequence[bytes],
        commands: Sequence[bytes],
        expect: Sequence[bytes],
        writes: bool,
    ) -> list[Any] | None:
        self._wrote |= writes
        return await send_on(self._conn, commands, expect, self._stall_s)

    async def wait(self) -> None:
        if self._wrote:
            await wait_on(self._conn, self._replication, self._stall_s)


class Addressed(NamedTuple):
    """Where a claim's identities live in the groups layout."""

    groups: list[bytes]
    fields: list[bytes]


class SweepStep(NamedTuple):
    """What one step of the sweep did."""

    groups: int
    """Groups swept (0: the round is done and the next is not due yet)."""
    dropped: int
    largest: int
    """The most fields any of them had."""


class GroupedDedup:
    """The store in the groups layout, over `links` (one connection per claim, or one to each
    master of a cluster). See the module's description."""

    def __init__(
        self,
        config: DedupConfig,
        links: Callable[[], contextlib.AbstractAsyncContextManager[Link]],
        close: Callable[[], Any],
        replication: Replication | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.replication = replication or Replication(None, 2.0, expect_replicas=False)
        self._prefix = config.prefix
        self._groups = config.groups
        self._ttl = max(1, int(config.ttl))
        self._every = config.sweep_every
        self._legacy_until: float | None = None if config.legacy_reads else 0.0
        self._links = links
        self._close = close
        self._clock = clock
        self._group_prefix = group_key(self._prefix, 0)[:-4]

    def address(self, keys: Sequence[bytes]) -> Addressed:
        """The group and field of each identity key: `group_key(prefix, group_number(key))`
        and its last FIELD_SIZE bytes, inlined for the hot path."""
        groups, head = self._groups, self._group_prefix
        return Addressed(
            [head + (int.from_bytes(k[-16:-8], "big") % groups).to_bytes(4, "big") for k in keys],
            [k[-FIELD_SIZE:] for k in keys],
        )

    async def claim(
        self,
        keys: Sequence[bytes],
        coords: Sequence[bytes],
        pending: Mapping[bytes, bytes] | None = None,
    ) -> list[bytes]:
        if len(keys) != len(coords):
            raise ValueError(f"{len(keys)} identity keys for {len(coords)} coordinates")
        now = int(self._clock())
        try:
            async with self._links() as link:
                holders = await self._claim(link, keys, coords, pending or {}, now)
                await link.wait()
                return holders
        except REDIS_FAILURES as exc:
            raise RedisUnavailable(f"dedup claim failed: {exc}") from exc

    async def _claim(
        self,
        link: Link,
        keys: Sequence[bytes],
        coords: Sequence[bytes],
        pending: Mapping[bytes, bytes],
        now: int,
    ) -> list[bytes]:
        holders = list(coords)
        todo = list(range(len(keys)))
        if await self._legacy_window(link, now):
            gets = [command(b"GET", k) for k in keys]
            found = await link.send(keys, gets, [_NIL] * len(keys), False)
            if found is not None:
                for at, held in enumerate(found):
                    if held is not None:
                        holders[at] = _value(held, "a read of an old-layout marker")
                todo = [at for at, held in enumerate(found) if held is None]
        ttl = str(self._ttl).encode()
        routes = list(pending)
        commands = [command(b"SET", k, v, b"EX", ttl) for k, v in pending.items()]
        expect = [_OK] * len(commands)
        mine = [keys[at] for at in todo] if len(todo) < len(keys) else keys
        groups, fields = self.address(mine)
        stamp = now.to_bytes(CLAIM_TIME_SIZE, "big")
        values = [stamp + coords[at] for at in todo]
        claims = hsetnx_commands(groups, fields, values)
        expect += [_ONE] * len(claims)
        replies = await link.send(routes + groups, commands + claims, expect, True)
        if replies is None:
            return holders
        for reply in replies[: len(commands)]:
            if reply != b"OK":
                raise RedisUnavailable(f"dedup claim: a pending range's SET answered {reply!r}")
        held = [
            i for i, reply in enumerate(replies[len(commands) :]) if _taken(reply, "dedup claim")
        ]
        if held:
            found = await self._read_back(
                link,
                [groups[i] for i in held],
                [fields[i] for i in held],
                [values[i] for i in held],
                now,
            )
            for i, value in zip(held, found, strict=True):
                holders[todo[i]] = value[CLAIM_TIME_SIZE:]
        return holders

    async def _read_back(
        self,
        link: Link,
        groups: list[bytes],
        fields: list[bytes],
        values: list[bytes],
        now: int,
    ) -> list[bytes]:
        """The value each field holds, a field claimed more than the TTL ago (or deleted since)
        taken over for the claim."""
        commands = [command(b"HGET", g, f) for g, f in zip(groups, fields, strict=True)]
        found = await link.send(groups, commands, [_ANY] * len(commands), False) or []
        stale = []
        for at, held in enumerate(found):
            if held is not None:
                found[at] = _value(held, "dedup claim")
                mine = values[at][CLAIM_TIME_SIZE:] == found[at][CLAIM_TIME_SIZE:]
                # Whole seconds: forgotten only once more than the TTL has surely passed.
                if mine or claimed_at(found[at]) + self._ttl >= now:
                    continue
            stale.append(at)
        if stale:
            taken = await TAKE_OVER.run(
                link,
                [groups[at] for at in stale],
                [(fields[at], found[at] or b"", values[at]) for at in stale],
                True,
            )
            for at, held in zip(stale, taken, strict=True):
                found[at] = _value(held, "dedup claim")
        return found

    async def _legacy_window(self, link: Link, now: int) -> bool:
        """Whether old-layout markers may remain: `dedup.legacy_reads`, and less than one TTL
        since this layout first claimed under the prefix (recorded by the first claim)."""
        if self._legacy_until is None:
            key = groups_since_key(self._prefix)
            since = str(now).encode()
            first = command(b"SET", key, since, b"NX", b"GET")
            reply = await link.send([key], [first], [_NIL], True)
            held = since if reply is None else _value(reply[0], "dedup: the layout's start")
            self._legacy_until = float(int(held) + self._ttl)
        return now < self._legacy_until

    async def pending(self, keys: Sequence[bytes]) -> list[bytes | None]:
        if not keys:
            return []
        try:
            async with self._links() as link:
                gets = [command(b"GET", k) for k in keys]
                found = await link.send(keys, gets, [_ANY] * len(keys), False)
        except REDIS_FAILURES as exc:
            raise RedisUnavailable(f"pending ranges read failed: {exc}") from exc
        return [None if v is None else _value(v, "pending ranges read") for v in found or []]

    async def release(self, keys: Sequence[bytes], coords: Sequence[bytes]) -> int:
        if not keys:
            return 0
        groups, fields = self.address(keys)
        try:
            async with self._links() as link:
                args = list(zip(fields, coords, strict=True))
                replies = await RELEASE.run(link, groups, args, True)
                await link.wait()
        except REDIS_FAILURES as exc:
            raise RedisUnavailable(f"dedup release failed: {exc}") from exc
        released = 0
        for reply in replies:
            if isinstance(reply, Exception):
                raise RedisUnavailable(f"dedup release failed: {reply}")
            released += int(reply)
        return released

    async def sweep(self, step: int = 256) -> SweepStep:
        """Sweeps the next `step` groups of the shared round, if one is due."""
        now = int(self._clock())
        cursor = sweep_key(self._prefix)
        round_args = [str(x).encode() for x in (self._groups, step, now, int(self._every))]
        try:
            async with self._links() as link:
                reply = await SWEEP_ROUND.run(link, [cursor], [round_args], True)
                first = int(_value(reply[0], "dedup sweep"))
                if first < 0:
                    return SweepStep(0, 0, 0)
                numbers = range(first, min(first + step, self._groups))
                keys = [group_key(self._prefix, n) for n in numbers]
                reads = [command(b"HGETALL", k) for k in keys]
                found = await link.send(keys, reads, [_ANY] * len(keys), False) or []
                before = now - self._ttl
                alive = str(self._ttl + 2 * int(self._every)).encode()
                routes, args = [], []
                largest = 0
                for key, fields in zip(keys, found, strict=True):
                    if isinstance(fields, Exception):
                        raise RedisUnavailable(f"dedup sweep failed: {fields}")
                    if fields:
                        largest = max(largest, len(fields) // 2)
                        version, old = expired(fields, before)
                        routes.append(key)
                        args.append([version, alive, *old])
                replies = await DROP.run(link, routes, args, True)
        except REDIS_FAILURES as exc:
            raise RedisUnavailable(f"dedup sweep failed: {exc}") from exc
        dropped = 0
        for reply in replies:
            if isinstance(reply, Exception):
                raise RedisUnavailable(f"dedup sweep failed: {reply}")
            dropped += max(0, int(reply))
        return SweepStep(len(keys), dropped, largest)

    async def ping(self) -> None:
        try:
            async with self._links() as link:
                await link.send([self._prefix], [command(b"PING")], [_ANY], False)
        except REDIS_FAILURES as exc:
            raise RedisUnavailable(f"redis ping failed: {exc}") from exc

    async def close(self) -> None:
        await self._close()


def expired(fields: Sequence[bytes], before: int) -> tuple[bytes, list[bytes]]:
    """A group's version and its fields claimed before `before` (epoch seconds), from its
    HGETALL."""
    limit = before.to_bytes(CLAIM_TIME_SIZE, "big")
    old = [
        fields[at - 1]
        for at in range(1, len(fields), 2)
        if fields[at][:CLAIM_TIME_SIZE] < limit and len(fields[at - 1]) == FIELD_SIZE
    ]
    version = dict(zip(fields[::2], fields[1::2], strict=True)).get(VERSION, b"")
    return version, old


def _taken(reply: Any, what: str) -> bool:
    """Whether a HSETNX found its field already there."""
    if isinstance(reply, Exception):
        raise RedisUnavailable(f"{what} failed: {reply}")
    return bool(reply != 1)


def _value(reply: Any, what: str) -> bytes:
    if isinstance(reply, Exception):
        raise RedisUnavailable(f"{what} failed: {reply}")
    return reply if isinstance(reply, bytes) else str(reply).encode()


def standalone_links(
    client: redis_async.Redis,
    replication: Replication,
    stall_s: float,
    sentinel: Sentinel | None = None,
) -> Callable[[], contextlib.AbstractAsyncContextManager[Link]]:
    """Links over one pooled connection of `client` each. A connection that failed is closed
    (its stream may still hold replies); in sentinel mode every idle one too, as it may reach a
    demoted master: new ones go to the master the sentinels name now."""

    @contextlib.asynccontextmanager
    async def link() -> AsyncIterator[Link]:
        pool = client.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            yield OneConnection(conn, replication, stall_s)
        except BaseException:
            await conn.disconnect(nowait=True)
            if sentinel is not None:
                with contextlib.suppress(*REDIS_FAILURES):
                    await pool.disconnect(inuse_connections=False)
            raise
        finally:
            await pool.release(conn)

    return link


async def sweep_forever(
    store: GroupedDedup, every: float, groups: int, log: Any, step: int = 256
) -> None:
    """Sweeps in steps paced so that one worker alone finishes a round within half the sweep
    period (more workers share the rounds). A step that fails is logged and its groups wait for
    the next round; the sweep goes on whatever failed, as the groups' keys live on by it."""
    steps = max(1, -(-groups // step))
    pause = min(60.0, max(0.01, every / 2 / steps))
    while True:
        try:
            done = await store.sweep(step)
        except Exception as exc:  # logged, and the sweep goes on
            log.warning("dedup sweep failed", error=str(exc)[:300])
            await asyncio.sleep(min(60.0, every / 4))
            continue
        if done.largest > 128:
            log.warning(
                "dedup groups over 128 fields: raise dedup.groups",
                largest=done.largest,
                groups=groups,
            )
        await asyncio.sleep(pause if done.groups else min(60.0, max(0.05, every / 20)))
