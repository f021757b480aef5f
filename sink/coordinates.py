"""Where records are in Kafka, in one shape each: a partition, a record's coordinates, an
offset span. Everything that names a record's place uses these, from the batch's rows to the
dedup markers (sink.stores.keys) and the landed-offset ledger (sink.stores.clickhouse.landed).
Topics are named here by their Kafka name; the stores map names to storage keys themselves.
"""

from __future__ import annotations

from typing import Any, NamedTuple

TopicPartition = tuple[str, int]
"""A Kafka partition: topic name, partition number."""


class Coordinates(NamedTuple):
    """A record's place in Kafka: topic name, partition, offset. The one shape of a record's
    place everywhere: rows (`Item`) carry these three fields, landed and interrupted
    coordinates come back as these, and a marker's value encodes them (`DedupKeys.marker`)."""

    topic: str
    partition: int
    offset: int


class Span(NamedTuple):
    """The lowest and highest offset of some records of one partition."""

    first: int
    last: int


def coordinates_of(row: Any) -> Coordinates:
    """A row's place: anything with `topic`, `partition` and `offset` (a batch's `Item`)."""
    return Coordinates(row.topic, row.partition, row.offset)
