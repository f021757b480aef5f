"""Realistic usage events: CloudEvents JSON, 1,000 subjects spread over a few customer
namespaces (one topic each, several partitions, key = subject), with a share of duplicates
(exact resends, mostly to the same partition, some to another one, arriving up to a few
thousand records later so they often fall into another batch) and of invalid records.

Two shapes (`Spec.shape`):
- `flat`: about 250 bytes, `data` a flat object of four members.
- `binary`: the flat events in CloudEvents binary content mode: the attributes in `ce_`
  headers, `data` the record value, `content-type: application/json` (invalid records stay
  structured).
- `mixed`: 300-700 bytes, four event types of which three carry nested objects and arrays in
  `data` (token usage, label maps, line items, tags), long subjects with non-ASCII letters,
  read by the meters `MIXED_METERS` (nested property paths).

Generation is deterministic for a `Spec`: the insert-only ceiling regenerates exactly the rows
that were loaded, with the same Kafka coordinates, instead of reading them back."""

from __future__ import annotations

import heapq
import random
import time
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import orjson

CUSTOMERS = ("acme", "globex", "initech", "umbrella", "hooli", "stark", "wayne", "wonka")
ROUTES = ("/v1/chat", "/v1/embed", "/v1/images", "/v1/audio", "/v2/search")
REGIONS = ("eu1", "us1", "us2", "ap1")
TYPES = ("api.request", "llm.tokens", "gpu.seconds", "storage.bytes")

# Invalid records. None contains a tab, a newline or a backslash: the ClickHouse Kafka engine
# peer reads each message as one TSV String field (see peer.py).
INVALID = (
    b"not json at all #%d",
    b"[1, 2, 3, %d]",
    b'{"specversion":"1.0","id":"x-%d"}',
    b'{"specversion":"1.0","id":"b-%d","source":"s","type":"t","subject":"u","time":"yesterday"}',
    b'{"specversion":"1.0","id":%d,"source":"s","type":"t","subject":"u",'
    b'"time":"2026-01-01T00:00:00Z"}',
    b"\xff\xfe\x00garbage #%d",
)


SHAPES = ("flat", "mixed", "binary")

MIXED_METERS: list[dict[str, Any]] = [
    {"slug": "bench_tokens", "event_type": "llm.tokens", "aggregation": "SUM",
     "value_property": "tokens", "group_by": {"model": "model"}},
    {"slug": "bench_requests", "event_type": "api.request", "aggregation": "COUNT",
     "group_by": {"route": "route", "status": "status"}},
    {"slug": "bench_gpu_seconds", "event_type": "gpu.seconds", "aggregation": "SUM",
     "value_property": "seconds"},
    {"slug": "bench_stored_max", "event_type": "storage.bytes", "aggregation": "MAX",
     "value_property": "bytes", "group_by": {"class": "class"}},
]  # fmt: skip
"""The meters a sink run of the mixed workload is configured with, one per event type. Their
properties are top-level ones: ClickHouse 18.16 (the local stack's) reads no nested path (the
SQL for nested paths on current servers runs in tests/unit/test_current_engine.py)."""

MODELS = ("gpt-4.1-mini", "claude-sonnet-4", "llama-3.3-70b", "mistral-large")
TEAMS = ("search", "growth", "платформа", "données", "研究", "billing")
SKUS = ("img-hd", "img-sd", "tts-std", "stt-pro", "embed-3")
GPUS = ("a100", "h100", "l4")
NAMES = ("Müller", "Øster", "José", "Zoë", "Łukasz", "Ana-María", "Søren", "Nguyễn")


@dataclass(frozen=True)
class Spec:
    run: str
    """Run tag, part of every resource name."""
    kind: str = "events"
    """Topic suffix: `events` for the preloaded backlog, `lat<r>` for latency runs."""
    events: int = 1_000_000
    topics: int = 3
    partitions: int = 4
    subjects: int = 1000
    dup_share: float = 0.05
    invalid_share: float = 0.005
    seed: int = 1
    base_ms: int = 0
    """Event times are spread over the hour before this instant."""
    shape: str = "flat"
    """`flat` or `mixed` (see the module's docstring)."""

    @property
    def namespaces(self) -> tuple[str, ...]:
        return CUSTOMERS[: self.topics]

    @property
    def topic_names(self) -> list[str]:
        return [f"bench_{self.run}_{ns}_{self.kind}" for ns in self.namespaces]

    @property
    def topics_regex(self) -> str:
        return rf"^bench_{self.run}_(?P<namespace>[a-z0-9]+)_[a-z0-9]+$"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Record(NamedTuple):
    topic: int
    partition: int
    key: bytes
    value: bytes
    identity: bytes | None
    """`namespace\\tsource\\tid` of a new valid event; None for duplicates and invalid."""
    kind: int
    """NEW, DUP or BAD."""
    headers: tuple[tuple[str, bytes], ...] = ()
    """The record's headers (binary content mode's attributes)."""


NEW, DUP, BAD = 0, 1, 2
JSON_CONTENT = ("content-type", b"application/json")


def generate(spec: Spec) -> Iterator[Record]:
    """Exactly `spec.events` records, in production order."""
    rng = random.Random(spec.seed)
    rand = rng.random
    namespaces = spec.namespaces
    t = spec.topics
    n_subjects = spec.subjects
    mixed = spec.shape == "mixed"
    binary = spec.shape == "binary"
    if mixed:  # long, and non-ASCII (the key and the subject are its UTF-8 bytes)
        subjects = [
            f"org-{i % 97:02d}/user-{i:05d}-{NAMES[i % len(NAMES)]}-{'x' * (i % 23)}"
            for i in range(n_subjects)
        ]
    else:
        subjects = [f"customer-{i:04d}" for i in range(n_subjects)]
    keys = [s.encode() for s in subjects]
    partition_of = [zlib.crc32(k) % spec.partitions for k in keys]
    sources = [
        f"//gw.{namespaces[i % t]}.example/{REGIONS[i % len(REGIONS)]}" for i in range(n_subjects)
    ]
    types = [TYPES[i % len(TYPES)] for i in range(n_subjects)]
    id_prefix = f"{rng.getrandbits(32):08x}-{rng.getrandbits(16):04x}-4{rng.getrandbits(12):03x}-"
    base_s = (spec.base_ms or int(time.time() * 1000)) // 1000
    stamps = [time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(base_s - s)) for s in range(3600)]
    # A new event is followed by a duplicate with this probability, so duplicates make up
    # dup_share of all records.
    new_share = 1.0 - spec.dup_share - spec.invalid_share
    dup_after_new = spec.dup_share / new_share
    invalid_share = spec.invalid_share
    n_parts = spec.partitions
    pending: list[tuple[int, int, Record]] = []  # (due index, tiebreak, record)
    n_new = 0
    dumps = orjson.dumps
    for index in range(spec.events):
        if pending and pending[0][0] <= index:
            yield heapq.heappop(pending)[2]
            continue
        if rand() < invalid_share:
            i = int(rand() * n_subjects)
            value = INVALID[int(rand() * len(INVALID))] % index
            yield Record(i % t, partition_of[i], keys[i], value, None, BAD)
            continue
        n_new += 1
        i = int(rand() * n_subjects)
        ns_index = i % t
        source = sources[i]
        event_id = f"{id_prefix}{8 + int(rand() * 4):x}{int(rand() * 4096):03x}-{n_new:012x}"
        event = {
            "specversion": "1.0",
            "id": event_id,
            "source": source,
            "type": types[i],
            "subject": subjects[i],
            "time": f"{stamps[int(rand() * 3600)]}.{int(rand() * 1000):03d}Z",
            "data": mixed_data(types[i], rand)
            if mixed
            else {
                "route": ROUTES[int(rand() * len(ROUTES))],
                "status": 200 if rand() < 0.97 else 429,
                "tokens": int(rand() * 20_000),
                "ms": int(rand() * 2000),
            },
        }
        headers: tuple[tuple[str, bytes], ...] = ()
        if binary:
            value = dumps(event.pop("data"))
            headers = (*((f"ce_{k}", v.encode()) for k, v in event.items()), JSON_CONTENT)
        else:
            value = dumps(event)
        identity = f"{namespaces[ns_index]}\t{source}\t{event_id}".encode()
        record = Record(ns_index, partition_of[i], keys[i], value, identity, NEW, headers)
        yield record
        if rand() < dup_after_new:
            # A resend: usually the same partition (producer retry), sometimes another one.
            partition = record.partition
            if rand() < 0.2 and n_parts > 1:
                partition = (partition + 1 + int(rand() * (n_parts - 1))) % n_parts
            due = index + 1 + int(rand() * 5000)
            dup = Record(record.topic, partition, record.key, value, None, DUP, headers)
            heapq.heappush(pending, (due, index, dup))


def mixed_data(event_type: str, rand: Any) -> dict[str, Any]:
    """`data` of a mixed-shape event of `event_type`. No string holds a quote, backslash, tab
    or newline, and no member is named like a CloudEvents attribute (the Kafka engine peer
    reads each message as one TSV field and finds the attributes by name, see peer.py)."""
    trace = f"{int(rand() * 2**64):016x}{int(rand() * 2**64):016x}"
    if event_type == "llm.tokens":
        tokens_in, tokens_out = int(rand() * 8000), int(rand() * 2000)
        return {
            "model": MODELS[int(rand() * len(MODELS))],
            "tokens": tokens_in + tokens_out,
            "usage": {
                "input_tokens": tokens_in,
                "output_tokens": tokens_out,
                "cache": {"read": int(rand() * 4000), "write": int(rand() * 500)},
            },
            "labels": {
                "team": TEAMS[int(rand() * len(TEAMS))],
                "env": "prod" if rand() < 0.9 else "staging",
                "region": REGIONS[int(rand() * len(REGIONS))],
            },
            "trace": trace,
            "stop": ["end_turn", "max_tokens"][int(rand() * 2)],
        }
    if event_type == "api.request":
        return {
            "route": ROUTES[int(rand() * len(ROUTES))],
            "status": 200 if rand() < 0.97 else 429,
            "ms": round(rand() * 2000, 3),
            "client": {"sdk": "python", "version": f"1.{int(rand() * 40)}.0", "ip": "10.0.0.1"},
            "items": [
                {"sku": SKUS[int(rand() * len(SKUS))], "qty": 1 + int(rand() * 9)}
                for _ in range(1 + int(rand() * 6))
            ],
            "trace": trace,
        }
    if event_type == "gpu.seconds":
        return {
            "seconds": round(rand() * 3600, 2),
            "gpu": {"kind": GPUS[int(rand() * len(GPUS))], "count": 1 + int(rand() * 8)},
            "job": {
                "name": f"train-{int(rand() * 1000):03d}-épreuve",
                "tags": ["batch", "eu" if rand() < 0.5 else "us", f"p{int(rand() * 9)}"],
            },
            "trace": trace,
        }
    return {  # storage.bytes: flat, with a long text member
        "bytes": int(rand() * 2**40),
        "bucket": f"bucket-{int(rand() * 100):03d}",
        "class": "standard" if rand() < 0.8 else "archive",
        "note": "snapshot " + trace * (1 + int(rand() * 4)),
    }


@dataclass
class Loaded:
    """What was produced and what must come out of it."""

    spec: Spec
    ends: dict[tuple[str, int], int] = field(default_factory=dict)
    records: int = 0
    new: int = 0
    duplicates: int = 0
    invalid: int = 0
    nbytes: int = 0
    expected: set[bytes] = field(default_factory=set)
    load_seconds: float = 0.0
    generate_seconds: float = 0.0
    produce_ms: int = 0

    @property
    def total(self) -> int:
        return sum(self.ends.values())

    def stats(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "unique_valid": self.new,
            "duplicates": self.duplicates,
            "invalid": self.invalid,
            "bytes": self.nbytes,
            "avg_record_bytes": round(self.nbytes / max(1, self.records), 1),
            "topics": self.spec.topic_names,
            "partitions_per_topic": self.spec.partitions,
            "subjects": self.spec.subjects,
            "load_seconds": round(self.load_seconds, 2),
            "generate_seconds": round(self.generate_seconds, 2),
            "load_records_per_s": round(self.records / max(1e-9, self.load_seconds)),
        }


async def load(spec: Spec, bootstrap: str, keep_expected: bool = True) -> Loaded:
    """Create the topics and produce every record. Built batches are handed to the producer
    directly (`create_batch`/`send_batch`): several times faster than `send` per record."""
    from aiokafka import AIOKafkaProducer

    from benchmarks.common import create_topics, end_offsets

    await create_topics(bootstrap, spec.topic_names, spec.partitions)
    topics = spec.topic_names
    out = Loaded(spec)
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        acks=1,
        linger_ms=20,
        max_batch_size=512 * 1024,
        max_request_size=8 * 1024 * 1024,
        request_timeout_ms=60_000,
    )
    await producer.start()
    started = time.monotonic()
    gen_seconds = 0.0
    try:
        builders: dict[tuple[int, int], Any] = {}
        futures: list[Any] = []
        counts: dict[tuple[int, int], int] = {}

        async def flush(tp: tuple[int, int]) -> None:
            builder = builders.pop(tp)
            futures.append(await producer.send_batch(builder, topics[tp[0]], partition=tp[1]))
            if len(futures) >= 64:
                await _settle(futures)

        t_gen = time.monotonic()
        for record in generate(spec):
            tp = (record.topic, record.partition)
            builder = builders.get(tp)
            if builder is None:
                builder = builders[tp] = producer.create_batch()
            key, value, headers = record.key, record.value, list(record.headers)
            if builder.append(key=key, value=value, timestamp=None, headers=headers) is None:
                gen_seconds += time.monotonic() - t_gen
                await flush(tp)
                builder = builders[tp] = producer.create_batch()
                builder.append(key=key, value=value, timestamp=None, headers=headers)
                t_gen = time.monotonic()
            counts[tp] = counts.get(tp, 0) + 1
            out.records += 1
            out.nbytes += len(record.value) + sum(len(k) + len(v) for k, v in record.headers)
            if record.kind == NEW:
                out.new += 1
                if keep_expected:
                    out.expected.add(record.identity)  # type: ignore[arg-type]
            elif record.kind == DUP:
                out.duplicates += 1
            else:
                out.invalid += 1
        gen_seconds += time.monotonic() - t_gen
        for tp in list(builders):
            await flush(tp)
        await _settle(futures)
        await producer.flush()
    finally:
        await producer.stop()
    out.load_seconds = time.monotonic() - started
    out.generate_seconds = gen_seconds
    out.produce_ms = int(time.time() * 1000)
    out.ends = await end_offsets(bootstrap, topics)
    want = {(topics[t], p): c for (t, p), c in counts.items()}
    got = {tp: e for tp, e in out.ends.items() if e}
    if got != want:
        raise RuntimeError(f"produced offsets differ from what was sent: {got} != {want}")
    return out


async def _settle(futures: list[Any]) -> None:
    import asyncio

    await asyncio.gather(*futures)
    futures.clear()


def coordinates(spec: Spec) -> Iterator[tuple[Record, str, int]]:
    """The generated records with the offset each got (topics start empty)."""
    topics = spec.topic_names
    next_offset: dict[tuple[int, int], int] = {}
    for record in generate(spec):
        tp = (record.topic, record.partition)
        offset = next_offset.get(tp, 0)
        next_offset[tp] = offset + 1
        yield record, topics[record.topic], offset
