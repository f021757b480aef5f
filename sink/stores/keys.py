"""The dedup store's key and value formats, encoded and parsed here and nowhere else.

| entry | key | value |
|---|---|---|
| an identity (`dedup.layout: groups`) | a field of a group hash: key prefix + `~g` + group number (4 bytes), field the identity's last 8 digest bytes | claim time (4 bytes, epoch seconds) + the holder's coordinates |
| an identity (`dedup.layout: keys`) | prefix + xxh3-128 of `framing(namespace, source) + id` | the holder's coordinates |
| a partition's pending range | prefix + `~pending:topic:partition` | `first:last:tmin:tmax`: the offsets a worker is about to insert and their event-time bounds (epoch seconds) |
| the groups layout's start, and its sweep cursor | prefix + `~groups-since`, prefix + `~sweep` | epoch seconds; a hash `next`, `started` |

A record's coordinates are 16 bytes: the first 8 bytes of xxh3-64 of `topic:partition`, then
the offset (8 bytes, big-endian). `topic` is the topic's storage key (`sink.pipeline.topics`): a
topic deleted and created again under its name gets other keys. Markers written before the
coordinates were binary hold them as text, `topic:partition:offset` (`coordinates`); a record
whose binary coordinates those are still recognises its claim (`from_text`). The prefix is `dedup.key_prefix`.
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


def coordinates_head(topic: str, partition: int) -> bytes:
    """What the coordinates of every record of one partition begin with: 8 bytes of the hash of
    the partition's name."""
    return xxhash.xxh3_64_digest(f"{topic}:{partition}".encode("utf-8", "surrogatepass"))


def compact_coordinates(topic: str, partition: int, offset: int) -> bytes:
    """A marker's coordinates: the record that holds it, in 16 bytes."""
    return coordinates_head(topic, partition) + offset.to_bytes(8, "big")


def coordinates(topic: str, partition: int, offset: int) -> bytes:
    """The coordinates as markers held them before they were binary: `topic:partition:offset`."""
    return f"{topic}:{partition}:{offset}".encode()


def from_text(held: bytes) -> bytes | None:
    """The binary coordinates of a holder written as text (`coordinates`); None if `held` is
    not such text. Only a holder other than a record's own binary coordinates is read so: a
    binary one that happened to parse could then match the record only by a hash collision."""
    if held.count(b":") < 2:
        return None
    try:
        topic, partition, offset = held.decode("utf-8", "surrogatepass").rsplit(":", 2)
    except UnicodeDecodeError:
        return None
    if not (partition.isdigit() and offset.isdigit() and partition.isascii() and offset.isascii()):
        return None
    return compact_coordinates(topic, int(partition), int(offset))


CLAIM_TIME_SIZE = 4
FIELD_SIZE = 8
"""The bytes of an identity's digest that name it inside its group: the last 8 of its 16."""


def group_number(identity: bytes, groups: int) -> int:
    """The group an identity key (prefix + 16-byte digest) falls in: its first 8 digest bytes,
    modulo the number of groups."""
    return int.from_bytes(identity[-16:-8], "big") % groups


def group_key(prefix: bytes, number: int) -> bytes:
    return prefix + b"~g" + number.to_bytes(4, "big")


def group_value(claimed_at: int, coords: bytes) -> bytes:
    """A group field's value: when it was claimed (epoch seconds), then who holds it."""
    return claimed_at.to_bytes(CLAIM_TIME_SIZE, "big") + coords


def claimed_at(value: bytes) -> int:
    return int.from_bytes(value[:CLAIM_TIME_SIZE], "big")


def groups_since_key(prefix: bytes) -> bytes:
    """When the groups layout first claimed under this prefix (epoch seconds)."""
    return prefix + b"~groups-since"


def sweep_key(prefix: bytes) -> bytes:
    """The sweep's shared cursor: the next group to sweep and when the sweep round started."""
    return prefix + b"~sweep"


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

    def head(self, topic: str, partition: int) -> bytes:
        """What the coordinates of every record of one partition begin with."""
        return coordinates_head(self.topic_key(topic), partition)

    def marker(self, at: Coordinates) -> bytes:
        """The coordinates a record's marker holds."""
        return compact_coordinates(self.topic_key(at.topic), at.partition, at.offset)

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
