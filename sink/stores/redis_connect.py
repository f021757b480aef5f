"""How the dedup store reaches Redis in each `dedup.mode`, and how many replicas must
acknowledge its claims.

Every mode takes its scheme (rediss:// for TLS), ACL user, password, database and query options
from `dedup.redis_url`; `dedup.username` and `dedup.password` override the URL's. The store
speaks RESP2 on its connections (see sink.stores.dedup.read_replies).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as redis_async
from redis.asyncio.connection import SSLConnection, parse_url
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoPermissionError

from sink.config import DedupConfig


@dataclass
class Replication:
    """The replicas a claim waits for (`WAIT`), and the check of each new connection: a
    connection must reach a master, never a replica (a demoted master answers ROLE `slave`)."""

    wanted: int | None
    """`dedup.min_replicas_acked`; None: 1 where replicas are expected or were seen."""
    timeout: float
    expect_replicas: bool
    """Sentinel and cluster mode: a master without a replica is a degraded one."""
    seen: bool = field(default=False)
    """A master was seen with a replica (standalone mode: from then on claims wait for one)."""

    def required(self) -> int:
        if self.wanted is not None:
            return self.wanted
        return 1 if self.expect_replicas or self.seen else 0

    async def check(self, conn: Any) -> None:
        """redis-py's connect callback: the usual handshake, then ROLE."""
        await conn.on_connect()
        await conn.send_command("ROLE")
        try:
            role = await conn.read_response()
        except NoPermissionError:
            # An ACL user without +role (documented: grant it). A standalone server keeps
            # working as before; a failover mode must know it reached a master.
            if not self.expect_replicas:
                return
            raise
        name = role[0].decode() if isinstance(role[0], bytes) else str(role[0])
        if name != "master":
            raise RedisConnectionError(
                f"redis {conn.host}:{conn.port} is a {name}, not a master (a failover moved it)"
            )
        if len(role) > 2 and role[2]:
            self.seen = True


def url_options(config: DedupConfig) -> dict[str, Any]:
    """The connection options `dedup.redis_url` and the credentials give, for redis-py."""
    options: dict[str, Any] = dict(parse_url(config.redis_url.get_secret_value()))
    if config.username is not None:
        options["username"] = config.username
    if config.password is not None:
        options["password"] = config.password.get_secret_value()
    return options


def common_options(socket_timeout: float, replication: Replication | None) -> dict[str, Any]:
    """redis-py options of every connection; `replication` checks each new one's role."""
    options: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_timeout,
        "retry_on_timeout": False,
        "health_check_interval": 30,
        # RESP2: no push messages can come between a claim's replies.
        "protocol": 2,
    }
    if replication is not None:
        options["redis_connect_func"] = replication.check
    return options


def replication_of(config: DedupConfig) -> Replication:
    return Replication(
        config.min_replicas_acked, config.replica_ack_timeout, config.mode != "standalone"
    )


def standalone_client(
    config: DedupConfig, socket_timeout: float, replication: Replication
) -> redis_async.Redis:
    # The URL's options win (a URL asking for RESP3 keeps it: the store then reads replies
    # with redis-py's parser).
    options = {**common_options(socket_timeout, replication), **url_options(config)}
    return redis_async.Redis(connection_pool=redis_async.ConnectionPool(**options))


def sentinel_client(
    config: DedupConfig, socket_timeout: float, replication: Replication
) -> tuple[redis_async.Redis, Sentinel]:
    """A client whose connections go to the master the sentinels name at each (re)connect."""
    options = {**common_options(socket_timeout, replication), **url_options(config)}
    for address in ("host", "port", "path"):
        options.pop(address, None)
    tls = options.pop("connection_class", None) is SSLConnection
    sentinel_options: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_timeout,
        "protocol": 2,
    }
    if tls:
        sentinel_options["ssl"] = True
        sentinel_options.update({k: v for k, v in options.items() if k.startswith("ssl_")})
    if config.sentinel_username is not None:
        sentinel_options["username"] = config.sentinel_username
    if config.sentinel_password is not None:
        sentinel_options["password"] = config.sentinel_password.get_secret_value()
    sentinels = [
        (host, int(port)) for host, _, port in (a.rpartition(":") for a in config.sentinels)
    ]
    manager = Sentinel(  # type: ignore[no-untyped-call]
        sentinels, sentinel_kwargs=sentinel_options, ssl=tls, **options
    )
    assert config.sentinel_master is not None  # checked by the configuration
    client = manager.master_for(config.sentinel_master, redis_class=redis_async.Redis)
    return client, manager
