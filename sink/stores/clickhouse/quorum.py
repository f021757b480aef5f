"""Which rows a replica shows are there to stay: the parts of a replicated table whose insert
was committed and whose quorum, if any, was reached.

A replica shows a part as soon as it wrote it, before the insert's outcome is decided:

- **Quorum pending.** An insert with `insert_quorum` commits its part to ZooKeeper with a
  quorum node (`<table>/quorum/status`, or `<table>/quorum/parallel/<part>` with parallel
  quorum), and the client is told only once enough replicas fetched it. If the wait times out
  (code 319, "Unknown status, client must retry"), the part is still pending.
- **Quorum failed.** When a replica that should fetch a pending part finds no active replica
  holding it (the one that wrote it died or lost its ZooKeeper session), the quorum fails: the
  part goes to `<table>/quorum/failed_parts`, its block ids are removed so the client's retry
  is written again, and the replica holding it detaches it when it next activates. Until then
  the part's rows are visible on that replica; then they are gone.
- **Commit unknown.** A part whose ZooKeeper commit was interrupted stays on its replica and
  is detached later if ZooKeeper never took it.

So a lookup of "what landed" after an insert whose outcome was unknown, or at positioning,
counts a part only if ZooKeeper lists it among the replica's parts and no quorum of it is
pending or failed. Rows of a failed part count as not landed (they are inserted again; the
part is on its way out). A pending part, or one ZooKeeper does not list yet (an interrupted
commit, or a part merged away between the two reads), is undecided: `Undecided` is raised
and the caller asks again later.

Tables that are not replicated (one server) have none of this: every part counts.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import NamedTuple

from sink.errors import ClickHouseUnavailable
from sink.stores.clickhouse.connection import Database
from sink.stores.clickhouse.sql import quote


class Undecided(ClickHouseUnavailable):
    """Rows being looked up are in a part whose insert is not decided yet (quorum pending, or
    not yet in ZooKeeper): ask again later."""


class QuorumState(NamedTuple):
    """One replicated table's quorum nodes in ZooKeeper."""

    pending: frozenset[str]
    failed: frozenset[str]


def _pending_of_status(value: str) -> str | None:
    """The part named by a `quorum/status` node (`part_name: <name>` on one of its lines)."""
    for line in value.splitlines():
        key, _, name = line.partition(":")
        if key.strip() == "part_name":
            return name.strip()
    return None


async def _children(db: Database, path: str) -> list[tuple[str, str]]:
    rows = await db.query(f"SELECT name, value FROM system.zookeeper WHERE path = {quote(path)}")
    return [(str(name), str(value)) for name, value in rows]


async def quorum_state(db: Database, zookeeper_path: str) -> QuorumState:
    """The pending and failed quorum parts of the table at `zookeeper_path`."""
    pending: set[str] = set()
    failed: set[str] = set()
    nodes = dict(await _children(db, f"{zookeeper_path}/quorum"))
    if "status" in nodes:
        name = _pending_of_status(nodes["status"])
        if name:
            pending.add(name)
    if "parallel" in nodes:
        pending.update(n for n, _ in await _children(db, f"{zookeeper_path}/quorum/parallel"))
    if "failed_parts" in nodes:
        failed.update(n for n, _ in await _children(db, f"{zookeeper_path}/quorum/failed_parts"))
    return QuorumState(frozenset(pending), frozenset(failed))


async def lasting_parts(db: Database, table: str, parts: Collection[str]) -> set[str]:
    """Of `parts` (names read from `table`'s `_part` on the replica `db` is connected to),
    those whose rows are there to stay; the others' rows count as not landed. Raises
    `Undecided` while one of them is pending or not yet listed in ZooKeeper."""
    if not parts:
        return set()
    replicas = await db.query(
        "SELECT zookeeper_path, replica_path FROM system.replicas "
        f"WHERE database = {quote(db.database)} AND table = {quote(table)}"
    )
    if not replicas:
        return set(parts)  # not replicated: what a server shows is what it has
    [(zookeeper_path, replica_path)] = replicas
    state = await quorum_state(db, str(zookeeper_path))
    pending = state.pending.intersection(parts)
    if pending:
        raise Undecided(
            f"{table}: the quorum of part(s) {', '.join(sorted(pending))} is not reached yet"
        )
    wanted = sorted(set(parts) - state.failed)
    if not wanted:
        return set()
    names = ", ".join(map(quote, wanted))
    listed = {
        str(name)
        for (name,) in await db.query(
            "SELECT name FROM system.zookeeper "
            f"WHERE path = {quote(str(replica_path) + '/parts')} AND name IN ({names})"
        )
    }
    unlisted = set(wanted) - listed
    if unlisted:
        raise Undecided(
            f"{table}: part(s) {', '.join(sorted(unlisted))} not (or no longer) in ZooKeeper"
        )
    return listed
