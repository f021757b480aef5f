"""Kafka clients: the consumer, the dead-letter producer, topic creation, namespace lookup."""

from __future__ import annotations

import asyncio
import re
import ssl
import time
from collections.abc import Sequence
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.consumer import fetcher
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.structs import ConsumerRecord

from sink.config import Config, KafkaConfig
from sink.errors import KafkaUnavailable
from sink.pipeline.batch import Item, Reject


def security(kafka: KafkaConfig) -> dict[str, Any]:
    """Client settings for SASL and SSL, passed through to aiokafka."""
    opts: dict[str, Any] = {"security_protocol": kafka.security_protocol}
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=kafka.ssl_cafile)
        if kafka.ssl_certfile:
            context.load_cert_chain(kafka.ssl_certfile, kafka.ssl_keyfile)
        context.check_hostname = kafka.ssl_check_hostname
        opts["ssl_context"] = context
    if kafka.sasl_mechanism:
        opts["sasl_mechanism"] = kafka.sasl_mechanism
        opts["sasl_plain_username"] = kafka.sasl_username
        if kafka.sasl_password is not None:
            opts["sasl_plain_password"] = kafka.sasl_password.get_secret_value()
    return opts


def as_parsed(value: bytes | None) -> bytes | None:
    """The worker consumer's value deserializer. It changes no value; it marks a consumer
    whose fetches hand out each record as aiokafka parsed it (offset, timestamp, key, value,
    headers), without building a ConsumerRecord per record: the worker knows each fetched
    list's partition, and builds full records only for the few it dead-letters."""
    return value


class _PartitionRecords(fetcher.PartitionRecords):  # type: ignore[misc]
    def _consumer_record(self, tp: Any, record: Any) -> Any:
        if self._value_deserializer is as_parsed:
            return record
        return super()._consumer_record(tp, record)

    def __iter__(self) -> Any:
        # A fetch of the marked consumer is read (`for record in ...`) straight from
        # aiokafka's record generator, not through one __next__ call per record.
        records = getattr(self, "_records_iterator", None)
        if self._value_deserializer is as_parsed and records is not None:
            return records
        return self


def adapt_fetcher() -> bool:
    """Let aiokafka's fetcher hand out records as parsed to consumers marked with `as_parsed`
    (the fetcher builds its per-partition record lists from this module attribute). Consumers
    without the marker are untouched. Should aiokafka drop the hook, nothing is changed, the
    marker is a plain identity deserializer and fetches hand out ConsumerRecords again; the
    unit tests fail first. True when the adaptation is in place."""
    if fetcher.PartitionRecords is _PartitionRecords:
        return True
    if not callable(getattr(fetcher.PartitionRecords, "_consumer_record", None)):
        return False
    fetcher.PartitionRecords = _PartitionRecords
    return True


def full_record(topic: str, partition: int, record: Any) -> ConsumerRecord[bytes, bytes]:
    """A ConsumerRecord for a fetched record (either kind): what the dead-letter topic needs."""
    if isinstance(record, ConsumerRecord):
        return record
    key, value = record.key, record.value
    return ConsumerRecord(
        topic,
        partition,
        record.offset,
        record.timestamp,
        record.timestamp_type,
        key,
        value,
        record.checksum,
        len(key) if key is not None else -1,
        len(value) if value is not None else -1,
        tuple(record.headers),
    )


class RebuiltRecord:
    """Stands in for a consumer record when an event must be dead-lettered after it was
    decoded (ClickHouse refused its row): the value is the event rebuilt as CloudEvents JSON."""

    def __init__(self, item: Item) -> None:
        self.topic, self.partition, self.offset = item.topic, item.partition, item.offset
        self.key = item.subject.encode()
        self.headers: list[tuple[str, bytes]] = [("sink.rebuilt", b"1")]
        self.value = orjson.dumps(
            {
                "specversion": "1.0",
                "id": item.id,
                "source": item.source,
                "type": item.type,
                "subject": item.subject,
                "time": _rfc3339(item.time_ms),
                "data": orjson.Fragment(item.data),
            }
        )


def _rfc3339(ms: int) -> str:
    seconds, millis = divmod(ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def make_consumer(config: Config) -> AIOKafkaConsumer:
    k = config.kafka
    adapt_fetcher()
    return AIOKafkaConsumer(
        bootstrap_servers=k.bootstrap_servers,
        group_id=k.group_id,
        client_id=f"{k.client_id}-{config.worker.id}",
        enable_auto_commit=False,
        auto_offset_reset=k.auto_offset_reset,
        session_timeout_ms=int(k.session_timeout * 1000),
        heartbeat_interval_ms=int(k.heartbeat_interval * 1000),
        max_poll_interval_ms=int(k.max_poll_interval * 1000),
        # A revoke lands what the worker holds for up to drain_timeout: the group must wait
        # that long (and a little more) before it hands the partitions to another worker.
        rebalance_timeout_ms=int((config.worker.drain_timeout + 10) * 1000),
        fetch_max_bytes=k.fetch_max_bytes,
        max_partition_fetch_bytes=k.max_partition_fetch_bytes,
        isolation_level="read_committed",
        metadata_max_age_ms=30_000,
        value_deserializer=as_parsed,
        **security(k),
    )


def make_producer(config: Config) -> AIOKafkaProducer:
    k = config.kafka
    return AIOKafkaProducer(
        bootstrap_servers=k.bootstrap_servers,
        client_id=f"{k.client_id}-{config.worker.id}-dlq",
        acks="all",
        enable_idempotence=True,
        request_timeout_ms=30_000,
        **security(k),
    )


async def ensure_topic(config: Config, topic: str, partitions: int, replication: int) -> bool:
    """Create a topic if it is missing; True if it was created."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=config.kafka.bootstrap_servers, **security(config.kafka)
    )
    await admin.start()
    try:
        if topic in set(await admin.list_topics()):
            return False
        try:
            await admin.create_topics([NewTopic(topic, partitions, replication)])
        except TopicAlreadyExistsError:
            return False
        return True
    finally:
        await admin.close()


class Namespaces:
    """The customer namespace of a record: a configured header, else the topic regex's
    `namespace` group, else the topic name itself. Cached per topic."""

    def __init__(self, topics_regex: str, header: str | None) -> None:
        self._regex = re.compile(topics_regex)
        self._header = header
        self._by_topic: dict[str, str] = {}

    def of_topic(self, topic: str) -> str:
        namespace = self._by_topic.get(topic)
        if namespace is None:
            match = self._regex.match(topic)
            group = match.groupdict().get("namespace") if match else None
            namespace = self._by_topic[topic] = group or topic
        return namespace

    def of_record(self, topic: str, headers: Sequence[tuple[str, bytes]] | None) -> str:
        if self._header and headers:
            for name, value in headers:
                if name == self._header and value:
                    return value.decode("utf-8", "replace")
        return self.of_topic(topic)


class DeadLetters:
    """Sends rejected records to the dead-letter topic: original key and value, original
    headers, plus headers giving the reason and the original coordinates."""

    def __init__(self, producer: AIOKafkaProducer, topic: str) -> None:
        self._producer = producer
        self.topic = topic

    async def send(self, rejects: Sequence[Reject]) -> None:
        if not rejects:
            return
        try:
            futures = [
                await self._producer.send(
                    self.topic,
                    value=r.record.value,
                    key=r.record.key,
                    headers=[
                        *(r.record.headers or ()),
                        ("sink.error.code", r.reason.code.encode()),
                        ("sink.error.message", r.reason.message.encode("utf-8", "replace")),
                        ("sink.source.topic", r.record.topic.encode()),
                        ("sink.source.partition", str(r.record.partition).encode()),
                        ("sink.source.offset", str(r.record.offset).encode()),
                    ],
                )
                for r in rejects
            ]
            await asyncio.gather(*futures)
        except KafkaError as exc:
            raise KafkaUnavailable(f"dead-letter send failed: {exc}") from exc
