"""One error tree. Callers decide by type and by the `retriable` flag, never by message text.

Poison input (a record that can never be stored) and infrastructure failure (a dependency
that will come back) are different branches and are never mixed.
"""

from __future__ import annotations


class SinkError(Exception):
    """Root of every error sink raises on purpose."""

    retriable: bool = False


class ConfigError(SinkError):
    """The configuration is invalid; the message names the key, the value and what was expected."""


class DependencyError(SinkError):
    """A dependency (Kafka, Redis, ClickHouse) failed; the same work may succeed later."""

    retriable = True
    dependency: str = "unknown"


class RedisUnavailable(DependencyError):
    dependency = "redis"


class ClickHouseUnavailable(DependencyError):
    dependency = "clickhouse"


class KafkaUnavailable(DependencyError):
    dependency = "kafka"


class ClickHouseRejected(SinkError):
    """ClickHouse refused the rows themselves; retrying the same block cannot help."""

    dependency = "clickhouse"

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class MigrationError(SinkError):
    """The schema cannot be brought to the expected state."""
