"""Hostile records through the whole path (Kafka -> running worker -> ClickHouse or the
dead-letter topic): random bytes, deep nesting, huge strings around `events.max_event_bytes`,
non-UTF-8, NaN/Infinity, integers beyond 64 bits, duplicate keys, timestamps at and past the
edges, control characters and SQL-looking strings in every field.

Every record must end up in exactly one place: stored, with exactly the fields that were sent
(compared with what Python's own json parser reads from the record, so nothing reached
ClickHouse altered or unescaped), or dead-lettered with its bytes, key and headers unchanged
and a reason. The worker never crashes; an oversized record is dead-lettered, not retried."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from sink.pipeline.decode import MAX_FIELD_CHARS, REASONS
from sink.stores.clickhouse.connection import ClickHouse
from tests.conftest import Services
from tests.faults.conftest import count, record_result
from tests.integration.conftest import SinkProcess
from tests.integration.workload import read_topic, wait_landed

pytestmark = pytest.mark.faults

MAX_EVENT_BYTES = 65_536
REQUIRED = {"specversion", "id", "source", "type", "subject", "time"}

ATOMS = [
    "'; DROP TABLE events; --",
    "'); DROP DATABASE default; --",
    "' OR '1'='1",
    "\\",
    "\\'",
    "\\\\'\"",
    "'",
    '"',
    "`events`",
    "\\N",
    "NULL",
    "\x00",
    "\x01\x02\x1f\x7f",
    "\x1b[31mred\x1b[0m",
    "\n\r\t\b\f",
    "\u2028\u2029",
    "\ufeff",
    "\u202egnp.exe",
    "é€𝄞😀",
    "%s%n{0}${jndi:x}",
    "<script>alert(1)</script>",
    " ",
    "0",
    "-0",
    "1e309",
    "\t\\t",
]


def hostile(rng: random.Random, limit: int = MAX_FIELD_CHARS) -> str:
    text = "".join(rng.choice(ATOMS) for _ in range(rng.randint(1, 4)))
    return text[:limit]


def hostile_value(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind == 0:
        return hostile(rng)
    if kind == 1:
        return rng.choice([0, -1, 2**63 - 1, -(2**63), 2**64 - 1, 10**18, 1])
    if kind == 2:
        return rng.choice([0.0, -0.0, 1e308, -1e-308, 0.1, 1.7976931348623157e308, 5e-324])
    if kind == 3:
        return rng.choice([True, False, None])
    if kind == 4:
        return ""
    if kind == 5:
        return hostile(rng) * rng.randint(1, 50)
    if kind == 6:
        return [hostile_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {hostile(rng, 40): hostile_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}


def event(n: int, rng: random.Random, **override: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "specversion": "1.0",
        # A unique part in every id keeps identities apart (this is not a dedup test).
        "id": (f"#{n}" + hostile(rng))[:MAX_FIELD_CHARS]
        if n % 2
        else (hostile(rng) + f"#{n}")[-MAX_FIELD_CHARS:],
        "source": hostile(rng),
        "type": hostile(rng),
        "subject": hostile(rng),
        "time": "2026-11-27T10:15:30.250Z",
        "data": {hostile(rng, 40): hostile_value(rng) for _ in range(rng.randint(0, 6))},
    }
    doc.update(override)
    return doc


def dumps(doc: Any, rng: random.Random) -> bytes:
    """JSON text with the escaping choices a hostile producer might make."""
    return json.dumps(doc, ensure_ascii=rng.random() < 0.5).encode()


def nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def sized(n: int, size: int) -> bytes:
    """A valid event of exactly `size` bytes."""
    doc = event(n, random.Random(n), data={"blob": ""})
    body = json.dumps(doc).encode()
    pad = size - len(body)
    assert pad >= 0
    doc["data"]["blob"] = "x" * pad
    value = json.dumps(doc).encode()
    assert len(value) == size
    return value


def generate(seed: int, n: int) -> list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]]:
    """(key, value, headers) of hostile records."""
    rng = random.Random(seed)
    out: list[tuple[bytes | None, bytes, list[tuple[str, bytes]]]] = []
    template = '{"specversion":"1.0","id":"%s","source":"s","type":"t","subject":"u","time":"%s"%s}'

    def raw(event_id: str, data: str, moment: str = "2026-01-01T00:00:00Z") -> bytes:
        return (template % (event_id, moment, data)).encode()

    fixed: list[bytes] = [
        # sizes around the limit: exactly at it lands, one byte over is dead-lettered
        sized(900_001, MAX_EVENT_BYTES - 1),
        sized(900_002, MAX_EVENT_BYTES),
        sized(900_003, MAX_EVENT_BYTES + 1),
        sized(900_004, MAX_EVENT_BYTES * 5),
        # NaN / Infinity / integers beyond 64 bits / big floats
        raw("nan", ',"data":{"x":NaN}'),
        raw("inf", ',"data":{"x":-Infinity}'),
        raw("u64max", ',"data":{"x":18446744073709551615}'),
        raw("u64over", ',"data":{"x":18446744073709551616}'),
        raw("i64under", ',"data":{"x":-9223372036854775809}'),
        raw("huge", ',"data":{"x":1' + "0" * 400 + "}"),
        raw("e400", ',"data":{"x":1e400}'),
        # duplicate keys (in the envelope and in data)
        raw("dupkeys", ',"data":{"k":1,"k":2},"id":"dup2"'),
        # deep nesting: inside data, and of the whole document
        raw("deep50", ',"data":' + nested(50)),
        raw("deep300", ',"data":' + nested(300)),
        nested(5000).encode(),
        b"[" * 100_000,
        # non-UTF-8 and broken escapes
        (template % ("bad\xff\xfeutf8", "2026-01-01T00:00:00Z", "")).encode("latin-1"),
        raw("lone\\ud800", ""),
        raw("pair\\ud83d\\ude00", ""),
        raw("ctl\x01raw", ""),
        b"\xef\xbb\xbf" + raw("bom", ""),
        b"",
        b"null",
        b'"just a string"',
        b'{"specversion":"1.0"}' + b"\x00" * 10,
    ]
    for moment in [
        "1970-01-01T00:00:00Z",
        "1969-12-31T23:59:59Z",
        "2106-02-07T06:28:15Z",
        "2106-02-07T06:28:16Z",
        "0001-01-01T00:00:00Z",
        "9999-12-31T23:59:59.999Z",
        "2026-02-30T00:00:00Z",
        "2026-11-27t10:15:30z",
        "2026-11-27T10:15:30.123456789+14:00",
        "2026-11-27T10:15:30-23:59",
        "2026-11-27T10:15:60Z",
        "2026-11-27 10:15:30Z",
        "2026-11-27T10:15:30",
        "+2026-11-27T10:15:30Z",
        "2026-11-27T10:15:30Z'; DROP TABLE events; --",
    ]:
        fixed.append(raw(f"time-{moment[:24]}", "", moment))
    for value in fixed:
        out.append((b"fixed", value, [("x-case", b"fixed")]))

    for i in range(n):
        roll = rng.random()
        headers = [("x-hostile", bytes(rng.randrange(256) for _ in range(rng.randrange(20))))]
        key: bytes | None = rng.choice([None, b"", hostile(rng).encode(), rng.randbytes(8)])
        if roll < 0.55:  # valid structure, hostile content everywhere
            value = dumps(event(i, rng), rng)
        elif roll < 0.65:  # a field of the wrong type or missing
            doc = event(i, rng)
            field = rng.choice(["id", "source", "type", "subject", "time", "specversion", "data"])
            doc[field] = rng.choice([None, 1, 1.5, [], {}, True, "", hostile_value(rng)])
            if rng.random() < 0.3:
                del doc[field]
            value = dumps(doc, rng)
        elif roll < 0.72:  # fields over the length limit
            doc = event(i, rng)
            doc[rng.choice(["id", "source", "type", "subject"])] = "x" * (MAX_FIELD_CHARS + 1)
            value = dumps(doc, rng)
        elif roll < 0.85:  # random bytes
            value = rng.randbytes(rng.randrange(1, 3000))
        elif roll < 0.93:  # a valid document cut short or with a flipped byte
            buf = bytearray(dumps(event(i, rng), rng))
            if rng.random() < 0.5:
                buf = buf[: rng.randrange(1, len(buf))]
            else:
                buf[rng.randrange(len(buf))] = rng.randrange(256)
            value = bytes(buf)
        else:  # data that is not an object
            value = dumps(event(i, rng, data=hostile_value(rng)), rng)
        out.append((key, value, headers))
    return out


def reference(value: bytes) -> dict[str, Any] | None:
    """What Python's json module reads from the record, if it is a CloudEvents-shaped object
    (the stored row must match it field by field)."""
    try:
        doc = json.loads(value.decode("utf-8-sig"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


def epoch_seconds(text: str) -> int:
    return math.floor(datetime.fromisoformat(text.upper().replace(" ", "T")).timestamp())


async def test_hostile_records_are_stored_exactly_or_dead_lettered_with_a_reason(
    services: Services,
    make_topics: Callable[..., Any],
    clickhouse_db: ClickHouse,
    sink_config: Callable[..., Path],
    run_sink: Callable[..., SinkProcess],
    uid: str,
) -> None:
    (topic,) = await make_topics(f"om_fuzz_{uid}", partitions=2)
    records = generate(seed=700, n=2500)
    proc = run_sink(
        sink_config(
            kafka={"topics_regex": rf"^om_(?P<namespace>.+)_{uid}$"},
            events={"max_event_bytes": MAX_EVENT_BYTES},
            batch={"max_rows": 500, "max_wait": "300ms", "max_in_flight": 5000},
        )
    )
    producer = AIOKafkaProducer(
        bootstrap_servers=services.kafka, acks="all", max_request_size=2 * 1024 * 1024
    )
    await producer.start()
    sent: dict[tuple[int, int], tuple[bytes | None, bytes, list[tuple[str, bytes]]]] = {}
    ends: dict[tuple[str, int], int] = {}
    try:
        for i, (key, value, headers) in enumerate(records):
            meta = await (
                await producer.send(topic, value=value, key=key, headers=headers, partition=i % 2)
            )
            sent[(meta.partition, meta.offset)] = (key, value, headers)
            tp = (topic, meta.partition)
            ends[tp] = max(ends.get(tp, 0), meta.offset + 1)
    finally:
        await producer.stop()

    await wait_landed(clickhouse_db, ends, timeout=180, alive=lambda: proc.running)
    rows = await clickhouse_db.query(
        "SELECT _partition, _offset, namespace, id, source, type, subject, toUInt32(time), "
        f"data, validation_error FROM {clickhouse_db.table('events')} WHERE _topic = '{topic}'"
    )
    stored: dict[tuple[int, int], tuple[Any, ...]] = {}
    for p, o, *fields in rows:
        assert (p, o) not in stored, f"offset {p}/{o} stored twice"
        stored[(p, o)] = tuple(fields)
    dlq = await read_topic(services.kafka, f"sink-{uid}.dlq", want=len(sent) - len(stored))
    dead: dict[tuple[int, int], Any] = {}
    for record in dlq:
        meta = dict(record.headers)
        assert meta["sink.source.topic"].decode() == topic
        at = (int(meta["sink.source.partition"]), int(meta["sink.source.offset"]))
        dead[at] = record

    reasons: dict[str, int] = {}
    for at, (key, value, headers) in sent.items():
        assert (at in stored) != (at in dead), f"record {at} {value[:80]!r}: stored and/or dead"
        if at in stored:
            ref = reference(value)
            assert ref is not None, f"stored a record Python cannot read: {value[:200]!r}"
            assert ref.keys() >= REQUIRED, f"stored {value[:300]!r}; Python reads {ref!r:.300}"
            namespace, id_, source, type_, subject, seconds, data, error = stored[at]
            assert (namespace, id_, source, type_, subject) == (
                "fuzz",
                ref["id"],
                ref["source"],
                ref["type"],
                ref["subject"],
            ), f"fields differ for {value[:200]!r}"
            assert seconds == epoch_seconds(ref["time"]), (ref["time"], seconds)
            assert json.loads(data) == (ref.get("data") or {}), value[:200]
            assert error == ""
            assert len(value) <= MAX_EVENT_BYTES
        else:
            record = dead[at]
            assert record.value == value and record.key == key
            got = list(record.headers)
            assert got[: len(headers)] == headers, "original headers not kept"
            extra = dict(got[len(headers) :])
            code = extra["sink.error.code"].decode()
            assert code in REASONS and extra["sink.error.message"]
            reasons[code] = reasons.get(code, 0) + 1
            if len(value) > MAX_EVENT_BYTES:
                assert code == "too_large"

    by_id = {
        ref["id"]: at
        for at, (_, v, _) in sent.items()
        if (ref := reference(v)) and isinstance(ref.get("id"), str)
    }
    # The edges that must land, and the ones that must not.
    must_land = ["u64max", "dup2", "deep50", "pair😀", "time-1970-01-01T00:00:00Z"]
    for event_id in must_land:
        assert by_id[event_id] in stored, f"{event_id} was not stored"
    for event_id in ["nan", "inf", "u64over", "i64under", "huge", "deep300", "lone\ud800"]:
        if event_id in by_id:
            assert by_id[event_id] in dead, f"{event_id} was stored"
    sizes = {len(v): at for at, (_, v, _) in sent.items()}
    assert sizes[MAX_EVENT_BYTES] in stored and sizes[MAX_EVENT_BYTES - 1] in stored
    assert sizes[MAX_EVENT_BYTES + 1] in dead and sizes[MAX_EVENT_BYTES * 5] in dead
    sql = [at for at, (_, v, _) in sent.items() if b"DROP TABLE" in v and at in stored]
    assert sql, "no SQL-looking record was stored"

    assert proc.running and count(proc, "task failed") == 0
    record_result(
        "hostile-input",
        records=len(sent),
        stored=len(stored),
        dead_lettered=len(dead),
        reasons=reasons,
        sql_looking_stored=len(sql),
    )
    assert proc.stop() == 0
