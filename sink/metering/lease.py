"""The migration lease: one migrator at a time, and one that died is replaced within seconds.

- Epochs. Taking the lease is creating the next lock table, `schema_migrations_lock_<N>`:
  CREATE TABLE without IF NOT EXISTS succeeds for one caller only, so each epoch has exactly
  one holder. The newest epoch is the lease; older lock tables are history.
- Renewal. The holder writes a row into its lock table every `timeout / 5` seconds from a
  connection of its own, so a long statement on the migration's connection (a backfill
  piece) does not stop the renewals. Rows carry the server's clock; no process's clock is
  compared with another's.
- Takeover. A lease whose newest row is older than `timeout` (server time) belongs to a
  process that died or froze: the next migrator takes the next epoch. A holder whose
  renewals stopped succeeding stops before the server could call it dead (it counts from the
  moment it *sent* its last successful renewal, with a margin), and a holder that sees a
  newer epoch stops at once. `Lease.check()` before every migration step turns either into
  `LeaseLost`.
- A released lease (a row with state `released`) is free at once.

Every step a migrator takes is idempotent (see `sink.metering.backfill`), so the lease
serialises the work and keeps it moving; it is not what keeps a meter exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from sink.errors import ClickHouseUnavailable, DependencyError
from sink.stores.clickhouse.connection import ClickHouse
from sink.stores.clickhouse.sql import quote

log = structlog.get_logger("sink.lease")

PREFIX = "schema_migrations_lock_"
LEGACY = "schema_migrations_lock"
"""The lock of versions before the lease: a table without an epoch, never renewed."""
LEGACY_STALE_AFTER = 1800
TABLE_EXISTS = 57
_EPOCH = re.compile(rf"^{PREFIX}(\d+)$")
MARGIN = 2.0
"""Seconds a holder gives up before the server would call it dead (the rows' one-second
resolution, and the time between sending a renewal and the server stamping it)."""


class LeaseHeld(DependencyError):
    """Another live process holds the migration lease; waiting is the remedy."""

    dependency = "clickhouse"


class LeaseLost(DependencyError):
    """This process no longer holds the lease: it stops migrating; another one goes on."""

    dependency = "clickhouse"


@dataclass(frozen=True)
class Holder:
    """What the server says of the newest lease."""

    epoch: int
    owner: str
    since: int
    """Epoch seconds (server clock) when the lease was taken."""
    silent_for: int
    """Seconds since the holder's last renewal."""
    released: bool
    legacy: bool = False

    def dead(self, timeout: float) -> bool:
        if self.legacy:
            return self.silent_for > LEGACY_STALE_AFTER
        return self.silent_for > timeout

    def describe(self, timeout: float) -> str:
        if self.released:
            return f"free (last held by {self.owner})"
        if self.legacy:
            return (
                f"held by a migrator of an earlier version since {self.since} "
                f"({self.silent_for} s ago; such a lock is taken over after "
                f"{LEGACY_STALE_AFTER} s, or drop the table {LEGACY} once no migration runs)"
            )
        state = "looks dead: the next migrator takes it over" if self.dead(timeout) else "alive"
        return (
            f"held by {self.owner or 'a process that has not renewed yet'} (epoch {self.epoch}) "
            f"since {self.since}, last renewed {self.silent_for} s ago, {state}"
        )


class Lease:
    """The migration lease of one database. `connect` opens the renewals' own connection."""

    def __init__(
        self,
        ch: ClickHouse,
        connect: Callable[[], ClickHouse],
        owner: str,
        timeout: float = 10.0,
    ) -> None:
        self.ch = ch
        self.connect = connect
        self.owner = owner
        self.timeout = timeout
        self.epoch = 0
        self._renewed_at = 0.0
        self._lost: str | None = None
        self._renewer: asyncio.Task[None] | None = None

    # --- reading ------------------------------------------------------------------------

    async def _epochs(self, ch: ClickHouse) -> tuple[list[int], bool]:
        rows = await ch.query(
            f"SELECT name FROM system.tables WHERE database = {quote(ch.database)} "
            f"AND startsWith(name, {quote(LEGACY)})"
        )
        names = [str(name) for (name,) in rows]
        epochs = sorted(int(m.group(1)) for n in names if (m := _EPOCH.match(n)))
        return epochs, LEGACY in names

    async def holder(self) -> Holder | None:
        """The newest lease, or None when no migrator ever took one."""
        epochs, legacy = await self._epochs(self.ch)
        if legacy:
            return await self._legacy()
        if not epochs:
            return None
        epoch = epochs[-1]
        table = self.ch.table(f"{PREFIX}{epoch}")
        [(owner, first, last, released, now, created)] = await self.ch.query(
            f"SELECT any(owner), toUInt32(min(at)), toUInt32(max(at)), max(state = 'released'), "
            "toUInt32(now()), (SELECT toUInt32(metadata_modification_time) FROM system.tables "
            f"WHERE database = {quote(self.ch.database)} AND name = {quote(PREFIX + str(epoch))}) "
            f"FROM {table}"
        )
        # No row yet: the holder created the table and has not written its first renewal.
        last = int(last) or int(created)
        return Holder(
            epoch,
            str(owner),
            int(first) or int(created),
            max(0, int(now) - last),
            bool(released),
        )

    async def _legacy(self) -> Holder:
        [(since, now)] = await self.ch.query(
            "SELECT toUInt32(metadata_modification_time), toUInt32(now()) FROM system.tables "
            f"WHERE database = {quote(self.ch.database)} AND name = {quote(LEGACY)}"
        )
        return Holder(0, "", int(since), max(0, int(now) - int(since)), False, legacy=True)

    # --- taking and giving back ---------------------------------------------------------

    async def acquire(self, wait: bool = True) -> bool:
        """Take the lease. With `wait`, wait as long as a live holder keeps it; without,
        return False at once when it is held."""
        announced = ""
        while True:
            holder = await self.holder()
            if holder is None or holder.released or holder.dead(self.timeout):
                if holder is not None and holder.legacy:
                    await self.ch.execute(f"DROP TABLE IF EXISTS {self.ch.table(LEGACY)}")
                if await self._create(holder.epoch + 1 if holder else 1):
                    if holder is not None and not holder.released:
                        log.warning(
                            "took over the migration lease from a holder that stopped renewing",
                            previous=holder.owner,
                            silent_for=holder.silent_for,
                            epoch=self.epoch,
                        )
                    return True
                continue  # another process took that epoch first: look again
            if not wait:
                return False
            text = holder.describe(self.timeout)
            if text.split(", last renewed")[0] != announced:
                announced = text.split(", last renewed")[0]
                log.info("waiting for the migration lease", holder=text)
            await asyncio.sleep(min(1.0, self.timeout / 5))

    async def _create(self, epoch: int) -> bool:
        try:
            await self.ch.execute(
                f"CREATE TABLE {self.ch.table(PREFIX + str(epoch))} (owner String, "
                "state String, at DateTime('UTC') DEFAULT now()) ENGINE = Log"
            )
        except ClickHouseUnavailable as exc:
            if f"server error {TABLE_EXISTS}" in str(exc):
                return False
            raise
        self.epoch = epoch
        self._lost = None
        await self._write(self.ch, "held")
        self._renewer = asyncio.create_task(self._renew(), name="lease")
        await self._forget_before(epoch - 1)
        return True

    async def _write(self, ch: ClickHouse, state: str) -> None:
        sent = time.monotonic()
        await ch.insert_columns(
            f"{PREFIX}{self.epoch}", ("owner", "state"), [[self.owner], [state]]
        )
        self._renewed_at = sent

    async def _forget_before(self, epoch: int) -> None:
        """Drop lock tables older than `epoch` (the one before ours stays: its holder, if
        alive, finds ours newer and stops)."""
        epochs, _ = await self._epochs(self.ch)
        for old in epochs:
            if old < epoch:
                await self.ch.execute(f"DROP TABLE IF EXISTS {self.ch.table(PREFIX + str(old))}")

    async def _renew(self) -> None:
        ch = self.connect()
        try:
            while self._lost is None:
                await asyncio.sleep(self.timeout / 5)
                try:
                    epochs, _ = await self._epochs(ch)
                    newer = [e for e in epochs if e > self.epoch]
                    if newer:
                        self._lost = f"epoch {newer[-1]} took the lease over"
                        break
                    await self._write(ch, "held")
                except DependencyError as exc:
                    log.warning("cannot renew the migration lease", error=str(exc)[:300])
        finally:
            await ch.close()

    def check(self) -> None:
        """Raise `LeaseLost` unless this process may take its next migration step."""
        if not self.epoch:
            raise LeaseLost("the migration lease is not held")
        if self._lost is None and time.monotonic() - self._renewed_at > self.timeout - MARGIN:
            self._lost = f"no renewal succeeded for {self.timeout - MARGIN:.0f} s"
        if self._lost is not None:
            raise LeaseLost(f"lost the migration lease: {self._lost}")

    async def release(self) -> None:
        """Give the lease back (best effort: a lease not given back expires)."""
        renewer, self._renewer = self._renewer, None
        if renewer is not None:
            renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await renewer
        if self.epoch and self._lost is None:
            with contextlib.suppress(DependencyError):
                await self._write(self.ch, "released")
        self.epoch = 0
