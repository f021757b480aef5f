"""Replay-safe deduplication by event identity `(namespace, source, id)`.

A marker key (the hashed identity) holds the coordinates `topic:partition:offset` of the record
that claimed it. Claiming answers, per key, the coordinates that hold the marker afterwards:

- the key was absent: this record claimed it, it is the holder: keep it;
- the key holds this record's own coordinates: a replay after a crash: keep it;
- the key holds other coordinates: a real duplicate: drop it.

So one rule decides: keep the record whose coordinates hold the marker. Claiming before the
insert is then safe: records replayed after a crash find their own marks. Repeats inside one
batch are grouped in memory and only the first is sent; if the marker turns out to be held by
a later repeat of the same batch (a replay whose order changed), that repeat is kept instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import redis.asyncio as redis_async
import xxhash
from redis.exceptions import RedisError

from sink.errors import RedisUnavailable

# One atomic SET NX GET EX per identity, all in one script call per batch (Redis >= 7.0).
# The identity keys travel as one string of fixed-width keys and the coordinates as one
# newline-separated string: packing two arguments instead of two per identity keeps the
# client's share of a claim small. (The keys are thus not declared in KEYS: the script
# needs a standalone Redis; Redis Cluster is not supported, see docs/operating.md.)
# KEYS: pending-range keys; ARGV: ttl, key width, keys, coordinates, range values.
# The reply names only the keys held by other coordinates, as (index, holder) pairs: in the
# usual batch almost every identity is new, and the reply stays small.
_CLAIM = """
local ttl = ARGV[1]
local width = tonumber(ARGV[2])
local keys = ARGV[3]
local out = {}
local i, at = 0, 1
for coords in string.gmatch(ARGV[4], '[^\\n]+') do
  i = i + 1
  local previous = redis.call(
    'SET', string.sub(keys, at, at + width - 1), coords, 'NX', 'GET', 'EX', ttl)
  at = at + width
  if previous and previous ~= coords then
    out[#out + 1] = i
    out[#out + 1] = previous
  end
end
for j = 1, #KEYS do
  redis.call('SET', KEYS[j], ARGV[j + 4], 'EX', ttl)
end
return out
"""

# Delete a marker only while it still holds the releasing record's coordinates.
_RELEASE = """
local n = 0
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i] then
    redis.call('DEL', key)
    n = n + 1
  end
end
return n
"""

# A script call blocks Redis while it runs; split very large batches.
_CHUNK = 10_000


def framing(namespace: str, source: str) -> str:
    """The part of an identity before its id: each field with its length in front, so no two
    identities frame alike."""
    return f"{len(namespace)}:{namespace}{len(source)}:{source}"


def identity_key(prefix: bytes, namespace: str, source: str, event_id: str) -> bytes:
    """Short, collision-safe key: the xxh3-128 digest of the framed identity."""
    framed = (framing(namespace, source) + event_id).encode("utf-8", "surrogatepass")
    return prefix + xxhash.xxh3_128_digest(framed)


def coordinates(topic: str, partition: int, offset: int) -> bytes:
    return f"{topic}:{partition}:{offset}".encode()


def pending_key(prefix: bytes, topic: str, partition: int) -> bytes:
    """Where the offset range a worker is about to insert for a partition is written down."""
    return prefix + f"~pending:{topic}:{partition}".encode()


class DedupStore(Protocol):
    """Claims identities for records and releases claims of records that were dead-lettered.

    It also keeps, per partition, the offset range last sent to ClickHouse (`pending`), so a
    new owner can tell whether an insert of the previous owner may have landed in part."""

    async def claim(
        self,
        keys: Sequence[bytes],
        coords: Sequence[bytes],
        pending: Mapping[bytes, bytes] | None = None,
    ) -> list[bytes]:
        """Claim each key for its coordinates; return the coordinates holding each key.
        `pending` entries are written in the same round trip."""
        ...

    async def pending(self, keys: Sequence[bytes]) -> list[bytes | None]: ...

    async def release(self, keys: Sequence[bytes], coords: Sequence[bytes]) -> int: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


class MemoryDedup:
    """In-process store with the same rule; for unit tests and single-process trials."""

    def __init__(self) -> None:
        self.markers: dict[bytes, bytes] = {}

    async def claim(
        self,
        keys: Sequence[bytes],
        coords: Sequence[bytes],
        pending: Mapping[bytes, bytes] | None = None,
    ) -> list[bytes]:
        self.markers.update(pending or {})
        return [self.markers.setdefault(k, c) for k, c in zip(keys, coords, strict=True)]

    async def pending(self, keys: Sequence[bytes]) -> list[bytes | None]:
        return [self.markers.get(k) for k in keys]

    async def release(self, keys: Sequence[bytes], coords: Sequence[bytes]) -> int:
        released = 0
        for key, mine in zip(keys, coords, strict=True):
            if self.markers.get(key) == mine:
                del self.markers[key]
                released += 1
        return released

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


class RedisDedup:
    """The production store: one Lua call per batch (chunked), markers expire after `ttl`."""

    def __init__(self, url: str, ttl_seconds: float, socket_timeout: float = 5.0) -> None:
        self._client = redis_async.Redis.from_url(
            url,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry_on_timeout=False,
            health_check_interval=30,
        )
        self._ttl = str(max(1, int(ttl_seconds)))
        self._claim = self._client.register_script(_CLAIM)
        self._release = self._client.register_script(_RELEASE)

    async def claim(
        self,
        keys: Sequence[bytes],
        coords: Sequence[bytes],
        pending: Mapping[bytes, bytes] | None = None,
    ) -> list[bytes]:
        holders = list(coords)
        extra_keys, extra_values = list((pending or {}).keys()), list((pending or {}).values())
        width = len(keys[0]) if keys else 0
        if any(len(k) != width for k in keys):
            raise ValueError("identity keys must share one width")
        try:
            # The chunks go out in one pipeline (one round trip), in order on one connection:
            # the pending ranges, written with the first chunk, come before every claim.
            async with self._client.pipeline(transaction=False) as pipe:
                starts = range(0, max(1, len(keys)), _CHUNK)
                for start in starts:
                    chunk = slice(start, start + _CHUNK)
                    await self._claim(
                        keys=extra_keys,
                        args=[
                            self._ttl,
                            width,
                            b"".join(keys[chunk]),
                            b"\n".join(coords[chunk]),
                            *extra_values,
                        ],
                        client=pipe,
                    )
                    extra_keys, extra_values = [], []
                replies = await pipe.execute()
        except (RedisError, OSError) as exc:
            raise RedisUnavailable(f"dedup claim failed: {exc}") from exc
        for start, taken in zip(starts, replies, strict=True):
            for at in range(0, len(taken), 2):
                holders[start + int(taken[at]) - 1] = taken[at + 1]
        return holders

    async def pending(self, keys: Sequence[bytes]) -> list[bytes | None]:
        if not keys:
            return []
        try:
            values = await self._client.mget(list(keys))
        except (RedisError, OSError) as exc:
            raise RedisUnavailable(f"pending ranges read failed: {exc}") from exc
        return [v.encode() if isinstance(v, str) else v for v in values]

    async def release(self, keys: Sequence[bytes], coords: Sequence[bytes]) -> int:
        if not keys:
            return 0
        try:
            return int(await self._release(keys=list(keys), args=list(coords)))
        except (RedisError, OSError) as exc:
            raise RedisUnavailable(f"dedup release failed: {exc}") from exc

    async def ping(self) -> None:
        try:
            await self._client.ping()
        except (RedisError, OSError) as exc:
            raise RedisUnavailable(f"redis ping failed: {exc}") from exc

    async def close(self) -> None:
        await self._client.aclose()


class Grouped(NamedTuple):
    """A batch's items grouped by identity, ready for one claim call."""

    keys: list[bytes]
    coords: list[bytes]
    """Coordinates of the first occurrence of each key: what is claimed."""
    firsts: list[Any]
    """The first item of each key."""
    repeats: dict[int, list[Any]]
    """Later items of a key that occurs more than once, by the key's index, in batch order."""


def _plain(topic: str) -> str:
    return topic


class Grouping:
    """Groups items by identity key as they arrive: the hot path of dedup (one pass, no calls
    per item beyond the hash, no object per identity). Coordinates name topics by
    `topic_key` (their storage key)."""

    def __init__(self, prefix: bytes, topic_key: Callable[[str], str] = _plain) -> None:
        self.grouped = Grouped([], [], [], {})
        self.added = 0
        """How many items were added: the batch's first `added` items are grouped."""
        self._prefix = prefix
        self._topic_key = topic_key
        self._index: dict[bytes, int] = {}
        # Made once per batch: the framing of each (namespace, source). The coordinates' head
        # (`topic:partition:`) is made again only when the partition changes from one item to
        # the next (items come in runs of one partition).
        self._heads: dict[tuple[str, str], str] = {}
        self._last: tuple[str | None, int, str] = (None, -1, "")

    def add(self, items: Sequence[Any]) -> None:
        keys, coords, firsts, repeats = self.grouped
        index, heads = self._index, self._heads
        prefix, digest = self._prefix, xxhash.xxh3_128_digest
        place, add_key, add_coords, add_first = (
            index.setdefault,
            keys.append,
            coords.append,
            firsts.append,
        )
        self.added += len(items)
        n = len(keys)
        topic, partition, at = self._last
        # Items are sink.batch.Item rows, read by position: namespace 0, id 1, source 3,
        # topic 8, partition 9, offset 10.
        for item in items:
            pair = (item[0], item[3])
            head = heads.get(pair)
            if head is None:
                head = heads[pair] = framing(*pair)
            key = prefix + digest((head + item[1]).encode("utf-8", "surrogatepass"))
            slot = place(key, n)
            if slot == n:
                n += 1
                add_key(key)
                if item[9] != partition or item[8] != topic:
                    topic, partition = item[8], item[9]
                    at = f"{self._topic_key(topic)}:{partition}:"
                add_coords(f"{at}{item[10]}".encode())
                add_first(item)
            elif slot in repeats:
                repeats[slot].append(item)
            else:
                repeats[slot] = [item]
        self._last = (topic, partition, at)


def group(items: Sequence[Any], prefix: bytes, topic_key: Callable[[str], str] = _plain) -> Grouped:
    """A batch's items grouped by identity key, in one go."""
    grouping = Grouping(prefix, topic_key)
    grouping.add(items)
    return grouping.grouped


def keep(
    grouped: Grouped, holders: Sequence[bytes], topic_key: Callable[[str], str] = _plain
) -> list[Any]:
    """The items whose coordinates hold their identity's marker, in batch order of identity."""
    keys, coords, firsts, repeats = grouped
    if len(holders) != len(keys):
        raise ValueError(f"{len(holders)} holders for {len(keys)} identity keys")
    if not repeats:
        pairs = zip(firsts, coords, holders, strict=True)
        return [first for first, mine, holder in pairs if holder == mine]
    kept = []
    for slot, (first, mine, holder) in enumerate(zip(firsts, coords, holders, strict=True)):
        if holder == mine:
            kept.append(first)
        elif slot in repeats:
            kept.extend(
                i
                for i in repeats[slot]
                if coordinates(topic_key(i.topic), i.partition, i.offset) == holder
            )
    return kept
