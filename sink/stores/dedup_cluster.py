"""The dedup store on a Redis Cluster (`dedup.mode: cluster`).

A claim's commands are the standalone store's (sink.stores.dedup.claim_commands), split by the
hash slot of each key (CRC16, as Redis computes it): each master gets its share in one
exchange, all masters at once, each followed by `WAIT` on its connection. Every command names
one key, so no keys need to share a slot. A command answered `MOVED` (its slot has moved: a
failover or a finished migration) is sent again to the node named, and the slot map is read
again before the next claim; one answered `ASK` (its slot is being migrated and the key is not
on the old owner) is sent again to the new owner after `ASKING`. Anything else that fails
fails the claim: the caller retries it whole, and a retried claim finds its own markers.

In the groups layout (sink.stores.dedup_groups) a group's key decides its slot: the same
splitting serves its commands (`ClusterLink`), each master's share on one connection held for
the claim, so that one `WAIT` on each covers its writes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from typing import Any

import redis.asyncio as redis_async
from redis.crc import key_slot
from redis.exceptions import AskError, MovedError

from sink.config import DedupConfig
from sink.errors import RedisUnavailable
from sink.stores.dedup import REDIS_FAILURES, RELEASE_SCRIPT, claim_pieces, exchange
from sink.stores.dedup_groups import GroupedDedup, Link, parsed, send_on, wait_on
from sink.stores.redis_connect import Replication, common_options, url_options

SLOTS = 16384
_REDIRECTS = 5
"""Redirections a command may take before the claim fails (and is retried whole)."""


def split_by_node(keys: Sequence[bytes], slots: Sequence[str]) -> dict[str, list[int]]:
    """The positions of `keys`, in order, by the address of the node serving each key's slot."""
    nodes: dict[str, list[int]] = {}
    for at, key in enumerate(keys):
        nodes.setdefault(slots[key_slot(key)], []).append(at)
    return nodes


def parse_slots(reply: Sequence[Any], default_host: str) -> list[str]:
    """The address (`host:port`) serving each slot, from a CLUSTER SLOTS reply; "" for a slot
    no master serves."""
    slots = [""] * SLOTS
    for first, last, master, *_ in reply:
        host = master[0].decode() if isinstance(master[0], bytes) else str(master[0])
        slots[int(first) : int(last) + 1] = [f"{host or default_host}:{int(master[1])}"] * (
            int(last) - int(first) + 1
        )
    return slots


def redirection(reply: Any, default_host: str) -> tuple[int, str, bool] | None:
    """(slot, address, ask) of a MOVED or ASK error reply; None for any other reply."""
    if isinstance(reply, AskError):  # as redis-py's parser gives them
        ask = not isinstance(reply, MovedError)
        return reply.slot_id, f"{reply.host or default_host}:{reply.port}", ask
    if not isinstance(reply, Exception):
        return None
    kind, _, rest = str(reply).partition(" ")  # as hiredis gives them
    if kind not in ("MOVED", "ASK"):
        return None
    slot, _, address = rest.partition(" ")
    host, _, port = address.rpartition(":")
    return int(slot), f"{host or default_host}:{port}", kind == "ASK"


class ClusterDedup:
    """The store on a Redis Cluster; `dedup.redis_url` names any of its nodes."""

    def __init__(self, config: DedupConfig, socket_timeout: float, replication: Replication):
        self.replication = replication
        options = {**common_options(socket_timeout, None), **url_options(config)}
        self._seed = f"{options.pop('host', '127.0.0.1')}:{options.pop('port', 6379)}"
        self._host = self._seed.rpartition(":")[0]
        options.pop("db", None)
        self._options = options
        self._clients: dict[str, redis_async.Redis] = {}
        self._slots: list[str] | None = None
        self._ttl = str(max(1, int(config.ttl))).encode()
        self._timeout = socket_timeout

    async def claim(
        self,
        keys: Sequence[bytes],
        coords: Sequence[bytes],
        pending: Mapping[bytes, bytes] | None = None,
    ) -> list[bytes]:
        if len(keys) != len(coords):
            raise ValueError(f"{len(keys)} identity keys for {len(coords)} coordinates")
        ranges = list((pending or {}).items())
        slots = await self._routes()
        claims, writes = split_by_node(keys, slots), split_by_node([k for k, _ in ranges], slots)
        nodes = sorted(set(claims) | set(writes))
        answers = await self._gather(
            {
                node: self._first(
                    node,
                    [keys[i] for i in claims.get(node, [])],
                    [coords[i] for i in claims.get(node, [])],
                    {ranges[i][0]: ranges[i][1] for i in writes.get(node, [])},
                )
                for node in nodes
            }
        )
        holders = list(coords)
        again: list[tuple[bytes, ...]] = []
        again_to: list[tuple[str, bool]] = []
        again_at: list[int] = []
        for node, (range_replies, claim_replies) in zip(nodes, answers, strict=True):
            for i, reply in zip(writes.get(node, []), range_replies, strict=True):
                if to := self._redirected(reply, slots):
                    key, value = ranges[i]
                    again.append((b"SET", key, value, b"EX", self._ttl))
                    again_to.append(to)
                    again_at.append(-1)
                else:
                    _check_ok(reply)
            for i, reply in zip(claims.get(node, []), claim_replies, strict=True):
                if to := self._redirected(reply, slots):
                    again.append((b"SET", keys[i], coords[i], b"NX", b"GET", b"EX", self._ttl))
                    again_to.append(to)
                    again_at.append(i)
                elif reply is not None:
                    holders[i] = _held(reply)
        if again:
            replies = await self._each(again, [], wait=True, targets=again_to)
            for i, reply in zip(again_at, replies, strict=True):
                if i < 0:
                    _check_ok(reply)
                elif reply is not None:
                    holders[i] = _held(reply)
        return holders

    async def _first(
        self, node: str, keys: list[bytes], coords: list[bytes], ranges: dict[bytes, bytes]
    ) -> tuple[list[Any], list[Any]]:
        """One node's share of a claim: the replies to its ranges' SETs and to its claims."""
        pieces = claim_pieces(keys, coords, self._ttl, ranges)
        answers = await exchange(
            self._client(node).connection_pool, pieces, self.replication, self._timeout
        )
        range_replies: list[Any] = []
        claim_replies: list[Any] = []
        for piece, replies in zip(pieces, answers, strict=True):
            if replies is None:
                range_replies += [b"OK"] * piece.ranges
                claim_replies += [None] * len(piece.coords)
            else:
                range_replies += replies[: piece.ranges]
                claim_replies += replies[piece.ranges :]
        return range_replies, claim_replies

    def _redirected(self, reply: Any, slots: list[str]) -> tuple[str, bool] | None:
        """Where a MOVED or ASK reply sends its command again (and whether after ASKING);
        a MOVED slot is routed to its new owner, and the whole map read again before the next
        call."""
        moved = redirection(reply, self._host)
        if moved is None:
            return None
        slot, address, ask = moved
        if not ask:
            slots[slot] = address
            self._slots = None
        return address, ask

    async def _each(
        self,
        commands: Sequence[tuple[bytes, ...]],
        keys: Sequence[bytes],
        wait: bool = False,
        targets: Sequence[tuple[str, bool]] | None = None,
    ) -> list[Any]:
        """The reply to each single-key command, each sent to the node serving its key (or
        to its target: address and whether after ASKING) and again where a MOVED or ASK reply
        sends it."""
        slots = await self._routes()
        replies: list[Any] = [None] * len(commands)
        if targets is None:
            targets = [(slots[key_slot(key)], False) for key in keys]
        todo = dict(enumerate(targets))
        for _ in range(_REDIRECTS):
            if not todo:
                return replies
            groups: dict[tuple[str, bool], list[int]] = {}
            for at, target in todo.items():
                groups.setdefault(target, []).append(at)
            answers = await self._gather(
                {
                    target: self._send(target[0], [commands[at] for at in ats], target[1], wait)
                    for target, ats in groups.items()
                }
            )
            todo = {}
            for ats, got in zip(groups.values(), answers, strict=True):
                for at, reply in zip(ats, got, strict=True):
                    if to := self._redirected(reply, slots):
                        todo[at] = to
                    else:
                        replies[at] = reply
        raise RedisUnavailable(
            f"dedup: commands still redirected after {_REDIRECTS} tries (the cluster is "
            "resharding or failing over)"
        )

    async def _send(
        self, node: str, commands: Sequence[tuple[bytes, ...]], asking: bool, wait: bool
    ) -> list[Any]:
        """Commands to one node in one write, each after ASKING if `asking`, then WAIT if
        `wait` and replicas must acknowledge; their replies (an error reply as its exception)."""
        pool = self._client(node).connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        wanted = self.replication.required() if wait else 0
        sent = [
            c for command in commands for c in (((b"ASKING",), command) if asking else (command,))
        ]
        if wanted:
            sent.append(
                (b"WAIT", str(wanted).encode(), str(int(self.replication.timeout * 1000)).encode())
            )
        try:
            await conn.send_packed_command(conn.pack_commands(sent))
            replies = [await _one(conn, self.replication.timeout + self._timeout) for _ in sent]
        except BaseException:
            await conn.disconnect(nowait=True)
            raise
        finally:
            await pool.release(conn)
        if wanted:
            acked = replies.pop()
            if isinstance(acked, Exception) or int(acked) < wanted:
                raise RedisUnavailable(
                    f"dedup claim on {node} acknowledged by {acked} of the {wanted} replicas "
                    f"it needs within {self.replication.timeout:g} s"
                )
        return replies[1::2] if asking else replies

    async def _gather(self, calls: Mapping[Any, Awaitable[Any]]) -> list[Any]:
        """The calls' results, run at once; any failure fails the whole (the slot map is read
        again before the next call: a node that failed may have lost its slots)."""
        results = await asyncio.gather(*calls.values(), return_exceptions=True)
        for where, result in zip(calls, results, strict=True):
            if isinstance(result, RedisUnavailable):
                raise result
            if isinstance(result, REDIS_FAILURES):
                self._slots = None
                node = where[0] if isinstance(where, tuple) else where
                raise RedisUnavailable(f"dedup: redis node {node} failed: {result}") from result
            if isinstance(result, BaseException):
                raise result
        return results

    async def _routes(self) -> list[str]:
        if self._slots is None:
            self._slots = await self._read_slots()
        return self._slots

    async def _read_slots(self) -> list[str]:
        """The slot map, from the first node that answers: the nodes known, then the seed."""
        failures = []
        for node in [*sorted(set(self._clients) - {self._seed}), self._seed]:
            pool = self._client(node).connection_pool
            try:
                conn = await pool.get_connection()  # type: ignore[no-untyped-call]
                try:
                    await conn.send_command("CLUSTER", "SLOTS")
                    reply = await conn.read_response()
                finally:
                    await pool.release(conn)
            except REDIS_FAILURES as exc:
                failures.append(f"{node}: {exc}")
                continue
            slots = parse_slots(reply, self._host)
            if "" in slots:
                failures.append(f"{node}: {slots.count('')} slots served by no master")
                continue
            return slots
        raise RedisUnavailable(f"dedup: no Redis Cluster node gave the slot map ({failures})")

    def _client(self, node: str) -> redis_async.Redis:
        client = self._clients.get(node)
        if client is None:
            host, _, port = node.rpartition(":")
            pool = redis_async.ConnectionPool(**self._options, host=host, port=int(port))
            client = self._clients[node] = redis_async.Redis(connection_pool=pool)
        return client

    async def pending(self, keys: Sequence[bytes]) -> list[bytes | None]:
        replies = await self._each([(b"GET", key) for key in keys], keys)
        for reply in replies:
            if isinstance(reply, Exception):
                raise RedisUnavailable(f"pending ranges read failed: {reply}")
        return replies

    async def release(self, keys: Sequence[bytes], coords: Sequence[bytes]) -> int:
        script = RELEASE_SCRIPT.encode()
        commands = [(b"EVAL", script, b"1", k, c) for k, c in zip(keys, coords, strict=True)]
        released = 0
        for reply in await self._each(commands, keys):
            if isinstance(reply, Exception):
                raise RedisUnavailable(f"dedup release failed: {reply}")
            released += int(reply)
        return released

    async def ping(self) -> None:
        slots = await self._routes()
        await self._gather({node: self._client(node).ping() for node in set(slots)})

    async def close(self) -> None:
        for client in self._clients.values():
            await client.aclose()

    @contextlib.asynccontextmanager
    async def link(self) -> AsyncIterator[Link]:
        """A link to the cluster's masters for one claim (groups layout)."""
        link = ClusterLink(self)
        try:
            yield link
        except BaseException:
            await link.release(broken=True)
            raise
        await link.release(broken=False)


_ASKING = b"*1\r\n$6\r\nASKING\r\n"
_OK = b"+OK\r\n"


class ClusterLink:
    """Each command to the master of its route key's slot, following MOVED and ASK; one
    connection to each master, held until `release`."""

    def __init__(self, store: ClusterDedup) -> None:
        self._store = store
        self._conns: dict[str, Any] = {}
        self._wrote: set[str] = set()

    async def send(
        self,
        routes: Sequence[bytes],
        commands: Sequence[bytes],
        expect: Sequence[bytes],
        writes: bool,
    ) -> list[Any] | None:
        store = self._store
        slots = await store._routes()
        replies: list[Any] = [None] * len(commands)
        foreseen = True
        todo = {at: (slots[key_slot(route)], False) for at, route in enumerate(routes)}
        for _ in range(_REDIRECTS):
            if not todo:
                return None if foreseen else replies
            groups: dict[tuple[str, bool], list[int]] = {}
            for at, target in todo.items():
                groups.setdefault(target, []).append(at)
            answers = await store._gather(
                {
                    target: self._to(
                        target, [commands[at] for at in ats], [expect[at] for at in ats], writes
                    )
                    for target, ats in groups.items()
                }
            )
            todo = {}
            for ats, got in zip(groups.values(), answers, strict=True):
                if got is None:
                    for at in ats:
                        replies[at] = parsed(expect[at])
                    continue
                foreseen = False
                for at, reply in zip(ats, got, strict=True):
                    if to := store._redirected(reply, slots):
                        todo[at] = to
                    else:
                        replies[at] = reply
        raise RedisUnavailable(
            f"dedup: commands still redirected after {_REDIRECTS} tries (the cluster is "
            "resharding or failing over)"
        )

    async def _to(
        self, target: tuple[str, bool], commands: list[bytes], expect: list[bytes], writes: bool
    ) -> list[Any] | None:
        node, asking = target
        conn = self._conns.get(node)
        if conn is None:
            pool = self._store._client(node).connection_pool
            conn = self._conns[node] = await pool.get_connection()  # type: ignore[no-untyped-call]
        if writes:
            self._wrote.add(node)
        if not asking:
            return await send_on(conn, commands, expect, self._store._timeout)
        sent = [c for command in commands for c in (_ASKING, command)]
        wanted = [e for reply in expect for e in (_OK, reply)]
        got = await send_on(conn, sent, wanted, self._store._timeout)
        return None if got is None else got[1::2]

    async def wait(self) -> None:
        store = self._store
        await store._gather(
            {
                node: wait_on(self._conns[node], store.replication, store._timeout, f" on {node}")
                for node in sorted(self._wrote)
            }
        )

    async def release(self, broken: bool) -> None:
        """Gives the connections back; after a failure closed, as they may hold replies."""
        for node, conn in self._conns.items():
            if broken:
                await conn.disconnect(nowait=True)
            await self._store._client(node).connection_pool.release(conn)
        self._conns.clear()


def cluster_grouped(
    config: DedupConfig, socket_timeout: float, replication: Replication
) -> GroupedDedup:
    """The groups layout on a Redis Cluster."""
    cluster = ClusterDedup(config, socket_timeout, replication)
    return GroupedDedup(config, cluster.link, cluster.close, replication)


async def _one(conn: Any, wait_s: float) -> Any:
    try:
        return await conn.read_response(disable_decoding=True, timeout=wait_s)
    except redis_async.ResponseError as exc:
        return exc


def _check_ok(reply: Any) -> None:
    if reply not in (b"OK", "OK"):
        raise RedisUnavailable(f"dedup claim: a pending range's SET answered {reply!r}")


def _held(reply: Any) -> bytes:
    if isinstance(reply, Exception):
        raise RedisUnavailable(f"dedup claim failed: {reply}")
    return reply if isinstance(reply, bytes) else str(reply).encode()
