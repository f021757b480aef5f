"""Topic incarnations: a topic deleted and created again under the same name is another topic.

Landed offsets, raw-row coordinates, dedup markers and pending ranges name a topic. Kafka
gives each topic a unique id (KIP-516, brokers 2.8+) that a recreated topic does not share.
sink records the ids it has seen per name in ClickHouse and stores each incarnation under a
*storage key*: the plain name for the first one (so tables written before this existed keep
their meaning), `name~<id prefix>` for every later one. Offsets of a recreated topic then
start empty, and nothing of the old topic is mistaken for the new.

aiokafka speaks Metadata only up to v5, which carries no topic id; `TopicIds` sends v12.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from io import BytesIO
from typing import Any

from aiokafka.errors import KafkaError
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.types import (
    AbstractType,
    Boolean,
    CompactArray,
    CompactString,
    Int16,
    Int32,
    Schema,
    TaggedFields,
)

from sink.errors import KafkaUnavailable
from sink.stores.clickhouse.connection import Database
from sink.stores.clickhouse.sql import quote

_ZERO_ID = bytes(16)


class _Uuid(AbstractType[bytes]):  # type: ignore[misc]
    @classmethod
    def encode(cls, value: bytes) -> bytes:
        return value

    @classmethod
    def decode(cls, data: BytesIO) -> bytes:
        value = data.read(16)
        if len(value) != 16:
            raise ValueError("Buffer underrun decoding a UUID")
        return value


class _MetadataResponseV12(Response):  # type: ignore[misc]
    API_KEY = 3
    API_VERSION = 12
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "brokers",
            CompactArray(
                ("node_id", Int32),
                ("host", CompactString("utf-8")),
                ("port", Int32),
                ("rack", CompactString("utf-8")),
                ("tags", TaggedFields),
            ),
        ),
        ("cluster_id", CompactString("utf-8")),
        ("controller_id", Int32),
        (
            "topics",
            CompactArray(
                ("error_code", Int16),
                ("name", CompactString("utf-8")),
                ("topic_id", _Uuid),
                ("is_internal", Boolean),
                (
                    "partitions",
                    CompactArray(
                        ("error_code", Int16),
                        ("partition_index", Int32),
                        ("leader_id", Int32),
                        ("leader_epoch", Int32),
                        ("replica_nodes", CompactArray(Int32)),
                        ("isr_nodes", CompactArray(Int32)),
                        ("offline_replicas", CompactArray(Int32)),
                        ("tags", TaggedFields),
                    ),
                ),
                ("topic_authorized_operations", Int32),
                ("tags", TaggedFields),
            ),
        ),
        ("tags", TaggedFields),
    )


class _MetadataRequestV12(RequestStruct):  # type: ignore[misc]
    FLEXIBLE_VERSION = True
    API_KEY = 3
    API_VERSION = 12
    RESPONSE_TYPE = _MetadataResponseV12
    SCHEMA = Schema(
        (
            "topics",
            CompactArray(
                ("topic_id", _Uuid), ("name", CompactString("utf-8")), ("tags", TaggedFields)
            ),
        ),
        ("allow_auto_topic_creation", Boolean),
        ("include_topic_authorized_operations", Boolean),
        ("tags", TaggedFields),
    )


class TopicIdsRequest(Request[_MetadataRequestV12]):  # type: ignore[misc]
    """Metadata v12 for the named topics, for their ids."""

    API_KEY = 3

    def __init__(self, topics: Sequence[str]) -> None:
        self._topics = list(topics)

    def build(self, request_struct_class: type[_MetadataRequestV12]) -> _MetadataRequestV12:
        return request_struct_class(
            [(_ZERO_ID, name, {}) for name in self._topics], False, False, {}
        )


async def topic_ids(client: Any, topics: Sequence[str]) -> dict[str, str] | None:
    """Topic name -> id (32 hex digits) for the named topics that exist; None when the
    broker has no topic ids (Metadata v12 unsupported). `client` is an aiokafka client."""
    if not topics:
        return {}
    try:
        node = client.get_random_node()
        response = await client.send(node, TopicIdsRequest(topics))
    except NotImplementedError:
        return None  # the broker's Metadata versions stop below 12: no topic ids
    except (KafkaError, OSError) as exc:
        raise KafkaUnavailable(f"topic metadata: {exc}") from exc
    ids = {}
    for error_code, name, topic_id, *_ in response.topics:
        if error_code == 0 and name and topic_id != _ZERO_ID:
            ids[name] = topic_id.hex()
    return ids


def storage_key(name: str, topic_id: str, known: Mapping[str, str]) -> str:
    """The storage key of incarnation `topic_id` of `name`, given the incarnations seen
    before (id -> key): the first keeps the plain name, later ones get the id's prefix."""
    if topic_id in known:
        return known[topic_id]
    if not known:
        return name
    return f"{name}~{topic_id[:12]}"


class TopicKeys:
    """Kafka topic name <-> storage key, for the topics this worker holds."""

    def __init__(self, ch: Database | None, table: str) -> None:
        self.ch = ch
        self.table = table
        self._keys: dict[str, str] = {}
        self._names: dict[str, str] = {}

    def key(self, name: str) -> str:
        return self._keys.get(name, name)

    def name(self, key: str) -> str:
        return self._names.get(key, key)

    async def resolve(self, ids: Mapping[str, str], names: Iterable[str]) -> dict[str, str]:
        """Settle the storage keys of `names` given their current ids (a name missing from
        `ids` keeps its plain name). Records new incarnations. Returns the names whose key
        changed."""
        names = sorted(set(names))
        with_id = [n for n in names if n in ids]
        seen: dict[str, dict[str, str]] = {n: {} for n in with_id}
        if with_id and self.ch is not None:
            rows = await self.ch.query(
                f"SELECT topic, topic_id, any(storage_key), min(seen_at) "
                f"FROM {self.ch.table(self.table)} "
                f"WHERE topic IN ({', '.join(quote(n) for n in with_id)}) "
                f"GROUP BY topic, topic_id ORDER BY topic, min(seen_at), topic_id"
            )
            for topic, topic_id, key, _ in rows:
                seen[str(topic)][str(topic_id)] = str(key)
        new: list[tuple[str, str, str]] = []
        changed = {}
        for name in names:
            topic_id = ids.get(name)
            key = name if topic_id is None else storage_key(name, topic_id, seen[name])
            if topic_id is not None and topic_id not in seen[name]:
                new.append((name, topic_id, key))
            if self.key(name) != key:
                changed[name] = key
            self._names.pop(self.key(name), None)
            self._keys[name] = key
            self._names[key] = name
        if new and self.ch is not None:
            await self.ch.insert_columns(
                self.table,
                ("topic", "topic_id", "storage_key"),
                [[n for n, _, _ in new], [i for _, i, _ in new], [k for _, _, k in new]],
            )
        return changed
