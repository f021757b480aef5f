"""The dedup store's key and value formats, encoded and parsed here and nowhere else.

| entry | key | value |
|---|---|---|
| an identity's marker | prefix + xxh3-128 of `framing(namespace, source) + id` | the coordinates of the record that holds it, `topic:partition:offset` |
| a partition's pending range | prefix + `~pending:topic:partition` | `first:last:tmin:tmax`: the offsets a worker is about to insert and their event-time bounds (epoch seconds) |

`topic` is the topic's storage key (`sink.pipeline.topics`): a topic deleted and created
again under its name gets other keys. The prefix is `dedup.key_prefix`.
"""  # noqa: E501

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import xxhash

from sink.coordinates import Coordinates


def framing(namespace: str, source: str) -> str:
    """The part of an identity before its id: each field with its length in front, so no two
    identities frame alike."""
    return f"{len(namespace)}:{namespace}{len(source)}:{source}"


def identity_key(prefix: bytes, namespace: str, source: str, event_id: str) -> bytes:
    """Short, collision-safe key: the xxh3-128 digest of the framed identity."""
    framed = (framing(namespace, source) + event_id).encode("utf-8", "surrogatepass")
    return prefix + xxhash.xxh3_128_digest(framed)


def coordinates_head(topic: str, partition: int) -> str:
    """What the coordinates of every record of one partition begin with."""
    return f"{topic}:{partition}:"


def coordinates(topic: str, partition: int, offset: int) -> bytes:
    """A marker's value: the coordinates of the record that holds it."""
    return f"{coordinates_head(topic, partition)}{offset}".encode()


def pending_key(prefix: bytes, topic: str, partition: int) -> bytes:
    """Where the offset range a worker is about to insert for a partition is written down."""
    return prefix + f"~pending:{topic}:{partition}".encode()


def plain(topic: str) -> str:
    """A topic's storage key when no incarnation is known: its name."""
    return topic


class DedupKeys:
    """The dedup store's keys and values for one worker: every key starts with `prefix` and
    names topics by their storage key (`topic_key`, see sink.pipeline.topics). The pipeline
    speaks of topics by name and of records by `Coordinates`; this is where they become bytes.
    """

    def __init__(self, prefix: bytes, topic_key: Callable[[str], str] = plain) -> None:
        self.prefix = prefix
        self.topic_key = topic_key

    def identity(self, namespace: str, source: str, event_id: str) -> bytes:
        return identity_key(self.prefix, namespace, source, event_id)

    def head(self, topic: str, partition: int) -> str:
        """What the marker value of every record of one partition begins with."""
        return coordinates_head(self.topic_key(topic), partition)

    def marker(self, at: Coordinates) -> bytes:
        """The value of the marker a record holds: its coordinates."""
        return coordinates(self.topic_key(at.topic), at.partition, at.offset)

    def pending(self, topic: str, partition: int) -> bytes:
        return pending_key(self.prefix, self.topic_key(topic), partition)


class PendingRange(NamedTuple):
    """The offsets a worker is about to insert for one partition, and the event-time bounds
    (epoch seconds) of their rows, so a new owner knows where to look for them."""

    first: int
    last: int
    tmin: int
    tmax: int

    def encode(self) -> bytes:
        return f"{self.first}:{self.last}:{self.tmin}:{self.tmax}".encode()

    @staticmethod
    def parse(value: bytes) -> PendingRange:
        first, last, tmin, tmax = (int(x) for x in value.split(b":"))
        return PendingRange(first, last, tmin, tmax)
