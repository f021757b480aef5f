"""Replay-safe deduplication by event identity `(namespace, source, id)`.

A marker (of the hashed identity) holds the coordinates of the record that claimed it
(sink.stores.keys). Markers are fields of small hashes (`dedup.layout: groups`,
sink.stores.dedup_groups) or a key each (`keys`, `RedisDedup` here). Claiming answers, per
identity, the coordinates that hold the marker afterwards:

- the key was absent: this record claimed it, it is the holder: keep it;
- the key holds this record's own coordinates: a replay after a crash: keep it;
- the key holds other coordinates: a real duplicate: drop it.

So one rule decides: keep the record whose coordinates hold the marker. Claiming before the
insert is then safe: records replayed after a crash find their own marks. Repeats inside one
batch are grouped in memory and only the first is sent; if the marker turns out to be held by
a later repeat of the same batch (a replay whose order changed), that repeat is kept instead.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence
from itertools import compress, count, repeat
from operator import is_not
from typing import Any, NamedTuple, Protocol

import hiredis
import redis.asyncio as redis_async
import xxhash
from pydantic import SecretStr
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import RedisError, ResponseError

from sink.config import DedupConfig
from sink.coordinates import coordinates_of
from sink.errors import RedisUnavailable
from sink.stores.keys import DedupKeys, framing, from_text
from sink.stores.redis_connect import (
    Replication,
    replication_of,
    sentinel_client,
    standalone_client,
)

# In the keys layout a claim is one `SET key coords NX GET EX ttl` per identity, each atomic on
# its own, sent as plain commands (a Lua script would copy every argument into and out of Lua),
# up to 10,000 to a write and its round trip, after the `SET range EX ttl` of each pending
# range. The commands
# are framed by one C-level join; replies that are all "no marker" are recognised as bytes, any
# others parsed by hiredis in one C-level loop. On a Redis Cluster the same commands are split
# by hash slot, one exchange per node (sink.stores.dedup_cluster).


class _BulkHeads(dict[int, bytes]):
    """The RESP framing between one bulk string and the next, by the next one's length."""

    def __missing__(self, size: int) -> bytes:
        head = self[size] = b"\r\n$%d\r\n" % size
        return head


BULK_HEADS = _BulkHeads()
_NIL = b"$-1\r\n"
"""The reply of a SET NX GET that found no marker (RESP2, which the store speaks)."""
_OK = b"+OK\r\n"
_READ_SIZE = 1 << 16
_INCOMPLETE = object()
"""What hiredis answers while the buffer holds no complete reply."""
CHUNK = 10_000
"""Identities per piece of a claim."""


def claim_commands(
    keys: Sequence[bytes],
    coords: Sequence[bytes],
    ttl: bytes,
    pending: Mapping[bytes, bytes] | None = None,
) -> bytes:
    """The RESP commands of one claim: the pending ranges' SETs, then one SET NX GET per
    identity, in order. All keys share one width (identity keys do)."""
    if len(keys) != len(coords):
        raise ValueError(f"{len(keys)} identity keys for {len(coords)} coordinates")
    widths = set(map(len, keys))
    if len(widths) > 1:
        raise ValueError("identity keys must share one width")
    width = widths.pop() if widths else 0
    heads = BULK_HEADS
    expiry = b"\r\n$2\r\nEX" + heads[len(ttl)] + ttl + b"\r\n"
    ranges = [
        b"*5\r\n$3\r\nSET" + heads[len(key)] + key + heads[len(value)] + value + expiry
        for key, value in (pending or {}).items()
    ]
    # One list of the pieces, filled by C-level slice assignments, then one join.
    tail = b"\r\n$2\r\nNX\r\n$3\r\nGET" + expiry
    head = b"*7\r\n$3\r\nSET" + heads[width]
    claims: list[bytes] = [head, b"", b"", b"", tail] * len(keys)
    claims[1::5] = keys
    claims[2::5] = map(heads.__getitem__, map(len, coords))
    claims[3::5] = coords
    return b"".join(ranges + claims)


async def read_replies(
    conn: Any, count: int, all_new: bytes, stall_s: float | None = None
) -> list[Any] | None:
    """Read the `count` replies of the commands a connection has just sent: None when they
    are exactly `all_new` (not empty), else each reply (None, bytes, or the error Redis
    answered).
    `stall_s` bounds each wait for more of them, as redis-py's socket timeout does.

    The replies are read from the connection's stream and parsed by hiredis: redis-py reads
    one reply per call, with a timeout each, too slow for thousands. The stream holds nothing
    before them, as every earlier command on the connection read its whole reply."""
    stream = getattr(conn, "_reader", None)
    if conn.protocol not in (2, "2") or not isinstance(stream, asyncio.StreamReader):
        # RESP3 (asked for in the URL), whose stream may carry push messages between replies,
        # or a redis-py without that stream: its own parser, one reply at a time.
        return [await _one_reply(conn) for _ in range(count)]
    size = 0
    while size < len(all_new):
        chunk = await _read(stream, stall_s)
        if not all_new.startswith(chunk, size):
            # Some reply differs: everything before this chunk was as expected.
            seen = all_new[:size] + chunk
            break
        size += len(chunk)
    else:
        if all_new and size == len(all_new):
            return None
        seen = all_new[:size]
    reader = hiredis.Reader(notEnoughData=_INCOMPLETE)
    reader.feed(seen)
    replies: list[Any] = []
    while True:
        # Every complete reply in the buffer, by a C-level loop.
        try:
            replies += iter(reader.gets, _INCOMPLETE)
        except hiredis.ProtocolError as exc:
            raise ConnectionError(f"unreadable reply to a claim: {exc}") from exc
        if len(replies) >= count:
            return replies
        reader.feed(await _read(stream, stall_s))


async def _read(stream: asyncio.StreamReader, stall_s: float | None) -> bytes:
    async with asyncio.timeout(stall_s):
        chunk = await stream.read(_READ_SIZE)
    if not chunk:
        raise ConnectionError("Redis closed the connection during a claim")
    return chunk


async def _one_reply(conn: Any) -> Any:
    try:
        return await conn.read_response(disable_decoding=True)
    except ResponseError as exc:
        return exc


def _holders(coords: Sequence[bytes], replies: Sequence[Any], ranges: int) -> list[bytes]:
    """The coordinates holding each identity after a claim, from its replies (the pending
    ranges' SETs first); any error Redis answered raises."""
    for reply in replies[:ranges]:
        if reply not in (b"OK", "OK"):
            raise RedisUnavailable(f"dedup claim: a pending range's SET answered {reply!r}")
    taken = replies[ranges:]
    if len(taken) != len(coords):
        raise RedisUnavailable(f"dedup claim: {len(taken)} replies for {len(coords)} claims")
    holders = list(coords)
    # Only the identities that had a marker answered something (usually a few).
    for at in compress(count(), map(is_not, taken, repeat(None))):
        held = taken[at]
        if isinstance(held, Exception):
            raise RedisUnavailable(f"dedup claim failed: {held}")
        holders[at] = held
    return holders


# Delete a marker only while it still holds the releasing record's coordinates.
RELEASE_SCRIPT = """
local n = 0
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i] then
    redis.call('DEL', key)
    n = n + 1
  end
end
return n
"""


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


class Piece(NamedTuple):
    """Up to CHUNK identities of a claim, sent in one write."""

    coords: Sequence[bytes]
    ranges: int
    """How many pending ranges' SETs come first."""
    commands: bytes


REDIS_FAILURES = (RedisError, OSError, RuntimeError)
"""What a failed Redis call raises. (uvloop answers an operation on a transport that a reset
closed with a RuntimeError, even while redis-py connects.)"""


class RedisDedup:
    """The store on one master (standalone, or the master the sentinels name): a round trip
    per 10,000 identities, markers expire after `ttl`. With replicas, a claim returns only once
    `replication` has its acknowledgements (`WAIT`), so no insert rests on a claim that a
    failover could lose."""

    def __init__(
        self,
        url: str | redis_async.Redis,
        ttl_seconds: float,
        socket_timeout: float = 5.0,
        replication: Replication | None = None,
        sentinel: Sentinel | None = None,
    ) -> None:
        self.replication = replication or Replication(None, 2.0, expect_replicas=False)
        if isinstance(url, str):
            url = standalone_client(
                DedupConfig(redis_url=SecretStr(url)), socket_timeout, self.replication
            )
        self._client = url
        self._sentinel = sentinel
        self._ttl = str(max(1, int(ttl_seconds))).encode()
        self._timeout = socket_timeout
        self._release = self._client.register_script(RELEASE_SCRIPT)

    async def claim(
        self,
        keys: Sequence[bytes],
        coords: Sequence[bytes],
        pending: Mapping[bytes, bytes] | None = None,
    ) -> list[bytes]:
        pieces = claim_pieces(keys, coords, self._ttl, pending)
        try:
            answers = await exchange(
                self._client.connection_pool, pieces, self.replication, self._timeout
            )
            return holders_of(pieces, answers)
        except (*REDIS_FAILURES, RedisUnavailable) as exc:
            if self._sentinel is not None:
                # Perhaps a demoted master (READONLY, or WAIT refused on a replica): no idle
                # connection to it is used again; new ones go to the master the sentinels
                # name now.
                with contextlib.suppress(*REDIS_FAILURES):
                    await self._client.connection_pool.disconnect(inuse_connections=False)
            if isinstance(exc, RedisUnavailable):
                raise
            raise RedisUnavailable(f"dedup claim failed: {exc}") from exc

    async def pending(self, keys: Sequence[bytes]) -> list[bytes | None]:
        if not keys:
            return []
        try:
            values = await self._client.mget(list(keys))
        except REDIS_FAILURES as exc:
            raise RedisUnavailable(f"pending ranges read failed: {exc}") from exc
        return [v.encode() if isinstance(v, str) else v for v in values]

    async def release(self, keys: Sequence[bytes], coords: Sequence[bytes]) -> int:
        if not keys:
            return 0
        try:
            return int(await self._release(keys=list(keys), args=list(coords)))
        except REDIS_FAILURES as exc:
            raise RedisUnavailable(f"dedup release failed: {exc}") from exc

    async def ping(self) -> None:
        try:
            await self._client.ping()
        except REDIS_FAILURES as exc:
            raise RedisUnavailable(f"redis ping failed: {exc}") from exc

    async def close(self) -> None:
        await self._client.aclose()
        if self._sentinel is not None:
            await self._sentinel.aclose()


def claim_pieces(
    keys: Sequence[bytes],
    coords: Sequence[bytes],
    ttl: bytes,
    pending: Mapping[bytes, bytes] | None = None,
) -> list[Piece]:
    """A claim's commands in pieces of at most CHUNK identities, the pending ranges' SETs
    first, with the first piece."""
    if len(keys) != len(coords):
        raise ValueError(f"{len(keys)} identity keys for {len(coords)} coordinates")
    pieces = []
    for start in range(0, max(1, len(keys)), CHUNK):
        mine = coords[start : start + CHUNK]
        ranges = pending if start == 0 else None
        commands = claim_commands(keys[start : start + CHUNK], mine, ttl, ranges)
        pieces.append(Piece(mine, len(ranges or ()), commands))
    return pieces


def holders_of(pieces: Sequence[Piece], answers: Sequence[list[Any] | None]) -> list[bytes]:
    holders: list[bytes] = []
    for (mine, ranges_sent, _), replies in zip(pieces, answers, strict=True):
        holders += mine if replies is None else _holders(mine, replies, ranges_sent)
    return holders


async def exchange(
    pool: Any, pieces: Sequence[Piece], replication: Replication, stall_s: float
) -> list[list[Any] | None]:
    """Send each piece's commands on one pooled connection and read its replies (see
    `read_replies`) before the next is sent: a send waits for Redis to take in what it sends,
    and `stall_s` bounds each wait. Then, if replicas must acknowledge the claim, `WAIT` on the
    same connection (it covers every write the connection made). A connection whose stream may
    still hold replies is closed."""
    conn = await pool.get_connection()
    try:
        answers = []
        for piece in pieces:
            await conn.send_packed_command(piece.commands)
            count = piece.ranges + len(piece.coords)
            all_new = _OK * piece.ranges + _NIL * len(piece.coords)
            answers.append(await read_replies(conn, count, all_new, stall_s))
        wanted = replication.required()
        acked = wanted
        if wanted:
            wait_ms = int(replication.timeout * 1000)
            await conn.send_command("WAIT", wanted, wait_ms)
            acked = int(await conn.read_response(timeout=replication.timeout + stall_s))
    except BaseException:
        await conn.disconnect(nowait=True)
        raise
    finally:
        await pool.release(conn)
    if acked < wanted:
        raise RedisUnavailable(
            f"dedup claim acknowledged by {acked} of the {wanted} replicas it needs within "
            f"{replication.timeout:g} s: retried before anything is inserted"
        )
    return answers


class Grouped(NamedTuple):
    """A batch's items grouped by identity, ready for one claim call."""

    keys: list[bytes]
    coords: list[bytes]
    """Coordinates of the first occurrence of each key: what is claimed."""
    firsts: list[Any]
    """The first item of each key."""
    repeats: dict[int, list[Any]]
    """Later items of a key that occurs more than once, by the key's index, in batch order."""


class Grouping:
    """Groups items by identity key as they arrive: the hot path of dedup (one pass, no calls
    per item beyond the hash, no object per identity). Keys and coordinates as `keys`
    makes them."""

    def __init__(self, keys: DedupKeys) -> None:
        self.grouped = Grouped([], [], [], {})
        self.added = 0
        """How many items were added: the batch's first `added` items are grouped."""
        self._keys = keys
        self._index: dict[bytes, int] = {}
        # Made once per batch: the framing of each (namespace, source). The coordinates' head
        # (`topic:partition:`) is made again only when the partition changes from one item to
        # the next (items come in runs of one partition).
        self._heads: dict[tuple[str, str], str] = {}
        self._last: tuple[str | None, int, bytes] = (None, -1, b"")

    def add(self, items: Sequence[Any]) -> None:
        keys, coords, firsts, repeats = self.grouped
        index, heads = self._index, self._heads
        prefix, digest = self._keys.prefix, xxhash.xxh3_128_digest
        place, add_key, add_coords, add_first = (
            index.setdefault,
            keys.append,
            coords.append,
            firsts.append,
        )
        self.added += len(items)
        n = len(keys)
        topic, partition, at = self._last
        # Items are sink.pipeline.batch.Item rows, read by position: namespace 0, id 1, source 3,
        # topic 8, partition 9, offset 10.
        for item in items:
            pair = (item[0], item[3])
            head = heads.get(pair)
            if head is None:
                head = heads[pair] = framing(*pair)
            # DedupKeys.identity, inlined: the prefix and the digest of the framed identity.
            key = prefix + digest((head + item[1]).encode("utf-8", "surrogatepass"))
            slot = place(key, n)
            if slot == n:
                n += 1
                add_key(key)
                if item[9] != partition or item[8] != topic:
                    topic, partition = item[8], item[9]
                    at = self._keys.head(topic, partition)
                add_coords(at + item[10].to_bytes(8, "big"))
                add_first(item)
            elif slot in repeats:
                repeats[slot].append(item)
            else:
                repeats[slot] = [item]
        self._last = (topic, partition, at)


def group(items: Sequence[Any], keys: DedupKeys) -> Grouped:
    """A batch's items grouped by identity key, in one go."""
    grouping = Grouping(keys)
    grouping.add(items)
    return grouping.grouped


def keep(grouped: Grouped, holders: Sequence[bytes], keys: DedupKeys) -> list[Any]:
    """The items whose coordinates hold their identity's marker, in batch order of identity."""
    identities, coords, firsts, repeats = grouped
    if len(holders) != len(identities):
        raise ValueError(f"{len(holders)} holders for {len(identities)} identity keys")
    if not repeats:
        pairs = zip(firsts, coords, holders, strict=True)
        return [first for first, mine, holder in pairs if holder == mine or _own(holder, mine)]
    kept = []
    for slot, (first, mine, holder) in enumerate(zip(firsts, coords, holders, strict=True)):
        if holder == mine or _own(holder, mine):
            kept.append(first)
        elif slot in repeats:
            kept.extend(i for i in repeats[slot] if _own(holder, keys.marker(coordinates_of(i))))
    return kept


def _own(holder: bytes, mine: bytes) -> bool:
    """Whether a holder is a record's own coordinates, written as they are now or as text
    before they were binary (a replay across an upgrade)."""
    return holder == mine or from_text(holder) == mine


def open_store(config: DedupConfig, socket_timeout: float) -> DedupStore:
    """The store `dedup.mode` and `dedup.layout` name."""
    replication = replication_of(config)
    if config.mode == "cluster":
        from sink.stores.dedup_cluster import ClusterDedup, cluster_grouped

        if config.layout == "groups":
            return cluster_grouped(config, socket_timeout, replication)
        return ClusterDedup(config, socket_timeout, replication)
    sentinel = None
    if config.mode == "sentinel":
        client, sentinel = sentinel_client(config, socket_timeout, replication)
    else:
        client = standalone_client(config, socket_timeout, replication)
    if config.layout == "groups":
        from sink.stores.dedup_groups import GroupedDedup, standalone_links

        async def close() -> None:
            await client.aclose()
            if sentinel is not None:
                await sentinel.aclose()

        links = standalone_links(client, replication, socket_timeout, sentinel)
        return GroupedDedup(config, links, close, replication)
    return RedisDedup(client, config.ttl, socket_timeout, replication, sentinel)
