"""Configuration: one validated, frozen model, loaded once from YAML plus environment overrides.

Every key can be overridden by an environment variable `SINK__<SECTION>__<KEY>`; the value is
read as a YAML scalar or flow collection, so `SINK__KAFKA__TOPICS='[a, b]'` gives a list.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from sink.errors import ConfigError
from sink.metering.meters import Meter

ENV_PREFIX = "SINK__"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(b|kib|mib|gib|kb|mb|gb)?\s*$", re.IGNORECASE)
_UNIT_BYTES = {
    None: 1,
    "b": 1,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
}


def _parse_duration(value: Any) -> Any:
    """Seconds as a number, or a string such as `500ms`, `30s`, `5m`, `32d`."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError("a duration such as 500ms, 30s, 5m, 2h or 32d")
        return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    return value


def _parse_size(value: Any) -> Any:
    """Bytes as an integer, or a string such as `16MiB`, `64KiB`."""
    if isinstance(value, str):
        match = _SIZE.match(value)
        if not match:
            raise ValueError("a size such as 65536, 64KiB or 16MiB")
        unit = match.group(2).lower() if match.group(2) else None
        return int(match.group(1)) * _UNIT_BYTES[unit]
    return value


Duration = Annotated[float, BeforeValidator(_parse_duration), Field(gt=0)]
Size = Annotated[int, BeforeValidator(_parse_size), Field(gt=0)]


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KafkaConfig(_Section):
    bootstrap_servers: str = "localhost:9092"
    group_id: str = "sink"
    client_id: str = "sink"
    topics: tuple[str, ...] | None = None
    topics_regex: str = r"^om_(?P<namespace>.+)_events$"
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    session_timeout: Duration = 10.0
    heartbeat_interval: Duration = 3.0
    max_poll_interval: Duration = 300.0
    fetch_max_bytes: Size = 16 * 1024**2
    max_partition_fetch_bytes: Size = 2 * 1024**2
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_check_hostname: bool = True

    @field_validator("topics_regex")
    @classmethod
    def _regex_compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"a valid regular expression ({exc})") from exc
        return value

    @field_validator("topics")
    @classmethod
    def _topics_not_empty(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and (not value or any(not t.strip() for t in value)):
            raise ValueError("a non-empty list of topic names")
        return value


class EventsConfig(_Section):
    max_event_bytes: Size = 1024 * 1024
    namespace_header: str | None = None
    """If set, a record header of this name gives the namespace (before the topic regex)."""


class DedupConfig(_Section):
    enabled: bool = True
    mode: Literal["standalone", "sentinel", "cluster"] = "standalone"
    """standalone: the one Redis of `redis_url`; sentinel: the master the sentinels name;
    cluster: a Redis Cluster, `redis_url` naming any of its nodes."""
    redis_url: SecretStr = SecretStr("redis://localhost:6379/0")
    """In sentinel mode only its scheme (rediss:// for TLS), user, password and database
    are used: the address comes from the sentinels."""
    username: str | None = None
    """ACL user; overrides the URL's."""
    password: SecretStr | None = None
    """Overrides the URL's."""
    sentinels: tuple[str, ...] = ()
    """`host:port` of each sentinel (sentinel mode)."""
    sentinel_master: str | None = None
    """The name the sentinels monitor the master under (sentinel mode)."""
    sentinel_username: str | None = None
    sentinel_password: SecretStr | None = None
    """Credentials of the sentinels themselves, if they require any."""
    min_replicas_acked: int | None = Field(default=None, ge=0)
    """Replicas that must acknowledge a batch's claims (WAIT) before its rows are inserted.
    Default: 1 in sentinel and cluster mode, and in standalone mode once the server has been
    seen with a replica; else 0."""
    replica_ack_timeout: Duration = 2.0
    """How long a claim waits for its replicas' acknowledgement before it is retried."""
    ttl: Duration = 32 * 86400.0
    on_error: Literal["block", "allow-duplicates"] = "block"
    key_prefix: str = "sink:dedup:"
    socket_timeout: Duration = 5.0
    layout: Literal["groups", "keys"] = "groups"
    """groups: identities as fields of `groups` small hashes (about 40 bytes each); keys: a key
    per identity (about 180 bytes each), as before the groups layout."""
    groups: int = Field(default=1 << 20, ge=1, lt=1 << 32)
    """Hashes the identities are spread over (groups layout): events/s x ttl (seconds) / 25, so
    that each stays well under Redis' `hash-max-listpack-entries` (128), in its compact
    encoding. A change forgets most identities (they move to other groups)."""
    sweep_every: Duration = 16 * 86400.0
    """How often the workers' shared sweep goes over every group, dropping fields older than the
    ttl (groups layout). Default: half the ttl. Decisions honour the ttl whatever this is; it
    bounds how long a forgotten identity still takes memory."""
    legacy_reads: bool = False
    """Groups layout: also look identities up under their keys-layout keys until one ttl after
    this layout first claimed under the prefix (an upgrade from the keys layout)."""

    @property
    def prefix(self) -> bytes:
        """`key_prefix` as the store's keys begin."""
        return self.key_prefix.encode()

    @model_validator(mode="before")
    @classmethod
    def _sweep_every_half_the_ttl(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("sweep_every") is None:
            try:
                ttl = float(_parse_duration(data.get("ttl", 32 * 86400.0)))
            except (TypeError, ValueError):
                return data  # the ttl's own check reports it
            return {**data, "sweep_every": ttl / 2}
        return data

    @field_validator("sentinels")
    @classmethod
    def _addresses(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for address in value:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"host:port of each sentinel, not {address!r}")
        return value

    @field_validator("redis_url")
    @classmethod
    def _url_scheme(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("a URL redis://[user:password@]host:port/db (rediss:// for TLS)")
        return value

    @model_validator(mode="after")
    def _mode_settings(self) -> DedupConfig:
        sentinel = self.mode == "sentinel"
        if sentinel and not self.sentinels:
            raise ValueError("dedup.mode: sentinel needs dedup.sentinels (host:port of each)")
        if sentinel and not self.sentinel_master:
            raise ValueError("dedup.mode: sentinel needs dedup.sentinel_master (its name)")
        if not sentinel and (self.sentinels or self.sentinel_master):
            raise ValueError(
                f"dedup.sentinels and dedup.sentinel_master go with dedup.mode: sentinel, "
                f"not {self.mode}"
            )
        if self.mode == "cluster" and _url_database(self.redis_url) not in (None, 0):
            raise ValueError("dedup.mode: cluster has only database 0: drop it from redis_url")
        return self


def _url_database(url: SecretStr) -> int | None:
    """The database number of a Redis URL (its path), None if it names none."""
    path = url.get_secret_value().split("://", 1)[-1].partition("/")[2].partition("?")[0]
    return int(path) if path.isdigit() else None


class ClickHouseConfig(_Section):
    url: SecretStr = SecretStr("clickhouse://default:@localhost:9000/default")
    events_table: str = "events"
    offsets_table: str = "sink_offsets"
    insert_settings: dict[str, int | str | float] = Field(default_factory=dict)
    compression: Literal["none", "lz4", "zstd"] = "none"
    connect_timeout: Duration = 5.0
    query_timeout: Duration = 60.0
    cluster: str | None = None
    """A cluster of the servers' `remote_servers`: tables are made ON CLUSTER, Replicated, and
    each partition lands on one shard. Unset: one server, as `url` names it."""
    nodes: tuple[tuple[str, ...], ...] | None = None
    """The cluster's nodes, a list of `host:port` replicas per shard, for setups where
    `system.clusters` cannot be read or names addresses the worker cannot reach; unset,
    they come from `system.clusters` on the server in `url`."""
    zookeeper_path: str = "/clickhouse/sink/{database}"
    """Where the replicated tables keep their state in ZooKeeper (or ClickHouse Keeper):
    `<zookeeper_path>/<shard>/<table>`; `{database}` is the database of `url`."""
    shard_by: Literal["partition", "namespace"] = "partition"
    """Which shard a record lands on: by its Kafka topic and partition, or by its topic's
    namespace (a customer's usage stays on one shard)."""
    insert_quorum: int | None = Field(default=None, ge=0)
    """Replicas that must have a batch before its insert is acknowledged; default 2 when every
    shard has 2 or more replicas, else none (0)."""
    insert_quorum_timeout: Duration = 600.0
    """How long the server waits for the quorum before it answers 319 (unknown status). Kept
    long on purpose: ClickHouse runs the views (meters, landed offsets) only after the raw
    table's quorum is reached, and a 319 skips them. The worker itself stops waiting after
    `query_timeout` and then checks what landed, while the server goes on and, once the
    quorum is reached, runs the views."""

    @field_validator("cluster")
    @classmethod
    def _cluster_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", value):
            raise ValueError("a cluster name of the servers' remote_servers")
        return value

    @field_validator("zookeeper_path")
    @classmethod
    def _zookeeper_path(cls, value: str) -> str:
        if not re.fullmatch(r"(/[A-Za-z0-9_.{}-]+)+/?", value):
            raise ValueError("an absolute ZooKeeper path, e.g. /clickhouse/sink/{database}")
        return value

    @model_validator(mode="after")
    def _nodes_need_a_cluster(self) -> ClickHouseConfig:
        if self.nodes is not None and self.cluster is None:
            raise ValueError("clickhouse.nodes is given without clickhouse.cluster (its name)")
        return self

    @field_validator("events_table", "offsets_table")
    @classmethod
    def _identifier(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError("a plain table name (letters, digits and underscores)")
        return value

    @field_validator("url")
    @classmethod
    def _url_scheme(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().startswith(("clickhouse://", "clickhouses://")):
            raise ValueError("a URL clickhouse://user:password@host:port/database")
        return value


class BatchConfig(_Section):
    max_rows: int = Field(default=25_000, gt=0)
    max_bytes: Size = 16 * 1024**2
    max_wait: Duration = 1.0
    max_in_flight: int = Field(default=100_000, gt=0)
    """Rows held in memory at most (buffered plus being flushed); partitions pause above it."""

    @model_validator(mode="after")
    def _in_flight_holds_a_batch(self) -> BatchConfig:
        if self.max_in_flight < self.max_rows:
            raise ValueError(
                f"batch.max_in_flight ({self.max_in_flight}) must be at least "
                f"batch.max_rows ({self.max_rows})"
            )
        return self


class DlqConfig(_Section):
    topic: str | None = None
    """Dead-letter topic; default `<kafka.group_id>.dlq`."""
    create: bool = True
    partitions: int = Field(default=1, gt=0)
    replication_factor: int = Field(default=1, gt=0)


class HttpConfig(_Section):
    enabled: bool = True
    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=0, le=65535)
    ready_dependency_grace: Duration = 30.0
    """/readyz fails once a dependency has been failing this long."""
    ready_stall_after: Duration = 60.0
    """/readyz fails when held partitions have lag and nothing landed for this long."""


class WorkerConfig(_Section):
    id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    drain_timeout: Duration = 30.0
    retry_initial: Duration = 0.2
    retry_max: Duration = 10.0
    migrate_on_start: bool = True
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["auto", "json", "console"] = "auto"
    use_uvloop: bool = True


class MigrationsConfig(_Section):
    lease_timeout: Duration = Field(default=10.0, ge=3.0)
    """A migrator that has not renewed its lease for this long is taken over."""
    backfill_piece_rows: int = Field(default=1_000_000, ge=1000)
    """Raw rows a backfill aggregates in one query at most: its memory bound."""
    check_interval: Duration = 30.0
    """How often a running worker looks for a meter to make live or a backfill to resume."""


class ApiToken(_Section):
    """One bearer token of `sink serve`, stored as the SHA-256 of the token (hex), never the
    token itself. `namespace: '*'` is an operator token: it reads every namespace."""

    namespace: str = Field(min_length=1)
    sha256: str
    """Checked by `ApiConfig`, whose errors do not show the value: a token pasted here by
    mistake must not be echoed."""

    @field_validator("sha256")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.lower()


class ApiConfig(_Section):
    """`sink serve`: usage over HTTP (OpenMeter's meter API), its own process."""

    host: str = "0.0.0.0"
    port: int = Field(default=8090, ge=0, le=65535)
    tokens: tuple[ApiToken, ...] = ()
    max_rows: int = Field(default=100_000, gt=0)
    """A query whose answer would have more rows is refused (400) instead of answered."""
    connections: int = Field(default=4, gt=0)
    """ClickHouse connections of one `sink serve` process: queries answered at once."""

    @model_validator(mode="after")
    def _digests(self) -> ApiConfig:
        digests = [t.sha256 for t in self.tokens]
        for index, digest in enumerate(digests):
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(
                    f"api.tokens[{index}].sha256 must be the SHA-256 of the token as 64 hex "
                    "digits (sha256sum), not the token"
                )
        if len(set(digests)) < len(digests):
            raise ValueError("api.tokens: each token (sha256) may appear once")
        return self


class Config(_Section):
    meters: tuple[Meter, ...] = ()
    """Meters declared inline; `meters_file` may name a YAML file with more."""
    meters_file: str | None = None
    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    events: EventsConfig = Field(default_factory=EventsConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    clickhouse: ClickHouseConfig = Field(default_factory=ClickHouseConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    dlq: DlqConfig = Field(default_factory=DlqConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    worker: WorkerConfig = Field(default_factory=WorkerConfig)
    migrations: MigrationsConfig = Field(default_factory=MigrationsConfig)
    api: ApiConfig = Field(default_factory=ApiConfig)

    @property
    def dlq_topic(self) -> str:
        return self.dlq.topic or f"{self.kafka.group_id}.dlq"

    @model_validator(mode="after")
    def _unique_meters(self) -> Config:
        slugs = [m.slug for m in self.meters]
        repeated = sorted({s for s in slugs if slugs.count(s) > 1})
        if repeated:
            raise ValueError(f"meter slugs must be unique; repeated: {', '.join(repeated)}")
        return self

    @model_validator(mode="after")
    def _shard_by_namespace_needs_topic_namespaces(self) -> Config:
        if self.clickhouse.shard_by == "namespace" and self.events.namespace_header:
            raise ValueError(
                "clickhouse.shard_by: namespace needs the namespace from the topic name; with "
                "events.namespace_header one partition holds several namespaces, whose rows "
                "and landed offsets must stay on one shard: use shard_by: partition"
            )
        return self


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        path = [part.lower() for part in name[len(ENV_PREFIX) :].split("__") if part]
        if len(path) < 2:
            raise ConfigError(
                f"{name}: expected SINK__<SECTION>__<KEY>, for example SINK__KAFKA__GROUP_ID"
            )
        value: Any = raw
        if raw.lstrip().startswith(("[", "{")):
            try:
                value = yaml.safe_load(raw)
            except yaml.YAMLError:
                value = raw
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{name}: {'.'.join(path[:-1])} is not a section")
            node = child
        node[path[-1]] = value
    return data


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(root)"
        value = item.get("input")
        if (
            "secret" in key
            or "password" in key
            or key.endswith("url")
            or item["type"] == "extra_forbidden"
            or (isinstance(value, (dict, str)) and len(item["loc"]) == 1)
        ):
            shown = "<hidden>"
        else:
            shown = repr(value)
        lines.append(f"  {key} = {shown}: {item['msg']}")
    return "invalid configuration:\n" + "\n".join(lines)


def build(
    data: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    base: Path | None = None,
) -> Config:
    """Validate a mapping (plus environment overrides) into a Config, or raise ConfigError.
    A relative `meters_file` is read from `base` (the configuration file's folder)."""
    merged = _apply_env(_deep_copy(data), os.environ if environ is None else environ)
    if merged.get("meters_file"):
        merged["meters"] = [
            *(merged.get("meters") or []),
            *_read_meters(Path(base or "."), str(merged["meters_file"])),
        ]
    try:
        return Config.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_describe(exc)) from None


def load(path: str | Path | None, environ: Mapping[str, str] | None = None) -> Config:
    """Read a YAML file (or nothing) and apply environment overrides."""
    data: Any = {}
    if path is not None:
        file = Path(path)
        try:
            data = yaml.safe_load(file.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"configuration file not found: {file}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{file}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{file}: expected a mapping of sections at the top level")
        return build(data, environ, file.parent)
    return build(data, environ)


def _read_meters(base: Path, name: str) -> list[Any]:
    file = base / name
    try:
        content = yaml.safe_load(file.read_text())
    except FileNotFoundError:
        raise ConfigError(f"meters_file not found: {file}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from None
    if isinstance(content, dict):
        content = content.get("meters")
    if not isinstance(content, list):
        raise ConfigError(f"{file}: expected a list of meters (or a mapping with `meters:`)")
    return content


def _deep_copy(data: Mapping[str, Any]) -> dict[str, Any]:
    return {
        key: _deep_copy(value) if isinstance(value, Mapping) else value
        for key, value in data.items()
    }
